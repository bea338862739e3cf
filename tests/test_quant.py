"""K/V batches cross to the trainer's device as stored (train/quant.py) and arrive as the
reader's float32: quantised ones are store/codecs.decode bit for bit, sample by sample,
whatever the rows' alignment to the shard's key-scale groups; padding rows are exact zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.schemas import AlignSpec, DataSpec, KVGeometry, ModelSpec, StoreSpec, TeacherSpec
from kvdistill.store import ShardReader, ShardWriter, codecs, finalize, init_store, init_teacher
from kvdistill.store.codecs import QuantRows
from kvdistill.train.quant import QuantKV, collate_quant, kv_as_stored, kv_to_device
from kvdistill.train.stream import KVStream, collate


def stored(codec: str, part: str, x: np.ndarray) -> QuantRows:
    """x [N, L, D] encoded as one shard from row 0, as QuantRows over all of it."""
    enc = codecs.encode(codec, part, x)
    return QuantRows(codec, part, x.shape[2], 0, enc[""], enc["scale"], enc.get("zero"))


@settings(max_examples=40, deadline=None)
@given(
    codec=st.sampled_from(["int8", "int4"]),
    part=st.sampled_from(["k", "v"]),
    L=st.integers(1, 3),
    D=st.sampled_from([1, 3, 8, 31, 32, 33, 70]),
    lengths=st.lists(st.integers(0, 80), min_size=1, max_size=5),
    offset=st.integers(0, 70),
    pad=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_the_device_batch_is_decode_bit_for_bit(codec, part, L, D, lengths, offset, pad, seed):
    rng = np.random.default_rng(seed)
    N = offset + sum(lengths)
    x = (rng.standard_normal((N, L, D)) * rng.uniform(0.01, 30, size=(1, L, D)) + rng.normal(size=(1, L, D))).astype(
        np.float32
    )
    whole = stored(codec, part, x)
    bounds = np.cumsum([offset, *lengths])
    samples = [whole[int(a) : int(b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    T = max(lengths) + pad
    batch = collate_quant(samples, T)
    assert batch.shape == (len(samples), T, L, D)
    got = batch.dequantise().numpy()
    assert got.dtype == np.float32 and got.shape == batch.shape
    for i, s in enumerate(samples):
        n = len(s)
        want = codecs.decode(
            codec,
            part,
            {"": whole.codes, "scale": whole.scale, **({"zero": whole.zero} if whole.zero is not None else {})},
            0,
            D,
        )[bounds[i] : bounds[i] + n]
        assert np.array_equal(got[i, :n], want), f"sample {i} (rows {bounds[i]}..{bounds[i] + n}) differs from decode"
        assert np.array_equal(s.decode(), want)  # a slice decodes like the whole
        assert not got[i, n:].any(), "padding rows must be exact zeros"


def test_slices_carry_only_the_scale_rows_they_need():
    x = np.random.default_rng(0).standard_normal((100, 2, 8)).astype(np.float32)
    k = stored("int8", "k", x)
    assert len(k.scale) == 4  # ceil(100 / 32) groups
    s = k[30:70]  # rows 30..69: groups 0, 1, 2
    assert (s.first_row, len(s), len(s.scale)) == (30, 40, 3) and np.shares_memory(s.codes, k.codes)
    assert len(k[64:64].scale) == 0 and len(stored("int4", "v", x)[5:9].scale) == 4
    with pytest.raises(ValueError, match="need 2 scale rows"):
        QuantRows("int8", "k", 8, 30, k.codes[30:40], k.scale[:1])
    with pytest.raises(ValueError, match="int4 needs zero points"):
        QuantRows("int4", "v", 8, 0, k.codes[:4], k.scale[:4])


def test_kv_to_device_moves_floats_and_dequantises_quantised():
    x = np.random.default_rng(1).standard_normal((40, 2, 16)).astype(np.float32)
    k, v = (collate_quant([stored("int4", p, x)[0:25], stored("int4", p, x)[25:40]], 25) for p in ("k", "v"))
    plain = torch.ones(2, 25, 2, 16)
    out = kv_to_device({"a": (k, v), "b": (plain, plain)}, "cpu")
    assert isinstance(k, QuantKV) and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 for pair in out.values() for t in pair
    )
    assert torch.equal(out["a"][0], k.dequantise()) and torch.equal(out["b"][1], plain)
    assert (
        k.codes.element_size() * k.codes.numel() * 8 == plain.element_size() * plain.numel()
    )  # int4: 1/8 of float32's bytes


def test_samples_of_other_codecs_in_one_batch_are_refused():
    x = np.zeros((32, 1, 4), np.float32)
    with pytest.raises(ValueError, match="one codec"):
        collate_quant([stored("int8", "k", x), stored("int4", "k", x)], 32)


@pytest.fixture(scope="module")
def codec_store(tmp_path_factory):
    """One shard, a teacher per codec, the same random K/V in each (D = 40: partial scale groups)."""
    path = tmp_path_factory.mktemp("codecs") / "s.zarr"
    L, H, d = 3, 2, 20
    geom = KVGeometry(num_layers=L, num_kv_heads=H, head_dim=d)
    init_store(
        path,
        StoreSpec(
            student=ModelSpec("s"),
            geometry=geom,
            tokenizer_fingerprint="t",
            data=DataSpec(),
            data_fingerprint="d",
            num_shards=1,
        ),
    )
    rng = np.random.default_rng(3)
    samples = [rng.normal(size=(2, int(rng.integers(5, 70)), L, H * d)).astype(np.float32) for _ in range(12)]
    eye = [[float(i == j) for j in range(L)] for i in range(L)]
    for codec in codecs.CODECS:
        init_teacher(
            path,
            TeacherSpec(
                name=codec,
                model=ModelSpec(codec),
                geometry=geom,
                align=AlignSpec(),
                time_map="identity",
                layer_map=eye,
                width=H * d,
                fingerprint=codec,
                kv_dtype=codec,
            ),
        )
        with ShardWriter(path, codec, 0, num_layers=L, width=H * d, codec=codec) as w:
            for j, (k, v) in enumerate(samples):
                w.write(f"s{j}", k, v, np.zeros(len(k), np.int32), np.ones(len(k), np.bool_))
    finalize(path)
    return path


STORED = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}


def test_every_codec_crosses_as_stored_and_arrives_as_the_readers_float32(codec_store):
    samples = list(KVStream(codec_store, list(codecs.CODECS), shuffle_buffer=1))
    batch = collate(samples[:5], pad_id=0)
    on_device = kv_to_device(batch["kv"], "cpu")
    r = ShardReader(codec_store, "float16", 0)  # the same samples, offsets and order in every teacher
    for codec in codecs.CODECS:
        reader = ShardReader(codec_store, codec, 0)
        for p, part in enumerate(("k", "v")):
            sent = batch["kv"][codec][p]
            assert (sent.codes if isinstance(sent, QuantKV) else sent).dtype == STORED[codec]
            got = on_device[codec][p]
            assert got.dtype == torch.float32 and got.shape == (5, batch["input_ids"].shape[1], 3, 40)
            for i, s in enumerate(samples[:5]):
                j = r.sample_ids.index(s["sample_id"])
                want = reader.rows(int(r.offsets[j]), int(r.offsets[j + 1]), (part,))[part].astype(np.float32)
                assert np.array_equal(got[i, : len(want)].numpy(), want), f"{codec} {part} sample {s['sample_id']}"
                assert not got[i, len(want) :].any()


def test_kv_transfer_auto_hands_over_as_stored_on_an_accelerator_and_decoded_on_the_cpu():
    assert kv_as_stored("auto", torch.device("cuda")) and not kv_as_stored("auto", torch.device("cpu"))
    assert kv_as_stored("stored", "cpu") and not kv_as_stored("decoded", "cuda")
    with pytest.raises(ValueError, match="auto, stored or decoded"):
        kv_as_stored("fast", "cpu")


def test_the_decoded_stream_gives_float32_from_the_reader(codec_store):
    for stored in (True, False):
        s = next(iter(KVStream(codec_store, list(codecs.CODECS), shuffle_buffer=1, kv_as_stored=stored)))
        kinds = {
            c: type(s["kv"][c][0]).__name__ + ":" + str(s["kv"][c][0].dtype)
            for c in codecs.CODECS
            if not isinstance(s["kv"][c][0], QuantRows)
        }
        if stored:
            assert kinds == {"float16": "ndarray:float16", "bfloat16": "Tensor:torch.bfloat16"} and isinstance(
                s["kv"]["int4"][1], QuantRows
            )
        else:
            assert kinds == {
                "float16": "ndarray:float16",
                "bfloat16": "ndarray:float32",
                "int8": "ndarray:float32",
                "int4": "ndarray:float32",
            }
