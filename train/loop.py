"""The training loop, both modes: a student learns from the KV store; no teacher is built.
(A *recipe* is a named TrainConfig base in train/recipes/, `kvdistill train --recipe kava`.)

    train(TrainConfig(store="out.zarr", student=ModelSpec("path/or/hub-id"), out="runs/a"))

Read in the order it runs: `_train` (the whole run on one screen), `_setup`, `_start`, `_epoch`
and `_step`, `_finish`. `build_mode`, `training_loader` and `optimizer_and_schedule` are the
setup `train diagnose` and bench/train.py build too.

setup: accelerate (CPU, one GPU, DDP, FSDP); the student (train/student.py: checked against
the store, LoRA, gradient checkpointing); the mode (train/mode.py: `cot` the written chain
through a Distiller, `latent` KaVa latent slots); AdamW + cosine schedule (stepped once per
optimizer step, whatever the number of processes); the stream (train/stream.py: one global
sample order per epoch; each step's global batch split across ranks and micro-batches;
kv_control "shuffled" deranges each micro-batch's teacher K/V: the negative control). train:
optimizer steps of gradient_accumulation_steps micro-batches per rank, the update that of the
whole global batch (`optimizer_step`); grad clipping; metrics (the run's, over every rank)
every `log_every` steps to metrics.jsonl (and the accelerate trackers of `report_to`);
validation every `eval_steps` on held-out shards or a second store, RUN_DIR/best on
`metric_for_best_model`. save: RUN_DIR/final, a Hugging Face checkpoint (+ adapters.pt /
router.pt / latent.pt) and train_config.yaml.

checkpoints (`save_every`, and on a stop signal): RUN_DIR/checkpoints/step-N, complete or
absent (train/checkpoint.py); `save_total_limit` N keeps the last N of them. resume: a
checkpoint, a run directory's latest one, or "auto"
(the latest in RUN_DIR if any, else step 0); bitwise exact on the same number of processes,
to float tolerance on another; the stream starts after the samples of the epoch the checkpoint
had consumed, reading none of them; metrics.jsonl and trackers append.
signals: SIGTERM or SIGUSR1 lets the running step finish, saves its checkpoint (every rank
agrees on the step) and raises Preempted (exit code 143); on SIGUSR1 with `requeue_on_usr1`
the main process first runs `scontrol requeue $SLURM_JOB_ID`.

Raises StoreError for an unfinalised store or one built for another student,
FloatingPointError on a non-finite loss (naming the term and the sample ids), and Preempted.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from kvdistill.core.models import pad_token_id, resolve_device
from kvdistill.errors import Preempted
from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.store import StoreError
from kvdistill.store.errors import ShardBusy
from kvdistill.store.lock import FileLock

from .checkpoint import (
    Position,
    find_resume,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_complete,
)
from .distiller import cot_mode
from .latent import latent_mode
from .mode import Mode
from .quant import kv_as_stored
from .report import resolve_trackers, tracker_config, tracker_values
from .stream import KVStream, train_loader
from .student import load_student, param_hash, save_student
from .validation import Best, validate, validation_loader

__all__ = [
    "train",
    "build_mode",
    "Built",
    "training_loader",
    "optimizer_and_schedule",
    "optimizer_step",
    "split_shards",
    "planned_steps",
    "stop_signals",
    "mixed_precision",
    "summary_terms",
    "open_metrics",
]


def open_metrics(cfg: TrainConfig, out: Path) -> tuple[IO[str], int]:
    """metrics.jsonl, and the last step it holds. A fresh run starts it anew. A resumed one
    (--resume, auto included) appends, and the caller logs only steps after that last one:
    steps replayed from an earlier checkpoint are in the file already (resume is exact, so
    with the same values), and trackers take the same steps. A row cut off by a kill is dropped."""
    path = out / "metrics.jsonl"
    if not cfg.resume or not path.exists():
        return path.open("w"), 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last row was cut off mid-write
        with path.open("r+b") as f:
            f.truncate(end)
    rows = data[:end].split(b"\n")
    last = next((json.loads(r)["step"] for r in reversed(rows) if r.strip()), 0)
    return path.open("a"), last


# SIGTERM: SLURM preemption, scancel, the time limit itself; SIGUSR1: the time limit's warning
# (`#SBATCH --signal=B:USR1@N` in the generated train.sbatch) or `scancel --signal=USR1 --batch`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """For the block, SIGTERM and SIGUSR1 append their number to the yielded list instead of
    ending the process; the loop reads it after each optimizer step. The previous handlers
    come back afterwards. Python runs handlers in the main thread only: elsewhere, nothing is
    installed."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, _frame):
        got.append(signum)  # no I/O here: the main thread may be in the middle of a write

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield got
    finally:
        for s, h in previous.items():
            if signal.getsignal(s) is handler:  # not replaced meanwhile (`_slurm_requeue` ignores SIGTERM)
                signal.signal(s, h)


def _agreed_signal(accelerator, got: list[int]) -> int:
    """The signal every rank stops for after this step (0: none), the same on every rank: one
    all-reduce (max) of a scalar per step, so no rank saves another step than the others or
    waits alone in a collective. SIGTERM (15) beats SIGUSR1 (10): it is never requeued."""
    mine = max(got, default=0)
    if accelerator.num_processes == 1:
        return mine
    flag = torch.tensor([mine], device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _slurm_requeue() -> str:
    """`scontrol requeue $SLURM_JOB_ID`: what happened, as the end of the preempted line."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM (no SLURM_JOB_ID), so not requeued: re-run with --resume auto to continue"
    argv = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{shlex.join(argv)}` failed ({e}): resubmit the job (it runs with --resume auto) to continue"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or "no output"
        return (
            f"`{shlex.join(argv)}` failed (exit {done.returncode}: {why}): resubmit the job (it runs with --resume"
            " auto) to continue"
        )
    # SLURM ends the running job with SIGTERM now; this process is done, so let it print and exit.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return f"SLURM job {job} requeued (`{shlex.join(argv)}`): it comes back and continues from there (--resume auto)"


def _preempted(cfg: TrainConfig, accelerator, signum: int, path: Path, step: int, seconds: float) -> Preempted:
    """What a stopped run raises once its checkpoint is complete (and metrics and trackers are
    closed): exit code 143, one line saying where it stopped, and how it continues; the main
    process requeues a SLURM job on SIGUSR1 when cfg.requeue_on_usr1 asks it to."""
    name = signal.Signals(signum).name
    if signum == signal.SIGUSR1 and cfg.requeue_on_usr1:
        then = _slurm_requeue() if accelerator.is_main_process else "the main process requeues the SLURM job"
    elif signum == signal.SIGUSR1:
        then = "continue with the same command and --resume auto (--requeue-on-usr1: a SLURM job requeues itself)"
    else:  # SLURM requeues a preempted job itself (#SBATCH --requeue); a cancelled one stays cancelled
        then = (
            "continue with the same command and --resume auto (a preempted SLURM job with --requeue comes back by"
            " itself)"
        )
    return Preempted(
        message=(
            f"preempted ({name}) after step {step}: checkpoint {path} is complete (saved in {seconds:.1f} s); {then}"
        )
    )


def _no_window(cfg: TrainConfig, batches, pos: Position) -> None:
    n = len(batches.stream)
    if not n:
        raise StoreError(f"store {cfg.store} yielded no samples to train on")
    raise StoreError(
        f"store {cfg.store}: epoch {pos.epoch} from sample {pos.samples_in_epoch} of {n} makes no whole global batch"
        f" of {cfg.batch_size} x {batches.accumulation} (accumulation) x {batches.world_size} (processes), which"
        " kv_control shuffled needs; lower --batch-size"
    )


def _check_fsdp(accelerator) -> None:
    """`accelerate launch` asked for FSDP, but accelerate made it another run (it shards only on
    GPUs and NPU / XPU / HPU; a CPU process group stays MULTI_CPU, i.e. DDP, silently)."""
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and accelerator.distributed_type != DistributedType.FSDP
    ):
        raise ConfigError(
            f"accelerate launch asked for FSDP, but this run is {accelerator.distributed_type.value}: accelerate"
            " shards only on GPUs (and NPU / XPU / HPU); on the CPU it would be DDP with the whole model on every"
            " process. Use --multi_gpu for CPU DDP"
        )


def mixed_precision(cfg: TrainConfig) -> str | None:
    """Accelerator's mixed_precision for cfg: None leaves it to `accelerate launch` / its config."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    gpu = resolve_device(cfg.device).type == "cuda"
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """The training loop (module docstring), for either mode. Raises Preempted (exit code 143) after
    SIGTERM / SIGUSR1, once the checkpoint of the step that was running is complete."""
    with stop_signals() as got:
        return _train(cfg, progress, got)


@contextmanager
def run_lock(accelerator, out: Path, what: str = "run directory") -> Iterator[None]:
    """One run (one process group) writes a run directory at a time: the main process holds an
    flock on RUN_DIR/.kvdistill.lock (store/lock.py: dropped by the kernel if it dies); a second
    run on the same --out stops with ShardBusy (exit 6) naming the owner, on every rank."""
    lock, busy = None, None
    if accelerator.is_main_process:
        lock = FileLock(
            out / ".kvdistill.lock", f"{what} {out}", fix="wait for that run to finish, or train into another --out"
        )
        try:
            lock.acquire()
        except ShardBusy as e:
            lock, busy = None, e
    ok = torch.tensor([0.0 if busy else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if busy or not ok.item():
        raise busy or ShardBusy(f"{what} {out} is being written by another run (the main process says whom)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, progress: bool, got: list[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    trackers = resolve_trackers(cfg.report_to)  # before any work: a missing tracker fails fast
    accelerator = Accelerator(
        # the CPU (--device cpu, or auto without a GPU) is asked for: `accelerate launch --multi_gpu`
        # then runs CPU DDP over gloo (without cpu=True every process would train alone, as rank 0 of 1)
        cpu=_device(cfg).type == "cpu",
        mixed_precision=mixed_precision(cfg),
        log_with=trackers or None,
        project_dir=str(Path(cfg.out) / "trackers") if trackers else None,
    )
    _check_fsdp(accelerator)
    with run_lock(accelerator, Path(cfg.out)):
        run = _setup(cfg, accelerator, trackers)
        state = _start(run, progress)
        bar = tqdm(
            total=run.max_steps,
            initial=state.pos.step,
            desc=f"train {run.mode.name} {run.out.name}",
            disable=not (progress and accelerator.is_main_process),
        )
        run.model.train()
        while state.pos.step < run.last and not state.stop:
            _epoch(run, state, got, bar)
        bar.close()
        if state.stop:
            _close(run, state)
            raise _preempted(cfg, accelerator, state.stop, state.ckpt, state.pos.step, state.save_s)
        return _finish(run, state, t0)


def _device(cfg: TrainConfig) -> torch.device:
    """cfg.device by the one rule (`resolve_device`). accelerate puts each process on the GPU of
    its local rank, so a GPU index it would silently ignore is refused."""
    device = resolve_device(cfg.device)
    if device.index is not None:
        raise ConfigError(
            f"TrainConfig.device {cfg.device}: accelerate puts each process on the GPU of its local rank; "
            f"pick the GPU with CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
        )
    return device


# ----------------------------------------------------------------------------- setup


@dataclass
class Built:
    """What `build_mode` builds: the student (its tokenizer, pad id), the store's StoreSpec, the
    teachers it learns from ({name: TeacherSpec}), and the mode wrapping the student."""

    mode: Mode
    tokenizer: Any
    student: nn.Module
    spec: Any
    teachers: dict[str, Any]
    pad_id: int


def build_mode(cfg: TrainConfig) -> Built:
    """The student and its mode, built one way for train, `train diagnose` and bench/train.py:
    seeded with cfg.seed first (the same initial weights in each), `load_student` (checked against
    the store), then `latent_mode` (cfg.mode latent) or `cot_mode`."""
    set_seed(cfg.seed)
    tokenizer, student, spec, teachers = load_student(cfg)
    pad_id = pad_token_id(tokenizer)
    if cfg.mode == "latent":
        mode = latent_mode(cfg, student, spec, teachers, pad_id)
    else:
        mode = cot_mode(cfg, student, spec, teachers)
    return Built(mode, tokenizer, student, spec, teachers, pad_id)


def training_loader(cfg: TrainConfig, built: Built, device, rank: int = 0, world_size: int = 1):
    """The training batches of rank `rank` of `world_size` (train/stream.py: one global sample
    order per epoch, each global batch split across ranks and micro-batches; kv_control
    "shuffled" gives each sample another's teacher K/V), from the store's training shards
    (`split_shards`), reading what the mode reads, K/V made ready for `device` (cfg.kv_transfer).
    `loader.dataset.stream` is the KVStream."""
    stream = KVStream(
        cfg.store,
        list(built.teachers),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        shuffle_buffer_bytes=cfg.shuffle_buffer_bytes,
        read_kv=built.mode.read_kv,
        read_latent=built.mode.read_latent,
        read_logits=built.mode.read_logits,
        kv_as_stored=kv_as_stored(cfg.kv_transfer, device),
        shards=split_shards(cfg, built.spec.num_shards)[0],
    )
    return train_loader(stream, cfg, built.pad_id, built.mode.control, rank=rank, world_size=world_size)


def optimizer_and_schedule(cfg: TrainConfig, mode: Mode, max_steps: int):
    """(AdamW over the mode's parameter groups, the cosine schedule over the run's `max_steps`
    (`planned_steps`) with cfg.warmup_over(max_steps) warm-up steps). The schedule is not for
    accelerator.prepare: its AcceleratedScheduler steps once per process at every optimizer step,
    N times too fast; `optimizer_step` steps it once, and checkpoints save and restore it."""
    opt = torch.optim.AdamW(mode.param_groups, weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, cfg.warmup_over(max_steps), max_steps)


@dataclass
class _Run:
    """What `_setup` builds, read by every later piece of the run."""

    cfg: TrainConfig
    accelerator: Any
    trackers: list
    built: Built
    model: nn.Module  # mode.model, prepared (DDP / FSDP)
    opt: Any
    sched: Any
    loader: Any
    val_loader: Any  # None without eval_steps
    max_steps: int  # planned: the LR and KV-weight schedules' length
    last: int  # the step this invocation stops after (stop_at_step)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def mode(self) -> Mode:
        return self.built.mode


def _setup(cfg: TrainConfig, accelerator, trackers: list) -> _Run:
    """The student and its mode, the batches, optimizer and schedule, validation, all prepared;
    RUN_DIR/train_config.yaml written and the trackers started."""
    built = build_mode(cfg)
    mode = built.mode
    metric = (cfg.metric_for_best_model or "val_loss").removeprefix("val_")
    if metric not in ("loss", *mode.finite):  # before any step, not at the first validation
        raise ConfigError(
            f"TrainConfig.metric_for_best_model: mode {mode.name} validates val_loss and val_<term> for terms"
            f" {list(mode.finite)}, not {cfg.metric_for_best_model!r}"
        )
    world = accelerator.num_processes
    # Each rank's loader yields its part of every global batch, so loaders are not handed to accelerate.
    loader = training_loader(cfg, built, accelerator.device, rank=accelerator.process_index, world_size=world)
    max_steps = planned_steps(cfg, loader.dataset)
    opt, sched = optimizer_and_schedule(cfg, mode, max_steps)
    accelerator.register_for_checkpointing(sched)
    val_loader = None
    if cfg.eval_steps:
        val_shards = split_shards(cfg, built.spec.num_shards)[1]
        val_loader = validation_loader(
            cfg, mode, built.tokenizer, built.student, list(built.teachers), val_shards, accelerator, built.pad_id
        )
    model, opt = accelerator.prepare(mode.model, opt)
    out = Path(cfg.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "train_config.yaml")
    if trackers:
        accelerator.init_trackers(out.name, config=tracker_config(cfg.to_dict()))
    last = min(max_steps, cfg.stop_at_step or max_steps)
    return _Run(cfg, accelerator, trackers, built, model, opt, sched, loader, val_loader, max_steps, last)


@dataclass
class _State:
    """What the run tracks as it goes."""

    pos: Position
    best: Best
    metrics_f: IO[str] | None  # metrics.jsonl (main process)
    logged: int  # the last step metrics.jsonl held at the start: replayed steps are not logged again
    samples_log: Path | None  # --record-samples
    history: History = field(default_factory=lambda: History())
    shards_read: set[int] = field(default_factory=set)
    samples_read: int = 0
    stop: int = 0  # the signal that stopped the run
    ckpt: Path | None = None  # the last step's checkpoint path (saved when stopped)
    save_s: float = 0.0  # seconds the stop's checkpoint took
    tokens_at_start: int = 0  # tokens trained before this process (a resumed run)


def _start(run: _Run, progress: bool) -> _State:
    """Where the run starts: a checkpoint's position (--resume), else step 0; metrics.jsonl,
    RUN_DIR/best and the sample log continued or begun."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    ckpt_in = find_resume(cfg.resume, out)
    if cfg.resume == "auto" and ckpt_in is None:
        accelerator.print(
            f"--resume auto: no complete checkpoint in {out / 'checkpoints'}; starting at step 0", flush=True
        )
    pos = load_checkpoint(accelerator, ckpt_in) if ckpt_in else Position()
    if ckpt_in:
        accelerator.print(
            f"resuming from {ckpt_in} at step {pos.step} (epoch {pos.epoch}, sample {pos.samples_in_epoch})",
            flush=True,
        )
    if progress and accelerator.is_main_process:
        _announce(run)
    metrics_f, logged = open_metrics(cfg, out) if accelerator.is_main_process else (None, 0)
    best = Best.resume(out, cfg) if ckpt_in else Best(cfg.metric_for_best_model)
    samples_log = (out / "ranks" / f"samples-rank-{accelerator.process_index}.jsonl") if cfg.record_samples else None
    if samples_log:
        samples_log.parent.mkdir(parents=True, exist_ok=True)
        if not ckpt_in:
            samples_log.write_text("")
    return _State(pos, best, metrics_f, logged, samples_log, tokens_at_start=pos.tokens)


def _announce(run: _Run) -> None:
    cfg, accum, world = run.cfg, run.cfg.gradient_accumulation_steps, run.accelerator.num_processes
    stream = run.loader.dataset.stream
    print(
        f"kvdistill train: mode {run.mode.name}, {run.max_steps} steps of an effective batch {cfg.batch_size} x"
        f" {accum} (accumulation) x {world} (processes) = {cfg.batch_size * accum * world} samples",
        flush=True,
    )
    if stream.buffer_size < cfg.shuffle_buffer:
        print(
            f"kvdistill train: shuffle buffer capped at {stream.buffer_size} of --shuffle-buffer {cfg.shuffle_buffer}"
            f" samples by --shuffle-buffer-bytes {cfg.shuffle_buffer_bytes} ({stream.sample_bytes / 2**20:.1f} MiB a"
            " sample as stored)",
            flush=True,
        )


# ----------------------------------------------------------------------------- train


def _epoch(run: _Run, state: _State, got: list[int], bar) -> None:
    """The optimizer steps of one epoch, from where `state.pos` stands in it, until the epoch
    ends, the run's last step, or a stop signal (`state.stop`)."""
    pos, batches = state.pos, run.loader.dataset
    batches.set_epoch(pos.epoch, pos.samples_in_epoch)  # resuming mid-epoch: after the samples trained, reading none
    if not batches.windows():
        if not pos.samples_in_epoch:
            _no_window(run.cfg, batches, pos)  # raises
        # a checkpoint taken at the epoch's end, in the (epoch, all of it) form: not iterated (the
        # loader's generator would draw this epoch's seed), on to the next epoch
        pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0
        return
    window: list[dict[str, Any]] = []
    for batch in run.loader:
        window.append(batch)
        if batch["micro"] < batch["micros"] - 1:
            continue
        row = _step(run, state, window, batch["window_size"])
        window = []
        bar.update(1)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in run.mode.postfix if k in row})
        state.ckpt, state.stop, state.save_s, done = _after_step(
            run.cfg, run.accelerator, got, run.out, pos, run.last, batch["last"]
        )
        if done:
            break
    pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0


def _step(run: _Run, state: _State, window: list[dict[str, Any]], window_size: int) -> dict[str, Any]:
    """One optimizer step over `window` and what follows it: the position moved on, what was read
    tallied, validation (and RUN_DIR/best), the row logged. Returns the row."""
    cfg, pos = run.cfg, state.pos
    kv_weight = _schedule_kv_weight(cfg, run.mode, pos.step, run.max_steps)
    row = optimizer_step(run.mode, run.model, run.opt, run.sched, run.accelerator, cfg, window, pos.step)
    pos.step += 1
    pos.tokens += row.pop("tokens")
    pos.samples_in_epoch += window_size
    real = [b for b in window if b["weight"]]
    for b in real:
        state.shards_read.update(b["shards"])
        state.samples_read += len(b["sample_ids"])
    if state.samples_log:
        with state.samples_log.open("a") as f:
            ids = [i for b in real for i in b["sample_ids"]]
            f.write(json.dumps({"step": pos.step, "epoch": pos.epoch, "sample_ids": ids}) + "\n")
    row = {
        "step": pos.step,
        "epoch": pos.epoch,
        "lr": run.sched.get_last_lr()[0],
        **({} if kv_weight is None else {"kv_weight": kv_weight}),
        "tokens": pos.tokens,
        **row,
    }
    validated = bool(run.val_loader is not None and pos.step % cfg.eval_steps == 0)
    if validated:
        row.update(validate(run.mode, run.model, run.val_loader, run.accelerator, pos.step, cfg.val_batches))
        if state.best.improves(row):
            state.best.save(run.accelerator, run.model, cfg, run.built.tokenizer, run.mode, run.out, pos.step, row)
    state.history.append(row)
    # replayed steps (a resume from before metrics.jsonl's last row) are logged already
    if pos.step > state.logged and (pos.step % cfg.log_every == 0 or pos.step == run.max_steps or validated):
        if state.metrics_f:
            state.metrics_f.write(json.dumps(row) + "\n")
            state.metrics_f.flush()
        if run.trackers:
            run.accelerator.log(tracker_values(row), step=pos.step)
    return row


# ----------------------------------------------------------------------------- finish


def _close(run: _Run, state: _State) -> None:
    if state.metrics_f:
        state.metrics_f.close()
    if run.trackers:
        run.accelerator.end_training()  # flushes and closes the trackers


def _finish(run: _Run, state: _State, t0: float) -> dict[str, Any]:
    """RUN_DIR/ranks/rank-N.json (what each rank read), RUN_DIR/final, metrics and trackers
    closed; the run summary."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    record = {
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "shards": sorted(state.shards_read),
        "samples": state.samples_read,
    }
    if cfg.hash_params:  # under DDP every rank ends with the same parameters
        record["param_sha256"] = param_hash(accelerator.unwrap_model(run.model))
    (out / "ranks" / f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    # Like a checkpoint: written into .final.partial, renamed once complete (a full disk leaves no half final/).
    final = out / "final"
    save_complete(
        accelerator,
        final,
        "the final model",
        lambda partial: save_student(accelerator, run.model, cfg, run.built.tokenizer, partial, run.mode.save_extra),
    )
    _close(run, state)
    last_row = state.history.tail[-1] if state.history.tail else {}
    val = {k: v for k, v in last_row.items() if k.startswith("val_")}
    pos, world = state.pos, accelerator.num_processes
    summary = {
        "run": str(out),
        "checkpoint": str(final),
        "mode": run.mode.name,
        **run.mode.result,
        "steps": pos.step,
        "epochs_started": pos.epoch,
        "tokens": pos.tokens,
        "effective_batch": cfg.batch_size * cfg.gradient_accumulation_steps * world,
        "teachers": list(run.built.teachers),
        **summary_terms(state.history, run.mode.summary),
        **({"last_validation": val} if val else {}),
        **state.best.summary(),
        **_peak_memory(accelerator.device),
        "seconds": time.perf_counter() - t0,
        "tokens_this_run": pos.tokens - state.tokens_at_start,  # what `seconds` trained (a resumed run: less)
    }
    if accelerator.is_main_process:  # RUN_DIR/summary.json: the report's results (train/report.py)
        tmp = out / ".summary.json.partial"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out / "summary.json")
    return summary


def _peak_memory(device) -> dict[str, float]:
    """This process's peak resident memory (student, optimizer, batches, the stream's buffers;
    bounded: README "Training at scale") and, on CUDA, the peak allocated on the device, in MiB."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.device(device).type == "cuda":
        out["peak_device_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def optimizer_step(
    mode: Mode, model, opt, sched, accelerator, cfg: TrainConfig, window: list[dict[str, Any]], step: int
) -> dict[str, Any]:
    """One optimizer step over `window`: this rank's micro-batches of one global batch (gradient
    accumulation: gradients sync across ranks on the last one only). Its update is that of the
    whole global batch as one batch, however it is split over micro-batches and ranks:
    - each term that is a mean over a unit (tokens, answer tokens, samples) is scaled by the
      micro-batch's share of the global batch's count (all ranks) x the number of processes
      (DDP / FSDP average the ranks' gradients);
    - terms over the whole batch at once (`mode.window`: the layer_std K/V MSE, CKA) are
      computed from statistics summed over every micro-batch and rank; each micro-batch
      back-propagates its own statistics times the gradient of the terms at the total (measured
      first, in a no-grad pass with the same random state, when a rank has several micro-batches);
    - reference statistics (similarity routing, CKA's teacher mix) are the previous step's
      whole global batch's (`mode.update_norm`); a fresh run measures its first one first.
    Returns the logged row, every value the run's (reduced over ranks): scalar terms and
    per-layer lists as global-batch means, "loss", and "tokens" (real tokens of the step)."""
    device, world = accelerator.device, accelerator.num_processes
    counts = [{u: c * b["weight"] for u, c in mode.counts(b).items()} for b in window]
    units = list(counts[0])
    tokens = sum(float(b["attention_mask"].sum()) * b["weight"] for b in window)  # the run's real tokens, logged
    both = _sum_ranks(
        accelerator, torch.tensor([*(sum(c[u] for c in counts) for u in units), tokens], dtype=torch.float64)
    ).tolist()
    total, tokens = dict(zip(units, both[:-1], strict=True)), int(both[-1])
    shares = [{u: world * c[u] / total[u] if total[u] else 0.0 for u in units} for c in counts]
    if mode.norm_missing is not None and mode.norm_missing():
        mode.update_norm(_pre_pass(mode, model, window, accelerator, step, "moments"))
    pre = (
        _pre_pass(mode, model, window, accelerator, step, "sums")
        if mode.window is not None and len(window) > 1
        else None
    )
    opt.zero_grad(set_to_none=True)
    logged: dict[str, torch.Tensor] = {}
    totals: dict[str, dict[str, torch.Tensor]] = {"sums": {}, "moments": {}}
    for i, (batch, share, count) in enumerate(zip(window, shares, counts, strict=True)):
        with accelerator.no_sync(model) if i < len(window) - 1 else nullcontext():
            out = mode.step(model, batch, device, step, share)
            sums = _weighted(out.pop("sums", {}), batch["weight"])
            moments = _weighted(out.pop("moments", {}), batch["weight"])
            _check_finite(out, mode.finite, step, batch)
            loss = out["loss"]
            if sums:  # the window terms' part: this micro-batch's statistics x d term / d total
                at = pre if pre is not None else _sum_ranks(accelerator, {k: v.detach() for k, v in sums.items()})
                grads = _window_grads(mode, at, step, window)
                loss = loss + world * sum((grads[k] * sums[k]).sum() for k in sums)
            accelerator.backward(loss)
        for name, part in (("sums", sums), ("moments", moments)):
            for k, v in part.items():
                totals[name][k] = totals[name].get(k, 0.0) + v.detach()
        logged["loss"] = logged.get("loss", 0.0) + out["loss"].detach().double() / world
        for k, v in out.items():
            if k != "loss" and v.dim() <= 1:
                logged[k] = logged.get(k, 0.0) + v.detach().double() * count[mode.unit_of(k)]
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    got = _sum_ranks(
        accelerator,
        {
            **{f"t.{k}": v for k, v in logged.items()},
            **{f"s.{k}": v for k, v in totals["sums"].items()},
            **{f"m.{k}": v for k, v in totals["moments"].items()},
        },
    )
    if totals["moments"]:
        mode.update_norm({k[2:]: v for k, v in got.items() if k.startswith("m.")})
    row: dict[str, Any] = {}
    for k, v in got.items():
        if k.startswith("t."):
            k = k[2:]
            n = 1.0 if k == "loss" else total[mode.unit_of(k)]
            row[k] = v / n if n else v * 0
    if totals["sums"]:
        for k, v in mode.window({k[2:]: v for k, v in got.items() if k.startswith("s.")}, step).items():
            row[k] = row.get(k, 0.0) + v
    out_row: dict[str, Any] = {k: round(v.item(), 6) for k, v in row.items() if v.dim() == 0}
    out_row.update({k: [round(x, 6) for x in v.tolist()] for k, v in row.items() if v.dim() == 1})
    out_row["tokens"] = tokens
    return out_row


def _schedule_kv_weight(cfg: TrainConfig, mode: Mode, step: int, max_steps: int) -> float | None:
    """--kv-weight-schedule: the KV weight optimizer step `step` (0-based) trains with
    (`TrainConfig.kv_weight_at` over the planned max_steps, as the LR schedule), set as the model's
    kv_weight, which weights every K/V term of either mode (Distiller: kv_k / kv_v, per micro-batch
    or from the window's sums, and Z; LatentStudent: kv_k + kv_v) and the validation after the step.
    A function of the step alone, so the same on every rank and after a resume. It stays > 0 on
    every step a run takes (`kv_weight_at`), so what kv_weight > 0 switches on (the K/V capture,
    adapters) stays on. None, the model untouched, under 'constant' (kv_weight as configured)."""
    if cfg.kv_weight_schedule == "constant":
        return None
    weight = cfg.kv_weight_at(step, max_steps)
    if (
        not weight > 0
    ):  # kv_weight_at keeps it > 0 before the last planned step ends; a weight 0 would switch the K/V terms off
        raise RuntimeError(
            f"kv_weight schedule {cfg.kv_weight_schedule}: weight {weight} at step {step + 1} of {max_steps}"
        )
    mode.model.kv_weight = weight
    return weight


def _weighted(part: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    return part if weight == 1 else {k: v * weight for k, v in part.items()}


def _sum_ranks(accelerator, x):
    """x (a tensor, or a dict of tensors) summed over every process (float64; one all-reduce)."""
    if isinstance(x, dict):
        if not x:
            return {}
        keys = sorted(x)
        flat = _sum_ranks(
            accelerator, torch.cat([torch.as_tensor(x[k], dtype=torch.float64).reshape(-1) for k in keys])
        )
        out, at = {}, 0
        for k in keys:
            shape = torch.as_tensor(x[k]).shape
            out[k] = flat[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
        return out
    x = x.to(device=accelerator.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(x)
    return x.cpu()


def _window_grads(
    mode: Mode, at: dict[str, torch.Tensor], step: int, window: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """d (window terms' loss) / d (each summed statistic), at the window's totals `at`; a
    non-finite window term stops the run like any other."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in at.items()}
    with torch.enable_grad():
        terms = mode.window(leaves, step)
        _check_finite(
            terms, mode.finite, step, {"sample_ids": [i for b in window if b["weight"] for i in b["sample_ids"]]}
        )
        grads = torch.autograd.grad(terms["loss"], list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads, strict=True)}


def _pre_pass(
    mode: Mode, model, window: list[dict[str, Any]], accelerator, step: int, what: str
) -> dict[str, torch.Tensor]:
    """The window's `what` ("sums" or "moments"), every micro-batch and rank, from no-grad
    forwards that leave the random state as they found it (the real forwards then draw the
    same dropout masks)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    total: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in window:
            # shares given (any: only the statistics are used) make the step return its "sums" / "moments"
            out = mode.step(model, batch, accelerator.device, step, dict.fromkeys(mode.counts(batch), 1.0))
            for k, v in _weighted(out.get(what, {}), batch["weight"]).items():
                total[k] = total.get(k, 0.0) + v.detach()
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    return _sum_ranks(accelerator, total)


def _check_finite(losses: dict[str, torch.Tensor], names: tuple[str, ...], step: int, batch: dict[str, Any]) -> None:
    for name in names:
        if name in losses and not math.isfinite(losses[name].item()):
            layers = losses.get(f"{name}_layers")
            bad = [i for i, x in enumerate(layers.tolist()) if not math.isfinite(x)] if layers is not None else []
            where = f" in student layer(s) {bad}" if bad else ""
            raise FloatingPointError(
                f"step {step + 1}: loss term {name} is {losses[name].item()}{where} on samples {batch['sample_ids']}; "
                "check those samples in the store (`kvdistill store verify`) or lower the learning rate"
            )


def split_shards(cfg: TrainConfig, num_shards: int) -> tuple[list[int], list[int]]:
    """(training shards, held-out validation shards): the store's last val_shards shards are
    never trained on."""
    if cfg.val_shards >= num_shards:
        raise StoreError(
            f"store {cfg.store} has {num_shards} shards; --val-shards {cfg.val_shards} would leave none to train on. "
            "Hold out fewer, or validate on a second store (--val-store)"
        )
    n = num_shards - cfg.val_shards
    return list(range(n)), list(range(n, num_shards))


def planned_steps(cfg: TrainConfig, batches) -> int:
    """max_steps, or with num_train_epochs that many passes over the training data: the global
    batches of an epoch (`MicroBatches.windows`: every rank's part of each optimizer step, the
    short last one included unless the shuffled control drops it) x num_train_epochs, rounded
    up, so a whole number of epochs ends exactly on an epoch's last step."""
    if cfg.num_train_epochs is None:
        return cfg.max_steps
    per_epoch = len(batches.windows(start=0))
    if per_epoch < 1:
        raise StoreError(
            f"store {cfg.store}: {len(batches.stream)} training samples make no global batch of {cfg.batch_size} x"
            f" {batches.accumulation} x {batches.world_size}; lower --batch-size"
        )
    return max(1, math.ceil(cfg.num_train_epochs * per_epoch))


def _after_step(
    cfg: TrainConfig, accelerator, got: list[int], out: Path, pos: Position, last: int, end_of_epoch: bool
) -> tuple[Path, int, float, bool]:
    """End of an optimizer step: save_every's checkpoint of this step; then, unless it is the
    run's last step, the stop signal every rank agreed on, with its checkpoint.
    (this step's checkpoint path, signal or 0, seconds its save took, whether the loop ends)."""
    ckpt = out / "checkpoints" / f"step-{pos.step:07d}"
    saved = bool(cfg.save_every and pos.step % cfg.save_every == 0)
    if saved:
        _save(cfg, accelerator, out, ckpt, pos, end_of_epoch)
    if pos.step >= last:
        return ckpt, 0, 0.0, True
    stop = _agreed_signal(accelerator, got)
    if not stop:
        return ckpt, 0, 0.0, False
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        print(
            f"kvdistill train: {signal.Signals(stop).name} after step {pos.step}: saving checkpoint {ckpt}", flush=True
        )
    if not saved:
        _save(cfg, accelerator, out, ckpt, pos, end_of_epoch)
    return ckpt, stop, time.perf_counter() - t0, True


def _save(cfg: TrainConfig, accelerator, out: Path, ckpt: Path, pos: Position, end_of_epoch: bool) -> None:
    """This step's checkpoint; then, with save_total_limit, the older ones beyond it pruned."""
    save_checkpoint(accelerator, ckpt, pos, end_of_epoch)
    if cfg.save_total_limit:
        prune_checkpoints(accelerator, out, cfg.save_total_limit, ckpt)


SUMMARY_WINDOW = 20


class History:
    """What the run summary reads of the logged rows, in memory that does not grow with the run:
    each key's first and last value, and the last SUMMARY_WINDOW rows (`tail`)."""

    def __init__(self) -> None:
        self.first: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.tail: deque[dict[str, Any]] = deque(maxlen=SUMMARY_WINDOW)

    def append(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            self.first.setdefault(k, v)
        self.last.update(row)
        self.tail.append(row)


def summary_terms(history: History, terms: dict[str, str]) -> dict[str, Any]:
    """The run summary's loss figures, named for what they are: per term (summary name -> key in
    the logged records) `last_<name>`, its value at the last logged step, `mean_last_20_<name>`,
    its mean over the last min(20, logged) records (a smoother figure), and `first_<name>`;
    None for a term the run did not log. `mean_last_20_over` says how many records that was."""
    out: dict[str, Any] = {f"mean_last_{SUMMARY_WINDOW}_over": len(history.tail)}
    for name, key in terms.items():
        vals = [r[key] for r in history.tail if key in r]
        out[f"last_{name}"] = history.last.get(key)
        out[f"mean_last_{SUMMARY_WINDOW}_{name}"] = sum(vals) / len(vals) if vals else None
        out[f"first_{name}"] = history.first.get(key)
    return out
