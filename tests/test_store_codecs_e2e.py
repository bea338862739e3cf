"""Quantised codecs end to end: chosen per store and per teacher, recorded, transparently
decoded by the reader, verified, and trainable."""

from __future__ import annotations

import numpy as np
import pytest

from kvdistill.jobs.local import run_local
from kvdistill.schemas import DumpTask, JobsConfig, TrainConfig
from kvdistill.store import ShardReader, finalize, inspect, read_store_spec, read_teacher_specs
from kvdistill.store.verify import verify
from kvdistill.train.loop import train


@pytest.fixture(scope="module")
def quantised_store(tiny_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("q") / "q.zarr"
    task = DumpTask(student=tiny_store["student"], store=str(store), data=tiny_store["data"], num_shards=2, batch_size=8,
                    device="cpu", kv_dtype="int8", teacher_kv_dtype={"teacher-b": "int4"})
    run_local(JobsConfig(teachers=tiny_store["teachers"], dump=task).tasks(), progress=False)
    finalize(store)
    return store


def test_codecs_are_chosen_per_store_and_per_teacher_and_recorded(quantised_store):
    spec = read_store_spec(quantised_store)
    assert spec.codec("teacher-a") == "int8" and spec.codec("teacher-b") == "int4"
    teachers = read_teacher_specs(quantised_store)
    assert teachers["teacher-a"].kv_dtype == "int8" and teachers["teacher-b"].kv_dtype == "int4"
    info = inspect(quantised_store)["teachers"]
    assert info["teacher-a"]["codec"] == "int8" and info["teacher-a"]["compression_ratio"] > 1.5
    assert info["teacher-b"]["codec"] == "int4"
    assert ShardReader(quantised_store, "teacher-b", 0).group["k"].dtype == np.uint8  # packed nibbles


@pytest.mark.parametrize("teacher, bound", [("teacher-a", 0.01), ("teacher-b", 0.10)])
def test_the_reader_decodes_close_to_the_float16_store(tiny_store, quantised_store, teacher, bound):
    for shard in range(2):
        ref, q = ShardReader(tiny_store["store"], teacher, shard), ShardReader(quantised_store, teacher, shard)
        assert ref.sample_ids == q.sample_ids
        n = int(ref.offsets[-1])
        for part in ("k", "v"):
            want = ref.rows(0, n, (part,))[part].astype(np.float32)
            got = q.rows(0, n, (part,))[part]
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound


def test_a_quantised_store_verifies_and_trains(tiny_store, quantised_store, tmp_path):
    assert verify(quantised_store) == []
    summary = train(TrainConfig(store=str(quantised_store), student=tiny_store["student"], out=str(tmp_path / "run"), batch_size=8, max_steps=3, device="cpu"), progress=False)
    assert summary["steps"] == 3 and np.isfinite(summary["final_kv_k"])
