"""The training recipe: a student learns from the KV store; no teacher model is ever built.

    train(TrainConfig(store="out.zarr", student=ModelSpec("path/or/hub-id"), out="runs/a"))

setup: accelerate (CPU, one GPU, DDP), the student from `from_pretrained`, checks that the
store was built for this student's tokenizer and geometry, adapters, AdamW + cosine schedule,
the shard stream (rank x worker split; with kv_control="shuffled", each batch's teacher K/V
deranged across its samples: the negative control). train: CE + fused KV losses, grad
clipping, metrics every `log_every` steps to metrics.jsonl (and to the accelerate trackers in
`report_to`). save: the student via `save_pretrained` (+ the
tokenizer), adapters.pt (+ router.pt with fusion router), and the config as train_config.yaml, under RUN_DIR/final.

checkpoints (`save_every`, and on a stop signal): RUN_DIR/checkpoints/step-N, complete or
absent (written as .step-N.partial, then renamed). resume: a checkpoint, a run directory's
latest one, or "auto" (the latest in RUN_DIR if there is one, else step 0); bitwise exact;
metrics.jsonl and trackers append, without the steps replayed after the checkpoint.
signals: SIGTERM or SIGUSR1 lets the step that is running finish, saves its checkpoint (every
rank agrees on the step), prints where, and raises Preempted (exit code 143); on SIGUSR1 with
`requeue_on_usr1`, the main process first runs `scontrol requeue $SLURM_JOB_ID`.

Raises StoreError for an unfinalised store or one built for another student,
FloatingPointError on a non-finite loss (naming the term and the sample ids), and Preempted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from kvdistill.core.capture import kv_geometry
from kvdistill.core.models import load_tokenizer, pad_token_id, tokenizer_fingerprint
from kvdistill.errors import Preempted
from kvdistill.schemas import TrainConfig
from kvdistill.store import StoreError, open_specs

from .distiller import LOSS_TERMS, build_distiller
from .quant import kv_as_stored, kv_to_device
from .report import resolve_trackers, tracker_config, tracker_values
from .stream import KVStream, shuffle_kv, train_loader

__all__ = ["train", "build_model"]


def _check_store(cfg: TrainConfig, tokenizer, student) -> tuple[Any, dict]:
    store = Path(cfg.store)
    spec, teachers = open_specs(store)
    if not (store / "index.parquet").exists():
        raise StoreError(f"store {store} is not finalized; run `kvdistill store finalize {store}` first")
    fp = tokenizer_fingerprint(tokenizer)
    if fp != spec.tokenizer_fingerprint:
        raise StoreError(
            f"store {store} was built for a student tokenizer with fingerprint {spec.tokenizer_fingerprint} "
            f"({spec.student.name_or_path}); {cfg.student.name_or_path} has {fp}. Train the student the "
            "store was dumped for, or re-dump with --student pointing at this one"
        )
    g = kv_geometry(student.config)
    if g != spec.geometry:
        raise StoreError(f"store {store} holds K/V for student geometry {spec.geometry}, this student has {g}")
    chosen = cfg.teachers or sorted(teachers)
    missing = [t for t in chosen if t not in teachers]
    if missing:
        raise StoreError(f"store {store} has no teacher(s) {missing}; it holds {sorted(teachers)}")
    return spec, {t: teachers[t] for t in chosen}


def _save_checkpoint(accelerator, path: Path, step: int, epoch: int, tokens: int, batches_in_epoch: int, end_of_epoch: bool) -> None:
    """Model, optimizer, scheduler and RNG states, and loader.json: where the stream resumes.
    A checkpoint on an epoch's last batch resumes at the next epoch's start, (epoch + 1, 0):
    (epoch, all its batches) would replay a whole epoch to train nothing of it.

    Written into the hidden sibling .step-N.partial and renamed to step-N once every rank's
    files and loader.json are in, so a step-N directory is always complete: a process killed
    while saving leaves only the .partial, which resume never picks and the next save replaces."""
    if end_of_epoch:
        epoch, batches_in_epoch = epoch + 1, 0
    partial = path.with_name(f".{path.name}.partial")
    if accelerator.is_main_process and partial.exists():  # left by a run killed while saving
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # model + adapters, optimizer, scheduler, RNG states
    accelerator.wait_for_everyone()  # every rank's files are in
    if accelerator.is_main_process:
        pos = {"step": step, "epoch": epoch, "tokens": tokens, "batches_in_epoch": batches_in_epoch}
        (partial / "loader.json").write_text(json.dumps(pos))
        if path.exists():  # this step saved before (a resume from an earlier checkpoint): the new one replaces it
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old)
        else:
            partial.rename(path)
    accelerator.wait_for_everyone()


def _checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first: step-N directories (renamed
    into place only once complete) that hold loader.json (written last, also before renaming)."""
    found = [p for p in (run / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / "loader.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _latest_checkpoint(path: Path) -> Path:
    if (path / "loader.json").exists():
        return path
    found = _checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {path}; train with --save-steps N to write them")
    return found[-1]


def _resume(cfg: TrainConfig, accelerator) -> tuple[int, int, int, int]:
    """(step, epoch, tokens, batches of that epoch already trained) to start from: the
    checkpoint cfg.resume names ("auto": the latest complete one in cfg.out, if any), its
    states loaded into the prepared objects; zeros without one."""
    if not cfg.resume:
        return 0, 0, 0, 0
    if cfg.resume == "auto":
        found = _checkpoints(Path(cfg.out))
        if not found:
            accelerator.print(f"--resume auto: no complete checkpoint in {Path(cfg.out) / 'checkpoints'}; starting at step 0", flush=True)
            return 0, 0, 0, 0
        ckpt = found[-1]
    else:
        ckpt = _latest_checkpoint(Path(cfg.resume))
    accelerator.load_state(str(ckpt))  # model + adapters, optimizer, scheduler, RNG states
    pos = json.loads((ckpt / "loader.json").read_text())
    accelerator.print(f"resuming from {ckpt} at step {pos['step']} (epoch {pos['epoch']}, batch {pos['batches_in_epoch']})", flush=True)
    return pos["step"], pos["epoch"], pos["tokens"], pos["batches_in_epoch"]


def _open_metrics(cfg: TrainConfig, out: Path) -> tuple[IO[str], int]:
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


def _signal_checkpoint(accelerator, signum: int, saved: bool, path: Path, step: int, *position) -> float:
    """The checkpoint of this step for a stop signal (unless save_every just wrote it); its
    seconds."""
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        print(f"kvdistill train: {signal.Signals(signum).name} after step {step}: saving checkpoint {path}", flush=True)
    if not saved:
        _save_checkpoint(accelerator, path, step, *position)
    return time.perf_counter() - t0


def _after_step(cfg: TrainConfig, accelerator, got: list[int], out: Path, step: int, last: int, *position) -> tuple[Path, int, float, bool]:
    """End of an optimizer step, both modes: save_every's checkpoint of this step; then, unless it
    is the run's last step, the stop signal every rank agreed on, with its checkpoint.
    (this step's checkpoint path, signal or 0, seconds its save took, whether the loop ends)."""
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    saved = bool(cfg.save_every and step % cfg.save_every == 0)
    if saved:
        _save_checkpoint(accelerator, ckpt, step, *position)
    if step >= last:
        return ckpt, 0, 0.0, True
    stop = _agreed_signal(accelerator, got)
    save_s = _signal_checkpoint(accelerator, stop, saved, ckpt, step, *position) if stop else 0.0
    return ckpt, stop, save_s, bool(stop)


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


def _check_epoch(cfg: TrainConfig, rank: int, epoch: int, batches: int, skip: int) -> None:
    """After an epoch: the stream yielded batches, and at least the `skip` a resumed position
    replays. skip == batches is a checkpoint on the epoch's last batch as written before
    `_save_checkpoint` made it (epoch + 1, 0): nothing is left to train, on to the next epoch."""
    if batches == 0:
        raise StoreError(f"store {cfg.store} yielded no samples for rank {rank}")
    if skip > batches:
        raise StoreError(
            f"checkpoint {cfg.resume} resumes at batch {skip} of epoch {epoch}, but the epoch has {batches} batches "
            f"for rank {rank} here; resume with the store, --batch-size, number of processes and --num-workers "
            "of the run that wrote it"
        )


def build_model(cfg: TrainConfig):
    """(tokenizer, Distiller, store spec, {teacher: TeacherSpec}): the student (LoRA-wrapped when
    lora_r > 0), checked against the store, inside the Distiller `train` optimises. Shared with
    `kvdistill train diagnose`, so both build exactly the same model."""
    tokenizer = load_tokenizer(cfg.student)
    student = AutoModelForCausalLM.from_pretrained(
        cfg.student.name_or_path, revision=cfg.student.revision, dtype=getattr(torch, cfg.student.dtype)
    )
    spec, teachers = _check_store(cfg, tokenizer, student)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets)
        student = get_peft_model(student, lora)  # K/V capture reaches through to the base model
    return tokenizer, build_distiller(cfg, student, spec, teachers), spec, teachers


def mixed_precision(cfg: TrainConfig) -> str | None:
    """Accelerator's mixed_precision for cfg: None leaves it to `accelerate launch` / its config."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """The recipe (module docstring). Raises Preempted (exit code 143) after SIGTERM / SIGUSR1,
    once the checkpoint of the step that was running is complete."""
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
    tokenizer, model, spec, teachers = build_model(cfg)
    groups = [
        {"params": model.student.parameters(), "lr": cfg.lr},
        {"params": model.adapters.parameters(), "lr": cfg.adapter_lr},
    ]
    if model.router is not None:
        groups.append({"params": model.router.parameters(), "lr": cfg.router_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.max_steps)
    stream = KVStream(
        cfg.store,
        list(teachers),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        read_kv=cfg.kv_weight > 0,
        kv_as_stored=kv_as_stored(cfg.kv_transfer, accelerator.device),
    )
    pad_id = pad_token_id(tokenizer)

    loader = train_loader(stream, cfg, pad_id, shuffle_kv)  # kv_control "shuffled": each sample gets another's teacher K/V
    # The stream already splits shards by rank, so the loader is not handed to accelerate.
    model, opt, sched = accelerator.prepare(model, opt, sched)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "train_config.yaml")
    if trackers:
        accelerator.init_trackers(out.name, config=tracker_config(cfg.to_dict()))
    step, epoch, tokens, skip = _resume(cfg, accelerator)
    metrics_f, logged = _open_metrics(cfg, out) if accelerator.is_main_process else (None, 0)
    history: list[dict[str, Any]] = []
    shards_read: set[int] = set()
    samples_read = 0
    last = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {out.name}", disable=not (progress and accelerator.is_main_process))
    model.train()
    stop = 0  # the signal that stopped the run
    while step < last and not stop:
        stream.set_epoch(epoch)
        batches_in_epoch = 0
        for batch, end_of_epoch in _with_last(loader):
            batches_in_epoch += 1
            if batches_in_epoch <= skip:  # resuming mid-epoch: the stream is deterministic, so replay its position
                continue
            kv = kv_to_device(batch["kv"], accelerator.device)  # int8 / int4 dequantised there
            losses = model(
                batch["input_ids"].to(accelerator.device),
                batch["attention_mask"].to(accelerator.device),
                batch["loss_mask"].to(accelerator.device),
                kv,
                step=step,  # warm-ups and layer annealing
            )
            for name in LOSS_TERMS:
                if name in losses and not math.isfinite(losses[name].item()):
                    layers = losses.get(f"{name}_layers")
                    bad = [i for i, x in enumerate(layers.tolist()) if not math.isfinite(x)] if layers is not None else []
                    where = f" in student layer(s) {bad}" if bad else ""
                    raise FloatingPointError(
                        f"step {step}: loss term {name} is {losses[name].item()}{where} on samples {batch['sample_ids']}; "
                        "check those samples in the store (`kvdistill store verify`) or lower the learning rate"
                    )
            opt.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            tokens += int(batch["attention_mask"].sum())
            shards_read.update(batch["shards"])
            samples_read += len(batch["sample_ids"])
            row = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], "tokens": tokens}
            row.update({k: round(v.item(), 6) for k, v in losses.items() if v.dim() == 0})
            if "kv_k_layers" in losses:
                row["kv_k_layers"] = [round(x, 6) for x in losses["kv_k_layers"].tolist()]
                row["kv_v_layers"] = [round(x, 6) for x in losses["kv_v_layers"].tolist()]
            history.append(row)
            log_now = step > logged and (step % cfg.log_every == 0 or step == cfg.max_steps)  # replayed steps are logged already
            if metrics_f and log_now:
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
            if trackers and log_now:
                accelerator.log(tracker_values(row), step=step)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("ce", "kv_k", "kv_v") if k in row})
            ckpt, stop, save_s, done = _after_step(cfg, accelerator, got, out, step, last, epoch, tokens, batches_in_epoch, end_of_epoch)
            if done:
                break
        _check_epoch(cfg, accelerator.process_index, epoch, batches_in_epoch, skip)
        epoch, skip = epoch + 1, 0
    bar.close()
    if stop:
        if metrics_f:
            metrics_f.close()
        if trackers:
            accelerator.end_training()
        raise _preempted(cfg, accelerator, stop, ckpt, step, save_s)

    final = out / "final"
    # What this rank did: which shards it read and a checksum of the parameters it ended with
    # (under DDP every rank must end with the same parameters and read disjoint shards).
    params = torch.cat([p.detach().double().flatten().cpu() for p in accelerator.unwrap_model(model).parameters()])
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    (out / "ranks" / f"rank-{accelerator.process_index}.json").write_text(json.dumps({
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "shards": sorted(shards_read),
        "samples": samples_read,
        "param_sum": float(params.sum()),
        "param_sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
    }))
    accelerator.wait_for_everyone()
    # Every rank takes part: under FSDP the full weights are gathered onto rank 0 (the
    # FULL_STATE_DICT of jobs/accelerate/fsdp.yaml); otherwise it is the module's own state dict.
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

        if cfg.lora_r > 0:  # the adapter in peft format, and the merged model for eval / serving
            unwrapped.student.save_pretrained(final / "lora")
            tokenizer.save_pretrained(final / "lora")
            merged = copy.deepcopy(unwrapped.student).merge_and_unload()
            merged.save_pretrained(final)
        else:
            unwrapped.student.save_pretrained(final, state_dict=part("student."))
        tokenizer.save_pretrained(final)
        torch.save(part("adapters."), final / "adapters.pt")
        if unwrapped.router is not None:
            torch.save(part("router."), final / "router.pt")
        cfg.save(final / "train_config.yaml")
        metrics_f.close()
    if trackers:
        accelerator.end_training()  # flushes and closes the trackers
    return {
        "run": str(out),
        "checkpoint": str(final),
        "steps": step,
        "epochs_started": epoch,
        "tokens": tokens,
        "teachers": list(teachers),
        **summary_terms(history, {"ce": "ce", "kv_k": "kv_k", "kv_v": "kv_v"}),
        "seconds": time.perf_counter() - t0,
    }


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
