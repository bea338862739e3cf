"""Quantised K/V batches dequantised on the trainer's device (train/quant.py) are
store/codecs.decode bit for bit, sample by sample, whatever the rows' alignment to the shard's
key-scale groups; padding rows are exact zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.store import codecs
from kvdistill.store.codecs import QuantRows
from kvdistill.train.quant import QuantKV, collate_quant, kv_to_device


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
    x = (rng.standard_normal((N, L, D)) * rng.uniform(0.01, 30, size=(1, L, D)) + rng.normal(size=(1, L, D))).astype(np.float32)
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
        want = codecs.decode(codec, part, {"": whole.codes, "scale": whole.scale, **({"zero": whole.zero} if whole.zero is not None else {})}, 0, D)[bounds[i] : bounds[i] + n]
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
    assert isinstance(k, QuantKV) and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for pair in out.values() for t in pair)
    assert torch.equal(out["a"][0], k.dequantise()) and torch.equal(out["b"][1], plain)
    assert k.codes.element_size() * k.codes.numel() * 8 == plain.element_size() * plain.numel()  # int4: 1/8 of float32's bytes


def test_samples_of_other_codecs_in_one_batch_are_refused():
    x = np.zeros((32, 1, 4), np.float32)
    with pytest.raises(ValueError, match="one codec"):
        collate_quant([stored("int8", "k", x), stored("int4", "k", x)], 32)
