"""Run dump array tasks on this machine: the same tasks a SLURM array runs, one after another.
A complete shard is skipped, so an interrupted run picks up where it stopped."""

from __future__ import annotations

import dataclasses

from kvdistill.dump.run import DumpResult, run_dump
from kvdistill.schemas import DumpConfig, ModelSpec

__all__ = ["dump_tasks", "run_local"]


def dump_tasks(base: DumpConfig, teachers: list[ModelSpec]) -> list[DumpConfig]:
    """One task per teacher x shard, in array order (task id = teacher_index * N + shard)."""
    return [dataclasses.replace(base, teacher=t, shard=i) for t in teachers for i in range(base.num_shards)]


def run_local(tasks: list[DumpConfig], progress: bool = True) -> list[DumpResult]:
    results = []
    for task in tasks:
        result = run_dump(task, progress=progress)
        print(result.summary(), flush=True)
        results.append(result)
    return results
