"""Run dump array tasks on this machine: the same tasks a SLURM array runs, as N worker
processes (torch threads split among them). A complete shard is skipped, so an interrupted run
picks up where it stopped; a failed task does not stop the others, and the run ends with an
error naming every task that failed (re-running redoes exactly those)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm.auto import tqdm

from kvdistill.dump.run import DumpResult, run_dump
from kvdistill.schemas import DumpConfig, ModelSpec

__all__ = ["dump_tasks", "run_local", "LocalRunError"]


class LocalRunError(RuntimeError):
    """Some tasks failed; the message lists them and their errors."""


def dump_tasks(base: DumpConfig, teachers: list[ModelSpec]) -> list[DumpConfig]:
    """One task per teacher x shard, in array order (task id = teacher_index * N + shard); every
    task knows every teacher (`DumpConfig.length_teachers`: one skip rule for all of them)."""
    return [
        dataclasses.replace(base, teacher=t, shard=i, length_teachers=list(teachers))
        for t in teachers
        for i in range(base.num_shards)
    ]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _run(task: DumpConfig) -> DumpResult:
    return run_dump(task, progress=False)


def run_local(tasks: list[DumpConfig], workers: int = 1, progress: bool = True) -> list[DumpResult]:
    """Run `tasks`; with workers > 1 in that many spawned processes sharing the CPU cores."""
    failed: list[tuple[DumpConfig, BaseException]] = []
    results: list[DumpResult] = []
    if workers <= 1:
        for task in tasks:
            try:
                results.append(run_dump(task, progress=progress))
            except Exception as e:  # noqa: BLE001 - reported below with the task it belongs to
                failed.append((task, e))
                continue
            print(results[-1].summary(), flush=True)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")  # no forked copies of torch's thread pools
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(_run, task): task for task in tasks}
            bar = tqdm(total=len(tasks), unit="task", desc=f"dump ({workers} workers)", disable=not progress)
            for fut in as_completed(futures):
                try:
                    results.append(fut.result())
                    bar.write(results[-1].summary())
                except Exception as e:  # noqa: BLE001 - reported below with the task it belongs to
                    failed.append((futures[fut], e))
                bar.update(1)
            bar.close()
    if failed:
        lines = [f"  teacher {t.teacher.short_name} shard {t.shard}: {type(e).__name__}: {e}" for t, e in failed]
        raise LocalRunError(
            f"{len(failed)} of {len(tasks)} dump tasks failed (the {len(results)} others are complete "
            "and are skipped on a re-run):\n" + "\n".join(lines)
        )
    order = {(t.teacher.short_name, t.shard): i for i, t in enumerate(tasks)}
    return sorted(results, key=lambda r: order[(r.teacher, r.shard)])
