"""The records every stage agrees on: data rows, model / data / alignment specs, the store's
own description, and the configs of `dump`, `train`, `eval` and `demo`."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .base import ConfigError, Record, option

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
    "StoreToolConfig",
    "StoreFinalizeConfig",
    "StoreInspectConfig",
    "StoreVerifyConfig",
    "StoreStatsConfig",
    "StoreConvertConfig",
    "ShowAlignmentConfig",
    "PlanConfig",
    "ReportConfig",
    "DiagnoseConfig",
    "JobsStatusConfig",
    "JobsLocalConfig",
    "JobsSlurmConfig",
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

# Short flags of nested fields (option aliases), besides the canonical `--teacher.name-or-path`.
TEACHER_FLAGS = {
    "name_or_path": "--teacher",
    "name": "--teacher-name",
    "revision": "--teacher-revision",
    "dtype": "--teacher-dtype",
    "prompt_template": "--teacher-template",
}
STUDENT_FLAGS = {
    "name_or_path": "--student",
    "name": "--student-name",
    "revision": "--student-revision",
    "dtype": "--student-dtype",
    "prompt_template": "--student-template",
}
DATA_FLAGS = {"source": "--data", "split": "--split", "config_name": "--data-config", "limit": "--limit"}


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

    name_or_path: str = option(help="hub id or local checkpoint directory")
    revision: str | None = option(None, help="hub revision: branch, tag or commit")
    dtype: Dtype = option("float32", help="dtype the weights are loaded in")
    prompt_template: str = option(
        DEFAULT_TEMPLATE,
        help=(
            "prompt template with {question}, {reasoning} and {answer} in this order "
            "(a teacher's and the student's may differ: K/V are then aligned per segment)"
        ),
    )
    name: str | None = option(None, help="short name in the store (default: last path component)")

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

    n_train: int = option(4000, help="training problems")
    n_test: int = option(200, help="test problems")
    seed: int = option(0, help="generator seed")
    style: Literal["sentences", "equations"] = option("equations", help="GSM8K-like equations, or sentences")
    min_steps: int = option(2, help="fewest arithmetic steps per problem")
    max_steps: int = option(2, help="most arithmetic steps per problem")
    max_number: int = option(9, help="largest operand")

    def validate(self) -> None:
        self.check_min(1, "n_train", "n_test", "min_steps")
        if self.max_steps < self.min_steps:
            raise ConfigError(
                f"SyntheticSpec.max_steps: must be >= min_steps ({self.min_steps}), got {self.max_steps}"
            )
        if self.max_number < 2:
            raise ConfigError(f"SyntheticSpec.max_number: must be >= 2, got {self.max_number}")


@dataclass
class DataSpec(Record):
    """Where rows come from: `synthetic`, a local .jsonl/.parquet (GSM8K format), or a local
    directory / hub id loaded with `datasets.load_dataset`."""

    source: str = option(
        "synthetic", help="'synthetic', a GSM8K-format .jsonl/.parquet, or a data set directory / hub id"
    )
    split: str = option("train", help="data set split")
    config_name: str | None = option(None, help="hub data set config, e.g. 'main' for openai/gsm8k")
    limit: int | None = option(None, help="use the first N rows after loading")
    synthetic: SyntheticSpec = option(
        factory=SyntheticSpec, help="the built-in arithmetic problems (source 'synthetic')"
    )

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

    layer_map: str = option(
        "ratio",
        help=(
            "'ratio' (student layer l reads teacher layer l (L_t - 1) / (L_s - 1), interpolated) "
            "or a layermap.json from `kvdistill align calibrate` (CKA top-k)"
        ),
    )
    time_map: Literal["auto", "identity", "char_overlap", "segment_linear"] = option(
        "auto",
        help="teacher tokens onto the student's: auto picks identity, char_overlap or segment_linear from the data",
    )
    keys: Literal["pre_rope"] = option(
        "pre_rope", help="keys are taken before RoPE"
    )  # position-free: sound to resample in time
    projection: str | None = option(
        None, help="a PCA .npz from `kvdistill align calibrate --pca D`: store D dims per layer"
    )

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
            raise ConfigError(
                f"StoreSpec.compression_level: blosc levels are 0 (none) to 9, got {self.compression_level}"
            )

    def codec(self, teacher: str) -> str:
        return self.teacher_kv_dtype.get(teacher, self.kv_dtype)


@dataclass
class LatentSpec(Record):
    """KaVa latent mode at dump time: the teacher's reasoning KV compressed to `slots` tokens
    per layer and KV head with R-KV scores `lam * importance + (1 - lam) * redundancy`
    (align/rkv.py), and optionally its last hidden state before the answer (CODI)."""

    slots: int = option(
        24,
        help=(
            "M: latent tokens, i.e. kept reasoning positions per (layer, KV head); "
            "needs eager attention (T^2 memory per layer)"
        ),
    )
    lam: float = option(0.1, help="R-KV score = lambda * importance + (1 - lambda) * redundancy")
    codi_hidden: bool = option(
        True, help="also store the teacher's final-norm hidden state before the first answer token (CODI)"
    )

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
    logits_top_k: int = 0  # K: top-K teacher log-probs per row (logits_ids / logits_lp arrays); 0 = none

    def validate(self) -> None:
        self.check_min(1, "width")
        _check_top_k(self, "logits_top_k", self.logits_top_k)


@dataclass(kw_only=True)
class DumpTask(Record):
    """Everything a dump array task needs except which teacher and which shard: the part the
    tasks of one job array share (see JobsConfig)."""

    student: ModelSpec = option(
        help="the student: its tokenizer and config are read (no weights)", aliases=STUDENT_FLAGS
    )
    store: str = option(help="the zarr store to write into, e.g. out.zarr")
    data: DataSpec = option(factory=DataSpec, help="the data set", aliases=DATA_FLAGS)
    num_shards: int = option(1, help="how many shards the data set is split into")
    batch_size: int = option(16, help="teacher forward batch size")
    max_len: int = option(1024, help="longest sample in tokens; longer ones are an error (or see --on-too-long)")
    on_too_long: Literal["error", "skip"] = option("error", help="a sample over --max-len: fail, or skip and count it")
    align: AlignSpec = option(
        factory=AlignSpec,
        help="how a teacher's K/V are put onto the student's geometry",
        aliases={"layer_map": "--layer-map", "time_map": "--time-map", "projection": "--projection"},
    )
    kv_dtype: KVDtype = option(
        "float16",
        help=(
            "codec of the stored K/V of every teacher not in teacher_kv_dtype (int8 / int4: KIVI-style, scales beside)"
        ),
    )
    teacher_kv_dtype: dict[str, KVDtype] = option(factory=dict, help="codec per teacher, e.g. teacher-a=int8")
    teacher_projection: dict[str, str] = option(
        factory=dict,
        help=(
            "PCA .npz per teacher (each teacher needs its own fit), e.g. teacher-a=a-pca32.npz; overrides --projection"
        ),
    )
    # The offline-logits baseline (DistillKit, Megatron-Core: k ~ 32-128) beside K/V in one store.
    logits_top_k: int = option(
        0,
        help=(
            "also store each teacher's top-K log-probs per student token (logits_ids int32 + logits_lp float16: "
            "6K bytes a token); 1-1024, only for a teacher with the student's tokenizer and a one-to-one time map"
        ),
    )
    teacher_logits_top_k: dict[str, int] = option(
        factory=dict, help="top-K per teacher, overriding --logits-top-k, e.g. other-tok=0"
    )
    backend: Literal["zarr", "webdataset"] = option(
        "zarr", help="how shards are stored; webdataset: one .tar per task (float16 / float32)"
    )
    # Level 1 compresses ~4x faster than 3 (~420 vs ~90 MB/s a core) for 1-5% more bytes: at 3
    # the writer, not the forward, would bound a GPU dump (bench/store.py, BENCHMARKS.md).
    compression_level: int = option(
        1, help="blosc-zstd level of the K/V chunks, 0 (none) to 9; 1 writes ~4x faster than 3 for 1-5% more bytes"
    )
    # "byte" groups the bytes of each value (the exponents of 16-bit floats), "bit" their bits. At
    # level 1 on a trained teacher's K/V (bench/store.py): byte is smaller for float16 / bfloat16 /
    # int4 (1.42x / 1.88x / 3.92x vs 1.40x / 1.78x / 3.88x), bit for int8 (2.31x vs 2.17x).
    blosc_shuffle: Literal["byte", "bit"] = option(
        "byte", help="blosc's filter before zstd (bit stores int8 ~6% smaller, byte the others)"
    )
    device: str = option("auto", help="auto | cpu | cuda | cuda:1")
    latent: LatentSpec | None = option(
        None,
        help="KaVa latent mode: also store R-KV compressed reasoning K/V (any of its flags turns it on)",
        aliases={"slots": "--latent-slots", "lam": "--latent-lambda", "codi_hidden": "--latent-codi-hidden"},
    )
    # A duplicated or requeued array task finds the (teacher, shard) owned by a live writer.
    on_busy: Literal["fail", "wait"] = option(
        "fail",
        help=(
            "another live writer owns this (teacher, shard): fail at once naming it, or wait until it finishes or dies"
        ),
    )
    allow_empty: bool = option(
        False,
        help=(
            "write a shard even when it gets no sample (more shards than rows, every sample skipped); "
            "without it that is an error, as an empty shard is almost always a wrong path or filter"
        ),
    )

    def validate(self) -> None:
        self.check_min(1, "num_shards", "batch_size", "max_len")
        _check_top_k(self, "logits_top_k", self.logits_top_k)
        for name, k in self.teacher_logits_top_k.items():
            _check_top_k(self, f"teacher_logits_top_k[{name}]", k)
        if not 0 <= self.compression_level <= 9:
            raise ConfigError(
                f"{type(self).__name__}.compression_level: blosc levels are 0 (none) to 9, got"
                f" {self.compression_level}"
            )
        if self.backend == "webdataset" and (self.compression_level, self.blosc_shuffle) != (1, "byte"):
            raise ConfigError(
                f"{type(self).__name__}.compression_level / blosc_shuffle: webdataset tars store K/V uncompressed, so"
                f" level {self.compression_level} / {self.blosc_shuffle} shuffle would be ignored; drop them, or use"
                " backend zarr"
            )


@dataclass(kw_only=True)
class DumpConfig(DumpTask):
    """`kvdistill dump`: one array task = one teacher x one shard of the data set."""

    teacher: ModelSpec = option(help="the teacher whose K/V are dumped", aliases=TEACHER_FLAGS)
    shard: int = option(0, help="this task's shard index (SLURM: $SLURM_ARRAY_TASK_ID)")
    length_teachers: list[ModelSpec] = option(
        factory=list,
        help=(
            "every teacher of the store (jobs local / slurm set it): with --on-too-long skip, a sample over --max-len"
            " for any of them (their tokenizers and templates are read, no weights) is skipped by this one too, so"
            " every teacher holds the same samples. Empty: this teacher's own length decides"
        ),
    )

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"DumpConfig.shard: need 0 <= shard < num_shards, got {self.shard} of {self.num_shards}")

    @property
    def teacher_top_k(self) -> int:
        """This teacher's logits top-K: teacher_logits_top_k's, else logits_top_k (0: none)."""
        return self.teacher_logits_top_k.get(self.teacher.short_name, self.logits_top_k)

    def resolved(self) -> DumpConfig:
        """This teacher's task: its own PCA projection (teacher_projection) in `align`."""
        own = self.teacher_projection.get(self.teacher.short_name)
        return (
            self if own is None else dataclasses.replace(self, align=dataclasses.replace(self.align, projection=own))
        )


MAX_LOGITS_TOP_K = 1024  # the offline-logits habit is k ~ 32-128; more is the full distribution's cost


def _check_top_k(rec: Record, name: str, k: int) -> None:
    if not 0 <= k <= MAX_LOGITS_TOP_K:
        raise ConfigError(
            f"{type(rec).__name__}.{name}: top-K log-probs per token, 1 to {MAX_LOGITS_TOP_K} (0: none), got {k}"
        )


@dataclass
class SlurmSpec(Record):
    """sbatch resources of one job (array task, finalize or training)."""

    partition: str | None = option(None, help="SLURM partition")
    account: str | None = option(None, help="SLURM account")
    qos: str | None = option(None, help="SLURM quality of service")
    nodes: int = option(1, help="nodes per job")
    gpus: int = option(1, help="GPUs per node (--gres=gpu:N); 0 for CPU-only jobs")
    cpus: int = option(8, help="CPUs per task (--cpus-per-task)")
    mem: str = option("64G", help="memory per node")
    time: str = option("04:00:00", help="time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S, or UNLIMITED")
    requeue: bool = option(
        True, help="preempted tasks come back and finish their shard; training also requeues itself on SIGUSR1"
    )
    max_parallel: int | None = option(None, help="array throttle: at most this many tasks at once (--array=0-N%P)")
    extra: list[str] = option(factory=list, help="more #SBATCH lines' options, as sbatch spells them")
    # training only: SIGUSR1 this many seconds before the time limit (--signal=B:USR1@N), time
    # to finish a step and write a checkpoint; 0: no signal (then the limit's SIGTERM saves, within KillWait)
    signal_seconds: int = option(
        300, help="training only: SIGUSR1 this many seconds before the time limit, to save a checkpoint; 0: none"
    )

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
            raise ConfigError(
                f"SlurmSpec.time: {self.time!r} is not an sbatch time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)"
            )
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

    teachers: list[ModelSpec] = option(
        help="the teachers: hub ids or checkpoint directories, or each a mapping of ModelSpec fields"
    )
    dump: DumpTask = option(
        help="what every dump task shares", aliases={"store": "--store", "num_shards": "--num-shards"}
    )
    slurm: SlurmSpec = option(factory=SlurmSpec, help="sbatch resources of the dump array tasks and the finalize job")
    jobs_dir: str = option("kvdistill-jobs", help="where sbatch scripts, per-teacher dump configs and logs go")
    workers: int = option(
        1, help="`kvdistill jobs local`: processes on this machine (torch threads are split among them)"
    )
    train: TrainConfig | None = option(None, help="the student's training job, after finalize (jobs slurm)")
    train_slurm: SlurmSpec = option(factory=SlurmSpec, help="sbatch resources of the training job")

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
                f"JobsConfig.train_slurm.signal_seconds: {self.train_slurm.signal_seconds} s is not before the time"
                f" limit {self.train_slurm.time} ({limit} s); lower it or raise train_slurm.time"
            )

    def task(self, teacher: ModelSpec, shard: int) -> DumpConfig:
        """One array task; every task knows every teacher (`DumpConfig.length_teachers`)."""
        shared = {f: getattr(self.dump, f) for f in _fields(DumpTask)}
        return DumpConfig(teacher=teacher, shard=shard, length_teachers=list(self.teachers), **shared)

    def tasks(self) -> list[DumpConfig]:
        """Array order: task id = teacher_index * num_shards + shard."""
        return [self.task(t, i) for t in self.teachers for i in range(self.dump.num_shards)]


def _fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass
class CalibrateConfig(Record):
    """`kvdistill align calibrate`: a CKA layer map (and optionally a PCA projection) for one
    teacher and student, from a calibration sample."""

    teacher: ModelSpec = option(help="the teacher (its weights are read)", aliases=TEACHER_FLAGS)
    student: ModelSpec = option(help="the student (its weights are read)", aliases=STUDENT_FLAGS)
    data: DataSpec = option(factory=DataSpec, help="the calibration data", aliases=DATA_FLAGS)
    samples: int = option(64, help="calibration samples")
    top_k: int = option(2, help="teacher layers per student layer")
    out: str = option("layermap.json", help="layer map JSON (a heatmap .png is written beside it)")
    pca: int | None = option(
        None,
        help=(
            "also fit a D-dim PCA per layer of the layer-mapped teacher K and V, for `dump --projection` (the compact"
            " store: D = teacher K/V width / 8 with `dump --kv-dtype int4`; `kvdistill store plan` sizes it)"
        ),
    )
    pca_layer_map: str = option(
        "calibrated",
        help=(
            "the layer map the PCA is fitted under, which must be the one the dump uses (it is recorded and "
            "checked): 'calibrated' (the map this run writes), 'ratio', or a layermap.json"
        ),
    )
    time_map: Literal["auto", "identity", "char_overlap", "segment_linear"] = option(
        "auto", help="teacher tokens onto the student's (auto: from the data)"
    )
    batch_size: int = option(8, help="forward batch size")
    device: str = option("auto", help="auto | cpu | cuda")

    def validate(self) -> None:
        self.check_min(1, "samples", "top_k")
        if self.pca is not None and self.pca < 1:
            raise ConfigError(f"CalibrateConfig.pca: must be >= 1 or null, got {self.pca}")
        if self.pca_layer_map not in ("calibrated", "ratio") and not self.pca_layer_map.endswith(".json"):
            raise ConfigError(
                "CalibrateConfig.pca_layer_map: 'calibrated', 'ratio' or a layermap .json file, got"
                f" {self.pca_layer_map!r}"
            )
        self.check_min(1, "batch_size")


@dataclass
class TrainConfig(Record):
    """`kvdistill train`: a student trained from the store; no teacher is loaded."""

    store: str = option(help="finalized KV store to stream from", group="data")
    student: ModelSpec = option(
        help="the student (the one the store was dumped for)", group="models", aliases=STUDENT_FLAGS
    )
    out: str = option(help="run directory: metrics.jsonl, checkpoints/, final/", group="checkpointing")
    teachers: list[str] | None = option(
        None, help="teachers of the store to learn from (default: every one)", group="data"
    )
    teacher_weights: dict[str, float] | None = option(
        None, help="fixed fusion weights, e.g. teacher-a=0.75,teacher-b=0.25 (default: equal)", group="fusion"
    )
    fusion: Literal["fixed", "similarity", "router"] = option(
        "fixed",
        help=(
            "fixed: teacher_weights; similarity: per token, softmax of cosine to the student's K/V / temperature; "
            "router: a small MLP on the student's pooled last hidden state, softmax per sample"
        ),
        group="fusion",
    )
    fusion_temperature: float = option(0.1, help="softmax temperature of similarity routing", group="fusion")
    router_groups: int = option(
        1,
        help="router: 1 weight vector per sample, or 3 (shallow / middle / deep third of the layers)",
        group="fusion",
    )
    router_hidden: int = option(64, help="width of the router MLP's hidden layer", group="fusion")
    router_entropy_weight: float = option(
        0.01,
        help="loss -= weight x router entropy (> 0 rewards spreading over teachers, against collapse onto one)",
        group="fusion",
    )
    router_lr: float = option(1e-3, help="router learning rate", group="fusion", aliases=("--router-learning-rate",))
    adapter: Literal["flat", "headwise"] = option(
        "flat",
        help=(
            "teacher K/V onto the student's width: flat, one D_t x D_s map per layer; headwise, a teacher "
            "kv-head mixer + per-head d_t x d_s map"
        ),
        group="KV loss",
    )
    kv_attn_weight: Literal["none", "student"] = option(
        "none", help="student: weight tokens by the student's attention to them (eager attention)", group="KV loss"
    )
    kv_attn_warmup_steps: int = option(1000, help="linear warm-up from uniform token weights", group="KV loss")
    cka_weight: float = option(
        0.05,
        help="weight of 1 - debiased linear CKA of student K|V and the fused target (0: off; mode cot only)",
        group="KV loss",
    )
    cka_layers: Literal["middle", "last"] | list[int] = option(
        "middle", help="student layers of the CKA term: middle, last, or a comma list such as 0,3", group="KV loss"
    )
    layer_anneal_steps: int = option(
        0, help="> 0: the KV loss phases in deeper layers linearly over these steps", group="KV loss"
    )
    attn_kl_weight: float = option(
        0.0,
        help=(
            "weight of the attention KL: KL(teacher || student attention) of the student's queries over the fused"
            " adapted teacher keys vs its own keys, per layer, over real tokens (0: off; mode cot only; needs"
            " kv_weight > 0)"
        ),
        group="KV loss",
    )
    attn_kl_warmup_steps: int = option(
        0, help="the attention KL weight ramps linearly from 0 over these steps", group="KV loss"
    )
    kv_weight: float = option(1.0, help="weight of the KV loss (0: the CE-only baseline)", group="KV loss")
    # KV weight over training (issue 26: the KV gain is an early one): `kv_weight_at`.
    kv_weight_schedule: Literal["constant", "linear", "cosine"] = option(
        "constant",
        help=(
            "KV weight over the run: constant (kv_weight), or a linear / cosine decay from kv_weight at the first step"
            " to kv_weight_final as the planned steps end (like the LR schedule); every K/V term it weights (and Z)"
            " follows it"
        ),
        group="KV loss",
    )
    kv_weight_final: float = option(
        0.0,
        help=(
            "the KV weight a linear / cosine --kv-weight-schedule ends at: an absolute weight like kv_weight, not a"
            " fraction of it"
        ),
        group="KV loss",
    )
    ce_weight: float = option(1.0, help="weight of the CE loss", group="KV loss")
    # Offline logits distillation (`dump --logits-top-k K`): the teachers' stored top-K log-probs.
    logits_weight: float = option(
        0.0,
        help=(
            "> 0: add the KL from each teacher's stored top-k next-token distribution (dump --logits-top-k) to the"
            " student's, on the CE positions, teachers mixed by teacher_weights (0 with kv_weight 0: the"
            " offline-logits baseline)"
        ),
        group="KV loss",
    )
    logits_temperature: float = option(
        1.0,
        help="softmax temperature of the logits term (both sides; the term is scaled by its square)",
        group="KV loss",
    )
    kv_norm: Literal["layer_std", "none"] = option(
        "layer_std", help="standardise K/V per layer before the loss, or not", group="KV loss"
    )
    kv_loss: Literal["mse", "smooth_l1", "cosine"] = option(
        "mse", help="distance of student and target K/V", group="KV loss"
    )
    # The common Z space (train/zspace.py): per-teacher maps g_i([K, V]) and a student map
    # h_s([K, V]) into Z; fusion and the loss in Z replace kv_k / kv_v.
    z_dim: int = option(
        0,
        help=(
            "> 0: fuse and distil in a common Z space of this width (very different teachers): per layer, maps of each"
            " teacher's and the student's [K, V] into Z; the Z loss (weighted by kv_weight) replaces the K and V"
            " losses. 0: off (mode cot only)"
        ),
        group="Z space",
    )
    z_loss: Literal["mse", "cosine", "barlow", "cca"] = option(
        "mse",
        help=(
            "loss in Z between the student and the fused target: mse, cosine, barlow (Barlow Twins cross-correlation "
            "towards identity) or cca (per-dimension correlation + soft decorrelation of each side)"
        ),
        group="Z space",
    )
    z_teacher_maps: Literal["fixed", "learned"] = option(
        "fixed",
        help=(
            "teacher maps into Z: fixed (frozen random semi-orthogonal: Z is anchored by the teachers, no collapse) "
            "or learned (needs z_loss barlow or cca, scored on whitened Z, so a collapse costs what a miss does)"
        ),
        group="Z space",
    )
    z_offdiag_weight: float = option(
        0.005,
        help="lambda of barlow (off-diagonal cross-correlation) and cca (off-diagonal of each side's correlation)",
        group="Z space",
    )
    lora_r: int = option(0, help="LoRA rank (peft); 0 trains every weight", group="models")
    lora_alpha: int = option(32, help="LoRA alpha", group="models")
    lora_dropout: float = option(0.0, help="LoRA dropout", group="models")
    lora_targets: list[str] = option(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], help="modules LoRA adapts", group="models"
    )
    lr: float = option(1e-3, help="student learning rate", group="optimisation", aliases=("--learning-rate",))
    adapter_lr: float = option(
        1e-3, help="adapter learning rate", group="optimisation", aliases=("--adapter-learning-rate",)
    )
    weight_decay: float = option(0.0, help="AdamW weight decay", group="optimisation")
    batch_size: int = option(
        16,
        help="batch size per process and micro-batch",
        group="optimisation",
        aliases=("--per-device-train-batch-size",),
    )
    gradient_accumulation_steps: int = option(
        1,
        help="micro-batches per optimizer step: effective batch = batch_size x this x processes",
        group="optimisation",
    )
    gradient_checkpointing: bool = option(
        False, help="recompute the student's activations in backward (less memory, ~30% more compute)", group="models"
    )
    max_steps: int = option(200, help="optimizer steps", group="optimisation")
    num_train_epochs: float | None = option(
        None,
        help="this many passes over the training shards, instead of --max-steps",
        group="optimisation",
        instead_of="max_steps",
    )
    warmup_steps: int = option(20, help="linear warm-up steps of the cosine schedule", group="optimisation")
    warmup_ratio: float | None = option(
        None,
        help=(
            "warm-up over this fraction of the run's steps instead (--max-steps, or those of --num-train-epochs; e.g."
            " 0.05); replaces --warmup-steps"
        ),
        group="optimisation",
        instead_of="warmup_steps",
    )
    grad_clip: float = option(
        1.0, help="gradient clipping norm (0: off)", group="optimisation", aliases=("--max-grad-norm",)
    )
    seed: int = option(0, help="seed for init order, shuffling and dropout", group="optimisation")
    shuffle_buffer: int = option(256, help="samples held for shuffling within shards", group="data")
    shuffle_buffer_bytes: int = option(
        2**30,
        group="data",
        help=(
            "caps the shuffle buffer in bytes: it holds at most this many bytes of K/V as stored (a mean sample of the"
            " store, every teacher read), so fewer than --shuffle-buffer samples at large widths; computed from the"
            " store alone"
        ),
    )
    num_workers: int = option(0, help="dataloader worker processes", group="data")
    # "stored": as the store holds them (float16 / bfloat16 in 16 bits, int8 / int4 codes +
    # scales), made float32 on the device: 2-8x fewer bytes to read, collate and copy. "decoded":
    # float32 from the stream's reader threads, which overlap the step. "auto": stored on an
    # accelerator, decoded on CPU (there the device *is* the CPU).
    kv_transfer: Literal["auto", "stored", "decoded"] = option(
        "auto",
        help=(
            "how K/V reach the device: stored (as the store holds them, made float32 there), decoded "
            "(float32 from the reader threads), auto (stored on an accelerator, decoded on CPU)"
        ),
        group="data",
    )
    log_every: int = option(10, help="write metrics every N steps", group="logging", aliases=("--logging-steps",))
    # Validation: every eval_steps steps the active loss terms on held-out data, either the
    # store's last val_shards shards (not trained on) or a second store val_store, all of it.
    eval_steps: int = option(
        0, help="validate every N steps (0: never); needs --val-shards or --val-store", group="validation"
    )
    val_shards: int = option(0, help="hold out the store's last N shards for validation", group="validation")
    val_store: str | None = option(None, help="validate on this second store instead", group="validation")
    val_batches: int | None = option(
        None, help="at most this many validation batches per evaluation (default: all)", group="validation"
    )
    metric_for_best_model: str | None = option(
        None,
        help=(
            "keep RUN_DIR/best: the checkpoint with the lowest value of this validation metric (val_loss, val_ce, "
            "val_kv_k, ...); needs --eval-steps"
        ),
        group="validation",
    )
    hash_params: bool = option(
        False,
        help="write a sha256 of the final parameters into RUN_DIR/ranks (the DDP test compares ranks)",
        group="checkpointing",
    )
    record_samples: bool = option(
        False,
        help="append each step's sample ids per rank to RUN_DIR/ranks/samples-rank-N.jsonl (audit the sample order)",
        group="checkpointing",
    )
    save_every: int = option(
        0,
        help=(
            "checkpoint (model, adapters, optimizer, scheduler, RNG, loader position) every N steps (0: only the final"
            " model)"
        ),
        group="checkpointing",
        aliases=("--save-steps",),
    )
    save_total_limit: int | None = option(
        None,
        help=(
            "keep only the last N checkpoints in RUN_DIR/checkpoints, deleting older ones after each save "
            "(RUN_DIR/best and final are never touched; default: keep all)"
        ),
        group="checkpointing",
    )
    stop_at_step: int | None = option(
        None, help="stop cleanly after this step (a time-limited job); --resume goes on", group="checkpointing"
    )
    resume: str | None = option(
        None,
        help=(
            "auto (the latest complete checkpoint in --out if there is one, else a fresh start: what train.sbatch"
            " runs), a run directory (its latest checkpoint) or a checkpoint directory"
        ),
        group="checkpointing",
    )
    # SIGTERM / SIGUSR1 always save a checkpoint and exit 143 (train.sbatch sets this when
    # train_slurm.requeue).
    requeue_on_usr1: bool = option(
        False,
        help=(
            "on SIGUSR1 under SLURM, after the checkpoint: `scontrol requeue $SLURM_JOB_ID` "
            "(SIGTERM / SIGUSR1 always save and exit 143)"
        ),
        group="checkpointing",
    )
    device: str = option("auto", help="auto | cpu | cuda", group="models")
    # bf16 matmuls are ~6x slower on CPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto",
        help=(
            "autocast: auto = bf16 on a GPU that has it, none on CPU, or accelerate's setting when run "
            "by `accelerate launch`"
        ),
        group="models",
    )
    report_to: list[str] = option(
        factory=list,
        help=(
            "trackers besides metrics.jsonl (the source of truth), through accelerate: tensorboard, wandb, "
            "...; all / auto: every one installed"
        ),
        group="logging",
    )
    # Each epoch's last batch is dropped when short (a one-sample batch cannot be deranged).
    kv_control: Literal["none", "shuffled"] = option(
        "none",
        help=(
            "shuffled: a negative control; each sample is supervised with the teacher K/V of another sample "
            "of its batch (seeded derangement), resampled in time to its own length"
        ),
        group="KV loss",
    )
    mode: Literal["cot", "latent"] = option(
        "cot",
        help=(
            "cot: KV loss on the written chain; latent (KaVa): question -> M latent slots "
            "refined by Jacobi iterations -> answer, M from the store"
        ),
        group="latent",
    )
    latent_iterations: int = option(
        3, help="T: Jacobi iterations (each one forward of question + latents)", group="latent"
    )
    codi_weight: float = option(
        10.0, help="alpha1: CODI hidden-state distillation weight (latent mode)", group="latent"
    )
    cot_weight: float = option(
        1.0, help="latent mode: teacher-mode CE on the written chain, same backbone", group="latent"
    )

    def warmup_over(self, steps: int) -> int:
        """Warm-up steps of a schedule of `steps` optimizer steps, the run's planned ones
        (`train.loop.planned_steps`: num_train_epochs included): warmup_ratio x steps when a ratio
        is set, else warmup_steps. The one warm-up rule (train.loop.optimizer_and_schedule)."""
        return round(self.warmup_ratio * steps) if self.warmup_ratio is not None else self.warmup_steps

    def kv_weight_at(self, step: int, steps: int) -> float:
        """The KV weight optimizer step `step` (0-based) of a run of `steps` planned optimizer steps
        (the trainer's, num_train_epochs included: the LR schedule's count) trains with: kv_weight
        when constant; else kv_weight_final + (kv_weight - kv_weight_final) x d(step / steps), d(p)
        = 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine), from step 0 (no warm-up). Like the LR
        it reaches the floor as the planned steps end: the first step trains at kv_weight, the
        last a 1/steps part of (kv_weight - kv_weight_final) above the floor (linear; cosine less),
        so a run with kv_weight > 0 never trains a step at weight 0. A function of the step alone:
        the same on any number of processes or micro-batches, and after a resume."""
        if self.kv_weight_schedule == "constant":
            return self.kv_weight
        p = min(max(step / max(steps, 1), 0.0), 1.0)
        d = 1.0 - p if self.kv_weight_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return self.kv_weight_final + (self.kv_weight - self.kv_weight_final) * d

    def validate(self) -> None:
        self._check_terms()
        self._check_optimisation()
        self._check_kv_control_and_z()
        self._check_latent()

    def _check_terms(self) -> None:
        """The loss terms' weights, schedule, fusion and router options."""
        self.check_min(1, "max_steps", "batch_size")
        if self.latent_iterations < 1:
            raise ConfigError(f"TrainConfig.latent_iterations: must be >= 1, got {self.latent_iterations}")
        self.check_min(0, "codi_weight", "cot_weight", "kv_weight", "kv_weight_final", "ce_weight", "logits_weight")
        self.check_min(0, "logits_temperature", strict=True)
        if self.kv_weight_schedule != "constant" and self.kv_weight == 0:
            raise ConfigError(
                f"TrainConfig.kv_weight_schedule {self.kv_weight_schedule!r}: kv_weight 0 (the CE-only baseline) has"
                " nothing to decay; set kv_weight > 0 (the starting weight) or kv_weight_schedule constant"
            )
        if self.kv_weight_schedule == "constant" and self.kv_weight_final != 0:
            raise ConfigError(
                f"TrainConfig.kv_weight_final {self.kv_weight_final}: applies to a decaying KV weight only; "
                "set kv_weight_schedule linear or cosine, or drop kv_weight_final"
            )
        for name, w in (self.teacher_weights or {}).items():
            if not w >= 0:
                raise ConfigError(f"TrainConfig.teacher_weights[{name!r}]: must be >= 0, got {w}")
        if self.router_groups not in (1, 3):
            raise ConfigError(
                "TrainConfig.router_groups: 1 (one weight vector) or 3 (shallow / middle / deep), got"
                f" {self.router_groups}"
            )
        if self.router_hidden < 1:
            raise ConfigError(f"TrainConfig.router_hidden: must be >= 1, got {self.router_hidden}")
        if self.cka_weight < 0:
            raise ConfigError(f"TrainConfig.cka_weight: must be >= 0, got {self.cka_weight}")
        if isinstance(self.cka_layers, list) and (not self.cka_layers or min(self.cka_layers) < 0):
            raise ConfigError(
                "TrainConfig.cka_layers: 'middle', 'last' or a non-empty list of student layer indices >= 0, got"
                f" {self.cka_layers}"
            )
        self.check_min(0, "kv_attn_warmup_steps", "layer_anneal_steps")
        self.check_min(0, "attn_kl_weight", "attn_kl_warmup_steps")
        if self.attn_kl_weight > 0 and self.kv_weight == 0:
            raise ConfigError(
                "TrainConfig.attn_kl_weight: the attention KL reads the teacher keys, which kv_weight 0 does not; set"
                " kv_weight > 0 or attn_kl_weight 0"
            )

    def _check_optimisation(self) -> None:
        """Optimizer, schedule, validation, checkpoints, LoRA and reading."""
        self.check_min(0, "lr", "adapter_lr", "router_lr", "fusion_temperature", strict=True)
        self.check_min(0, "weight_decay", "grad_clip", "warmup_steps", "lora_r", "save_every", "num_workers", "seed")
        self.check_min(1, "gradient_accumulation_steps")
        self.check_min(0, "eval_steps", "val_shards")
        if self.num_train_epochs is not None and self.num_train_epochs <= 0:
            raise ConfigError(f"TrainConfig.num_train_epochs: must be > 0, got {self.num_train_epochs}")
        if self.val_batches is not None and self.val_batches < 1:
            raise ConfigError(f"TrainConfig.val_batches: must be >= 1, got {self.val_batches}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(
                f"TrainConfig.save_total_limit: keeps the last N >= 1 checkpoints, got {self.save_total_limit}; "
                "leave it unset to keep them all"
            )
        if self.val_shards and self.val_store:
            raise ConfigError(
                "TrainConfig: give val_shards (held out of the training store) or val_store (a second store), not both"
            )
        if self.eval_steps and not (self.val_shards or self.val_store):
            raise ConfigError(
                "TrainConfig.eval_steps: validation needs held-out data: set val_shards N (the store's last N shards)"
                " or val_store PATH"
            )
        if self.metric_for_best_model and not self.eval_steps:
            raise ConfigError(
                "TrainConfig.metric_for_best_model: needs validation; set eval_steps (and val_shards or val_store)"
            )
        if self.metric_for_best_model and not self.metric_for_best_model.startswith("val_"):
            raise ConfigError(
                "TrainConfig.metric_for_best_model: a validation metric such as val_loss or val_ce, got"
                f" {self.metric_for_best_model!r}"
            )
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"TrainConfig.warmup_ratio: a fraction of max_steps in [0, 1), got {self.warmup_ratio}")
        self.check_min(1, "lora_alpha", "shuffle_buffer", "shuffle_buffer_bytes", "log_every", "stop_at_step")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"TrainConfig.lora_dropout: must lie in [0, 1), got {self.lora_dropout}")

    def _check_kv_control_and_z(self) -> None:
        """The teachers' weights, the shuffled-K/V control and the Z space, against the rest."""
        if self.teacher_weights and not any(w > 0 for w in self.teacher_weights.values()):
            raise ConfigError(
                f"TrainConfig.teacher_weights: give some teacher a weight > 0, got {self.teacher_weights}"
            )
        if self.kv_control == "shuffled" and (self.batch_size < 2 or self.kv_weight == 0):
            need, got = (
                ("batch_size >= 2", f"batch_size {self.batch_size}")
                if self.batch_size < 2
                else ("kv_weight > 0", f"kv_weight {self.kv_weight}")
            )
            raise ConfigError(
                f"TrainConfig.kv_control: 'shuffled' swaps K/V between the samples of a batch, so it needs {need}, got"
                f" {got}"
            )
        self.check_min(0, "z_dim", "z_offdiag_weight")
        if self.z_dim > 0:  # the Z space replaces the adapters and the K / V losses: what needs them is refused
            needs = {
                "kv_weight": (self.kv_weight, self.kv_weight > 0),
                "adapter": (self.adapter, self.adapter == "flat"),
                "kv_attn_weight": (self.kv_attn_weight, self.kv_attn_weight == "none"),
                "attn_kl_weight": (self.attn_kl_weight, self.attn_kl_weight == 0),
            }
            clash = {k: v for k, (v, ok) in needs.items() if not ok}
            if clash:
                raise ConfigError(
                    f"TrainConfig.z_dim {self.z_dim}: the Z space needs kv_weight > 0 (it weights the Z term) and has"
                    f" no adapters, per-token attention weights or student-space teacher keys; got {clash}. Set z_dim"
                    " 0, or kv_weight > 0, adapter flat, kv_attn_weight none and attn_kl_weight 0"
                )
            if self.z_teacher_maps == "learned" and self.z_loss in ("mse", "cosine"):
                raise ConfigError(
                    f"TrainConfig.z_teacher_maps 'learned' with z_loss {self.z_loss!r}: both sides could collapse"
                    " together to a low loss; use z_loss barlow or cca (their correlation terms prevent it) or"
                    " z_teacher_maps fixed"
                )

    def _check_latent(self) -> None:
        """Options of the written-chain trainer that latent mode does not have."""
        if self.mode == "latent":
            cot_only = {
                "fusion": (self.fusion, "fixed"),
                "adapter": (self.adapter, "flat"),
                "kv_attn_weight": (self.kv_attn_weight, "none"),
                "layer_anneal_steps": (self.layer_anneal_steps, 0),
                "attn_kl_weight": (self.attn_kl_weight, 0.0),
                "z_dim": (self.z_dim, 0),
                "logits_weight": (self.logits_weight, 0.0),
            }
            bad = {k: v for k, (v, off) in cot_only.items() if v != off}
            if bad:
                raise ConfigError(
                    f"TrainConfig: {bad} apply to mode 'cot' only; latent mode fuses teachers with fixed weights"
                    " through flat adapters and has no attention weighting, attention KL, layer annealing or Z space."
                    " Drop them or train with --mode cot"
                )


@dataclass
class EvalConfig(Record):
    """`kvdistill eval`: greedy answers with the KV cache, accuracy and gold perplexity."""

    model: str = option(help="a training run directory or any checkpoint (hub id or path)")
    data: DataSpec = option(factory=lambda: DataSpec(split="test"), help="the evaluation data", aliases=DATA_FLAGS)
    prompt_template: str | None = option(None, help="default: the one the model was trained with")
    batch_size: int = option(64, help="generation batch size")
    max_new_tokens: int | None = option(
        None, help="generation budget per question (default: the eval data's longest gold continuation x 1.25 + 16)"
    )
    out: str | None = option(None, help="write metrics (and predictions) as JSON here")
    device: str = option("auto", help="auto | cpu | cuda")
    mode: Literal["cot", "latent"] = option(
        "cot", help="latent: question -> M latents (Jacobi) -> answer, for a checkpoint trained with --mode latent"
    )
    latent_iterations: int | None = option(None, help="latent mode: Jacobi iterations T (default: as trained)")

    def validate(self) -> None:
        if self.latent_iterations is not None and self.latent_iterations < 1:
            raise ConfigError(f"EvalConfig.latent_iterations: must be >= 1 or null, got {self.latent_iterations}")
        self.check_min(1, "batch_size", "max_new_tokens")


@dataclass
class DemoConfig(Record):
    """`kvdistill demo`: the whole pipeline on synthetic data and tiny models, on CPU."""

    out: str = option("demo-out", help="output directory (models, store.zarr, runs, summary.json, training.png)")
    data: DataSpec = option(
        factory=lambda: DataSpec(synthetic=SyntheticSpec(n_test=1000)),
        help=(
            "the data set (1,000 test questions: with 200, one run's accuracy carries about +-0.03 of sampling noise)"
        ),
    )
    num_shards: int = option(2, help="shards per teacher")
    teacher_steps: int = option(300, help="CE steps for each tiny teacher")
    student_steps: int = option(300, help="steps for each student run")
    batch_size: int = option(32, help="batch size of every training run")
    seed: int = option(0, help="seed of the student runs")
    kv_weight: float = option(1.0, help="KV loss weight of the distilled student")
    extra_teachers: list[Literal["cross-tokenizer", "dual-prompt"]] = option(
        factory=list,
        help=(
            "cross-tokenizer: a Llama teacher with its own, larger BPE vocabulary (char-overlap time map); "
            "dual-prompt: teacher-qwen2 again under a step-by-step template (per-segment resampling)"
        ),
    )
    mode: Literal["cot", "latent"] = option(
        "cot",
        help=(
            "latent (KaVa): dump with R-KV compression to latent_slots, train latent students with and without "
            "the KV loss, compare with a CoT student"
        ),
    )
    latent_slots: int = option(8, help="latent mode: M, compressed reasoning slots per teacher")
    latent_iterations: int = option(3, help="latent mode: Jacobi iterations T")

    def validate(self) -> None:
        self.check_min(
            1, "num_shards", "teacher_steps", "student_steps", "batch_size", "latent_slots", "latent_iterations"
        )
        self.check_min(0, "seed", "kv_weight")


# The core arms `kvdistill compare` runs by default (the others: kvdistill.compare.ARMS).
COMPARE_ARMS = ["ce", "kv-single", "kv-fixed", "kv-shuffled"]


@dataclass
class CompareConfig(Record):
    """`kvdistill compare`: train and evaluate every arm (a name -> TrainConfig overrides) once
    per seed on one store, and report each arm as mean and 95% CI over seeds, plus its paired
    difference to the baseline arm (`ce` by default). Default: the embedded demo's data, teachers and store."""

    out: str = option("compare-out", help="output directory (runs/<arm>/seed-<n>, compare.json, compare.html)")
    seeds: int = option(
        10,
        help=(
            "seeds 0 .. seeds-1 per arm (>= 2: the CI is Student t with seeds - 1 degrees of freedom); "
            "a seed sets the shuffle order and the adapters' init"
        ),
    )
    arms: list[str] = option(
        factory=lambda: list(COMPARE_ARMS),
        help="arms to run; the baseline arm is required (differences are paired against it)",
    )
    baseline: str = option(
        "ce", help="the arm every difference is paired against (e.g. latent-codi for a latent-mode sweep)"
    )
    arm_overrides: dict[str, dict[str, Any]] = option(
        factory=dict,
        help=(
            "adds or replaces arms: name -> TrainConfig overrides, e.g. kv-cos={kv_loss: cosine}; an arm may set "
            "its own store holding the same data (e.g. stored compactly: kv-int4={fusion: fixed, store: int4.zarr})"
        ),
    )
    steps: int = option(300, help="optimizer steps per run")
    curve_steps: list[int] = option(
        factory=list,
        help=(
            "sample efficiency: also train curve_arms at these step budgets (e.g. 100,1000), each a run with its own"
            " schedule, and report accuracy against steps and the baseline's steps each arm's accuracy is worth"
        ),
    )
    curve_arms: list[str] = option(
        factory=lambda: ["ce", "kv-fixed"], help="arms trained at every curve_steps budget (with the baseline)"
    )
    curve_seeds: int | None = option(None, help="seeds per curve budget (default: seeds)")
    bootstrap: int = option(
        2000, help="bootstrap resamples (seeds, then questions, paired) for the accuracy differences; 0: none"
    )
    train: dict[str, Any] = option(
        factory=dict, help="TrainConfig overrides shared by every arm, e.g. kv_loss=cosine,lr=0.003"
    )
    demo: DemoConfig = option(
        factory=DemoConfig,
        help=(
            "the embedded default: `kvdistill demo` with this config is run first for its teachers "
            "and store, or reused when its summary.json records the same config"
        ),
        aliases={"out": "--demo-out"},
    )
    store: str | None = option(
        None, help="a finalized store to use instead of the demo's (with --student and --eval-data.source)"
    )
    student: ModelSpec | None = option(
        None, help="the student that --store was dumped for", aliases={"name_or_path": "--student"}
    )
    eval_data: DataSpec | None = option(None, help="the evaluation data (default: the test split of the demo's data)")
    max_new_tokens: int | None = option(
        None, help="generation budget per eval question (default: derived from the eval data, as kvdistill eval does)"
    )
    device: str = option("auto", help="auto | cpu | cuda")

    def validate(self) -> None:
        if self.seeds < 2:
            raise ConfigError(f"CompareConfig.seeds: a confidence interval needs >= 2 seeds, got {self.seeds}")
        if self.steps < 1:
            raise ConfigError(f"CompareConfig.steps: must be >= 1, got {self.steps}")
        if any(n < 1 for n in self.curve_steps):
            raise ConfigError(f"CompareConfig.curve_steps: every budget must be >= 1, got {self.curve_steps}")
        if self.curve_steps and self.baseline not in self.curve_arms:
            raise ConfigError(
                f"CompareConfig.curve_arms: the curve is read against the baseline {self.baseline!r}; add it to"
                f" {self.curve_arms}"
            )
        if self.curve_seeds is not None and self.curve_seeds < 2:
            raise ConfigError(
                f"CompareConfig.curve_seeds: a confidence interval needs >= 2 seeds, got {self.curve_seeds}"
            )
        self.check_min(0, "bootstrap")
        self.check_min(1, "max_new_tokens")
        if self.baseline not in self.arms:
            raise ConfigError(
                f"CompareConfig.arms: differences are paired against the baseline {self.baseline!r}; add it to"
                f" {self.arms}"
            )
        dup = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if dup:
            raise ConfigError(f"CompareConfig.arms: {dup} listed twice")
        if (self.store is None) != (self.student is None):
            raise ConfigError("CompareConfig: give `store` and `student` together (or neither, for the demo's)")
        if self.store is not None and self.eval_data is None:
            raise ConfigError(
                "CompareConfig.eval_data: with your own `store`, name the evaluation data (eval_data: {source: ...,"
                " split: test} in --config)"
            )


# --- the flags of the tools: `store ...`, `report`, `train diagnose`, `jobs status` -----------------


@dataclass
class StoreToolConfig(Record):
    """A `kvdistill store` tool: the store it reads, first on the command line."""

    store: str = option(help="path to the store, e.g. out.zarr", positional=True)


@dataclass
class StoreFinalizeConfig(StoreToolConfig):
    """`kvdistill store finalize STORE`: check every shard is complete, write index.parquet."""


@dataclass
class StoreInspectConfig(StoreToolConfig):
    """`kvdistill store inspect STORE`: teachers, shards, rows, tokens, bytes on disk."""

    json: bool = option(False, help="print JSON instead of a table")


@dataclass
class StoreVerifyConfig(StoreToolConfig):
    """`kvdistill store verify STORE`: re-read every byte; exit 4 on any problem."""


@dataclass
class StoreStatsConfig(StoreToolConfig):
    """`kvdistill store stats STORE`: per-layer mean / std / absmax of every teacher's K and V."""

    teacher: list[str] | None = option(None, help="only these teachers (repeatable; default: all)")
    png: str | None = option(None, help="also plot per-layer std and absmax to this PNG")
    json: bool = option(False, help="print JSON instead of a table")


@dataclass
class StoreConvertConfig(Record):
    """`kvdistill store convert SRC DST`: a store copied into another backend or K/V codec."""

    src: str = option(help="a finalized store of either backend", positional=True)
    dst: str = option(
        help="the new store (must not exist, or be an empty directory; removed again if the conversion fails)",
        positional=True,
    )
    to: Literal["zarr", "webdataset"] | None = option(None, help="backend of DST (default: the other one than SRC's)")
    kv_dtype: KVDtype | None = option(
        None,
        help=(
            "store every teacher's K/V in this codec (default: each teacher's own); webdataset holds float16 / float32"
            " only"
        ),
    )
    compression_level: int | None = option(
        None, help="blosc-zstd level of DST's K/V chunks, 0 (none) to 9 (zarr only; default: SRC's)"
    )
    blosc_shuffle: Literal["byte", "bit"] | None = option(
        None, help="blosc shuffle of DST's K/V chunks (zarr only; default: SRC's)"
    )

    def validate(self) -> None:
        if self.compression_level is not None and not 0 <= self.compression_level <= 9:
            raise ConfigError(
                f"StoreConvertConfig.compression_level: blosc levels are 0 (none) to 9, got {self.compression_level}"
            )


@dataclass
class ShowAlignmentConfig(StoreToolConfig):
    """`kvdistill store show-alignment STORE`: one sample's time map and layer map, drawn."""

    teacher: str = option(help="teacher name in the store (`kvdistill store inspect` lists them)")
    sample: str = option(help="sample id (index.parquet's sample_id column, e.g. synth-train-3)")
    out: str = option(
        help=(
            "image to write, e.g. alignment.png (no suffix: .png is added; an existing folder: "
            "FOLDER/alignment-TEACHER-SAMPLE.png)"
        )
    )
    max_tokens: int = option(64, help="draw at most this many student tokens (the title says so when cut)")
    start: int = option(0, help="first student token drawn")


@dataclass(kw_only=True)
class PlanConfig(DumpTask):
    """`kvdistill store plan`: a store sized before dumping it, from the models' configs and the
    student's tokenizer (no weights). It takes dump's flags, so a dump's command line (--teacher
    repeated) sizes as is. Of those, the student, the data, --num-shards, --kv-dtype,
    --teacher-kv-dtype, --projection, --teacher-projection, --logits-top-k,
    --teacher-logits-top-k and --backend change the plan; the others are accepted and change
    nothing in it."""

    teachers: list[ModelSpec] = option(
        help="the teachers: hub ids or checkpoint directories (repeatable), or each a mapping of ModelSpec fields",
        aliases=("--teacher",),
        group="plan",
    )
    store: str | None = option(None, help="not read: the plan sizes a store that does not exist yet")
    num_shards: int | None = option(
        None, help="shards per teacher (default: the suggestion, the largest teacher's at --target-shard-gib)"
    )
    target_shard_gib: float = option(1.0, help="suggest shards of about this size on disk, in GiB", group="plan")
    compression: float | None = option(
        None,
        help="expected compression ratio (default: 1.3 for float codecs, 1.0 quantised or webdataset)",
        group="plan",
    )
    pca: int | None = option(
        None,
        help=(
            "size a store projected to D dims per layer before fitting the projection "
            "(`kvdistill align calibrate --pca D`; a --projection file gives its own D)"
        ),
        group="plan",
    )
    json: bool = option(
        False,
        help="print one JSON object (the plan per teacher, and every storage option under 'options')",
        group="plan",
    )

    def validate(self) -> None:
        # Named by flag, before the dump's own checks: these are the plan's numbers.
        def bad(flag: str, value: float, rule: str) -> ConfigError:
            return ConfigError(f"{flag} {value:g}: {rule}")

        if self.num_shards is not None and self.num_shards < 1:
            raise bad(
                "--num-shards", self.num_shards, "must be >= 1 (shards per teacher); leave it out for the suggestion"
            )
        if not (math.isfinite(self.target_shard_gib) and self.target_shard_gib * 2**30 >= 1):
            raise bad("--target-shard-gib", self.target_shard_gib, "must be a finite size > 0 in GiB, e.g. 1 or 0.5")
        if self.compression is not None and not (math.isfinite(self.compression) and self.compression > 0):
            raise bad(
                "--compression",
                self.compression,
                "must be a finite ratio > 0 (raw bytes / bytes on disk, e.g. 1.3); leave it out for the codec's"
                " default",
            )
        if self.pca is not None and self.pca < 1:
            raise bad(
                "--pca", self.pca, "must be >= 1 (dims kept per layer); leave it out for the teachers' own width"
            )
        if not self.teachers:
            raise ConfigError("PlanConfig.teachers: name at least one teacher (--teacher T, repeatable)")
        super().validate()


@dataclass
class ReportConfig(Record):
    """`kvdistill report RUN_DIR`: one self-contained HTML page for a training run."""

    run_dir: str = option(help="a training run directory (holds metrics.jsonl)", positional=True)
    out: str | None = option(None, help="HTML file to write (default: RUN_DIR/report.html)")
    compare: str | None = option(None, help="a `kvdistill compare` output directory: add its table")


@dataclass
class DiagnoseConfig(Record):
    """`kvdistill train diagnose`: what it measures; what it builds is the TrainConfig of `train`'s flags."""

    batches: int = option(4, help="batches to average over")
    checkpoint: str | None = option(
        None,
        help=(
            "diagnose a trained run's weights instead of the initialisation: a run directory (its final/), a final/"
            " directory or RUN_DIR/checkpoints/step-N; the config is the run's train_config.yaml unless --config is"
            " given, and the run's loss curve follows"
        ),
    )
    run: str | None = option(
        None,
        help=(
            "only this: do RUN_DIR's logged loss terms fall (metrics.jsonl: first value vs the mean of the last 20, "
            "per term and per Jacobi iteration)? Builds no model and reads no store"
        ),
    )
    json: str | None = option(
        None, help="also write the result (terms, suggested weights, curve) as JSON to this file"
    )

    def validate(self) -> None:
        self.check_min(1, "batches")


@dataclass
class JobsStatusConfig(Record):
    """`kvdistill jobs status`: per teacher x shard of a store, complete / partial / missing."""

    store: str = option(help="the store")
    config: str | None = option(None, help="the jobs config (names teachers that have not started yet)")


@dataclass
class JobsLocalConfig(JobsConfig):
    """`kvdistill jobs local`: every dump task of a jobs config on this machine, then finalize."""

    finalize: bool = option(True, help="finalize the store afterwards")


@dataclass
class JobsSlurmConfig(JobsConfig):
    """`kvdistill jobs slurm`: sbatch scripts of a jobs config, submitted with --submit."""

    submit: bool = option(False, help="submit with sbatch (otherwise print what would be submitted)")
