"""Training checkpoints: RUN_DIR/checkpoints/step-N, complete or absent.

A checkpoint holds what `accelerator.save_state` writes (model + adapters, optimizer,
scheduler, RNG states) and loader.json, the stream position to continue from. It is written
into the hidden sibling .step-N.partial and renamed once every rank's files are in, so a
process killed while saving leaves only the .partial, which resume never picks. With
--save-total-limit N, older checkpoints are deleted once a new one is in place, the last N kept
(`prune_checkpoints`).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Position",
    "save_checkpoint",
    "save_complete",
    "saving",
    "checkpoints",
    "prune_checkpoints",
    "latest_checkpoint",
    "find_resume",
    "load_checkpoint",
]

# A save that fails with less than this free where it writes ran out of disk (torch.save and
# safetensors report it in their own words, e.g. "unexpected pos", not as an OSError).
DISK_FULL_BYTES = 64 * 2**20


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, tokens seen (every rank), and the
    samples of that epoch's global order already trained (every rank's: the stream starts after
    them on resume, on any number of processes and workers)."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    samples_in_epoch: int = 0


@contextmanager
def saving(what: str, path: Path) -> Iterator[None]:
    """Around a save into `path`: a failure on a (nearly) full disk is OSError(ENOSPC) naming
    `path`, whatever words the writer used, so the CLI says "disk full at PATH" (exit 5)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if "No space left" in str(e) or _free(path) < DISK_FULL_BYTES:
            raise OSError(
                errno.ENOSPC, f"no space left on the device writing {what} ({type(e).__name__}: {e})", str(path)
            ) from e
        raise


def _free(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def save_complete(accelerator, path: Path, what: str, write: Callable[[Path], None]) -> None:
    """`write(partial)` on every rank into the hidden sibling .NAME.partial, renamed to `path`
    (replacing one there) once every rank's files are in: `path` is complete or absent. A failed
    write removes the partial folder (a full disk gets its space back) and raises; on a full
    disk OSError(ENOSPC) naming `path`."""
    partial = path.with_name(f".{path.name}.partial")
    if accelerator.is_main_process and partial.exists():  # left by a run killed while saving
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        with saving(what, path):
            write(partial)
    except Exception:  # a failed write (a kill leaves the partial folder, which nothing reads)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()  # every rank's files are in
    if accelerator.is_main_process:
        if path.exists():  # a resumed run saves this step again: the new one replaces it
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old)
        else:
            partial.rename(path)
    accelerator.wait_for_everyone()


@contextmanager
def _tied_weights_quiet() -> Iterator[None]:
    """For one save_state: accelerate's safetensors writer drops the second name of a tensor
    stored twice and logs it ("Removed shared tensor {'student.lm_head.weight'} while saving ..."),
    on every checkpoint of a student with tied embeddings. That is expected: load_state ties the
    weight back, bit for bit (tests/test_checkpoint_limit.py, tests/test_resume.py). Only that
    message, only during our save: the filter is removed after it."""
    log = logging.getLogger("accelerate.utils.other")

    def keep(record: logging.LogRecord) -> bool:  # accelerate's logger puts "[RANK n] " first
        return not re.match(r"(\[RANK \d+\] )?Removed shared tensor ", str(record.msg))

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def save_checkpoint(accelerator, path: Path, pos: Position, end_of_epoch: bool) -> None:
    """Every rank takes part. A checkpoint on an epoch's last batch is saved as (epoch + 1,
    sample 0): (epoch, all its samples) would make a resume skip a whole epoch to train nothing."""
    if end_of_epoch:
        pos = Position(pos.step, pos.epoch + 1, pos.tokens, 0)

    def write(partial: Path) -> None:
        with _tied_weights_quiet():
            accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / "loader.json").write_text(json.dumps(asdict(pos)))

    save_complete(accelerator, path, f"checkpoint {path.name}", write)


def checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first (step-N holding loader.json)."""
    found = [
        p
        for p in (run / "checkpoints").glob("step-*")
        if re.fullmatch(r"step-\d+", p.name) and (p / "loader.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def prune_checkpoints(accelerator, run: Path, keep: int, newest: Path) -> list[Path]:
    """--save-total-limit: after `newest` (the checkpoint just saved, complete on every rank) is
    in place, all but the last `keep` complete checkpoints of `run` are deleted, `newest` always
    among those kept, so a kill at any point leaves a resumable run. RUN_DIR/best and final live
    outside checkpoints/ and are never touched. The main process deletes (each first renamed to
    a hidden .step-N.deleting, which `checkpoints` never lists, so a kill mid-delete leaves no
    half checkpoint to resume from; the next prune finishes it); the others wait. Returns what
    was deleted (main process; [] elsewhere)."""
    gone: list[Path] = []
    if accelerator.is_main_process:
        older = [p for p in checkpoints(run) if p != newest]
        gone = older[: max(0, len(older) - (keep - 1))]
        for p in gone:
            hidden = p.with_name(f".{p.name}.deleting")
            if hidden.exists():  # a kill mid-delete left it, and the step was saved again since
                shutil.rmtree(hidden)
            p.rename(hidden)
        for p in (run / "checkpoints").glob(".step-*.deleting"):  # these, and any a kill left
            shutil.rmtree(p)
    accelerator.wait_for_everyone()
    return gone


def latest_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint, else the latest one of the run directory `path`."""
    if (path / "loader.json").exists():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {path}; train with --save-every N to write them")
    return found[-1]


def find_resume(resume: str | None, out: Path) -> Path | None:
    """The checkpoint `resume` names: None without one; "auto": the latest complete one in
    `out`, or None when there is none (a fresh start)."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints(out)
        return found[-1] if found else None
    return latest_checkpoint(Path(resume))


def load_checkpoint(accelerator, ckpt: Path) -> Position:
    """Loads the states into the prepared objects; the position to continue from. A checkpoint
    of a kvdistill before the global sample order (its position counted one rank's batches) is
    refused before anything is loaded."""
    pos = json.loads((ckpt / "loader.json").read_text())
    if "batches_in_epoch" in pos:
        raise ValueError(
            f"checkpoint {ckpt} was written by an earlier kvdistill whose sample order depended on the number of"
            " processes; it cannot continue in the global order: start the run again (or train on from its weights"
            " with a new --out)"
        )
    accelerator.load_state(str(ckpt))
    return Position(**pos)
