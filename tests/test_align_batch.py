"""Batch alignment (align/batch.py), the math the dump runs on a padded batch: it equals aligning
every sample alone (bit for bit without a projection), never reads padding, and the K/V block
projection is K's and V's own PCA side by side."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.align.batch import align_batch, batch_time_map, compress_batch, kv_block_projection
from kvdistill.align.pipeline import align_kv, build_time_map, map_layers
from kvdistill.align.projection import project_layers
from kvdistill.align.rkv import compress

FAST = settings(max_examples=60, deadline=None)


def _spans(cuts: list[int], n: int) -> np.ndarray:
    """[T, 2] contiguous character spans of a text of n characters cut at `cuts`, plus EOS (n, n)."""
    bounds = [0, *sorted(set(cuts)), n]
    spans = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if a < b]
    return np.array([*spans, (n, n)], dtype=np.int64)


@st.composite
def sample(draw, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(student offsets, teacher offsets, student segments, teacher segments) of one sample that
    `kind`'s time map accepts."""
    if kind == "identity":
        T = draw(st.integers(1, 9))
        off = np.stack([np.arange(T), np.arange(T) + 1], 1).astype(np.int64)
        seg = np.zeros(T, np.uint8)
        return off, off, seg, seg
    if kind == "char_overlap":
        n = draw(st.integers(1, 12))
        cut = st.lists(st.integers(1, max(n - 1, 1)), max_size=6)
        s_off, t_off = _spans(draw(cut), n), _spans(draw(cut), n)
        return s_off, t_off, np.zeros(len(s_off), np.uint8), np.zeros(len(t_off), np.uint8)
    counts = st.lists(st.integers(1, 4), min_size=3, max_size=3)  # segment_linear: every segment on both sides
    s_seg = np.repeat(np.arange(3, dtype=np.uint8), draw(counts))
    t_seg = np.repeat(np.arange(3, dtype=np.uint8), draw(counts))
    return np.zeros((len(s_seg), 2), np.int64), np.zeros((len(t_seg), 2), np.int64), s_seg, t_seg


@st.composite
def batch(draw):
    kind = draw(st.sampled_from(["identity", "char_overlap", "segment_linear"]))
    samples = draw(st.lists(sample(kind), min_size=1, max_size=4))
    return kind, samples


def _padded(lengths: list[int], L: int, D: int, seed: int) -> torch.Tensor:
    """[B, T_pad, L, D] float64 random, padding NaN: anything that reads it shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), max(lengths), L, D), float("nan"), dtype=torch.float64)
    for j, T in enumerate(lengths):
        x[j, :T] = torch.randn(T, L, D, generator=g, dtype=torch.float64)
    return x


def _projection(L_s: int, D_t: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L_s, D_t, generator=g, dtype=torch.float64), torch.randn(
        L_s, D_t, dim, generator=g, dtype=torch.float64
    )


@FAST
@given(b=batch(), L_t=st.integers(1, 4), L_s=st.integers(1, 4), D=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_a_padded_batch_aligned_at_once_equals_each_sample_aligned_alone_bitwise(b, L_t, L_s, D, seed):
    kind, samples = b
    s_off, t_off, s_seg, t_seg = (list(part) for part in zip(*samples, strict=True))
    lengths = [len(t) for t in t_off]
    x = _padded(lengths, L_t, D, seed)  # [B, T_pad, L_t, D]
    W = torch.rand(L_s, L_t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # any mixing weights

    got = align_batch(x, W, batch_time_map(kind, s_off, t_off, s_seg, t_seg))  # [sum T_s, L_s, D]

    alone = [align_kv(x[j, :T], W, build_time_map(kind, *samples[j])) for j, T in enumerate(lengths)]
    assert got.shape == (sum(len(s) for s in s_off), L_s, D)
    assert torch.equal(got, torch.cat(alone))  # also: no NaN, so no padding was read


@FAST
@given(
    b=batch(),
    L_t=st.integers(1, 3),
    L_s=st.integers(1, 3),
    D_t=st.integers(1, 4),
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_with_a_projection_the_batch_still_equals_each_sample_alone(b, L_t, L_s, D_t, dim, seed):
    kind, samples = b
    s_off, t_off, s_seg, t_seg = (list(part) for part in zip(*samples, strict=True))
    lengths = [len(t) for t in t_off]
    x = _padded(lengths, L_t, D_t, seed)
    W = torch.rand(L_s, L_t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    proj = _projection(L_s, D_t, dim, seed + 1)

    got = align_batch(x, W, batch_time_map(kind, s_off, t_off, s_seg, t_seg), proj)

    alone = [align_kv(x[j, :T], W, build_time_map(kind, *samples[j]), proj) for j, T in enumerate(lengths)]
    # The projection is a matmul whose summation order may depend on the batch shape: equal to rounding.
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-12, atol=1e-12)


@FAST
@given(
    L=st.integers(1, 3), D_t=st.integers(1, 5), dim=st.integers(1, 4), N=st.integers(1, 6), seed=st.integers(0, 2**16)
)
def test_the_kv_block_projection_projects_k_and_v_each_with_its_own_pca(L, D_t, dim, N, seed):
    k_mean, k_comp = _projection(L, D_t, dim, seed)
    v_mean, v_comp = _projection(L, D_t, dim, seed + 1)
    mean, comp = kv_block_projection(k_mean, k_comp, v_mean, v_comp)
    assert mean.shape == (L, 2 * D_t) and comp.shape == (L, 2 * D_t, 2 * dim)
    assert (comp[:, :D_t, dim:] == 0).all() and (comp[:, D_t:, :dim] == 0).all()  # K never mixes into V

    g = torch.Generator().manual_seed(seed + 2)
    k, v = (
        torch.randn(N, L, D_t, generator=g, dtype=torch.float64),
        torch.randn(N, L, D_t, generator=g, dtype=torch.float64),
    )
    both = map_layers(torch.cat([k, v], -1), torch.eye(L, dtype=torch.float64), (mean, comp))  # [N, L, 2 dim]
    torch.testing.assert_close(both[..., :dim], project_layers(k, k_mean, k_comp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both[..., dim:], project_layers(v, v_mean, v_comp), rtol=1e-12, atol=1e-12)


@st.composite
def chains(draw):
    """Per sample its teacher length T and which tokens are reasoning (possibly none)."""
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=4))
    return [np.array(draw(st.lists(st.booleans(), min_size=T, max_size=T))) for T in lengths]


@FAST
@given(
    reasoning=chains(),
    slots=st.integers(1, 6),
    H=st.integers(1, 2),
    d=st.integers(1, 3),
    L_t=st.integers(1, 3),
    L_s=st.integers(1, 3),
    project=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compressing_a_padded_batch_equals_compressing_each_sample_alone(
    reasoning, slots, H, d, L_t, L_s, project, seed
):
    lengths = [len(r) for r in reasoning]
    D = H * d
    k, v = _padded(lengths, L_t, D, seed), _padded(lengths, L_t, D, seed + 1)  # [B, T_pad, L_t, D], NaN padding
    g = torch.Generator().manual_seed(seed + 2)
    importance = torch.rand(len(lengths), L_t, H, max(lengths), generator=g)  # [B, L_t, H, T_pad]
    W = torch.rand(L_s, L_t, generator=g, dtype=torch.float64)
    proj = (
        kv_block_projection(*_projection(L_s, D, 2, seed + 3), *_projection(L_s, D, 2, seed + 4)) if project else None
    )

    got = compress_batch(k, v, importance, reasoning, slots, 0.3, W, proj)

    for j, (r, T) in enumerate(zip(reasoning, lengths, strict=True)):
        one = compress(k[j, :T], v[j, :T], importance[j, ..., :T], torch.as_tensor(r), slots, 0.3)
        assert torch.equal(got["mask"][j], one["mask"]) and torch.equal(got["pos"][j], one["pos"])
        assert (got["pos"][j] < T).all()  # padding is never a candidate
        kv = map_layers(torch.cat([one["k"], one["v"]], -1), W, proj)  # [M, L_s, 2D]
        real = one["mask"]
        if proj is None:
            assert torch.equal(got["kv"][j][real], kv[real])
        else:
            torch.testing.assert_close(got["kv"][j][real], kv[real], rtol=1e-12, atol=1e-12)
        assert (got["kv"][j][~real] == 0).all()  # padding slots stay 0, even after a projection
