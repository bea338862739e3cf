"""The local array executor and task semantics under preemption: nothing is lost, nothing is
duplicated, a re-run finishes exactly what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvdistill.cli import main
from kvdistill.jobs.local import LocalRunError, run_local
from kvdistill.schemas import DataSpec, DumpTask, JobsConfig, ModelSpec, SyntheticSpec
from kvdistill.store import ShardReader, StoreError, finalize, shard_is_complete
from kvdistill.store.layout import partial_attempts, partial_dir


def _jobs(tiny_store, store: Path, **dump) -> JobsConfig:
    task = DumpTask(
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
    )
    return JobsConfig(teachers=tiny_store["teachers"], dump=DumpTask(**{**task.to_dict(), **dump}) if dump else task)


def _same_shard(a: Path, b: Path, teacher: str, shard: int) -> None:
    ra, rb = ShardReader(a, teacher, shard), ShardReader(b, teacher, shard)
    assert ra.sample_ids == rb.sample_ids and len(set(ra.sample_ids)) == len(ra.sample_ids)
    assert np.array_equal(ra.offsets, rb.offsets)
    n = int(ra.offsets[-1])
    xa, xb = ra.rows(0, n), rb.rows(0, n)
    for name in xa:
        assert np.array_equal(xa[name], xb[name]), name


def test_two_local_workers_write_the_same_store_as_the_serial_run_row_for_row(tiny_store, tmp_path):
    cfg = _jobs(tiny_store, tmp_path / "par.zarr")
    results = run_local(cfg.tasks(), workers=2, progress=False)
    assert [(r.teacher, r.shard, r.status) for r in results] == [
        (t.teacher.short_name, t.shard, "written") for t in cfg.tasks()
    ]
    finalize(tmp_path / "par.zarr")
    # The serial reference with the workers' thread count (1 each on 2 cores): float reductions
    # then run in the same order, so the rows must match bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        run_local(_jobs(tiny_store, tmp_path / "ser.zarr").tasks(), workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    for t in cfg.teachers:
        for shard in range(2):
            _same_shard(tmp_path / "par.zarr", tmp_path / "ser.zarr", t.short_name, shard)
    again = run_local(cfg.tasks(), workers=2, progress=False)  # everything complete: no-ops
    assert {r.status for r in again} == {"already complete"}


def test_a_failing_task_does_not_stop_the_others_and_is_named(tiny_store, tmp_path):
    cfg = _jobs(tiny_store, tmp_path / "s.zarr")
    bad = ModelSpec(name_or_path=str(tmp_path / "no-such-model"), name="broken")
    cfg = JobsConfig(teachers=[*cfg.teachers, bad], dump=cfg.dump)
    with pytest.raises(
        LocalRunError,
        match=(
            r"(?s)2 of 6 dump tasks failed.*teacher broken shard 0: FileNotFoundError: teacher .*no-such-model: no"
            r" such folder"
        ),
    ):
        run_local(cfg.tasks(), workers=1, progress=False)
    for t in tiny_store["teachers"]:
        assert all(shard_is_complete(tmp_path / "s.zarr", t.short_name, i) for i in range(2))


def test_jobs_local_cli_runs_every_task_and_finalizes(tiny_store, tmp_path, capsys):
    cfg = _jobs(tiny_store, tmp_path / "cli.zarr")
    cfg.save(tmp_path / "jobs.yaml")
    assert main(["jobs", "local", "--config", str(tmp_path / "jobs.yaml"), "--workers", "1", "--no-progress"]) == 0
    assert (tmp_path / "cli.zarr" / "index.parquet").exists()
    assert "teacher-b" in capsys.readouterr().out


@pytest.fixture(scope="module")
def slow_task(tiny_store, tmp_path_factory):
    """A dump task slow enough to be interrupted mid-shard (600 rows, batch 2, one thread), and
    its uninterrupted result as the reference."""
    root = tmp_path_factory.mktemp("preempt")
    data = DataSpec(synthetic=SyntheticSpec(n_train=600, n_test=8, seed=5))
    cfg = JobsConfig(
        teachers=[tiny_store["teachers"][0]],
        dump=DumpTask(
            student=tiny_store["student"],
            store=str(root / "ref.zarr"),
            data=data,
            num_shards=1,
            batch_size=2,
            device="cpu",
        ),
    )
    run_local(cfg.tasks(), progress=False)
    return cfg, root


def _interrupt(cfg: JobsConfig, store: Path, sig: int) -> subprocess.CompletedProcess:
    task = cfg.task(cfg.teachers[0], 0)
    task = type(task).from_dict({**task.to_dict(), "store": str(store)})
    task.save(store.parent / f"task-{sig}.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvdistill",
            "dump",
            "--config",
            str(store.parent / f"task-{sig}.yaml"),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = partial_dir(store, task.teacher.short_name)
    deadline = time.time() + 120
    while not (partial.exists() and any(partial.iterdir())):  # the shard writer has started
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the dump task never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # some batches in
    assert proc.poll() is None, "the task finished before it could be interrupted; make it slower"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_an_interrupted_task_leaves_no_visible_shard_and_the_rerun_completes_it_exactly(slow_task, tmp_path, sig):
    cfg, root = slow_task
    store = tmp_path / "s.zarr"
    name = cfg.teachers[0].short_name
    done = _interrupt(cfg, store, sig)
    assert done.returncode == (143 if sig == signal.SIGTERM else -9), done.stderr[-2000:]
    assert not (store / "teachers" / name / "shard-00000").exists()
    leftovers = partial_attempts(store, name, 0)
    if sig == signal.SIGTERM:
        assert leftovers == []  # unwound cleanly: the partial shard was discarded
    else:
        assert len(leftovers) == 1  # a kill leaves its hidden partial (and its lock file, not held) behind ...
        with pytest.raises(StoreError, match="shard-00000: partial"):
            finalize(store)  # ... which finalize names
    # The requeued task: discards any leftover, redoes the shard, and it equals the reference.
    rerun = type(cfg)(teachers=cfg.teachers, dump=DumpTask(**{**cfg.dump.to_dict(), "store": str(store)}))
    assert [r.status for r in run_local(rerun.tasks(), progress=False)] == ["written"]
    assert not (store / ".partial").exists()  # attempt, lock and folders all gone
    finalize(store)
    _same_shard(store, root / "ref.zarr", name, 0)
