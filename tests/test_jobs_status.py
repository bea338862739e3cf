"""`kvdistill jobs status`: complete / partial / missing shards per teacher and the exact
`--array=` that resubmits only those."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvdistill.jobs.status import format_status, shard_states, status
from kvdistill.schemas import DumpTask, JobsConfig, ModelSpec, SlurmSpec
from kvdistill.store.layout import partial_dir, shard_name
from kvdistill.store.writer import shard_lock


def jobs_config(
    tiny_store, store: Path, tmp_path: Path, teachers: list[ModelSpec] | None = None, **slurm
) -> JobsConfig:
    return JobsConfig(
        teachers=teachers or tiny_store["teachers"],
        dump=DumpTask(student=tiny_store["student"], store=str(store), data=tiny_store["data"], num_shards=2),
        slurm=SlurmSpec(**slurm),
        jobs_dir=str(tmp_path / "jobs"),
    )


def test_complete_store_reports_every_shard_complete_with_rows_and_no_resubmit(store_copy):
    info = status(store_copy)
    assert info["complete"] and info["finalized"] and info["num_shards"] == 2
    assert list(info["teachers"]) == ["teacher-a", "teacher-b"]
    for t in info["teachers"].values():
        assert t["array"] is None and t["resubmit"] is None and t["missing"] == t["partial"] == []
        assert [s["state"] for s in t["shards"]] == ["complete", "complete"]
        assert sum(s["samples"] for s in t["shards"]) == 48  # conftest.DATA: 48 training rows
        assert all(s["rows"] > s["samples"] and s["bytes"] > 0 for s in t["shards"])
    table = format_status(info)
    assert "resubmit" not in table and "--array" not in table
    assert "all 2 shards of every teacher are complete" in table
    assert f"kvdistill store finalize {store_copy}" in table


def test_deleted_and_partial_shards_are_listed_with_the_exact_array_to_resubmit(store_copy, tiny_store, tmp_path):
    shutil.rmtree(store_copy / "teachers" / "teacher-a" / shard_name(1))
    # teacher-b shard 0: its task was killed mid-write (the completed copy is gone, a leftover remains)
    shutil.rmtree(store_copy / "teachers" / "teacher-b" / shard_name(0))
    leftover = partial_dir(store_copy, "teacher-b") / f"{shard_name(0)}.node7-12345"
    leftover.mkdir(parents=True)
    (leftover / "k.bin").write_bytes(b"\0" * 1000)

    states = shard_states(store_copy, ["teacher-a", "teacher-b"], 2)
    assert [s["state"] for s in states["teacher-a"]] == ["complete", "missing"]
    assert [s["state"] for s in states["teacher-b"]] == ["partial", "complete"]
    assert states["teacher-a"][1] == {"shard": 1, "state": "missing", "rows": None, "samples": None, "bytes": 0}
    assert states["teacher-b"][0]["bytes"] == 1000 and states["teacher-b"][0]["rows"] is None

    info = status(store_copy)
    a, b = info["teachers"]["teacher-a"], info["teachers"]["teacher-b"]
    assert not info["complete"]
    assert (a["missing"], a["partial"], a["array"]) == ([1], [], "--array=1")
    assert (b["missing"], b["partial"], b["array"]) == ([], [0], "--array=0")
    assert a["resubmit"] is None  # no jobs config: the store does not know where the scripts are

    cfg = jobs_config(tiny_store, store_copy, tmp_path)
    info = status(store_copy, cfg)
    jobs = tmp_path / "jobs"
    assert info["teachers"]["teacher-a"]["resubmit"] == f"sbatch --array=1 {jobs / 'dump-teacher-a.sbatch'}"
    assert info["teachers"]["teacher-b"]["resubmit"] == f"sbatch --array=0 {jobs / 'dump-teacher-b.sbatch'}"

    table = format_status(info)
    row = {tuple(line.split()[:3]) for line in table.splitlines()}
    assert {("teacher-a", "1", "missing"), ("teacher-b", "0", "partial"), ("teacher-a", "0", "complete")} <= row
    assert f"sbatch --array=1 {jobs / 'dump-teacher-a.sbatch'}" in table
    assert f"sbatch --array=0 {jobs / 'dump-teacher-b.sbatch'}" in table
    assert "are complete" not in table


def test_teacher_not_in_the_store_yet_has_every_shard_missing(store_copy, tiny_store, tmp_path):
    late = ModelSpec(name_or_path=tiny_store["teachers"][0].name_or_path, name="teacher-c")
    cfg = jobs_config(tiny_store, store_copy, tmp_path, teachers=[*tiny_store["teachers"], late], max_parallel=4)
    info = status(store_copy, cfg)
    c = info["teachers"]["teacher-c"]
    assert [s["state"] for s in c["shards"]] == ["missing", "missing"]
    assert c["array"] == "--array=0-1%4"  # the config's throttle carries over
    assert c["resubmit"] == f"sbatch --array=0-1%4 {tmp_path / 'jobs' / 'dump-teacher-c.sbatch'}"
    assert info["teachers"]["teacher-a"]["array"] is None
    assert "teacher-c" in format_status(info) and not info["complete"]


def test_status_before_any_dump_lists_every_shard_missing(tiny_store, tmp_path):
    cfg = jobs_config(tiny_store, tmp_path / "not-yet.zarr", tmp_path)
    info = status(tmp_path / "not-yet.zarr", cfg)
    assert {n: t["array"] for n, t in info["teachers"].items()} == {
        "teacher-a": "--array=0-1",
        "teacher-b": "--array=0-1",
    }


def test_config_with_another_shard_count_than_the_store_is_refused(store_copy, tiny_store, tmp_path):
    cfg = jobs_config(tiny_store, store_copy, tmp_path)
    cfg.dump.num_shards = 3
    with pytest.raises(ValueError, match="store .* has 2 shards per teacher, the jobs config says 3"):
        status(store_copy, cfg)


def test_a_shard_whose_writer_holds_its_lock_is_running_naming_the_owner_and_not_resubmitted(
    store_copy, tiny_store, tmp_path
):
    shutil.rmtree(store_copy / "teachers" / "teacher-a" / shard_name(1))
    lock = shard_lock(store_copy, "teacher-a", 1).acquire()  # a live writer of that shard
    try:
        (partial_dir(store_copy, "teacher-a") / f"{shard_name(1)}.node3-77").mkdir()
        (s1,) = [s for s in shard_states(store_copy, ["teacher-a"], 2)["teacher-a"] if s["shard"] == 1]
        assert s1["state"] == "running" and f"pid {os.getpid()} on host" in s1["owner"]
        info = status(store_copy, jobs_config(tiny_store, store_copy, tmp_path))
        t = info["teachers"]["teacher-a"]
        assert t["running"] == [1] and t["array"] is None and not info["complete"]
        assert f"shard 1 running (pid {os.getpid()}" in format_status(info)
    finally:
        lock.release()
    # Its writer died (the lock is free again): now a leftover, resubmitted.
    (s1,) = [s for s in shard_states(store_copy, ["teacher-a"], 2)["teacher-a"] if s["shard"] == 1]
    assert s1["state"] == "partial"
    assert (
        status(store_copy, jobs_config(tiny_store, store_copy, tmp_path))["teachers"]["teacher-a"]["array"]
        == "--array=1"
    )
