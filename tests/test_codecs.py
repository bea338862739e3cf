"""store/codecs.py: the K/V codecs, as a specification.

float16 / bfloat16 are exact casts (numpy's, torch's); int8 / int4 keep every element within
half a quantisation step of a group's own range, for any shape and scale (hypothesis), and meet
their error targets on K-like data (outlier channels, per-channel offsets) and V-like data
(outlier tokens): int8 <= 1%, int4 <= 8% relative Frobenius error. Any row range decodes to
the same rows as the whole, encoding shard by shard equals encoding at once, and the module
docstring's plain-numpy dequantisation gives what `decode` gives."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvdistill.store.codecs import (
    CODECS,
    GROUP,
    array_names,
    bytes_per_row,
    decode,
    describe,
    encode,
    scale_rows,
    stored_dtype,
)

QUANTISED = ("int8", "int4")
F16_MAX = 65504.0
BF16_MAX = float(np.float32(3.3895e38))  # below 3.3961e38, the least float32 that rounds to bfloat16 inf

shapes = st.tuples(st.integers(1, 100), st.integers(1, 4), st.integers(1, 70))  # n, L, D
scales = st.floats(1e-3, 1e3)


def round_trip(codec: str, part: str, x: np.ndarray) -> np.ndarray:
    return decode(codec, part, encode(codec, part, x), 0, x.shape[2])


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def k_like(rng: np.random.Generator, n: int, L: int, D: int, scale: float) -> np.ndarray:
    """Keys: ~10% of channels 10x larger than the rest, and per-channel offsets (k_proj bias)."""
    std = np.where(rng.random((L, D)) < 0.1, 10.0, 1.0)
    bias = 0.5 * std * rng.standard_normal((L, D))
    return (scale * (bias + std * rng.standard_normal((n, L, D)))).astype(np.float32)


def v_like(rng: np.random.Generator, n: int, L: int, D: int, scale: float) -> np.ndarray:
    """Values: ~10% of tokens 10x larger than the rest, per-channel offsets (v_proj bias)."""
    tok = np.where(rng.random((n, L, 1)) < 0.1, 10.0, 1.0)
    bias = 0.5 * rng.standard_normal((L, D))
    return (scale * tok * (bias + rng.standard_normal((n, L, D)))).astype(np.float32)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def groups(part: str, n: int, D: int) -> list[tuple[slice, slice]]:
    """(rows, channels) of every scale group: k per channel over GROUP rows, v per token over
    GROUP channels (written out here independently of the codec's own reshapes)."""
    if part == "k":
        return [(slice(g, g + GROUP), slice(c, c + 1)) for g in range(0, n, GROUP) for c in range(D)]
    return [(slice(r, r + 1), slice(c, c + GROUP)) for r in range(n) for c in range(0, D, GROUP)]


# --- float16 / bfloat16: exact casts -----------------------------------------------------------

f16_values = st.floats(-F16_MAX, F16_MAX, width=32, allow_subnormal=True)
f32_values = st.floats(-BF16_MAX, BF16_MAX, width=32, allow_subnormal=True)
SPECIAL = np.array(
    [-0.0, 0.0, 1e-45, -1e-45, 1.1754942e-38, 1e-40, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3e38, -3.3e38, 65504.0, 6e-8],
    dtype=np.float32,
)  # signed zeros, float32 subnormals, bfloat16 ties (to even), large values


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, shapes, elements=f16_values), st.sampled_from("kv"))
def test_float16_round_trip_equals_numpys_float16_cast_bit_for_bit(x, part):
    got = round_trip("float16", part, x)
    np.testing.assert_array_equal(bits(got), bits(x.astype(np.float16).astype(np.float32)))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, shapes, elements=f32_values), st.sampled_from("kv"))
def test_bfloat16_round_trip_equals_torch_bit_for_bit(x, part):
    want = torch.from_numpy(x).to(torch.bfloat16)
    stored = encode("bfloat16", part, x)[""]
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, want.view(torch.uint16).numpy())
    np.testing.assert_array_equal(
        bits(decode("bfloat16", part, {"": stored}, 0, x.shape[2])), bits(want.float().numpy())
    )


@pytest.mark.parametrize("codec", ["float16", "bfloat16"])
def test_float_codecs_keep_negative_zero_subnormals_ties_and_large_values(codec):
    x = SPECIAL[None, None, :]
    if codec == "float16":
        x = x[..., np.abs(x[0, 0]) <= F16_MAX]
        want = x.astype(np.float16).astype(np.float32)
    else:
        want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    got = round_trip(codec, "k", x)
    np.testing.assert_array_equal(bits(got), bits(want))
    assert np.signbit(got[0, 0, 0]) and got[0, 0, 0] == 0  # -0.0 stays negative


@pytest.mark.parametrize(
    ("codec", "value"),
    [("float16", 65520.0), ("float16", -1e5), ("bfloat16", 3.4e38), ("int8", 1e7), ("int4", 7e4), ("int4", -7e4)],
)
def test_values_beyond_the_codecs_range_raise_and_name_bfloat16(codec, value):
    x = np.ones((4, 1, 8), np.float32)
    x[2, 0, 3] = value
    with pytest.raises(ValueError, match="bfloat16|rescale"):
        encode(codec, "k", x)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("part", ["k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_instead_of_being_quantised_away(codec, part, bad):
    x = np.ones((40, 2, 8), np.float32)
    x[33, 1, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite .* row 33, layer 1, channel 5"):
        encode(codec, part, x)


def test_unknown_codec_raises_and_lists_the_codecs():
    for call in (
        lambda: encode("fp8", "k", np.ones((1, 1, 1), np.float32)),
        lambda: decode("fp8", "k", {"": np.ones((1, 1, 1))}, 0, 1),
        lambda: stored_dtype("fp8"),
        lambda: bytes_per_row("fp8", 1, 1),
    ):
        with pytest.raises(ValueError, match="float16, bfloat16, int8, int4"):
            call()
    with pytest.raises(ValueError, match="part must be 'k' or 'v'"):
        encode("int8", "q", np.ones((1, 1, 1), np.float32))


# --- int8 / int4: error bounds -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(QUANTISED), st.sampled_from("kv"), shapes, scales, st.integers(0, 2**32 - 1), st.booleans())
def test_quantised_round_trip_is_within_half_a_step_of_each_groups_range(codec, part, shape, scale, seed, keys):
    """For any shape and scale: |x' - x| <= step / 2 elementwise, where the step is the group's
    absmax / 127 (int8) or (max - min) / 15 (int4), up to float16 rounding of the step (and the
    zero), so no code clips and no scale is inflated."""
    rng = np.random.default_rng(seed)
    x = (k_like if keys else v_like)(rng, *shape, scale)
    err = np.abs(round_trip(codec, part, x) - x)
    for rows, chans in groups(part, shape[0], shape[2]):
        g, e = x[rows, :, chans], err[rows, :, chans]  # [rows, L, channels] of one group per layer
        for layer in range(shape[1]):
            gl, el = g[:, layer], e[:, layer]
            if codec == "int8":
                step = np.abs(gl).max() / 127
            else:
                lo = np.float32(gl.min())
                step = (gl.max() - lo + np.spacing(np.float16(lo)).astype(np.float32)) / 15
            bound = (step * (1 + 2**-10) + 2**-24) / 2 + 2**-20 * np.abs(gl).max()
            assert el.max() <= bound, (codec, part, rows, layer, chans, el.max(), bound)


@settings(max_examples=25, deadline=None)
@given(scales, st.integers(0, 2**32 - 1))
def test_int8_and_int4_meet_their_error_targets_on_k_like_and_v_like_data(scale, seed):
    """int8 <= 1%, int4 <= 8% relative Frobenius error; n and D not multiples of GROUP, odd D."""
    rng = np.random.default_rng(seed)
    n, L, D = 250, 4, 69
    for part, x in (("k", k_like(rng, n, L, D, scale)), ("v", v_like(rng, n, L, D, scale))):
        assert rel_err(round_trip("int8", part, x), x) <= 0.01
        assert rel_err(round_trip("int4", part, x), x) <= 0.08


def test_keys_need_per_channel_scales_values_per_token_scales():
    """Why the parts are scaled along different axes (KIVI): swapped, int4 misses its target."""
    rng = np.random.default_rng(0)
    k, v = k_like(rng, 256, 2, 64, 1.0), v_like(rng, 256, 2, 64, 1.0)
    assert rel_err(round_trip("int4", "k", k), k) <= 0.08 < rel_err(round_trip("int4", "v", k), k)
    assert rel_err(round_trip("int4", "v", v), v) <= 0.08 < rel_err(round_trip("int4", "k", v), v)


@pytest.mark.parametrize("codec", QUANTISED)
@pytest.mark.parametrize("part", ["k", "v"])
def test_zero_rows_and_constant_groups_do_not_divide_by_zero(codec, part):
    x = np.zeros((70, 2, 40), np.float32)
    x[32:64] = 0.3  # one constant key group; also constant value groups
    x[64:, 1] = -7.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero / invalid-value warnings
        arrays = encode(codec, part, x)
        got = decode(codec, part, arrays, 0, 40)
    assert np.array_equal(got[:32], x[:32])  # zeros decode exactly
    np.testing.assert_allclose(got, x, rtol=2**-10, atol=0)  # constants: float16 rounding at most
    assert all(np.isfinite(a.astype(np.float32)).all() for a in arrays.values())


# --- slicing and blockwise encoding --------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CODECS), st.sampled_from("kv"), shapes, st.data())
def test_any_row_range_decodes_to_the_same_rows_as_the_whole(codec, part, shape, data):
    n, L, D = shape
    x = k_like(np.random.default_rng(n * 131 + D), n, L, D, 3.0)
    arrays = encode(codec, part, x)
    full = decode(codec, part, arrays, 0, D)
    a = data.draw(st.integers(0, n - 1), label="a")
    b = data.draw(st.integers(a + 1, n), label="b")
    sliced = {"": arrays[""][a:b]}
    for name in array_names(codec)[1:]:
        s0, s1 = scale_rows(codec, part, a, b)
        sliced[name] = arrays[name][s0:s1]
    np.testing.assert_array_equal(bits(decode(codec, part, sliced, a, D)), bits(full[a:b]))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("part", ["k", "v"])
def test_encoding_block_by_block_equals_encoding_at_once(codec, part):
    """The writer appends blocks that start at multiples of GROUP; the last one may be short."""
    x = k_like(np.random.default_rng(1), 200, 3, 45, 1.0)
    whole = encode(codec, part, x)
    blocks = [encode(codec, part, x[a : a + 64]) for a in range(0, 200, 64)]
    for name in array_names(codec):
        np.testing.assert_array_equal(np.concatenate([blk[name] for blk in blocks]), whole[name])


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("part", ["k", "v"])
def test_an_empty_block_encodes_and_decodes_to_empty_arrays(codec, part):
    arrays = encode(codec, part, np.zeros((0, 3, 5), np.float32))
    assert all(len(a) == 0 for a in arrays.values())
    assert decode(codec, part, arrays, 64, 5).shape == (0, 3, 5)


def test_scale_rows_cover_exactly_the_groups_of_a_row_range():
    assert scale_rows("int8", "k", 0, 1) == (0, 1)
    assert scale_rows("int8", "k", 0, 32) == (0, 1)
    assert scale_rows("int4", "k", 31, 33) == (0, 2)
    assert scale_rows("int4", "k", 32, 96) == (1, 3)
    assert scale_rows("int8", "k", 40, 40) == (1, 1)
    assert scale_rows("int8", "v", 31, 33) == (31, 33)
    with pytest.raises(ValueError, match="stores no scales"):
        scale_rows("bfloat16", "k", 0, 1)


# --- what is on disk -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("part", ["k", "v"])
@pytest.mark.parametrize("D", [64, 45])
def test_arrays_dtypes_and_bytes_per_row_match_what_encode_returns(codec, part, D):
    n, L = 128, 3
    arrays = encode(codec, part, np.ones((n, L, D), np.float32))
    assert tuple(arrays) == array_names(codec)
    assert arrays[""].dtype == stored_dtype(codec)
    assert arrays[""].shape == (n, L, -(-D // 2) if codec == "int4" else D)
    for name in array_names(codec)[1:]:
        assert arrays[name].dtype == np.float16
        assert arrays[name].shape == ((n // GROUP, L, D) if part == "k" else (n, L, -(-D // GROUP)))
    assert sum(a.nbytes for a in arrays.values()) / n == bytes_per_row(codec, L, D, part)
    assert bytes_per_row(codec, L, D) == bytes_per_row(codec, L, D, "k") + bytes_per_row(codec, L, D, "v")
    json.dumps(describe(codec, part))  # goes into zarr attributes


def test_module_docstrings_plain_numpy_dequantisation_matches_decode():
    """A user with zarr and numpy only: the formulas in store/codecs.py's docstring."""
    rng = np.random.default_rng(2)
    a, b, D = 37, 101, 45
    k, v = k_like(rng, 128, 2, D, 1.0), v_like(rng, 128, 2, D, 1.0)

    s8 = encode("int8", "k", k)  # int8 keys: x = scale * p, scale per 32 rows
    q = s8[""][a:b].astype(np.float32)
    s = s8["scale"][a // 32 : (b - 1) // 32 + 1].astype(np.float32)
    np.testing.assert_array_equal(
        q * s[np.arange(a, b) // 32 - a // 32], decode("int8", "k", {"": s8[""][a:b], "scale": s}, a, D)
    )

    s4 = encode("int4", "v", v)  # int4 values: x = zero + scale * q, per token over 32 channels
    p = s4[""][a:b]
    q = np.stack([p & 15, p >> 4], axis=-1).reshape(b - a, 2, -1)[:, :, :D].astype(np.float32)
    s = np.repeat(s4["scale"][a:b], 32, axis=2)[..., :D].astype(np.float32)
    z = np.repeat(s4["zero"][a:b], 32, axis=2)[..., :D].astype(np.float32)
    want = decode("int4", "v", {"": p, "scale": s4["scale"][a:b], "zero": s4["zero"][a:b]}, a, D)
    np.testing.assert_array_equal(z + s * q, want)

    bf = encode("bfloat16", "k", k)[""]  # bfloat16: the high half of a float32
    np.testing.assert_array_equal(
        (bf.astype(np.uint32) << 16).view(np.float32), decode("bfloat16", "k", {"": bf}, 0, D)
    )
