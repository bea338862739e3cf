"""`Preempted`: a stage stopped by a signal (SLURM preemption, scancel, a time limit's warning)
after putting its output in a safe state; `kvdistill` exits with ExitCode.PREEMPTED (143).

Shared by the dump (SIGTERM unwinds the task, the partial shard is discarded) and the trainer
(SIGTERM / SIGUSR1: a checkpoint is saved, `--resume auto` continues), which must not import
each other."""

from __future__ import annotations

__all__ = ["Preempted"]


class Preempted(SystemExit):
    """Unwinds like an exception; a SystemExit, so uncaught it still exits with `code` (143 =
    128 + SIGTERM). `message`, when given, is the one line `kvdistill` prints: what was
    saved or discarded, and how the work continues."""

    def __init__(self, code: int = 143, message: str | None = None) -> None:
        super().__init__(code)
        self.message = message
