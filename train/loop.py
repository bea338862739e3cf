"""The training recipe, both modes: a student learns from the KV store; no teacher is built.

    train(TrainConfig(store="out.zarr", student=ModelSpec("path/or/hub-id"), out="runs/a"))

setup: accelerate (CPU, one GPU, DDP, FSDP); the student (train/student.py: checked against
the store, LoRA, gradient checkpointing); the mode (train/mode.py: `cot` the written chain
through a Distiller, `latent` KaVa latent slots); AdamW + cosine schedule; the shard stream
(rank x worker split; kv_control "shuffled" deranges each batch's teacher K/V: the negative
control). train: optimizer steps of gradient_accumulation_steps micro-batches, weighted so the
update is that of one batch; grad clipping; metrics every `log_every` steps to metrics.jsonl
(and the accelerate trackers of `report_to`); validation every `eval_steps` on held-out
shards or a second store, RUN_DIR/best on `metric_for_best_model`. save: RUN_DIR/final, a
Hugging Face checkpoint (+ adapters.pt / router.pt / latent.pt) and train_config.yaml.

checkpoints (`save_every`, and on a stop signal): RUN_DIR/checkpoints/step-N, complete or
absent (train/checkpoint.py). resume: a checkpoint, a run directory's latest one, or "auto"
(the latest in RUN_DIR if any, else step 0); bitwise exact, and the stream starts where the
checkpoint stopped without reading what came before (`KVStream.resume`); metrics.jsonl and
trackers append.
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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from kvdistill.core.models import pad_token_id
from kvdistill.errors import Preempted
from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.store import StoreError, read_index

from .checkpoint import Position, find_resume, load_checkpoint, save_checkpoint
from .distiller import cot_mode
from .latent import latent_mode
from .mode import Mode
from .quant import kv_as_stored
from .report import resolve_trackers, tracker_config, tracker_values
from .stream import KVStream, train_loader
from .student import load_student, param_hash, save_student
from .validation import Best, validate, validation_loader

__all__ = ["train", "optimizer_step", "split_shards", "planned_steps", "stop_signals", "mixed_precision", "summary_terms", "open_metrics"]


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
        return f"`{shlex.join(argv)}` failed (exit {done.returncode}: {why}): resubmit the job (it runs with --resume auto) to continue"
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
        then = "continue with the same command and --resume auto (a preempted SLURM job with --requeue comes back by itself)"
    return Preempted(message=f"preempted ({name}) after step {step}: checkpoint {path} is complete (saved in {seconds:.1f} s); {then}")


_END = object()


def _with_last(batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(batch, is it the last one): one batch of look-ahead, so a checkpoint knows it ends an epoch."""
    it = iter(batches)
    nxt = next(it, _END)
    while nxt is not _END:
        cur, nxt = nxt, next(it, _END)
        yield cur, nxt is _END


def _check_epoch(cfg: TrainConfig, rank: int, batches: int) -> None:
    if batches == 0:
        raise StoreError(f"store {cfg.store} yielded no samples for rank {rank}")


def mixed_precision(cfg: TrainConfig) -> str | None:
    """Accelerator's mixed_precision for cfg: None leaves it to `accelerate launch` / its config."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """The recipe (module docstring), for either mode. Raises Preempted (exit code 143) after
    SIGTERM / SIGUSR1, once the checkpoint of the step that was running is complete."""
    with stop_signals() as got:
        return _train(cfg, progress, got)


def _train(cfg: TrainConfig, progress: bool, got: list[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    trackers = resolve_trackers(cfg.report_to)  # before any work: a missing tracker fails fast
    accelerator = Accelerator(
        cpu=cfg.device == "cpu", mixed_precision=mixed_precision(cfg), log_with=trackers or None, project_dir=str(Path(cfg.out) / "trackers") if trackers else None
    )
    set_seed(cfg.seed)
    out = Path(cfg.out)
    tokenizer, student, spec, teachers = load_student(cfg)
    pad_id = pad_token_id(tokenizer)
    mode = latent_mode(cfg, student, spec, teachers, pad_id) if cfg.mode == "latent" else cot_mode(cfg, student, spec, teachers)
    metric = (cfg.metric_for_best_model or "val_loss").removeprefix("val_")
    if metric not in ("loss", *mode.finite):  # before any step, not at the first validation
        raise ConfigError(f"TrainConfig.metric_for_best_model: mode {mode.name} validates val_loss and val_<term> for terms {list(mode.finite)}, not {cfg.metric_for_best_model!r}")
    train_shards, val_shards = split_shards(cfg, spec.num_shards)
    max_steps = planned_steps(cfg, teachers, train_shards, accelerator.num_processes)
    warmup = round(cfg.warmup_ratio * max_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps
    opt = torch.optim.AdamW(mode.param_groups, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, warmup, max_steps)
    stream = KVStream(
        cfg.store,
        list(teachers),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        read_kv=mode.read_kv,
        read_latent=mode.read_latent,
        kv_as_stored=kv_as_stored(cfg.kv_transfer, accelerator.device),
        shards=train_shards,
    )
    loader = train_loader(stream, cfg, pad_id, mode.control)  # kv_control "shuffled": each sample gets another's teacher K/V
    val_loader = validation_loader(cfg, mode, tokenizer, student, list(teachers), val_shards, accelerator, pad_id) if cfg.eval_steps else None
    # The stream already splits shards by rank, so the loaders are not handed to accelerate.
    model, opt, sched = accelerator.prepare(mode.model, opt, sched)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "train_config.yaml")
    if trackers:
        accelerator.init_trackers(out.name, config=tracker_config(cfg.to_dict()))
    ckpt_in = find_resume(cfg.resume, out)
    if cfg.resume == "auto" and ckpt_in is None:
        accelerator.print(f"--resume auto: no complete checkpoint in {out / 'checkpoints'}; starting at step 0", flush=True)
    pos = load_checkpoint(accelerator, ckpt_in) if ckpt_in else Position()
    if ckpt_in:
        accelerator.print(f"resuming from {ckpt_in} at step {pos.step} (epoch {pos.epoch}, batch {pos.batches_in_epoch})", flush=True)
    accum, world = cfg.gradient_accumulation_steps, accelerator.num_processes
    if progress and accelerator.is_main_process:
        print(
            f"kvdistill train: mode {mode.name}, {max_steps} steps of an effective batch {cfg.batch_size} x {accum} (accumulation) "
            f"x {world} (processes) = {cfg.batch_size * accum * world} samples", flush=True,
        )
    metrics_f, logged = open_metrics(cfg, out) if accelerator.is_main_process else (None, 0)
    best = Best.resume(out, cfg) if ckpt_in else Best(cfg.metric_for_best_model)
    history: list[dict[str, Any]] = []
    shards_read: set[int] = set()
    samples_read = 0
    last = min(max_steps, cfg.stop_at_step or max_steps)
    bar = tqdm(total=max_steps, initial=pos.step, desc=f"train {mode.name} {out.name}", disable=not (progress and accelerator.is_main_process))
    model.train()
    stop = 0  # the signal that stopped the run
    while pos.step < last and not stop:
        stream.set_epoch(pos.epoch)
        if pos.batches_in_epoch:  # resuming mid-epoch: the stream starts after the batches trained, reading none of them
            stream.resume(pos.epoch, pos.batches_in_epoch, cfg.batch_size, cfg.num_workers, drop_last=loader.drop_last)
        batches, window = pos.batches_in_epoch, []
        for batch, end_of_epoch in _with_last(loader):
            batches += 1
            window.append(batch)
            if len(window) < accum and not end_of_epoch:
                continue
            row = optimizer_step(mode, model, opt, sched, accelerator, cfg, window, pos.step)
            pos.step += 1
            pos.tokens += sum(int(b["attention_mask"].sum()) for b in window)
            pos.batches_in_epoch = batches
            for b in window:
                shards_read.update(b["shards"])
                samples_read += len(b["sample_ids"])
            window = []
            row = {"step": pos.step, "epoch": pos.epoch, "lr": sched.get_last_lr()[0], "tokens": pos.tokens, **row}
            validated = bool(val_loader is not None and pos.step % cfg.eval_steps == 0)
            if validated:
                row.update(validate(mode, model, val_loader, accelerator, pos.step, cfg.val_batches))
                if best.improves(row):
                    best.save(accelerator, model, cfg, tokenizer, mode, out, pos.step, row)
            history.append(row)
            log_now = pos.step > logged and (pos.step % cfg.log_every == 0 or pos.step == max_steps or validated)  # replayed steps are logged already
            if metrics_f and log_now:
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
            if trackers and log_now:
                accelerator.log(tracker_values(row), step=pos.step)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in mode.postfix if k in row})
            ckpt, stop, save_s, done = _after_step(cfg, accelerator, got, out, pos, last, end_of_epoch)
            if done:
                break
        _check_epoch(cfg, accelerator.process_index, batches)
        pos.epoch, pos.batches_in_epoch = pos.epoch + 1, 0
    bar.close()
    if stop:
        if metrics_f:
            metrics_f.close()
        if trackers:
            accelerator.end_training()
        raise _preempted(cfg, accelerator, stop, ckpt, pos.step, save_s)

    final = out / "final"
    unwrapped = accelerator.unwrap_model(model)
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    record = {
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "shards": sorted(shards_read),  # under DDP ranks read disjoint shards
        "samples": samples_read,
    }
    if cfg.hash_params:  # under DDP every rank ends with the same parameters
        record["param_sha256"] = param_hash(unwrapped)
    (out / "ranks" / f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    save_student(accelerator, model, cfg, tokenizer, final, mode.save_extra)
    if metrics_f:
        metrics_f.close()
    if trackers:
        accelerator.end_training()  # flushes and closes the trackers
    val = {k: v for k, v in history[-1].items() if k.startswith("val_")} if history and any(k.startswith("val_") for k in history[-1]) else {}
    return {
        "run": str(out),
        "checkpoint": str(final),
        "mode": mode.name,
        **mode.result,
        "steps": pos.step,
        "epochs_started": pos.epoch,
        "tokens": pos.tokens,
        "effective_batch": cfg.batch_size * accum * world,
        "teachers": list(teachers),
        **summary_terms(history, mode.summary),
        **({"last_validation": val} if val else {}),
        **best.summary(),
        **_peak_memory(accelerator.device),
        "seconds": time.perf_counter() - t0,
    }


def _peak_memory(device) -> dict[str, float]:
    """This process's peak resident memory (student, optimizer, batches, the stream's buffers;
    bounded: README "Training at scale") and, on CUDA, the peak allocated on the device, in MiB."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.device(device).type == "cuda":
        out["peak_device_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def optimizer_step(mode: Mode, model, opt, sched, accelerator, cfg: TrainConfig, window: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """One optimizer step over `window`'s micro-batches (gradient accumulation: gradients sync
    across ranks on the last one only). Each term is scaled by the micro-batch's share of what
    it averages over in the window, so the update is that of one batch of them all.
    The logged terms: scalars and per-layer lists, as window means."""
    if len(window) == 1:
        shares: list[dict[str, float] | None] = [None]
    else:
        counts = [mode.counts(b) for b in window]
        total = {u: sum(c[u] for c in counts) for u in counts[0]}
        shares = [{u: c[u] / total[u] if total[u] else 0.0 for u in c} for c in counts]
    opt.zero_grad(set_to_none=True)
    terms: dict[str, torch.Tensor] = {}
    for i, (batch, share) in enumerate(zip(window, shares, strict=True)):
        with accelerator.no_sync(model) if i < len(window) - 1 else nullcontext():
            losses = mode.step(model, batch, accelerator.device, step, share)
            _check_finite(losses, mode.finite, step, batch)
            accelerator.backward(losses["loss"])
        for k, v in losses.items():
            if v.dim() > 1:
                continue
            w = 1.0 if share is None or k == "loss" else share[mode.unit_of(k)]  # "loss" is scaled already
            terms[k] = terms.get(k, 0.0) + w * v.detach()
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    row = {k: round(v.item(), 6) for k, v in terms.items() if v.dim() == 0}
    row.update({k: [round(x, 6) for x in v.tolist()] for k, v in terms.items() if v.dim() == 1})
    return row


def _check_finite(losses: dict[str, torch.Tensor], names: tuple[str, ...], step: int, batch: dict[str, Any]) -> None:
    for name in names:
        if name in losses and not math.isfinite(losses[name].item()):
            layers = losses.get(f"{name}_layers")
            bad = [i for i, x in enumerate(layers.tolist()) if not math.isfinite(x)] if layers is not None else []
            where = f" in student layer(s) {bad}" if bad else ""
            raise FloatingPointError(
                f"step {step}: loss term {name} is {losses[name].item()}{where} on samples {batch['sample_ids']}; "
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


def planned_steps(cfg: TrainConfig, teachers: dict, shards: list[int], world: int) -> int:
    """max_steps, or with num_train_epochs that many passes over the training shards: samples
    (index.parquet) / (processes x batch_size) micro-batches per epoch (whole batches only with
    the shuffled control, which drops a short one), / gradient_accumulation_steps."""
    if cfg.num_train_epochs is None:
        return cfg.max_steps
    index = read_index(cfg.store, [next(iter(teachers))])
    kept = set(shards)
    samples = sum(len(ids) for (_, shard), (_, ids) in index.items() if shard in kept)
    per_rank = samples / world
    micro = per_rank // cfg.batch_size if cfg.kv_control == "shuffled" else math.ceil(per_rank / cfg.batch_size)
    per_epoch = math.ceil(micro / cfg.gradient_accumulation_steps)
    if per_epoch < 1:
        raise StoreError(f"store {cfg.store}: {samples} training samples make no batch of {cfg.batch_size} per process; lower --batch-size")
    return max(1, math.ceil(cfg.num_train_epochs * per_epoch))


def _after_step(cfg: TrainConfig, accelerator, got: list[int], out: Path, pos: Position, last: int, end_of_epoch: bool) -> tuple[Path, int, float, bool]:
    """End of an optimizer step: save_every's checkpoint of this step; then, unless it is the
    run's last step, the stop signal every rank agreed on, with its checkpoint.
    (this step's checkpoint path, signal or 0, seconds its save took, whether the loop ends)."""
    ckpt = out / "checkpoints" / f"step-{pos.step:07d}"
    saved = bool(cfg.save_every and pos.step % cfg.save_every == 0)
    if saved:
        save_checkpoint(accelerator, ckpt, pos, end_of_epoch)
    if pos.step >= last:
        return ckpt, 0, 0.0, True
    stop = _agreed_signal(accelerator, got)
    if not stop:
        return ckpt, 0, 0.0, False
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        print(f"kvdistill train: {signal.Signals(stop).name} after step {pos.step}: saving checkpoint {ckpt}", flush=True)
    if not saved:
        save_checkpoint(accelerator, ckpt, pos, end_of_epoch)
    return ckpt, stop, time.perf_counter() - t0, True


SUMMARY_WINDOW = 20


def summary_terms(history: list[dict[str, Any]], terms: dict[str, str]) -> dict[str, Any]:
    """The run summary's loss figures, named for what they are: per term (summary name -> key in
    the logged records) `last_<name>`, its value at the last logged step, `mean_last_20_<name>`,
    its mean over the last min(20, logged) records (a smoother figure), and `first_<name>`;
    None for a term the run did not log. `mean_last_20_over` says how many records that was."""
    tail = history[-SUMMARY_WINDOW:]
    out: dict[str, Any] = {f"mean_last_{SUMMARY_WINDOW}_over": len(tail)}
    for name, key in terms.items():
        vals = [r[key] for r in tail if key in r]
        logged = [r[key] for r in history if key in r]
        out[f"last_{name}"] = logged[-1] if logged else None
        out[f"mean_last_{SUMMARY_WINDOW}_{name}"] = sum(vals) / len(vals) if vals else None
        out[f"first_{name}"] = logged[0] if logged else None
    return out
