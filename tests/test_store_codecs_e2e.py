"""Quantised codecs end to end: chosen per store and per teacher, recorded, transparently
decoded by the reader, verified, and trainable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvdistill.jobs.local import run_local
from kvdistill.schemas import DumpTask, JobsConfig, TrainConfig
from kvdistill.store import ShardReader, finalize, inspect, read_store_spec, read_teacher_specs
from kvdistill.store.codecs import QuantRows
from kvdistill.store.verify import verify
from kvdistill.train.loop import train
from kvdistill.train.quant import QuantKV, kv_to_device
from kvdistill.train.stream import KVStream, collate, shuffle_kv


@pytest.fixture(scope="module")
def quantised_store(tiny_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("q") / "q.zarr"
    task = DumpTask(
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
        kv_dtype="int8",
        teacher_kv_dtype={"teacher-b": "int4"},
    )
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


def test_a_quantised_store_verifies_and_trains_the_same_however_kv_reaches_the_device(
    tiny_store, quantised_store, tmp_path
):
    """kv_transfer "stored" (codes to the device, dequantised there: what a GPU run does) and
    "decoded" (float32 from the reader threads: the CPU default) feed the same bits, so the
    same seeded run gives the same losses."""
    assert verify(quantised_store) == []
    runs = {
        how: train(
            TrainConfig(
                store=str(quantised_store),
                student=tiny_store["student"],
                out=str(tmp_path / how),
                batch_size=8,
                max_steps=3,
                device="cpu",
                kv_transfer=how,
            ),
            progress=False,
        )
        for how in ("stored", "decoded")
    }
    assert runs["stored"]["steps"] == 3 and np.isfinite(runs["stored"]["mean_last_20_kv_k"])
    for term in ("mean_last_20_ce", "mean_last_20_kv_k", "mean_last_20_kv_v"):
        assert runs["stored"][term] == runs["decoded"][term], term
    # DataLoader worker processes collate the stored batches and hand QuantKV / bfloat16 over
    workers = train(
        TrainConfig(
            store=str(quantised_store),
            student=tiny_store["student"],
            out=str(tmp_path / "w"),
            batch_size=8,
            max_steps=2,
            device="cpu",
            kv_transfer="stored",
            num_workers=2,
        ),
        progress=False,
    )
    assert workers["steps"] == 2 and np.isfinite(workers["mean_last_20_kv_v"])


def test_the_stream_moves_codes_and_the_device_batch_equals_the_decoded_one(quantised_store):
    """The trainer's batch of a quantised store: codes and scales through the stream and collate
    (1 or 1/2 byte an element), dequantised by kv_to_device into exactly the float32 batch the
    CPU decoder gives."""
    teachers = ["teacher-a", "teacher-b"]
    samples = list(KVStream(quantised_store, teachers, shuffle_buffer=1))[:6]
    assert all(isinstance(x, QuantRows) for s in samples for pair in s["kv"].values() for x in pair)
    decoded = [{**s, "kv": {t: (k.decode(), v.decode()) for t, (k, v) in s["kv"].items()}} for s in samples]
    quant, ref = collate(samples, pad_id=0), collate(decoded, pad_id=0)
    assert isinstance(quant["kv"]["teacher-a"][0], QuantKV) and quant["kv"]["teacher-b"][1].codes.dtype == torch.uint8
    got = kv_to_device(quant["kv"], "cpu")
    for t in teachers:
        for part in (0, 1):
            assert torch.equal(got[t][part], ref["kv"][t][part])
    # and the stream's rows are the reader's decoded rows (ShardReader.rows, decode=True)
    r = ShardReader(quantised_store, "teacher-b", samples[0]["shard"])
    j = r.sample_ids.index(samples[0]["sample_id"])
    want = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), ("k", "v"))
    assert np.array_equal(decoded[0]["kv"]["teacher-b"][0], want["k"]) and np.array_equal(
        decoded[0]["kv"]["teacher-b"][1], want["v"]
    )
    # the shuffled-KV control dequantises the other sample's rows before resampling them
    shuffled = shuffle_kv(samples, seed=0)
    assert all(x.dtype == np.float32 for s in shuffled for pair in s["kv"].values() for x in pair)
