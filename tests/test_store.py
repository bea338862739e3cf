"""The zarr KV store: readable with plain tools, atomic shards, finalize, inspect, chunking.

Everything that mutates works on a copy of the session store (`store_copy`); `tiny_store`
itself is shared by other test files and only ever read here."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from kvdistill.dump.run import run_dump
from kvdistill.schemas import DumpConfig
from kvdistill.store import (
    ShardReader,
    ShardWriter,
    StoreError,
    finalize,
    format_inspect,
    init_store,
    init_teacher,
    inspect,
    read_index,
    read_store_spec,
    read_teacher_specs,
    shard_is_complete,
    shard_name,
    writer,
)
from kvdistill.store.layout import KEY, partial_dir
from kvdistill.store.rows import missing_chunks
from kvdistill.store.writer import CHUNK_BYTES, CHUNKS_PER_SHARD, shard_lock

TEACHER_WIDTH = {"teacher-a": 64, "teacher-b": 16}  # D_t = H * d of the conftest teachers
STUDENT_LAYERS = 2


def dump_config(tiny_store, store: Path, teacher: int, shard: int) -> DumpConfig:
    """The config conftest dumped (teacher, shard) of `tiny_store` with, pointed at `store`."""
    return DumpConfig(
        teacher=tiny_store["teachers"][teacher],
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        shard=shard,
        num_shards=2,
        batch_size=8,
        device="cpu",
    )


def sample(rng: np.random.Generator, T: int, L: int, D: int) -> dict[str, np.ndarray]:
    return {
        "k": rng.standard_normal((T, L, D)).astype(np.float32),  # [T, L, D]
        "v": rng.standard_normal((T, L, D)).astype(np.float32),
        "input_ids": rng.integers(0, 300, T).astype(np.int64),  # [T]
        "loss_mask": rng.random(T) < 0.5,
    }


def file_mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# --- the on-disk format, read without kvdistill ------------------------------------------------

PLAIN_READER = textwrap.dedent("""
    import json, sys
    import dask.array as da
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    path = sys.argv[1]
    root = zarr.open_group(path, mode="r")
    out = {"root_attrs": dict(root.attrs), "teachers": {}}
    for name in sorted(root["teachers"].group_keys()):
        t = root["teachers"][name]
        shards = {}
        for sname in sorted(t.group_keys()):
            s = t[sname]
            k, v = s["k"][:], s["v"][:]
            lazy = da.from_zarr(s["k"])  # dask over the same sharded array, chunk by chunk
            shards[sname] = {
                "dask_equal": bool(
                    (lazy.astype("float32").sum(axis=(1, 2)).compute() == k.astype("float32").sum(axis=(1, 2))).all()
                ),
                "k_shape": list(k.shape), "v_shape": list(v.shape), "dtype": str(k.dtype),
                "finite": bool(np.isfinite(k).all() and np.isfinite(v).all()),
                "input_ids": len(s["input_ids"][:]), "loss_mask": len(s["loss_mask"][:]),
                "offsets": s["offsets"][:].tolist(),
                "sample_ids": [str(x) for x in s["sample_ids"][:]],
                "attrs": dict(s.attrs),
            }
        out["teachers"][name] = {"attrs": dict(t.attrs), "shards": shards}
    out["index"] = pq.read_table(path + "/index.parquet").to_pylist()
    loaded = sorted(m for m in sys.modules if m == "kvdistill" or m.startswith("kvdistill."))
    assert "kvdistill" not in sys.modules, loaded
    out["kvdistill_modules"] = loaded
    print(json.dumps(out))
    """)


def test_store_opens_with_zarr_dask_and_pyarrow_alone_and_its_layout_is_consistent(tiny_store, examples):
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_READER, str(tiny_store["store"])],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kvdistill_modules"] == []
    assert got["root_attrs"][KEY]["store_spec"]["num_shards"] == 2
    assert sorted(got["teachers"]) == sorted(TEACHER_WIDTH)

    index = got["index"]
    data_ids = sorted(ex.id for ex in examples)
    per_shard_ids: dict[str, dict[str, list[str]]] = {}
    for name, t in got["teachers"].items():
        assert t["attrs"][KEY]["teacher_spec"]["name"] == name
        assert sorted(t["shards"]) == [shard_name(0), shard_name(1)]
        seen = []
        for sname, s in t["shards"].items():
            offsets = s["offsets"]
            N = offsets[-1]
            assert s["k_shape"] == s["v_shape"] == [N, STUDENT_LAYERS, TEACHER_WIDTH[name]]
            assert s["dtype"] == "float16" and s["finite"] and s["dask_equal"]
            assert s["input_ids"] == s["loss_mask"] == N
            assert offsets[0] == 0 and (np.diff(offsets) > 0).all()
            assert len(s["sample_ids"]) == len(offsets) - 1
            assert s["attrs"][KEY]["complete"] is True
            assert s["attrs"][KEY]["samples"] == len(s["sample_ids"])
            assert s["attrs"][KEY]["rows"] == N
            rows = sorted(
                (r for r in index if r["teacher"] == name and r["shard"] == int(sname[-5:])),
                key=lambda r: r["sample_index"],
            )
            assert [r["sample_id"] for r in rows] == s["sample_ids"]
            assert [r["row_start"] for r in rows] == offsets[:-1]
            assert [r["row_stop"] for r in rows] == offsets[1:]
            assert [r["length"] for r in rows] == np.diff(offsets).tolist()
            per_shard_ids.setdefault(sname, {})[name] = s["sample_ids"]
            seen += s["sample_ids"]
        assert sorted(seen) == data_ids  # every sample exactly once per teacher
    for sname, by_teacher in per_shard_ids.items():
        assert by_teacher["teacher-a"] == by_teacher["teacher-b"], sname
    assert len(index) == len(TEACHER_WIDTH) * len(data_ids)


# --- finalize ----------------------------------------------------------------------------------


def test_finalize_refuses_a_store_with_a_missing_shard_and_names_it(store_copy):
    shutil.rmtree(store_copy / "teachers" / "teacher-b" / shard_name(1))
    with pytest.raises(StoreError) as e:
        finalize(store_copy)
    msg = str(e.value)
    assert "'teacher-b' shard-00001: missing" in msg
    assert "teacher-a" not in msg and "shard-00000" not in msg  # only the missing one is named


def test_finalize_refuses_a_shard_that_is_present_but_not_marked_complete(store_copy):
    shard = zarr.open_group(store_copy / "teachers" / "teacher-a" / shard_name(0), mode="r+")
    shard.attrs[KEY] = {**shard.attrs[KEY], "complete": False}
    assert not shard_is_complete(store_copy, "teacher-a", 0)
    with pytest.raises(StoreError, match=r"'teacher-a' shard-00000: incomplete"):
        finalize(store_copy)
    with pytest.raises(StoreError, match="missing or incomplete"):
        ShardReader(store_copy, "teacher-a", 0)


def test_finalize_refuses_teachers_whose_shard_holds_other_samples(store_copy):
    # Overwrite teacher-b's shard 1 with teacher-b's shard 0: same width, other sample ids.
    tdir = store_copy / "teachers" / "teacher-b"
    shutil.rmtree(tdir / shard_name(1))
    shutil.copytree(tdir / shard_name(0), tdir / shard_name(1))
    with pytest.raises(StoreError, match=r"shard-00001: teacher 'teacher-b' holds other samples"):
        finalize(store_copy)


def test_finalize_rewrites_an_index_that_matches_the_shards(store_copy, tiny_store):
    (store_copy / "index.parquet").unlink()
    index = finalize(store_copy)
    assert index == store_copy / "index.parquet"
    assert pq.read_table(index).equals(pq.read_table(tiny_store["store"] / "index.parquet"))


# --- atomic shards -----------------------------------------------------------------------------


def test_an_exception_inside_the_writer_leaves_no_shard_and_no_partial_dir(tmp_path):
    store = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="task killed"), ShardWriter(store, "t", 0, num_layers=2, width=8) as w:
        for i in range(2):
            w.write(f"id-{i}", **sample(rng, 5, 2, 8))
        assert w.tmp.exists()  # the partial shard is being written under the hidden sibling
        raise RuntimeError("task killed")
    assert not (store / "teachers" / "t" / shard_name(0)).exists()
    assert not shard_is_complete(store, "t", 0)
    assert not (store / ".partial").exists()  # the attempt, its lock and their folders are gone


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_closed_shard_is_visible_complete_and_reads_back_what_was_written(tmp_path, dtype):
    store = tmp_path / "s.zarr"
    rng = np.random.default_rng(1)
    samples = {"a": sample(rng, 5, 2, 8), "b": sample(rng, 3, 2, 8)}
    with ShardWriter(store, "t", 0, num_layers=2, width=8, codec=dtype) as w:
        for sid, s in samples.items():
            w.write(sid, **s)
        assert not (store / "teachers" / "t" / shard_name(0)).exists()  # invisible until closed
        assert not shard_is_complete(store, "t", 0)
        assert (
            store.absolute() in w.tmp.parents and store.absolute() in w.lock.path.parents
        )  # inside the store's own folder
        assert sorted(p.name for p in store.parent.iterdir()) == ["s.zarr"]
    assert shard_is_complete(store, "t", 0)
    assert not (store / ".partial").exists()  # nothing left behind after a commit
    assert sorted(p.name for p in store.iterdir()) == ["teachers"]  # (no init_store here: a bare writer)
    assert sorted(p.name for p in store.parent.iterdir()) == ["s.zarr"]  # nothing beside the store

    r = ShardReader(store, "t", 0)
    assert r.sample_ids == ["a", "b"] and len(r) == 2
    assert r.offsets.tolist() == [0, 5, 8]
    assert r.attrs["samples"] == 2 and r.attrs["rows"] == 8 and r.attrs["teacher"] == "t"
    got = r.rows(0, 8)
    for name in ("k", "v"):
        want = np.concatenate([s[name] for s in samples.values()]).astype(np.dtype(dtype))
        assert got[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[name], want)
    assert got["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(got["input_ids"], np.concatenate([s["input_ids"] for s in samples.values()]))
    assert got["loss_mask"].dtype == np.bool_
    np.testing.assert_array_equal(got["loss_mask"], np.concatenate([s["loss_mask"] for s in samples.values()]))
    np.testing.assert_array_equal(r.rows(5, 8, ("k",))["k"], samples["b"]["k"].astype(dtype))


def test_samples_straddling_zarr_shard_boundaries_read_back_exactly(tmp_path):
    # A 32 KiB row gives 32-row chunks (one key-scale group) and 512-row zarr shards: 7 samples
    # of 100 rows cross both.
    L, D = 1, CHUNK_BYTES // 128
    rng = np.random.default_rng(2)
    ks = [np.arange(100 * D, dtype=np.float32).reshape(100, L, D) + 1000 * i for i in range(7)]
    with ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=L, width=D, codec="float32") as w:
        assert (w.chunk_rows, w.shard_rows) == (32, 32 * CHUNKS_PER_SHARD)
        for i, k in enumerate(ks):
            w.write(f"id-{i}", k, -k, rng.integers(0, 9, 100), np.ones(100, bool))
    r = ShardReader(tmp_path / "s.zarr", "t", 0)
    assert r.offsets.tolist() == list(range(0, 701, 100))
    got = r.rows(0, 700, ("k", "v"))
    np.testing.assert_array_equal(got["k"], np.concatenate(ks))
    np.testing.assert_array_equal(got["v"], -np.concatenate(ks))
    np.testing.assert_array_equal(r.rows(490, 530, ("k",))["k"], np.concatenate(ks)[490:530])


def test_a_writer_refuses_a_sample_of_the_wrong_shape_and_a_complete_shard(tmp_path):
    store = tmp_path / "s.zarr"
    rng = np.random.default_rng(3)
    with ShardWriter(store, "t", 0, num_layers=2, width=8) as w:
        s = sample(rng, 4, 2, 8)
        with pytest.raises(ValueError, match=r"sample bad: expected k, v of shape \(4, 2, 8\)"):
            w.write("bad", s["k"][:, :1], s["v"], s["input_ids"], s["loss_mask"])
        w.write("ok", **s)
    with pytest.raises(StoreError, match="is complete already; a complete shard is never rewritten"):
        ShardWriter(store, "t", 0, num_layers=2, width=8)
    assert ShardReader(store, "t", 0).sample_ids == ["ok"]


def test_a_killed_tasks_leftovers_are_discarded_by_the_next_writer(tmp_path):
    store = tmp_path / "s.zarr"
    leftover = partial_dir(store, "t") / f"{shard_name(0)}.deadhost-4242"
    (leftover / "k").mkdir(parents=True)
    (leftover / "k" / "c").write_bytes(b"half a chunk")
    other_shard = partial_dir(store, "t") / f"{shard_name(1)}.otherhost-1"  # another task's
    other_shard.mkdir()
    with ShardWriter(store, "t", 0, num_layers=1, width=4) as w:
        assert not leftover.exists()
        w.write("x", np.ones((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32), [1, 2], [True, False])
    assert other_shard.exists()  # a writer touches only its own shard's leftovers
    assert shard_is_complete(store, "t", 0)
    assert ShardReader(store, "t", 0).rows(0, 2, ("input_ids",))["input_ids"].tolist() == [1, 2]


def test_finalize_reports_a_shard_that_exists_only_as_partial_as_partial(store_copy):
    shutil.rmtree(store_copy / "teachers" / "teacher-a" / shard_name(1))
    (partial_dir(store_copy, "teacher-a") / f"{shard_name(1)}.deadhost-4242" / "k").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"'teacher-a' shard-00001: partial"):
        finalize(store_copy)


def test_a_killed_dump_task_is_redone_into_the_same_shard(store_copy, tiny_store):
    shard = store_copy / "teachers" / "teacher-a" / shard_name(1)
    shutil.rmtree(shard)
    leftover = partial_dir(store_copy, "teacher-a") / f"{shard_name(1)}.deadhost-4242"
    (leftover / "k").mkdir(parents=True)
    result = run_dump(dump_config(tiny_store, store_copy, 0, 1), progress=False)
    assert result.status == "written" and result.samples == 24
    assert not leftover.exists()
    finalize(store_copy)
    redone, orig = ShardReader(store_copy, "teacher-a", 1), ShardReader(tiny_store["store"], "teacher-a", 1)
    assert redone.sample_ids == orig.sample_ids
    np.testing.assert_array_equal(redone.offsets, orig.offsets)
    n = int(orig.offsets[-1])
    for name, arr in orig.rows(0, n).items():
        np.testing.assert_array_equal(redone.rows(0, n, (name,))[name], arr)


def test_rerunning_a_complete_dump_task_is_a_no_op(store_copy, tiny_store):
    shard = store_copy / "teachers" / "teacher-b" / shard_name(0)
    before = file_mtimes(shard)
    result = run_dump(dump_config(tiny_store, store_copy, 1, 0), progress=False)
    assert result.status == "already complete"
    assert (result.teacher, result.shard, result.samples) == ("teacher-b", 0, 0)
    assert "already complete, nothing to do" in result.summary()
    assert file_mtimes(shard) == before
    assert not partial_dir(store_copy, "teacher-b").exists()  # no writer was even started


# --- store and teacher specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("data_fingerprint", "0123456789abcdef"),
        ("num_shards", 3),
        ("kv_dtype", "float32"),
        ("tokenizer_fingerprint", "other"),
    ],
)
def test_init_store_refuses_a_store_built_for_another_setup_and_names_the_field(store_copy, field, value):
    spec = read_store_spec(store_copy)
    before = getattr(spec, field)
    with pytest.raises(StoreError) as e:
        init_store(store_copy, dataclasses.replace(spec, **{field: value}))
    assert f"{field}: store has {before!r}, this run has {value!r}" in str(e.value)
    assert read_store_spec(store_copy) == spec  # refused, not overwritten


def test_init_store_names_the_nested_geometry_field_and_accepts_a_moved_student(store_copy):
    spec = read_store_spec(store_copy)
    g = dataclasses.replace(spec.geometry, num_layers=4)
    with pytest.raises(StoreError, match=r"geometry\.num_layers: store has 2, this run has 4"):
        init_store(store_copy, dataclasses.replace(spec, geometry=g))
    moved = dataclasses.replace(spec, student=dataclasses.replace(spec.student, name_or_path="/moved/student"))
    init_store(store_copy, moved)  # only the path differs: accepted
    assert read_store_spec(store_copy) == spec


def test_init_teacher_refuses_a_name_reused_for_another_teacher(store_copy):
    spec = read_teacher_specs(store_copy)["teacher-a"]
    init_teacher(store_copy, spec)  # the same teacher again: fine
    with pytest.raises(StoreError) as e:
        init_teacher(store_copy, dataclasses.replace(spec, fingerprint="feedfacefeedface"))
    msg = str(e.value)
    assert "teacher 'teacher-a' already holds shards of another teacher setup" in msg
    assert f"fingerprint: store has {spec.fingerprint!r}, this run has 'feedfacefeedface'" in msg
    assert read_teacher_specs(store_copy)["teacher-a"] == spec


def test_read_store_spec_refuses_a_directory_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="is not a kvdistill store"):
        read_store_spec(tmp_path)
    zarr.open_group(tmp_path / "g.zarr", mode="w")
    with pytest.raises(StoreError, match="not a kvdistill store"):
        read_store_spec(tmp_path / "g.zarr")


# --- inspect -----------------------------------------------------------------------------------


def test_inspect_counts_shards_samples_tokens_and_bytes_per_teacher(tiny_store, examples):
    store = tiny_store["store"]
    info = inspect(store)
    index = pq.read_table(store / "index.parquet").to_pylist()
    assert (
        info["finalized"] is True
        and info["num_shards"] == 2
        and info["kv_dtype"] == "float16"
        and info["compression_level"] == 1
    )
    assert info["geometry"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16}
    assert "K/V blosc-zstd level 1" in format_inspect(info).splitlines()[1]
    assert sorted(info["teachers"]) == sorted(TEACHER_WIDTH)
    for name, t in info["teachers"].items():
        tokens = sum(r["length"] for r in index if r["teacher"] == name)
        assert t["width"] == TEACHER_WIDTH[name]
        assert t["shards_complete"] == 2
        assert t["samples"] == len(examples) == 48
        assert t["tokens"] == tokens > 0
        assert t["bytes"] > 0
        assert t["bytes_per_token"] == pytest.approx(t["bytes"] / tokens)
    total_tokens = sum(t["tokens"] for t in info["teachers"].values())
    assert info["bytes"] > sum(t["bytes"] for t in info["teachers"].values())  # + index, root
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / total_tokens)
    text = format_inspect(info)
    assert "(finalized)" in text
    for name, t in info["teachers"].items():
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert f" {t['tokens']} " in line and " 2/2 " in line


def test_inspect_shows_a_store_in_progress_as_not_finalized(store_copy):
    (store_copy / "index.parquet").unlink()
    shutil.rmtree(store_copy / "teachers" / "teacher-b" / shard_name(1))
    info = inspect(store_copy)
    assert info["finalized"] is False
    assert info["teachers"]["teacher-b"]["shards_complete"] == 1
    assert info["teachers"]["teacher-b"]["samples"] == 24
    assert info["teachers"]["teacher-a"]["shards_complete"] == 2
    assert "NOT finalized" in format_inspect(info)


# --- chunking ----------------------------------------------------------------------------------


def test_kv_arrays_are_chunked_by_rows_sharded_by_16_chunks_and_blosc_zstd(tiny_store):
    for name, D in TEACHER_WIDTH.items():
        k = zarr.open_group(tiny_store["store"] / "teachers" / name / shard_name(0), mode="r")["k"]
        rows = max(32, CHUNK_BYTES // (STUDENT_LAYERS * D * 2) // 32 * 32)  # float16: 2 bytes; whole 32-row groups
        assert k.chunks == (rows, STUDENT_LAYERS, D)
        assert k.shards == (CHUNKS_PER_SHARD * rows, STUDENT_LAYERS, D)
        codec, crc = k.compressors  # every chunk checksummed, as plain zarr checks it
        assert type(codec).__name__ == "BloscCodec" and type(crc).__name__ == "Crc32cCodec"
        assert codec.cname.value == "zstd" and codec.shuffle.value == "shuffle"


def test_a_row_wider_than_a_chunk_still_gets_one_group_of_rows_per_chunk(tmp_path):
    w = ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=3, width=CHUNK_BYTES // 64, codec="float32")
    try:
        w.write("a", np.zeros((2, 3, CHUNK_BYTES // 64)), np.zeros((2, 3, CHUNK_BYTES // 64)), np.zeros(2), np.ones(2))
        w._flush(final=True)
        assert w.arrays["k"].chunks == (32, 3, CHUNK_BYTES // 64)
        assert w.arrays["k"].shards == (32 * CHUNKS_PER_SHARD, 3, CHUNK_BYTES // 64)
    finally:
        w.abort()
    assert not w.tmp.exists()


def test_array_tasks_that_start_together_initialise_one_store_without_racing(tmp_path):
    """Found by the real SLURM array: two tasks creating the same new store at once made zarr
    raise ContainsGroupError in one of them. Metadata creation is serialised with a file lock."""
    import multiprocessing as mp

    from kvdistill.schemas import AlignSpec, DataSpec, KVGeometry, ModelSpec, StoreSpec, TeacherSpec
    from kvdistill.store import init_store, init_teacher, read_store_spec, read_teacher_specs

    geo = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8)
    spec = StoreSpec(
        student=ModelSpec(name_or_path="s"),
        geometry=geo,
        tokenizer_fingerprint="t",
        data=DataSpec(),
        data_fingerprint="d",
        num_shards=8,
    )
    tspec = TeacherSpec(
        name="t",
        model=ModelSpec(name_or_path="t"),
        geometry=geo,
        align=AlignSpec(),
        time_map="identity",
        layer_map=[[1.0, 0.0], [0.0, 1.0]],
        width=16,
        fingerprint="f",
    )
    path = str(tmp_path / "race.zarr")
    with mp.get_context("spawn").Pool(4) as pool:  # library functions only: children import nothing of the tests
        pool.starmap(init_store, [(path, spec)] * 8)
        pool.starmap(init_teacher, [(path, tspec)] * 8)
    assert read_store_spec(path) == spec and read_teacher_specs(path) == {"t": tspec}


def test_read_index_gives_every_shards_own_offsets_and_sample_ids(tiny_store):
    index = read_index(tiny_store["store"], ["teacher-a", "teacher-b"])
    for teacher in ("teacher-a", "teacher-b"):
        for shard in range(2):
            r = ShardReader(tiny_store["store"], teacher, shard)
            offsets, ids = index[(teacher, shard)]
            assert offsets.dtype == np.int64 and np.array_equal(offsets, r.offsets) and ids == r.sample_ids


def test_a_stale_index_is_refused_naming_the_shard_and_the_fix(store_copy):
    t = pq.read_table(store_copy / "index.parquet")
    keep = [
        not (row["teacher"] == "teacher-a" and row["shard"] == 1 and row["sample_index"] == 0) for row in t.to_pylist()
    ]
    pq.write_table(t.filter(keep), store_copy / "index.parquet")
    with pytest.raises(
        StoreError, match=r"shard-00001: index.parquet lists \d+ samples / \d+ rows, the shard holds .*store finalize"
    ):
        ShardReader(store_copy, "teacher-a", 1, index=read_index(store_copy, ["teacher-a"])[("teacher-a", 1)])


def test_a_teacher_of_empty_shards_is_refused_by_finalize_naming_it(tiny_store, tmp_path):
    spec, teacher = read_store_spec(tiny_store["store"]), read_teacher_specs(tiny_store["store"])["teacher-a"]
    store = tmp_path / "empty.zarr"
    init_store(store, spec)
    init_teacher(store, teacher)
    for i in range(spec.num_shards):
        ShardWriter(store, "teacher-a", i, num_layers=STUDENT_LAYERS, width=TEACHER_WIDTH["teacher-a"]).close()
    with pytest.raises(StoreError, match=r"teacher\(s\) \['teacher-a'\] hold 0 rows in all 2 shard\(s\)"):
        finalize(store)
    assert not (store / "index.parquet").exists()


def test_a_store_with_no_complete_shard_is_re_initialised_by_a_run_with_another_spec(tmp_path, store_copy):
    spec, teacher = read_store_spec(store_copy), read_teacher_specs(store_copy)["teacher-a"]
    store = tmp_path / "failed-first-run.zarr"
    init_store(store, spec)  # a first run created the metadata, then failed
    init_teacher(store, teacher)
    fixed = dataclasses.replace(spec, kv_dtype="int8", tokenizer_fingerprint="the-corrected-tokenizer")
    init_store(store, fixed)  # the corrected run: no shard holds data of the old spec, so it is replaced
    assert read_store_spec(store) == fixed and read_teacher_specs(store) == {}
    init_teacher(store, teacher)
    other = dataclasses.replace(teacher, fingerprint="feedfacefeedface")
    init_teacher(store, other)  # likewise a teacher with no shard yet
    assert read_teacher_specs(store)["teacher-a"] == other
    # Once a shard is being written (its lock held) or complete, the spec is kept and the run refused.
    lock = shard_lock(store, "teacher-a", 0).acquire()
    try:
        with pytest.raises(StoreError, match="already holds shards of another teacher setup"):
            init_teacher(store, teacher)
        with pytest.raises(StoreError, match="was built for another student"):
            init_store(store, spec)
    finally:
        lock.release()
    with pytest.raises(StoreError, match=r"a store with no complete shard yet is re-initialised"):
        init_store(store_copy, fixed)  # the session store holds complete shards


def test_chunks_of_zeros_are_written_so_no_chunk_is_ever_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CHUNK_BYTES", 2048)  # many chunks from a few samples
    store = tmp_path / "s.zarr"
    z = np.zeros((300, 2, 8), np.float32)  # whole chunks of K / V / loss mask equal to zarr's fill value
    with ShardWriter(store, "t", 0, num_layers=2, width=8, codec="int8") as w:
        w.write("zeros", z, z, np.zeros(300, np.int64), np.zeros(300, bool))
    shard = store / "teachers" / "t" / shard_name(0)
    group = zarr.open_group(shard, mode="r")
    for name in group.array_keys():
        assert missing_chunks(group[name], shard / name) == [], name  # every chunk is on disk
    assert len(list((shard / "k" / "c").rglob("*"))) > 1
    got = ShardReader(store, "t", 0).rows(0, 300)
    assert not got["k"].any() and not got["loss_mask"].any()
