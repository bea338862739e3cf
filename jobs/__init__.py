"""Array-task execution: a local executor now; SLURM sbatch generation builds on the same tasks."""

from .local import dump_tasks, run_local

__all__ = ["dump_tasks", "run_local"]
