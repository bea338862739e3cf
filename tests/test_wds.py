"""The webdataset backend: same records as the zarr store, readable with plain webdataset,
streamable by the trainer, convertible both ways, and never unpickling anything."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from kvdistill.cli import main
from kvdistill.schemas import DumpConfig, TrainConfig
from kvdistill.store import ShardReader, StoreError, shard_samples, wds_samples
from kvdistill.store.verify import verify
from kvdistill.train.loop import train
from kvdistill.train.stream import KVStream

TEACHERS = ["teacher-a", "teacher-b"]


@pytest.fixture(scope="module")
def wds_store(tiny_store, tmp_path_factory):
    dst = tmp_path_factory.mktemp("wds") / "tiny.wds"
    assert main(["store", "convert", str(tiny_store["store"]), str(dst)]) == 0
    return dst


def test_converted_tars_hold_the_zarr_records_and_open_with_plain_webdataset(tiny_store, wds_store):
    code = f"""
import io, json, sys
import numpy as np, webdataset as wds
out = []
tar = {str(wds_store / "teachers" / "teacher-a" / "shard-00001.tar")!r}
for rec in wds.WebDataset(tar, shardshuffle=False, empty_check=False):
    k = np.load(io.BytesIO(rec["k.npy"]), allow_pickle=False)
    out.append([rec["__key__"], list(k.shape), str(k.dtype), json.loads(rec["json"])["tokens"]])
print(json.dumps({{"records": out, "kvdistill": sorted(m for m in sys.modules if m.split(".")[0] == "kvdistill")}}))
"""
    res = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    )
    assert res["kvdistill"] == []
    r = ShardReader(tiny_store["store"], "teacher-a", 1)
    assert [x[0] for x in res["records"]] == r.sample_ids
    assert [x[1] for x in res["records"]] == [
        [int(b - a), 2, 64] for a, b in zip(r.offsets[:-1], r.offsets[1:], strict=True)
    ]
    assert {x[2] for x in res["records"]} == {"float16"}


def test_wds_samples_equal_the_zarr_rows_for_every_teacher(tiny_store, wds_store):
    for shard in range(2):
        got = list(wds_samples(wds_store, TEACHERS, shard))
        want = list(shard_samples(tiny_store["store"], TEACHERS, [shard]))
        assert [g["sample_id"] for g in got] == [w["sample_id"] for w in want]
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g["input_ids"], w["input_ids"]) and np.array_equal(g["loss_mask"], w["loss_mask"])
            for t in TEACHERS:
                assert np.array_equal(g["kv"][t][0], w["kv"][t][0]) and np.array_equal(g["kv"][t][1], w["kv"][t][1])


def test_the_trainer_streams_a_webdataset_store(tiny_store, wds_store, tmp_path):
    summary = train(
        TrainConfig(
            store=str(wds_store),
            student=tiny_store["student"],
            out=str(tmp_path / "run"),
            batch_size=8,
            max_steps=3,
            device="cpu",
        ),
        progress=False,
    )
    assert summary["steps"] == 3 and np.isfinite(summary["mean_last_20_kv_k"])


def test_converting_back_gives_an_identical_verified_zarr_store(tiny_store, wds_store, tmp_path):
    back = tmp_path / "back.zarr"
    assert main(["store", "convert", str(wds_store), str(back)]) == 0
    assert verify(back) == []
    for t in TEACHERS:
        for shard in range(2):
            a, b = ShardReader(tiny_store["store"], t, shard), ShardReader(back, t, shard)
            assert a.sample_ids == b.sample_ids
            n = int(a.offsets[-1])
            for name, x in a.rows(0, n).items():
                assert np.array_equal(x, b.rows(0, n)[name]), name


def test_dump_tasks_write_one_tar_each_and_finalize_like_a_zarr_store(tiny_store, tmp_path):
    store = tmp_path / "direct"
    for t in tiny_store["teachers"]:
        cfg = DumpConfig(
            teacher=t,
            student=tiny_store["student"],
            store=str(store),
            data=tiny_store["data"],
            num_shards=2,
            batch_size=8,
            device="cpu",
        )
        cfg.save(tmp_path / f"{t.name}.yaml")
        for shard in range(2):
            assert (
                main(
                    [
                        "dump",
                        "--config",
                        str(tmp_path / f"{t.name}.yaml"),
                        "--shard",
                        str(shard),
                        "--backend",
                        "webdataset",
                        "--no-progress",
                    ]
                )
                == 0
            )
    assert sorted(p.name for p in (store / "teachers" / "teacher-a").glob("*.tar")) == [
        "shard-00000.tar",
        "shard-00001.tar",
    ]
    assert main(["store", "finalize", str(store)]) == 0
    assert verify(store) == []
    for shard in range(2):  # the same records as the zarr dump of the same tasks
        want = list(shard_samples(tiny_store["store"], TEACHERS, [shard]))
        got = list(wds_samples(store, TEACHERS, shard))
        assert [g["sample_id"] for g in got] == [w["sample_id"] for w in want]
        assert all(
            np.array_equal(g["kv"][t][0], w["kv"][t][0]) for g, w in zip(got, want, strict=True) for t in TEACHERS
        )


def test_an_object_dtype_npy_in_a_tar_is_refused_not_unpickled(tmp_path, wds_store):
    """Even with checksums that agree (a tar written that way on purpose), pickle is never run."""
    import shutil

    import google_crc32c

    bad = tmp_path / "bad.wds"
    shutil.copytree(wds_store, bad)
    tar_path = bad / "teachers" / "teacher-a" / "shard-00000.tar"
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    key = members[0][0].name.split(".")[0]
    with tarfile.open(tar_path, "w") as tf:
        for m, data in members:
            if m.name == f"{key}.k.npy":
                data = buf.getvalue()
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    sidecar = tar_path.with_suffix(".json")
    rec = json.loads(sidecar.read_text())
    sums = rec["crc32c"]
    sums["records"][0][sums["members"].index("k.npy")] = google_crc32c.value(buf.getvalue())
    sums["tar"], sums["size"] = google_crc32c.value(tar_path.read_bytes()), tar_path.stat().st_size
    sidecar.write_text(json.dumps(rec))
    with pytest.raises(StoreError, match="cannot be read without pickle"):
        list(wds_samples(bad, ["teacher-a"], 0))


def _stream_ids(store) -> list[str]:
    return [s["sample_id"] for s in KVStream(store, TEACHERS, shuffle_buffer=1)]


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (1, 2), (2, 2)])
def test_a_webdataset_store_splits_the_global_order_across_ranks_and_workers_as_zarr_does(
    tiny_store, wds_store, world, workers
):
    from torch.utils.data import DataLoader

    from kvdistill.train.stream import MicroBatches

    def ids(store, rank):
        batches = MicroBatches(
            KVStream(store, TEACHERS, shuffle_buffer=4, seed=2),
            4,
            lambda s: {"ids": [x["sample_id"] for x in s]},
            rank=rank,
            world_size=world,
        )
        return [b["ids"] for b in DataLoader(batches, batch_size=None, num_workers=workers) if b["weight"]]

    parts = [ids(wds_store, r) for r in range(world)]
    assert parts == [ids(tiny_store["store"], r) for r in range(world)]
    flat = [i for p in parts for b in p for i in b]
    assert sorted(flat) == sorted(_stream_ids(tiny_store["store"])) and len(set(flat)) == len(flat)


def test_webdataset_stream_yields_the_zarr_stream_samples_in_the_same_order(tiny_store, wds_store):
    a = list(KVStream(tiny_store["store"], TEACHERS, shuffle_buffer=1, seed=3))
    b = list(KVStream(wds_store, TEACHERS, shuffle_buffer=1, seed=3))
    assert [s["sample_id"] for s in a] == [s["sample_id"] for s in b]
    assert [s["shard"] for s in a] == [s["shard"] for s in b]
    for x, y in zip(a, b, strict=True):
        for t in TEACHERS:
            assert np.array_equal(x["kv"][t][0], y["kv"][t][0])
