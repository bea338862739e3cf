"""Training checkpoints: RUN_DIR/checkpoints/step-N, complete or absent.

A checkpoint holds what `accelerator.save_state` writes (model + adapters, optimizer,
scheduler, RNG states) and loader.json, the stream position to continue from. It is written
into the hidden sibling .step-N.partial and renamed once every rank's files are in, so a
process killed while saving leaves only the .partial, which resume never picks.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Position", "save_checkpoint", "checkpoints", "latest_checkpoint", "find_resume", "load_checkpoint"]


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, tokens seen (every rank), and the
    samples of that epoch's global order already trained (every rank's: the stream starts after
    them on resume, on any number of processes and workers)."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    samples_in_epoch: int = 0


def save_checkpoint(accelerator, path: Path, pos: Position, end_of_epoch: bool) -> None:
    """Every rank takes part. A checkpoint on an epoch's last batch is saved as (epoch + 1,
    batch 0): (epoch, all its batches) would make a resume skip a whole epoch to train nothing."""
    if end_of_epoch:
        pos = Position(pos.step, pos.epoch + 1, pos.tokens, 0)
    partial = path.with_name(f".{path.name}.partial")
    if accelerator.is_main_process and partial.exists():  # left by a run killed while saving
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's files are in
    if accelerator.is_main_process:
        (partial / "loader.json").write_text(json.dumps(asdict(pos)))
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


def checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first (step-N holding loader.json)."""
    found = [p for p in (run / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / "loader.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


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
            f"checkpoint {ckpt} was written by an earlier kvdistill whose sample order depended on the number of processes; "
            "it cannot continue in the global order: start the run again (or train on from its weights with a new --out)"
        )
    accelerator.load_state(str(ckpt))
    return Position(**pos)
