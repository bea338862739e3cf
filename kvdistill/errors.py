"""`ExitCode`: what `kvdistill` exits with. `Preempted`: a stage stopped by a signal (SLURM
preemption, scancel, a time limit's warning) after putting its output in a safe state;
`kvdistill` exits with ExitCode.PREEMPTED (143).

Shared by the dump (SIGTERM unwinds the task, the partial shard is discarded) and the trainer
(SIGTERM / SIGUSR1: a checkpoint is saved, `--resume auto` continues), which must not import
each other."""

from __future__ import annotations

import signal
import threading
from enum import IntEnum

__all__ = ["ExitCode", "Preempted", "catch_early_signals", "release_early_signals"]

_EARLY: list[int] = []  # SIGTERM / SIGUSR1 received while `kvdistill` was starting


def catch_early_signals() -> None:
    """From the console script's first line: SIGTERM and SIGUSR1 are noted instead of killing
    the process in the middle of its (seconds of) imports; `release_early_signals` then ends
    the command with its one line and exit 143. Main thread only (Python's rule for handlers)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, _note)


def _note(signum, _frame) -> None:
    _EARLY.append(signum)


def release_early_signals(command: str) -> None:
    """Before a command starts its work: Preempted if a signal came while starting (nothing was
    written yet), else the default handlers back (a stage installs its own where it needs them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGTERM, signal.SIGUSR1):
        if signal.getsignal(s) is _note:  # only ours: an embedding program keeps its own
            signal.signal(s, signal.SIG_DFL)
    if _EARLY:
        name = signal.Signals(max(_EARLY)).name
        _EARLY.clear()
        raise Preempted(
            message=(
                f"preempted ({name}) while starting, before `kvdistill {command}` did any work: nothing was written;"
                " re-run the same command"
            )
        )


class Preempted(SystemExit):
    """Unwinds like an exception; a SystemExit, so uncaught it still exits with `code` (143 =
    128 + SIGTERM). `message`, when given, is the one line `kvdistill` prints: what was
    saved or discarded, and how the work continues."""

    def __init__(self, code: int = 143, message: str | None = None) -> None:
        super().__init__(code)
        self.message = message


class ExitCode(IntEnum):
    """What `kvdistill` exits with (README, "Exit codes"), so scripts and SLURM can branch on it."""

    OK = 0
    FAILED = 1  # the run failed: training diverged (non-finite loss), `jobs local` tasks failed
    USAGE = 2  # usage or config error (argparse, ConfigError)
    BAD_INPUT = 3  # data, model, tokenizer, a store that does not match, a missing file
    INTEGRITY = 4  # a corrupt or missing chunk; `store verify` found problems
    ENVIRONMENT = 5  # disk full, quota, read-only file system, permission denied
    BUSY = 6  # another live writer owns the shard
    # SIGTERM (128 + 15); train: also SIGUSR1, after saving a checkpoint. dump: the partial shard was discarded
    PREEMPTED = 143
