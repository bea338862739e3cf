"""The records every stage agrees on: data rows, model / data / alignment specs, the store's
own description, and the configs of `dump`, `train`, `eval` and `demo`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .base import ConfigError, Record

__all__ = [
    "SCHEMA_VERSION",
    "DEFAULT_TEMPLATE",
    "Example",
    "ModelSpec",
    "SyntheticSpec",
    "DataSpec",
    "AlignSpec",
    "KVGeometry",
    "StoreSpec",
    "TeacherSpec",
    "LatentSpec",
    "DumpTask",
    "DumpConfig",
    "SlurmSpec",
    "JobsConfig",
    "CalibrateConfig",
    "TrainConfig",
    "EvalConfig",
    "DemoConfig",
    "CompareConfig",
]

# Bump when the on-disk store layout changes; readers refuse stores of another version.
SCHEMA_VERSION = 2  # 2: every chunk carries a crc32c and is always written

# The prompt / reasoning / answer segments are the three placeholders, in this order; the
# rendered text's character spans per segment come from where they are substituted.
DEFAULT_TEMPLATE = "Question: {question}\nReasoning:\n{reasoning}\n#### {answer}"

Dtype = Literal["float32", "bfloat16", "float16"]
# How the store holds K/V: float16 / float32 as is, bfloat16 as its bit pattern (uint16),
# int8 / int4 quantised KIVI style (keys per channel, values per token) with scales beside;
# see store/codecs.py for the exact layout and the dequantisation formula.
KVDtype = Literal["float16", "float32", "bfloat16", "int8", "int4"]


@dataclass
class Example(Record):
    """One data row: a question, its gold reasoning trace and its final answer."""

    id: str
    question: str
    reasoning: str
    answer: str

    def validate(self) -> None:
        if not self.id:
            raise ConfigError("Example.id: must be a non-empty string")


@dataclass
class ModelSpec(Record):
    """A model to load with `from_pretrained`: a hub id or a local directory."""

    name_or_path: str
    revision: str | None = None
    dtype: Dtype = "float32"
    prompt_template: str = DEFAULT_TEMPLATE
    name: str | None = None  # short name in the store; default: last path component

    def validate(self) -> None:
        pos = [self.prompt_template.find("{" + k + "}") for k in ("question", "reasoning", "answer")]
        if min(pos) < 0 or pos != sorted(pos):
            raise ConfigError(
                "ModelSpec.prompt_template: must contain {question}, {reasoning} and {answer} "
                f"in that order, got {self.prompt_template!r}"
            )
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"ModelSpec.name: {self.name!r} may hold only letters, digits, '_', '.', '-'")

    @property
    def short_name(self) -> str:
        if self.name:
            return self.name
        base = os.path.basename(os.path.normpath(self.name_or_path))
        return re.sub(r"[^A-Za-z0-9_.-]", "-", base) or "model"


@dataclass
class SyntheticSpec(Record):
    """The built-in multi-step arithmetic word problems (deterministic by seed)."""

    n_train: int = 4000
    n_test: int = 200
    seed: int = 0
    style: Literal["sentences", "equations"] = "equations"
    min_steps: int = 2
    max_steps: int = 2
    max_number: int = 9

    def validate(self) -> None:
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(f"SyntheticSpec: n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"SyntheticSpec: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_number < 2:
            raise ConfigError(f"SyntheticSpec.max_number: must be >= 2, got {self.max_number}")


@dataclass
class DataSpec(Record):
    """Where rows come from: `synthetic`, a local .jsonl/.parquet (GSM8K format), or a local
    directory / hub id loaded with `datasets.load_dataset`."""

    source: str = "synthetic"
    split: str = "train"
    config_name: str | None = None  # hub data set config, e.g. "main" for openai/gsm8k
    limit: int | None = None  # first N rows after loading
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"DataSpec.limit: must be >= 1 or null, got {self.limit}")


@dataclass
class AlignSpec(Record):
    """How a teacher's KV is put onto the student's geometry.

    time_map "auto" picks from the data: identity (same tokenizer, same rendered text),
    char_overlap (same text, other tokenizer: IoU of character spans), or segment_linear
    (other text, e.g. another prompt template or reasoning style: linear resampling within
    each prompt / reasoning / answer segment). The store records the choice."""

    # "ratio" (l_s * (L_t - 1) / (L_s - 1), interpolated), or a layermap.json written by
    # `kvdistill align calibrate` (CKA top-k)
    layer_map: str = "ratio"
    time_map: Literal["auto", "identity", "char_overlap", "segment_linear"] = "auto"
    keys: Literal["pre_rope"] = "pre_rope"  # see DESIGN.md "Why pre-RoPE keys"
    projection: str | None = None  # a PCA .npz from `kvdistill align calibrate --pca D`

    def validate(self) -> None:
        if self.layer_map != "ratio" and not self.layer_map.endswith(".json"):
            raise ConfigError(f"AlignSpec.layer_map: 'ratio' or a layermap .json file, got {self.layer_map!r}")


@dataclass
class KVGeometry(Record):
    """A model's KV geometry, read from its config: width per layer is D = H * d."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def validate(self) -> None:
        self.check_min(1, "num_layers", "num_kv_heads", "head_dim")

    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class StoreSpec(Record):
    """The store's root record: what every shard of every teacher was aligned onto."""

    student: ModelSpec
    geometry: KVGeometry
    tokenizer_fingerprint: str
    data: DataSpec
    data_fingerprint: str
    num_shards: int
    kv_dtype: KVDtype = "float16"  # the store's codec ...
    teacher_kv_dtype: dict[str, KVDtype] = field(default_factory=dict)  # ... and per-teacher overrides
    backend: Literal["zarr", "webdataset"] = "zarr"  # how shards are stored (metadata is zarr JSON either way)
    compression_level: int = 1  # blosc-zstd level of K/V chunks (0-9); each zarr array records its own
    blosc_shuffle: Literal["byte", "bit"] = "byte"  # blosc's shuffle filter of the K/V chunks
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> None:
        self.check_min(1, "num_shards")
        if not 0 <= self.compression_level <= 9:
            raise ConfigError(f"StoreSpec.compression_level: blosc levels are 0 (none) to 9, got {self.compression_level}")

    def codec(self, teacher: str) -> str:
        return self.teacher_kv_dtype.get(teacher, self.kv_dtype)


@dataclass
class LatentSpec(Record):
    """KaVa latent mode at dump time: the teacher's reasoning KV compressed to `slots` tokens
    per layer and KV head with R-KV scores `lam * importance + (1 - lam) * redundancy`
    (dump/rkv.py), and optionally its last hidden state before the answer (CODI)."""

    slots: int = 24  # M: latent tokens, i.e. kept reasoning positions per (layer, KV head)
    lam: float = 0.1  # weight of attention importance against redundancy (R-KV's lambda)
    codi_hidden: bool = True  # also store the final-norm hidden state before the first answer token

    def validate(self) -> None:
        if self.slots < 1:
            raise ConfigError(f"LatentSpec.slots: must be >= 1, got {self.slots}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"LatentSpec.lam: must lie in [0, 1], got {self.lam}")


@dataclass
class TeacherSpec(Record):
    """One teacher's record in the store: model, alignment as resolved, and what is stored."""

    name: str
    model: ModelSpec
    geometry: KVGeometry  # the teacher's own
    align: AlignSpec  # as configured
    time_map: Literal["identity", "char_overlap", "segment_linear"]  # as resolved
    layer_map: list[list[float]]  # [L_s][L_t] weights; row l_s mixes teacher layers
    width: int  # stored K/V width: geometry.width, or the PCA dimension
    fingerprint: str
    kv_dtype: KVDtype = "float16"  # this teacher's codec
    layer_similarity: list[list[float]] | None = None  # [L_s][L_t] CKA, when calibrated
    projection: dict[str, Any] | None = None  # PCA: dim and explained variance, when used
    latent: LatentSpec | None = None  # compressed reasoning KV stored per sample (latent_* arrays)

    def validate(self) -> None:
        self.check_min(1, "width")


@dataclass(kw_only=True)
class DumpTask(Record):
    """Everything a dump array task needs except which teacher and which shard: the part the
    tasks of one job array share (see JobsConfig)."""

    student: ModelSpec
    store: str
    data: DataSpec = field(default_factory=DataSpec)
    num_shards: int = 1
    batch_size: int = 16
    max_len: int = 1024
    on_too_long: Literal["error", "skip"] = "error"
    align: AlignSpec = field(default_factory=AlignSpec)
    kv_dtype: KVDtype = "float16"  # codec of every teacher ...
    teacher_kv_dtype: dict[str, KVDtype] = field(default_factory=dict)  # ... unless named here
    backend: Literal["zarr", "webdataset"] = "zarr"  # webdataset: one .tar per task (float16 / float32)
    # blosc-zstd level of the K/V chunks, 0 (none) to 9. Level 1 compresses ~4x faster than 3
    # (~420 vs ~90 MB/s a core) for 1-5% more bytes: at 3 the writer, not the forward, would bound
    # a GPU dump (bench/store.py, BENCHMARKS.md).
    compression_level: int = 1
    # blosc's filter before zstd: "byte" groups the bytes of each value (the exponents of 16-bit
    # floats), "bit" their bits. At level 1 on a trained teacher's K/V (bench/store.py): byte is
    # smaller for float16 / bfloat16 / int4 (1.42x / 1.88x / 3.92x vs 1.40x / 1.78x / 3.88x),
    # bit for int8 (2.31x vs 2.17x).
    blosc_shuffle: Literal["byte", "bit"] = "byte"
    device: str = "auto"
    latent: LatentSpec | None = None  # also store R-KV compressed reasoning KV (KaVa latent mode)
    # Another live writer already owns this (teacher, shard) (a duplicated or requeued array
    # task): "fail" exits at once naming the owner; "wait" blocks until it finishes or dies.
    on_busy: Literal["fail", "wait"] = "fail"
    # A dump that would write 0 samples (empty data file, everything skipped) is an error
    # unless allowed: an empty shard is almost always a wrong path or filter.
    allow_empty: bool = False

    def validate(self) -> None:
        if self.num_shards < 1:
            raise ConfigError(f"{type(self).__name__}.num_shards: must be >= 1, got {self.num_shards}")
        if self.batch_size < 1 or self.max_len < 1:
            raise ConfigError(f"{type(self).__name__}: batch_size and max_len must be >= 1")
        if not 0 <= self.compression_level <= 9:
            raise ConfigError(f"{type(self).__name__}.compression_level: blosc levels are 0 (none) to 9, got {self.compression_level}")
        if self.backend == "webdataset" and (self.compression_level, self.blosc_shuffle) != (1, "byte"):
            raise ConfigError(
                f"{type(self).__name__}.compression_level / blosc_shuffle: webdataset tars store K/V uncompressed, so level "
                f"{self.compression_level} / {self.blosc_shuffle} shuffle would be ignored; drop them, or use backend zarr"
            )


@dataclass(kw_only=True)
class DumpConfig(DumpTask):
    """`kvdistill dump`: one array task = one teacher x one shard of the data set."""

    teacher: ModelSpec
    shard: int = 0

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"DumpConfig.shard: need 0 <= shard < num_shards, got {self.shard} of {self.num_shards}")


@dataclass
class SlurmSpec(Record):
    """sbatch resources of one job (array task, finalize or training)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus: int = 1  # per node (--gres=gpu:N); 0 for CPU-only jobs
    cpus: int = 8  # --cpus-per-task
    mem: str = "64G"
    time: str = "04:00:00"
    requeue: bool = True  # preempted tasks come back and finish their shard; training also requeues itself on SIGUSR1
    max_parallel: int | None = None  # array throttle: --array=0-N%P
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. "--constraint=a100"
    # training only: SIGUSR1 this many seconds before the time limit (--signal=B:USR1@N), time
    # to finish a step and write a checkpoint; 0: no signal (then the limit's SIGTERM saves, within KillWait)
    signal_seconds: int = 300

    def validate(self) -> None:
        self.check_min(1, "nodes", "cpus", "max_parallel")
        self.check_min(0, "gpus")  # 0: a CPU-only job
        if not 0 <= self.signal_seconds <= 65535:  # sbatch's range
            raise ConfigError(f"SlurmSpec.signal_seconds: must lie in [0, 65535], got {self.signal_seconds}")

    def time_seconds(self) -> int | None:
        """`time` in seconds (sbatch's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None when unlimited."""
        text = str(self.time).strip()
        if text.upper() in ("UNLIMITED", "INFINITE", "-1"):
            return None
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not m:
            raise ConfigError(f"SlurmSpec.time: {self.time!r} is not an sbatch time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
        days, a, b, c = m.groups()
        if days is not None:  # D-H, D-H:M, D-H:M:S
            parts = [int(a), int(b or 0), int(c or 0)]
            return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
        if c is not None:  # H:M:S
            return int(a) * 3600 + int(b) * 60 + int(c)
        return int(a) * 60 + int(b or 0)  # M or M:S


@dataclass
class JobsConfig(Record):
    """`kvdistill jobs slurm | local | status`: every teacher x shard of one store, plus the
    finalize step and optionally the student's training job after it."""

    teachers: list[ModelSpec]
    dump: DumpTask
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    jobs_dir: str = "kvdistill-jobs"  # sbatch scripts, per-teacher dump configs, logs
    workers: int = 1  # `kvdistill jobs local`: processes on this machine
    train: TrainConfig | None = None
    train_slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self) -> None:
        if not self.teachers:
            raise ConfigError("JobsConfig.teachers: list at least one teacher")
        names = [t.short_name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"JobsConfig.teachers: names {dup} repeat; give each teacher a distinct `name`")
        if self.workers < 1:
            raise ConfigError(f"JobsConfig.workers: must be >= 1, got {self.workers}")
        limit = self.train_slurm.time_seconds() if self.train is not None and self.train_slurm.signal_seconds else None
        if limit is not None and self.train_slurm.signal_seconds >= limit:
            raise ConfigError(
                f"JobsConfig.train_slurm.signal_seconds: {self.train_slurm.signal_seconds} s is not before the time limit "
                f"{self.train_slurm.time} ({limit} s); lower it or raise train_slurm.time"
            )

    def task(self, teacher: ModelSpec, shard: int) -> DumpConfig:
        return DumpConfig(teacher=teacher, shard=shard, **{f: getattr(self.dump, f) for f in _fields(DumpTask)})

    def tasks(self) -> list[DumpConfig]:
        """Array order: task id = teacher_index * num_shards + shard."""
        return [self.task(t, i) for t in self.teachers for i in range(self.dump.num_shards)]


def _fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass
class CalibrateConfig(Record):
    """`kvdistill align calibrate`: a CKA layer map (and optionally a PCA projection) for one
    teacher and student, from a calibration sample."""

    teacher: ModelSpec
    student: ModelSpec
    data: DataSpec = field(default_factory=DataSpec)
    samples: int = 64
    top_k: int = 2
    out: str = "layermap.json"
    pca: int | None = None  # fit a D-dim PCA per layer of the layer-mapped teacher K and V
    time_map: Literal["auto", "identity", "char_overlap", "segment_linear"] = "auto"
    batch_size: int = 8
    device: str = "auto"

    def validate(self) -> None:
        if self.samples < 1 or self.top_k < 1:
            raise ConfigError("CalibrateConfig: samples and top_k must be >= 1")
        if self.pca is not None and self.pca < 1:
            raise ConfigError(f"CalibrateConfig.pca: must be >= 1 or null, got {self.pca}")
        self.check_min(1, "batch_size")


@dataclass
class TrainConfig(Record):
    """`kvdistill train`: a student trained from the store; no teacher is loaded."""

    store: str
    student: ModelSpec
    out: str
    teachers: list[str] | None = None  # default: every teacher in the store
    teacher_weights: dict[str, float] | None = None  # fixed fusion; default equal
    # fixed: teacher_weights; similarity: per token, softmax of cosine / temperature;
    # router: a small MLP on the student's pooled last hidden state, softmax per sample
    fusion: Literal["fixed", "similarity", "router"] = "fixed"
    fusion_temperature: float = 0.1
    router_groups: int = 1  # 1: one weight vector per sample; 3: one per shallow / middle / deep third of the layers
    router_hidden: int = 64  # width of the router MLP's hidden layer
    router_entropy_weight: float = 0.01  # loss -= weight * entropy: > 0 rewards spreading over teachers
    router_lr: float = 1e-3
    # flat: one D_t x D_s map per layer; headwise: teacher kv-head mixer + per-head d_t x d_s map
    adapter: Literal["flat", "headwise"] = "flat"
    kv_attn_weight: Literal["none", "student"] = "none"  # student: weight tokens by the attention they receive
    kv_attn_warmup_steps: int = 1000  # linear warm-up from uniform token weights
    cka_weight: float = 0.05  # 1 - debiased linear CKA of student K|V and the fused target (mode cot; latent mode has no CKA term)
    cka_layers: Literal["middle", "last"] | list[int] = "middle"
    layer_anneal_steps: int = 0  # > 0: KV loss phases in deeper layers linearly over these steps
    kv_weight: float = 1.0  # 0 gives the CE-only baseline
    ce_weight: float = 1.0
    kv_norm: Literal["layer_std", "none"] = "layer_std"
    kv_loss: Literal["mse", "smooth_l1", "cosine"] = "mse"
    lora_r: int = 0  # > 0: train LoRA adapters (peft) instead of every weight
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 1e-3
    adapter_lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16  # per device and micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step: effective batch = batch_size x this x processes
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (less memory, ~30% more compute)
    max_steps: int = 200  # optimizer steps
    num_train_epochs: float | None = None  # when set: this many passes over the training shards, instead of max_steps
    warmup_steps: int = 20
    warmup_ratio: float | None = None  # when set: warm-up over this fraction of max_steps, instead of warmup_steps
    grad_clip: float = 1.0
    seed: int = 0
    shuffle_buffer: int = 256
    num_workers: int = 0
    # How K/V reach the trainer's device. "stored": as the store holds them (float16 / bfloat16
    # in 16 bits, int8 / int4 codes + scales), made float32 on the device: 2-8x fewer bytes to
    # read, collate and copy. "decoded": float32 from the stream's reader threads, which overlap
    # the step. "auto": stored on an accelerator, decoded on CPU (there the device *is* the CPU).
    kv_transfer: Literal["auto", "stored", "decoded"] = "auto"
    log_every: int = 10
    # Validation: every eval_steps steps (0: never) the active loss terms on held-out data, either
    # the store's last val_shards shards (not trained on) or a second store val_store, all of it.
    eval_steps: int = 0
    val_shards: int = 0
    val_store: str | None = None
    val_batches: int | None = None  # at most this many validation batches per evaluation (default: all)
    # Keep RUN_DIR/best: the checkpoint with the lowest value of this validation metric
    # ("val_loss", "val_ce", "val_kv_k", ...); needs eval_steps.
    metric_for_best_model: str | None = None
    hash_params: bool = False  # write a sha256 of the final parameters into RUN_DIR/ranks (the DDP test compares ranks)
    save_every: int = 0  # checkpoint (model, adapters, optimizer, scheduler, RNG, loader position) every N steps
    stop_at_step: int | None = None  # stop cleanly after this step (a time-limited job); --resume goes on
    # a run directory (its latest checkpoint), one checkpoint directory, or "auto": the latest
    # complete checkpoint in `out` if there is one, else a fresh start (what train.sbatch runs)
    resume: str | None = None
    # SIGTERM / SIGUSR1 always save a checkpoint and exit 143; with this, SIGUSR1 under SLURM
    # also runs `scontrol requeue $SLURM_JOB_ID` (train.sbatch sets it when train_slurm.requeue)
    requeue_on_usr1: bool = False
    device: str = "auto"
    # autocast: "auto" = bf16 on a GPU that has it, none on CPU (bf16 matmuls are ~6x slower
    # there), or what `accelerate launch --mixed_precision` / its config says when launched so
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Trackers besides metrics.jsonl (the source of truth), through accelerate: e.g.
    # ["tensorboard"], ["wandb"]; "all" / "auto": every one accelerate finds installed.
    report_to: list[str] = field(default_factory=list)
    # "shuffled": a negative control; each sample is supervised with the teacher K/V of another
    # sample of its batch (seeded derangement), resampled in time to its own length. Each
    # epoch's last batch is dropped when short (a one-sample batch cannot be deranged).
    kv_control: Literal["none", "shuffled"] = "none"
    # mode "latent" (KaVa, train/latent.py): question -> M latent slots refined by Jacobi
    # iterations -> answer; M comes from the store (the teachers' LatentSpec.slots).
    mode: Literal["cot", "latent"] = "cot"
    latent_iterations: int = 3  # T: Jacobi iterations (each one forward of question + latents)
    codi_weight: float = 10.0  # alpha1: CODI hidden-state distillation (latent mode)
    cot_weight: float = 1.0  # latent mode: teacher-mode CE on the written chain, same backbone

    @property
    def warmup(self) -> int:
        """Warm-up steps of the schedule: warmup_ratio x max_steps when a ratio is set, else warmup_steps."""
        return round(self.warmup_ratio * self.max_steps) if self.warmup_ratio is not None else self.warmup_steps

    def validate(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1:
            raise ConfigError("TrainConfig: max_steps and batch_size must be >= 1")
        if self.latent_iterations < 1:
            raise ConfigError(f"TrainConfig.latent_iterations: must be >= 1, got {self.latent_iterations}")
        if self.codi_weight < 0 or self.cot_weight < 0:
            raise ConfigError("TrainConfig: codi_weight and cot_weight must be >= 0")
        if self.kv_weight < 0 or self.ce_weight < 0:
            raise ConfigError("TrainConfig: kv_weight and ce_weight must be >= 0")
        if self.teacher_weights is not None and any(w < 0 for w in self.teacher_weights.values()):
            raise ConfigError("TrainConfig.teacher_weights: weights must be >= 0")
        if self.router_groups not in (1, 3):
            raise ConfigError(f"TrainConfig.router_groups: 1 (one weight vector) or 3 (shallow / middle / deep), got {self.router_groups}")
        if self.router_hidden < 1:
            raise ConfigError(f"TrainConfig.router_hidden: must be >= 1, got {self.router_hidden}")
        if self.cka_weight < 0:
            raise ConfigError(f"TrainConfig.cka_weight: must be >= 0, got {self.cka_weight}")
        if isinstance(self.cka_layers, list) and (not self.cka_layers or min(self.cka_layers) < 0):
            raise ConfigError(f"TrainConfig.cka_layers: 'middle', 'last' or a non-empty list of student layer indices >= 0, got {self.cka_layers}")
        if self.kv_attn_warmup_steps < 0 or self.layer_anneal_steps < 0:
            raise ConfigError("TrainConfig: kv_attn_warmup_steps and layer_anneal_steps must be >= 0")
        self.check_min(0, "lr", "adapter_lr", "router_lr", "fusion_temperature", strict=True)
        self.check_min(0, "weight_decay", "grad_clip", "warmup_steps", "lora_r", "save_every", "num_workers", "seed")
        self.check_min(1, "gradient_accumulation_steps")
        self.check_min(0, "eval_steps", "val_shards")
        if self.num_train_epochs is not None and self.num_train_epochs <= 0:
            raise ConfigError(f"TrainConfig.num_train_epochs: must be > 0, got {self.num_train_epochs}")
        if self.val_batches is not None and self.val_batches < 1:
            raise ConfigError(f"TrainConfig.val_batches: must be >= 1, got {self.val_batches}")
        if self.val_shards and self.val_store:
            raise ConfigError("TrainConfig: give val_shards (held out of the training store) or val_store (a second store), not both")
        if self.eval_steps and not (self.val_shards or self.val_store):
            raise ConfigError("TrainConfig.eval_steps: validation needs held-out data: set val_shards N (the store's last N shards) or val_store PATH")
        if self.metric_for_best_model and not self.eval_steps:
            raise ConfigError("TrainConfig.metric_for_best_model: needs validation; set eval_steps (and val_shards or val_store)")
        if self.metric_for_best_model and not self.metric_for_best_model.startswith("val_"):
            raise ConfigError(f"TrainConfig.metric_for_best_model: a validation metric such as val_loss or val_ce, got {self.metric_for_best_model!r}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"TrainConfig.warmup_ratio: a fraction of max_steps in [0, 1), got {self.warmup_ratio}")
        self.check_min(1, "lora_alpha", "shuffle_buffer", "log_every", "stop_at_step")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"TrainConfig.lora_dropout: must lie in [0, 1), got {self.lora_dropout}")
        if self.teacher_weights and not any(w > 0 for w in self.teacher_weights.values()):
            raise ConfigError(f"TrainConfig.teacher_weights: give some teacher a weight > 0, got {self.teacher_weights}")
        if self.kv_control == "shuffled" and (self.batch_size < 2 or self.kv_weight == 0):
            raise ConfigError(
                f"TrainConfig.kv_control: 'shuffled' swaps K/V between the samples of a batch, so it needs "
                f"batch_size >= 2 and kv_weight > 0 (got {self.batch_size}, {self.kv_weight})"
            )
        if self.mode == "latent":  # options of the written-chain trainer that latent mode does not have
            cot_only = {"fusion": (self.fusion, "fixed"), "adapter": (self.adapter, "flat"), "kv_attn_weight": (self.kv_attn_weight, "none"),
                        "layer_anneal_steps": (self.layer_anneal_steps, 0)}
            bad = {k: v for k, (v, off) in cot_only.items() if v != off}
            if bad:
                raise ConfigError(
                    f"TrainConfig: {bad} apply to mode 'cot' only; latent mode fuses teachers with fixed weights through flat "
                    "adapters and has no attention weighting or layer annealing. Drop them or train with --mode cot"
                )


@dataclass
class EvalConfig(Record):
    """`kvdistill eval`: greedy answers with the KV cache, accuracy and gold perplexity."""

    model: str
    data: DataSpec = field(default_factory=lambda: DataSpec(split="test"))
    prompt_template: str | None = None  # default: the one the model was trained with
    batch_size: int = 64
    max_new_tokens: int = 64
    out: str | None = None  # write metrics (and predictions) as JSON here
    device: str = "auto"
    mode: Literal["cot", "latent"] = "cot"  # latent: question -> M latents (Jacobi) -> answer
    latent_iterations: int | None = None  # latent mode: Jacobi iterations T; default: as trained

    def validate(self) -> None:
        if self.latent_iterations is not None and self.latent_iterations < 1:
            raise ConfigError(f"EvalConfig.latent_iterations: must be >= 1 or null, got {self.latent_iterations}")
        self.check_min(1, "batch_size", "max_new_tokens")


@dataclass
class DemoConfig(Record):
    """`kvdistill demo`: the whole pipeline on synthetic data and tiny models, on CPU."""

    out: str = "demo-out"
    data: DataSpec = field(default_factory=DataSpec)
    num_shards: int = 2
    teacher_steps: int = 300
    student_steps: int = 300
    batch_size: int = 32
    seed: int = 0
    kv_weight: float = 1.0
    # Optional extra teachers: "cross-tokenizer" (a Llama teacher with its own, larger BPE
    # vocabulary: char-overlap time map) and "dual-prompt" (teacher-qwen2 again under a
    # step-by-step template: per-segment resampling).
    extra_teachers: list[Literal["cross-tokenizer", "dual-prompt"]] = field(default_factory=list)
    # mode "latent": dump with R-KV compression to latent_slots, train latent students with and
    # without the KV loss, compare with a CoT student.
    mode: Literal["cot", "latent"] = "cot"
    latent_slots: int = 8
    latent_iterations: int = 3

    def validate(self) -> None:
        self.check_min(1, "num_shards", "teacher_steps", "student_steps", "batch_size", "latent_slots", "latent_iterations")
        self.check_min(0, "seed", "kv_weight")


COMPARE_ARMS = ["ce", "kv-single", "kv-fixed", "kv-headwise", "kv-similarity", "kv-router", "kv-shuffled"]


@dataclass
class CompareConfig(Record):
    """`kvdistill compare`: train and evaluate every arm (a name -> TrainConfig overrides) once
    per seed on one store, and report each arm as mean and 95% CI over seeds, plus its paired
    difference to the `ce` arm. Default: the embedded demo's data, teachers and store."""

    out: str = "compare-out"
    seeds: int = 3  # seeds 0 .. seeds-1; a seed sets the shuffle order and the adapters' init
    arms: list[str] = field(default_factory=lambda: list(COMPARE_ARMS))
    # Adds or replaces arms: name -> TrainConfig overrides, e.g. {"kv-cos": {"kv_loss": "cosine"}}.
    arm_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 300  # optimizer steps per run
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides shared by every arm
    # The embedded default: `kvdistill demo` with this config is run first for its teachers and
    # store, or reused when DIR/summary.json records the same config.
    demo: DemoConfig = field(default_factory=DemoConfig)
    store: str | None = None  # a finalized store to use instead of building the demo's
    student: ModelSpec | None = None  # the student that store was dumped for (with `store`)
    eval_data: DataSpec | None = None  # default: the test split of the demo's data
    max_new_tokens: int = 64
    device: str = "auto"

    def validate(self) -> None:
        if self.seeds < 2:
            raise ConfigError(f"CompareConfig.seeds: a confidence interval needs >= 2 seeds, got {self.seeds}")
        if self.steps < 1:
            raise ConfigError(f"CompareConfig.steps: must be >= 1, got {self.steps}")
        self.check_min(1, "max_new_tokens")
        if "ce" not in self.arms:
            raise ConfigError(f"CompareConfig.arms: differences are paired against the 'ce' arm; add it to {self.arms}")
        dup = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if dup:
            raise ConfigError(f"CompareConfig.arms: {dup} listed twice")
        if (self.store is None) != (self.student is None):
            raise ConfigError("CompareConfig: give `store` and `student` together (or neither, for the demo's)")
        if self.store is not None and self.eval_data is None:
            raise ConfigError("CompareConfig.eval_data: with your own `store`, name the evaluation data (eval_data: {source: ..., split: test} in --config)")
