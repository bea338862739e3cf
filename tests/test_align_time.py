"""Time maps (align/time.py): the identity is exact, the char-overlap map matches a brute-force
IoU reference on random tokenisations, linear resampling reproduces linear signals, the
segment map is block diagonal, and all of it holds on real BPE tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill import tiny
from kvdistill.align.time import (
    TimeMap,
    char_overlap_time_map,
    identity_time_map,
    linear_resample_time_map,
    segment_time_map,
    stack_time_maps,
)
from kvdistill.core.data import load_examples
from kvdistill.core.prompts import SEGMENTS, encode, render
from kvdistill.schemas import DEFAULT_TEMPLATE, DataSpec, SyntheticSpec

FAST = settings(max_examples=150, deadline=None)


# ----------------------------------------------------------------------------- helpers


@st.composite
def tokenisation(draw, n: int, zero_mid: bool) -> list[tuple[int, int]]:
    """Spans of one tokenisation of a text of n characters: contiguous cuts, some tokens
    dropped (whitespace the tokenizer attaches elsewhere), some duplicated (a character split
    over two byte tokens), zero-length tokens at the ends (BOS / EOS) and, if zero_mid,
    anywhere. Sorted by (start, end), as a tokenizer emits them."""
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    spans: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        action = draw(st.sampled_from(["keep"] * 6 + ["drop", "dup"]))
        if action != "drop":
            spans += [(a, b)] * (2 if action == "dup" else 1)
    if draw(st.booleans()):
        spans.append((0, 0))
    if draw(st.booleans()):
        spans.append((n, n))
    if zero_mid:
        spans += [(x, x) for x in draw(st.lists(st.integers(0, n), max_size=3))]
    if not spans:
        spans = [(0, n)]
    return sorted(spans)


@st.composite
def two_tokenisations(draw, zero_mid: bool):
    n = draw(st.integers(1, 40))
    return draw(tokenisation(n, zero_mid)), draw(tokenisation(n, zero_mid))


def reference_char_overlap(s: list[tuple[int, int]], t: list[tuple[int, int]]) -> np.ndarray:
    """The O(T_s * T_t) definition, written out."""
    if s == t:
        return np.eye(len(s))
    A = np.zeros((len(s), len(t)))
    for i, (a, b) in enumerate(s):
        for j, (c, d) in enumerate(t):
            inter = min(b, d) - max(a, c)
            if inter > 0:
                A[i, j] = inter / ((b - a) + (d - c) - inter)
        if A[i].sum() == 0:
            gaps = [max(0, c - b, a - d) for c, d in t]
            near = [j for j, g in enumerate(gaps) if g == min(gaps)]
            same = [j for j in near if t[j] == (a, b)]
            copies = [k for k, span in enumerate(t) if span == t[max(same or near)]]
            A[i, copies] = 1.0  # (the generator only repeats a span on consecutive tokens)
        A[i] /= A[i].sum()
    return A


def check_stochastic(m: TimeMap) -> None:
    T_s, T_t = m.shape
    assert m.rows.dtype == m.cols.dtype == torch.int64 and m.weights.dtype == torch.float64
    assert torch.all(m.rows[1:] >= m.rows[:-1]), "rows must be sorted"
    assert torch.all(m.weights > 0)
    assert m.nnz == 0 or (int(m.cols.min()) >= 0 and int(m.cols.max()) < T_t)
    sums = torch.zeros(T_s, dtype=torch.float64).index_add_(0, m.rows, m.weights)
    torch.testing.assert_close(sums, torch.ones(T_s, dtype=torch.float64), rtol=0, atol=1e-12)


def col_range(m: TimeMap) -> tuple[torch.Tensor, torch.Tensor]:
    T_s = m.shape[0]
    lo = torch.full((T_s,), m.shape[1], dtype=torch.int64).scatter_reduce(0, m.rows, m.cols, "amin")
    hi = torch.full((T_s,), -1, dtype=torch.int64).scatter_reduce(0, m.rows, m.cols, "amax")
    return lo, hi


# ----------------------------------------------------------------------------- identity


@given(st.integers(1, 30), st.sampled_from([torch.float16, torch.float32, torch.bfloat16]))
@FAST
def test_identity_map_copies_teacher_bitwise(T, dtype):
    x = torch.randn(T, 3, 5).to(dtype)
    x[0, 0, 0] = -0.0  # the sign of a zero survives too
    out = identity_time_map(T).apply(x)
    assert out.dtype == dtype
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


@given(two_tokenisations(zero_mid=True))
@FAST
def test_same_spans_on_both_sides_is_exactly_the_identity(pair):
    spans, _ = pair  # includes duplicated spans, which IoU alone would share 50/50
    m = char_overlap_time_map(spans, spans)
    assert torch.equal(m.dense(), torch.eye(len(spans), dtype=torch.float64))
    x = torch.randn(len(spans), 4, dtype=torch.float16)
    assert torch.equal(m.apply(x).view(torch.int16), x.view(torch.int16))


# ----------------------------------------------------------------------------- char overlap


@given(two_tokenisations(zero_mid=True))
@FAST
def test_char_overlap_matches_brute_force_iou_with_nearest_fallback(pair):
    s, t = pair
    m = char_overlap_time_map(np.array(s), torch.tensor(t))
    assert m.shape == (len(s), len(t)) and m.kind in ("char_overlap", "identity")
    check_stochastic(m)
    np.testing.assert_allclose(m.dense().numpy(), reference_char_overlap(s, t), rtol=0, atol=1e-12)


@given(two_tokenisations(zero_mid=False))
@FAST
def test_char_overlap_rows_are_stochastic_and_monotone(pair):
    s, t = pair
    m = char_overlap_time_map(s, t)
    check_stochastic(m)
    lo, hi = col_range(m)
    assert torch.all(hi >= 0), "a zero row"
    assert torch.all(lo[1:] >= lo[:-1]) and torch.all(hi[1:] >= hi[:-1])


def test_zero_length_and_skipped_tokens_take_the_nearest_teacher_token():
    #        text: "ab cd" (5 chars); student keeps the space and has an EOS, teacher drops it
    student = [(0, 2), (2, 3), (3, 5), (5, 5)]
    teacher = [(0, 1), (1, 2), (3, 5)]
    A = char_overlap_time_map(student, teacher).dense()
    expected = torch.tensor(
        [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )  # the space touches both neighbours: the later wins; EOS touches the last token
    assert torch.equal(A, expected)
    # an EOS on both sides maps onto the teacher's EOS, not onto the last text token
    A = char_overlap_time_map(student, [*teacher, (5, 5)]).dense()
    assert A[3].tolist() == [0.0, 0.0, 0.0, 1.0]
    # a token far from everything: smallest gap, ties to the later token
    A = char_overlap_time_map([(5, 6)], [(0, 3), (8, 9)]).dense()
    assert A.tolist() == [[0.0, 1.0]]  # gaps 2 and 2
    A = char_overlap_time_map([(5, 6)], [(0, 4), (9, 10)]).dense()
    assert A.tolist() == [[1.0, 0.0]]  # gaps 1 and 3
    # a character the teacher splits over two byte tokens: a BOS before it, an EOS after it
    # and a zero-length token inside it share their weight over both copies, as IoU does
    A = char_overlap_time_map([(0, 0), (0, 2), (2, 2)], [(0, 2), (0, 2)]).dense()
    assert A.tolist() == [[0.5, 0.5]] * 3
    A = char_overlap_time_map([(0, 1), (1, 1), (1, 2)], [(0, 2), (0, 2)]).dense()
    assert A.tolist() == [[0.5, 0.5]] * 3


@pytest.mark.parametrize(
    ("spans", "match"),
    [
        ([(0, 2), (3, 4), (1, 1)], "not sorted by start"),
        ([(0, 2), (3, 2)], "start <= end"),
        ([(-1, 2)], "start <= end"),
        ([[0, 1, 2]], r"shape \[T, 2\]"),
        (np.array([[0.0, 1.0]]), "integers"),
    ],
)
def test_char_overlap_rejects_malformed_spans(spans, match):
    with pytest.raises(ValueError, match=match):
        char_overlap_time_map(spans, [(0, 4)])
    with pytest.raises(ValueError, match=match):
        char_overlap_time_map([(0, 4)], spans)


def test_char_overlap_needs_teacher_tokens():
    with pytest.raises(ValueError, match="teacher has no tokens"):
        char_overlap_time_map([(0, 1)], np.zeros((0, 2), dtype=np.int64))


# ----------------------------------------------------------------------------- resampling


@given(st.integers(1, 40), st.integers(1, 40), st.floats(-5, 5), st.floats(-5, 5))
@FAST
def test_resampling_reproduces_signals_linear_in_time(T_t, T_s, a, b):
    m = linear_resample_time_map(T_t, T_s)
    assert m.shape == (T_s, T_t) and m.kind == "segment_linear"
    check_stochastic(m)
    slope = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)  # [L, D]
    t = torch.arange(T_t, dtype=torch.float64)
    x = a + b * t[:, None, None] * slope  # [T_t, L, D], linear in time
    i = torch.arange(T_s, dtype=torch.float64)
    p = i * (T_t - 1) / (T_s - 1) if T_s > 1 else torch.tensor([(T_t - 1) / 2], dtype=torch.float64)
    expected = a + b * p[:, None, None] * slope
    torch.testing.assert_close(m.apply(x), expected, rtol=0, atol=1e-9)
    # linear interpolation between floor(p) and floor(p) + 1, never a farther neighbour
    lo, hi = col_range(m)
    assert torch.equal(lo, torch.floor(p + 1e-9).long()) and torch.all(hi - lo <= 1)


@given(st.integers(2, 40), st.integers(2, 40))
@FAST
def test_resampling_preserves_endpoints(T_t, T_s):
    A = linear_resample_time_map(T_t, T_s).dense()
    assert A[0, 0] == 1.0 and A[-1, -1] == 1.0


@given(st.integers(1, 40))
@FAST
def test_resampling_to_the_same_length_is_the_identity_bitwise(T):
    m = linear_resample_time_map(T, T)
    assert m.nnz == T and torch.equal(m.dense(), torch.eye(T, dtype=torch.float64))
    x = torch.randn(T, 2, 3, dtype=torch.float16)
    assert torch.equal(m.apply(x).view(torch.int16), x.view(torch.int16))


def test_resampling_corner_cases():
    # one student step reads the teacher's midpoint; one teacher step feeds every student step
    assert linear_resample_time_map(4, 1).dense().tolist() == [[0.0, 0.5, 0.5, 0.0]]
    assert linear_resample_time_map(5, 1).dense().tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    assert linear_resample_time_map(1, 3).dense().tolist() == [[1.0], [1.0], [1.0]]
    for T_t, T_s in [(0, 3), (3, 0)]:
        with pytest.raises(ValueError, match="no tokens on one side"):
            linear_resample_time_map(T_t, T_s)


# ----------------------------------------------------------------------------- segments


def _segments(lengths: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(lengths)), lengths)


@given(st.lists(st.tuples(st.integers(1, 15), st.integers(1, 15)), min_size=1, max_size=4))
@FAST
def test_segment_map_is_block_diagonal_linear_resampling(lengths):
    n_s, n_t = [a for a, _ in lengths], [b for _, b in lengths]
    seg_s, seg_t = _segments(n_s), _segments(n_t)
    m = segment_time_map(seg_s, torch.as_tensor(seg_t, dtype=torch.uint8))
    assert m.shape == (sum(n_s), sum(n_t)) and m.kind == "segment_linear"
    check_stochastic(m)
    assert np.array_equal(seg_s[m.rows.numpy()], seg_t[m.cols.numpy()]), "weight crosses a segment"
    A = m.dense()
    for k, (a, b) in enumerate(lengths):
        rs, cs = seg_s == k, seg_t == k
        assert torch.equal(A[rs][:, cs], linear_resample_time_map(b, a).dense())


@given(st.lists(st.integers(1, 15), min_size=1, max_size=4))
@FAST
def test_segment_map_with_identical_runs_is_the_identity(lengths):
    seg = _segments(lengths)
    assert torch.equal(segment_time_map(seg, seg).dense(), torch.eye(len(seg), dtype=torch.float64))


def test_segment_map_errors_name_the_segment():
    with pytest.raises(ValueError, match="segment 1 has 2 student tokens and 0 teacher tokens"):
        segment_time_map([0, 0, 1, 1, 2], [0, 2, 2])
    with pytest.raises(ValueError, match="segment 2 has 0 student tokens and 1 teacher tokens"):
        segment_time_map([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="non-decreasing.*token 2 has segment 0 after segment 1"):
        segment_time_map([0, 1, 0], [0, 1, 1])
    with pytest.raises(ValueError, match="teacher segment ids must be non-decreasing"):
        segment_time_map([0, 1, 2], [0, 2, 1])


# ----------------------------------------------------------------------------- apply


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("tail", [(), (6,), (3, 4)])
def test_apply_equals_dense_matmul_for_any_trailing_dims(dtype, tail):
    m = char_overlap_time_map([(0, 3), (3, 4), (4, 9), (9, 9)], [(0, 1), (1, 5), (5, 7), (7, 9)])
    x = torch.randn(4, *tail, dtype=torch.float64)
    out = m.apply(x.to(dtype))
    assert out.shape == (4, *tail) and out.dtype == dtype
    expected = (m.dense() @ x.reshape(4, -1)).reshape(4, *tail)
    tol = {torch.float16: 5e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_apply_rejects_a_teacher_of_the_wrong_length():
    m = linear_resample_time_map(5, 3)
    with pytest.raises(ValueError, match="expects a teacher tensor with 5 time steps.*got shape \\(4, 2\\)"):
        m.apply(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="5 time steps"):
        m.apply(torch.tensor(1.0))


def test_time_map_rejects_zero_rows_and_unsorted_rows():
    i = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="cover every student step 0..2"):
        TimeMap(i, i, torch.ones(2, dtype=torch.float64), (3, 3), "identity")
    with pytest.raises(ValueError, match="sorted"):
        TimeMap(torch.tensor([1, 0]), i, torch.ones(2, dtype=torch.float64), (2, 3), "identity")


# ----------------------------------------------------------------------------- real tokenizers


@pytest.fixture(scope="module")
def two_tokenizers():
    rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=200, n_test=4, seed=3)))
    texts = [render(DEFAULT_TEMPLATE, ex).text for ex in rows]
    return tiny.train_tokenizer(texts, vocab_size=300), tiny.train_tokenizer(texts, vocab_size=450)


def _offsets(tok, text: str) -> np.ndarray:
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return np.array(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def test_char_overlap_between_two_real_bpe_tokenizers(two_tokenizers):
    small, large = two_tokenizers
    ex = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=4, n_test=4, seed=11)))[0]
    text = render(DEFAULT_TEMPLATE, ex).text
    off_s, off_t = _offsets(small, text), _offsets(large, text)
    assert len(off_s) != len(off_t)  # different vocabularies, different cuts
    m = char_overlap_time_map(off_s, off_t)
    assert m.shape == (len(off_s), len(off_t))
    check_stochastic(m)
    lo, hi = col_range(m)
    assert torch.all(lo[1:] >= lo[:-1]) and torch.all(hi[1:] >= hi[:-1])
    assert torch.equal(char_overlap_time_map(off_s, off_s).dense(), torch.eye(len(off_s), dtype=torch.float64))

    # encode() appends EOS as (len, len): EOS maps onto EOS, and segments follow the text
    enc_s, enc_t = encode(small, DEFAULT_TEMPLATE, ex), encode(large, DEFAULT_TEMPLATE, ex)
    m = char_overlap_time_map(enc_s.offsets, enc_t.offsets)
    assert m.dense()[-1, -1] == 1.0
    crossing = enc_s.segment_ids[m.rows.numpy()] != enc_t.segment_ids[m.cols.numpy()]
    assert crossing.sum() <= 2 * (len(SEGMENTS) - 1)  # only tokens straddling a segment boundary


def test_segment_map_between_two_reasoning_styles(two_tokenizers):
    tok, _ = two_tokenizers
    terse, verbose = (
        load_examples(DataSpec(synthetic=SyntheticSpec(n_train=4, seed=11, style=style)))[0]
        for style in ("equations", "sentences")
    )
    assert terse.question == verbose.question and terse.reasoning != verbose.reasoning
    enc_s, enc_t = encode(tok, DEFAULT_TEMPLATE, terse), encode(tok, DEFAULT_TEMPLATE, verbose)
    m = segment_time_map(enc_s.segment_ids, enc_t.segment_ids)
    assert m.shape == (len(enc_s), len(enc_t))
    check_stochastic(m)
    # same question on both sides: the prompt block is the identity
    n_prompt = int((enc_s.segment_ids == 0).sum())
    assert n_prompt == int((enc_t.segment_ids == 0).sum())
    A = m.dense()
    assert torch.equal(A[:n_prompt, :n_prompt], torch.eye(n_prompt, dtype=torch.float64))


@settings(deadline=None, max_examples=30)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9), st.booleans()), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_stacked_batch_map_equals_each_sample_aligned_alone(lengths, seed):
    """The dump aligns a padded batch in one apply; it must equal aligning each sample alone."""
    T_pad = max(max(t for _, t, _ in lengths), 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), T_pad, 3, generator=g)  # [B, T_pad, D]
    maps, t_lengths, expected = [], [], []
    for j, (T_s, T_t, identity) in enumerate(lengths):
        m = None if identity else linear_resample_time_map(T_t, T_s)
        maps.append(m)
        t_lengths.append(T_t)
        expected.append(x[j, :T_t] if m is None else m.apply(x[j, :T_t]))
    stacked = stack_time_maps(maps, t_lengths, T_pad)
    out = stacked.apply(x.reshape(-1, 3))
    assert torch.equal(out, torch.cat(expected))
