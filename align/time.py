"""Time maps: which teacher positions (with which weights) feed each student position.

A map is a sparse row-stochastic matrix A [T_s, T_t], stored as COO triplets sorted by row;
the aligned cache is K_s = A @ K_t over the time axis. Three constructions:

- `identity_time_map`: same tokenizer, same text.
- `char_overlap_time_map`: same text, different tokenizers. A[s, t] is the IoU of the two
  tokens' character spans, rows normalised; a student token that overlaps nothing takes its
  nearest teacher token.
- `segment_time_map`: different texts of the same segments (another CoT style, latent
  slots). Each segment of the teacher is linearly resampled onto the student's tokens of that
  segment (`linear_resample_time_map`), block diagonal.

Pure math on small int arrays; no I/O. Maps are built on the CPU; `apply` follows x's device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "TimeMap",
    "identity_time_map",
    "char_overlap_time_map",
    "linear_resample_time_map",
    "segment_time_map",
    "stack_time_maps",
]


@dataclass(frozen=True, eq=False)
class TimeMap:
    """Sparse row-stochastic A [T_s, T_t] as COO triplets; every row has >= 1 entry."""

    rows: torch.Tensor  # [nnz] int64, sorted by row
    cols: torch.Tensor  # [nnz] int64
    weights: torch.Tensor  # [nnz] float64, > 0, each row sums to 1
    shape: tuple[int, int]  # (T_s, T_t)
    kind: str  # "identity" | "char_overlap" | "segment_linear"

    def __post_init__(self) -> None:
        n = self.rows.shape
        if self.rows.ndim != 1 or self.cols.shape != n or self.weights.shape != n:
            raise ValueError(
                "TimeMap needs 1-D rows/cols/weights of one length, got "
                f"{tuple(self.rows.shape)}, {tuple(self.cols.shape)}, {tuple(self.weights.shape)}"
            )
        first = self._first()
        if first.numel() != self.shape[0] or not torch.equal(self.rows[first], torch.arange(self.shape[0])):
            raise ValueError(f"TimeMap rows must be sorted and cover every student step 0..{self.shape[0] - 1}")

    def _first(self) -> torch.Tensor:
        """[T_s] index of each row's first entry (rows are sorted)."""
        is_first = torch.ones(self.rows.shape, dtype=torch.bool)
        is_first[1:] = self.rows[1:] != self.rows[:-1]
        return torch.nonzero(is_first).squeeze(1)

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T_t, ...] -> [T_s, ...], out[s] = sum_t A[s, t] * x[t], in x's dtype.

        Each row's first entry is gathered straight into the output and scaled in place; the
        few other entries (nnz - T_s: interpolation partners, shared spans) are added with one
        index_add. So a row with a single weight 1.0 copies x[t] bit for bit (x * 1.0), and
        the big tensor is touched about twice. On CUDA, rows with several entries may differ in
        the last bit from run to run (atomic adds); single-entry rows never do."""
        T_t = self.shape[1]
        if x.ndim == 0 or x.shape[0] != T_t:
            raise ValueError(
                f"time map ({self.kind}) expects a teacher tensor with {T_t} time steps on dim 0, "
                f"got shape {tuple(x.shape)}; build the map from this sample's teacher tokens"
            )
        first = self._first()  # [T_s]
        rest = torch.ones(self.rows.shape, dtype=torch.bool)
        rest[first] = False
        bcast = [1] * (x.ndim - 1)
        w = self.weights.to(x.dtype)  # [nnz]
        out = x.index_select(0, self.cols[first].to(x.device))  # [T_s, ...]
        out.mul_(w[first].to(x.device).view(-1, *bcast))
        if bool(rest.any()):
            picked = x.index_select(0, self.cols[rest].to(x.device))  # [nnz - T_s, ...]
            picked.mul_(w[rest].to(x.device).view(-1, *bcast))
            out.index_add_(0, self.rows[rest].to(x.device), picked)
        return out

    def dense(self) -> torch.Tensor:
        """A [T_s, T_t] float64, for tests and debugging (quadratic memory)."""
        A = torch.zeros(self.shape, dtype=torch.float64)
        return A.index_put_((self.rows, self.cols), self.weights, accumulate=True)


def _time_map(rows, cols, weights, shape: tuple[int, int], kind: str) -> TimeMap:
    return TimeMap(
        torch.as_tensor(np.asarray(rows, dtype=np.int64)),
        torch.as_tensor(np.asarray(cols, dtype=np.int64)),
        torch.as_tensor(np.asarray(weights, dtype=np.float64)),
        (int(shape[0]), int(shape[1])),
        kind,
    )


def identity_time_map(T: int) -> TimeMap:
    """A = eye(T): same tokenizer, same text."""
    if T < 0:
        raise ValueError(f"time length must be >= 0, got {T}")
    i = np.arange(T, dtype=np.int64)
    return _time_map(i, i, np.ones(T), (T, T), "identity")


# ----------------------------------------------------------------------------- char overlap


def _int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _spans(x, side: str) -> np.ndarray:
    """Validated [T, 2] int64 character spans [start, end), sorted by start."""
    a = _int_array(x, f"{side} spans")
    if a.size == 0:
        a = a.reshape(0, 2)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{side} spans must have shape [T, 2] (start, end), got {a.shape}")
    bad = np.flatnonzero((a[:, 0] > a[:, 1]) | (a[:, 0] < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{side} token {i} has span {a[i].tolist()}: need 0 <= start <= end; pass the tokenizer's offset_mapping"
        )
    bad = np.flatnonzero(np.diff(a[:, 0]) < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{side} spans are not sorted by start: token {i + 1} starts at {a[i + 1, 0]} "
            f"before token {i} at {a[i, 0]}; pass offsets in token order"
        )
    return a


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j) with lo[i] <= j < hi[i], ordered by i then j: [n] row, [n] col."""
    n = np.maximum(hi - lo, 0)  # [R]
    r = np.repeat(np.arange(len(lo), dtype=np.int64), n)  # [n]
    start = np.cumsum(n) - n  # [R] where row i's pairs begin
    c = np.arange(r.size, dtype=np.int64) - start[r] + lo[r]  # [n]
    return r, c


def _nearest(s: np.ndarray, t: np.ndarray, t_end_max: np.ndarray) -> np.ndarray:
    """For student spans s [R, 2] that overlap no teacher token: the teacher index with the
    smallest gap max(0, t.start - s.end, s.start - t.end); ties -> identical span, then the
    later token. [R] int64."""
    T_t = len(t)
    s0, s1 = s[:, 0], s[:, 1]
    t0, t1 = t[:, 0], t[:, 1]
    # Gap 0 ("touching"): start <= s.end and end >= s.start; the running max of the ends
    # bounds the window from below even if ends are not sorted.
    lo = np.searchsorted(t_end_max, s0, side="left")
    hi = np.searchsorted(t0, s1, side="right")
    r, c = _expand(lo, hi)
    touch = t1[c] >= s0[r]
    r, c = r[touch], c[touch]
    identical = (t0[c] == s0[r]) & (t1[c] == s1[r])
    best = np.full(len(s), -1, dtype=np.int64)
    np.maximum.at(best, r, c + identical * T_t)  # identical first, then later
    out = best % T_t if T_t else best

    # Nothing touches: every teacher token ends before s.start or starts after s.end.
    far = np.flatnonzero(best < 0)
    if far.size:
        h = hi[far]  # first teacher token starting after s.end
        # left: the latest token with the largest end among [0, h) (all end before s.start)
        achiever = np.where(t1 == t_end_max, np.arange(T_t), -1)
        last_max = np.maximum.accumulate(achiever)  # [T_t] latest k <= i with t1[k] == t_end_max[i]
        has_l, has_r = h > 0, h < T_t
        hl, hr = np.maximum(h - 1, 0), np.minimum(h, T_t - 1)
        gap_l = np.where(has_l, s0[far] - t_end_max[hl], np.iinfo(np.int64).max)
        gap_r = np.where(has_r, t0[hr] - s1[far], np.iinfo(np.int64).max)
        right = np.searchsorted(t0, t0[hr], side="right") - 1  # latest among equal starts
        out[far] = np.where(gap_r <= gap_l, right, last_max[hl])
    return out


def char_overlap_time_map(student_spans, teacher_spans) -> TimeMap:
    """Same text, two tokenizers: A[s, t] = |s ∩ t| / |s ∪ t| over characters, rows normalised.

    Spans: [T, 2] int (array, tensor or list) of [start, end) character offsets of each token
    in the same text (`return_offsets_mapping=True`), sorted by start. A student token that
    overlaps no teacher token (a zero-length span such as an appended EOS at (len, len), or
    whitespace one tokenizer drops) gets weight 1 on its nearest teacher token by gap
    max(0, t.start - s.end, s.start - t.end); ties prefer an identical span, then the later
    token. If the teacher repeats that span on consecutive tokens (a character split over
    byte tokens), the weight is shared equally by the copies, as IoU shares it. Identical
    spans on both sides give exactly `identity_time_map` (kind "identity").

    The sweep is vectorised: two monotone pointers per student token (first teacher token that
    can still overlap, first that starts too late) found with searchsorted, then only the
    pairs between them are expanded, so the cost is O((T_s + T_t) log T_t + nnz), never
    T_s * T_t. Columns are monotone in the rows (min and max column non-decreasing) when
    zero-length tokens sit only at the ends (BOS, EOS); a zero-length token mid-text (next to
    a gap the other side skips, or inside another token) can step back a column."""
    s = _spans(student_spans, "student")  # [T_s, 2]
    t = _spans(teacher_spans, "teacher")  # [T_t, 2]
    T_s, T_t = len(s), len(t)
    if s.shape == t.shape and np.array_equal(s, t):
        return identity_time_map(T_s)  # duplicated spans (split characters) must not be shared
    if T_t == 0 and T_s > 0:
        raise ValueError(f"teacher has no tokens but the student has {T_s}; nothing to align to")
    s0, s1 = s[:, 0], s[:, 1]
    t0, t1 = t[:, 0], t[:, 1]
    t_end_max = np.maximum.accumulate(t1) if T_t else t1  # [T_t] non-decreasing
    # Positive overlap needs t.start < s.end and t.end > s.start.
    lo = np.searchsorted(t_end_max, s0, side="right")  # [T_s] first teacher that may reach s
    hi = np.searchsorted(t0, s1, side="left")  # [T_s] first teacher starting at or after s.end
    r, c = _expand(lo, hi)  # [n] candidate pairs, sorted by row
    inter = np.minimum(s1[r], t1[c]) - np.maximum(s0[r], t0[c])  # [n]
    keep = inter > 0
    r, c, inter = r[keep], c[keep], inter[keep]
    w = inter / ((s1 - s0)[r] + (t1 - t0)[c] - inter)  # IoU, float64

    orphan = np.ones(T_s, dtype=bool)
    orphan[r] = False
    lone = np.flatnonzero(orphan)
    if lone.size:
        # Weight 1 on the nearest span, shared by its consecutive copies (one character split
        # over byte tokens), as IoU shares it: any single copy would make the columns step back.
        new_run = np.r_[True, np.any(t[1:] != t[:-1], axis=1)]  # [T_t]
        run_first = np.flatnonzero(new_run)
        run_end = np.r_[run_first[1:], T_t]
        run = np.cumsum(new_run)[_nearest(s[lone], t, t_end_max)] - 1  # [R]
        rr, cc = _expand(run_first[run], run_end[run])
        r = np.concatenate([r, lone[rr]])
        c = np.concatenate([c, cc])
        w = np.concatenate([w, np.ones(rr.size)])
        order = np.argsort(r, kind="stable")
        r, c, w = r[order], c[order], w[order]
    w = w / np.bincount(r, weights=w, minlength=T_s)[r]
    return _time_map(r, c, w, (T_s, T_t), "char_overlap")


# ----------------------------------------------------------------------------- resampling


def _resample(T_t: int, T_s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO of the linear resampling (rows, cols, weights), rows sorted."""
    i = np.arange(T_s, dtype=np.int64)
    # p = num / den exactly in integers, so endpoints and the identity carry no rounding.
    if T_s == 1:
        num, den = np.array([T_t - 1], dtype=np.int64), 2  # the midpoint
    else:
        num, den = i * (T_t - 1), T_s - 1
    lo, rem = num // den, num % den  # [T_s]
    two = rem > 0  # rows that interpolate between lo and lo + 1
    rows = np.repeat(i, 1 + two)
    first = np.cumsum(1 + two) - (1 + two)  # [T_s] index of each row's first entry
    cols = np.repeat(lo, 1 + two)
    cols[first[two] + 1] += 1
    w = np.repeat((den - rem) / den, 1 + two)
    w[first[two] + 1] = rem[two] / den
    return rows, cols, w


def linear_resample_time_map(T_t: int, T_s: int) -> TimeMap:
    """Resample T_t teacher steps onto T_s student steps (up or down): student i reads teacher
    position p = i * (T_t - 1) / (T_s - 1), linearly interpolated between floor(p) and
    floor(p) + 1. Endpoints map to endpoints; T_s == T_t is the identity (single 1.0 weights);
    T_t == 1 gives every row weight 1 on 0. A one-step student (T_s == 1) reads the midpoint
    p = (T_t - 1) / 2, the point that treats both ends alike. kind "segment_linear" (one
    segment)."""
    if T_t < 1 or T_s < 1:
        raise ValueError(
            f"cannot resample a segment with {T_t} teacher and {T_s} student tokens: a segment "
            "with no tokens on one side has nothing to interpolate; check that both sides "
            "render every segment"
        )
    rows, cols, w = _resample(T_t, T_s)
    return _time_map(rows, cols, w, (T_s, T_t), "segment_linear")


def _runs(seg: np.ndarray, side: str) -> dict[int, tuple[int, int]]:
    """segment id -> [start, end) token range; ids must be non-decreasing (contiguous runs)."""
    if seg.ndim != 1:
        raise ValueError(f"{side} segment ids must have shape [T], got {seg.shape}")
    back = np.flatnonzero(np.diff(seg) < 0)
    if back.size:
        i = int(back[0]) + 1
        raise ValueError(
            f"{side} segment ids must be non-decreasing (each segment one contiguous run, in "
            f"order): token {i} has segment {seg[i]} after segment {seg[i - 1]}"
        )
    ids, starts, counts = np.unique(seg, return_index=True, return_counts=True)
    return {int(k): (int(a), int(a + n)) for k, a, n in zip(ids, starts, counts, strict=True)}


def segment_time_map(student_segments, teacher_segments) -> TimeMap:
    """Block-diagonal resampling: for each segment id (e.g. 0 prompt / 1 reasoning / 2 answer,
    `dump.prompts.SEGMENTS`), the teacher's tokens of that segment are linearly resampled
    onto the student's tokens of that segment; no weight crosses a segment boundary.

    Segment ids: [T] int per token, non-decreasing. Both sides must hold the same segment ids."""
    s_runs = _runs(_int_array(student_segments, "student segment ids"), "student")
    t_runs = _runs(_int_array(teacher_segments, "teacher segment ids"), "teacher")
    for k in sorted(s_runs.keys() ^ t_runs.keys()):
        n_s = s_runs.get(k, (0, 0))[1] - s_runs.get(k, (0, 0))[0]
        n_t = t_runs.get(k, (0, 0))[1] - t_runs.get(k, (0, 0))[0]
        raise ValueError(
            f"segment {k} has {n_s} student tokens and {n_t} teacher tokens: a segment missing "
            "on one side cannot be resampled; render both sides with every segment"
        )
    T_s = max((b for _, b in s_runs.values()), default=0)
    T_t = max((b for _, b in t_runs.values()), default=0)
    rows, cols, ws = [], [], []
    for k, (a_s, b_s) in s_runs.items():  # a handful of segments, in order
        a_t, b_t = t_runs[k]
        r, c, w = _resample(b_t - a_t, b_s - a_s)
        rows.append(r + a_s)
        cols.append(c + a_t)
        ws.append(w)
    if not rows:
        return _time_map([], [], [], (0, 0), "segment_linear")
    return _time_map(np.concatenate(rows), np.concatenate(cols), np.concatenate(ws), (T_s, T_t), "segment_linear")


def stack_time_maps(maps: list[TimeMap | None], teacher_lengths: list[int], T_pad: int) -> TimeMap:
    """One block-diagonal map for a padded batch, so a whole batch is aligned in one `apply`:
    input x.reshape(B * T_pad, ...) (sample j's teacher step t at row j * T_pad + t), output
    [sum_j T_s_j, ...] with the samples' student steps concatenated in batch order. `None`
    stands for the identity over that sample's `teacher_lengths[j]` steps (padding dropped)."""
    rows, cols, weights, kinds = [], [], [], set()
    offset = 0
    for j, (m, T_t) in enumerate(zip(maps, teacher_lengths, strict=True)):
        if T_t > T_pad:
            raise ValueError(f"sample {j} has {T_t} teacher steps > padded length {T_pad}")
        if m is None:
            r = torch.arange(T_t, dtype=torch.int64)
            rows.append(r + offset)
            cols.append(r + j * T_pad)
            weights.append(torch.ones(T_t, dtype=torch.float64))
            offset += T_t
            kinds.add("identity")
            continue
        if m.shape[1] != T_t:
            raise ValueError(f"sample {j}: map expects {m.shape[1]} teacher steps, the sample has {T_t}")
        rows.append(m.rows + offset)
        cols.append(m.cols + j * T_pad)
        weights.append(m.weights)
        offset += m.shape[0]
        kinds.add(m.kind)
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return TimeMap(torch.cat(rows), torch.cat(cols), torch.cat(weights), (offset, len(maps) * T_pad), kind)
