"""`ExitCode`: what `kvdistill` exits with. `Preempted`: a stage stopped by a signal (SLURM
preemption, scancel, a time limit's warning) after putting its output in a safe state;
`kvdistill` exits with ExitCode.PREEMPTED (143).

Shared by the dump (SIGTERM unwinds the task, the partial shard is discarded) and the trainer
(SIGTERM / SIGUSR1: a checkpoint is saved, `--resume auto` continues), which must not import
each other."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "Preempted"]


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
    PREEMPTED = 143  # SIGTERM (128 + 15); train: also SIGUSR1, after saving a checkpoint. dump: the partial shard was discarded
