"""Linear CKA between student and teacher layers, and the top-k layer map built from it.

CKA (Kornblith et al. 2019) compares two representations of the same N tokens:
HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)). The classic (biased) estimator drifts towards 1
when the width D is comparable to N, even for independent features; the debiased one uses
the unbiased HSIC of Song et al. 2012 and stays near 0 there, which is why calibration uses it.

Everything is computed in feature space ([D1, D2] cross-covariances, never the N x N Gram
matrices), in float64. Inputs are centred first: the unbiased HSIC is exactly invariant to a
translation of X or Y, and centring removes the cancellation a large mean would cause.

A layer map built here is the same dense W [L_s, L_t] as `align.layers` (rows are mixing
weights over teacher layers), saved as JSON by `layer_map_to_json`."""

from __future__ import annotations

import math

import torch

__all__ = [
    "linear_hsic_unbiased",
    "linear_cka",
    "cka_matrix",
    "masked_tokens",
    "topk_layer_map",
    "layer_map_to_json",
    "layer_map_from_json",
    "CKA_METHOD",
]

CKA_METHOD = "debiased_linear_cka"
_ROW_SUM_TOL = 1e-9
_GRID = 2.0**-40


# ----------------------------------------------------------------------------- HSIC / CKA


class _Feats:
    """One centred float64 representation and the per-row terms every HSIC with it needs."""

    def __init__(self, x: torch.Tensor, name: str):
        if x.dim() != 2:
            raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
        x = x.detach().to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        self.raw_norm = float(torch.linalg.vector_norm(x))
        self.x = x - x.mean(dim=0)  # [N, D]
        self.name = name
        self.n = x.shape[0]
        self.sq = (self.x * self.x).sum(dim=1)  # [N] = diag(K)
        self.colsum = self.x.sum(dim=0)  # [D] = X^T 1 (~0 after centring, kept for exactness)
        self.k1 = self.x @ self.colsum - self.sq  # [N] = K~ 1
        self.sum_k = float(self.colsum @ self.colsum - self.sq.sum())  # 1^T K~ 1

    def check_variance(self) -> None:
        # Relative test: centring a constant column in float64 leaves rounding-level residue.
        if float(torch.linalg.vector_norm(self.x)) <= 1e-12 * self.raw_norm:
            raise ValueError(
                f"{self.name} has zero variance over its {self.n} tokens (every row is the same); "
                "CKA is undefined: check the mask and that the layer's activations are not constant"
            )


def _hsic_u(a: _Feats, b: _Feats) -> float:
    n = a.n
    cross = a.x.T @ b.x  # [D1, D2] = X^T Y
    tr_kl = float((cross * cross).sum() - (a.sq * b.sq).sum())  # tr(K~ L~)
    kl_1 = float(a.k1 @ b.k1)  # 1^T K~ L~ 1 (K~ symmetric)
    return (tr_kl + a.sum_k * b.sum_k / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl_1) / (n * (n - 3))


def _check_pair(a: _Feats, b: _Feats, min_n: int) -> None:
    if a.n != b.n:
        raise ValueError(f"{a.name} has {a.n} rows but {b.name} has {b.n}; both must hold the same tokens")
    if a.n < min_n:
        raise ValueError(f"the unbiased HSIC needs n >= {min_n} tokens, got {a.n}")


def linear_hsic_unbiased(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) with linear kernels K = X X^T, L = Y Y^T.

    X: [N, D1], Y: [N, D2] -> 0-d float64 tensor. Memory O(N (D1 + D2) + D1 D2). Needs N >= 4.
    Can be slightly negative (it is unbiased, not non-negative)."""
    a, b = _Feats(X, "X"), _Feats(Y, "Y")
    _check_pair(a, b, 4)
    return torch.tensor(_hsic_u(a, b), dtype=torch.float64)


def _self_term(a: _Feats, debiased: bool) -> float:
    a.check_variance()
    if not debiased:
        return float(torch.linalg.matrix_norm(a.x.T @ a.x))  # ||Xc^T Xc||_F
    h = _hsic_u(a, a)
    if h <= 0:
        raise ValueError(
            f"{a.name}: unbiased HSIC(X, X) = {h:.3g} <= 0 on {a.n} tokens, so debiased CKA is "
            "undefined; use more calibration tokens"
        )
    return math.sqrt(h)


def _cka(a: _Feats, b: _Feats, na: float, nb: float, debiased: bool) -> float:
    if debiased:
        return _hsic_u(a, b) / (na * nb)
    cross = a.x.T @ b.x
    return float((cross * cross).sum()) / (na * nb)


def linear_cka(X: torch.Tensor, Y: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA of X [N, D1] and Y [N, D2] (rows are the same N tokens).

    debiased=True: unbiased HSIC (needs N >= 4); False: the classic centred
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). Invariant to orthogonal transforms and
    isotropic scaling of either side. Zero-variance input raises ValueError."""
    a, b = _Feats(X, "X"), _Feats(Y, "Y")
    _check_pair(a, b, 4 if debiased else 2)
    return _cka(a, b, _self_term(a, debiased), _self_term(b, debiased), debiased)


def cka_matrix(student: list[torch.Tensor], teacher: list[torch.Tensor], debiased: bool = True) -> torch.Tensor:
    """sim [L_s, L_t] float64 with sim[s, t] = CKA(student[s], teacher[t]).

    student[s]: [N, D_s], teacher[t]: [N, D_t], all over the same N tokens (see
    `masked_tokens`). Each layer's self term is computed once."""
    if not student or not teacher:
        raise ValueError(
            f"need at least one layer on each side, got {len(student)} student and {len(teacher)} teacher"
        )
    fs = [_Feats(x, f"student layer {i}") for i, x in enumerate(student)]
    ft = [_Feats(x, f"teacher layer {i}") for i, x in enumerate(teacher)]
    for f in fs[1:] + ft:
        _check_pair(fs[0], f, 4 if debiased else 2)
    ns = [_self_term(f, debiased) for f in fs]
    nt = [_self_term(f, debiased) for f in ft]
    sim = torch.empty(len(fs), len(ft), dtype=torch.float64)
    for i, a in enumerate(fs):
        for j, b in enumerate(ft):
            sim[i, j] = _cka(a, b, ns[i], nt[j], debiased)
    return sim


def masked_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...], mask [B, T] bool (True = real token) -> [N, ...], batch-major order."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = real token), got {mask.dtype}")
    if mask.dim() != 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] matching x {tuple(x.shape)}")
    return x[mask]


# ----------------------------------------------------------------------------- layer maps


def topk_layer_map(sim: torch.Tensor, k: int) -> torch.Tensor:
    """W [L_s, L_t] float64: per student layer, the k most similar teacher layers weighted by
    clamp(sim, min=0) normalised to sum 1 over the kept ones (rounded to multiples of 2^-40,
    so each row sums to exactly 1.0 however it is summed).

    If every kept similarity is <= 0 the row puts weight 1 on its argmax teacher layer (a row
    must mix something, and the least dissimilar layer is the honest choice)."""
    if sim.dim() != 2:
        raise ValueError(f"sim must be [L_s, L_t], got shape {tuple(sim.shape)}")
    L_s, L_t = sim.shape
    if not 1 <= k <= L_t:
        raise ValueError(f"k must be in [1, {L_t}] (the teacher's layer count), got {k}")
    sim = sim.detach().to(torch.float64)
    if not torch.isfinite(sim).all():
        raise ValueError("similarity matrix contains NaN or inf")
    W = torch.zeros(L_s, L_t, dtype=torch.float64)
    for s in range(L_s):
        vals, idx = torch.topk(sim[s], k)
        w = vals.clamp(min=0)
        if float(w.sum()) <= 0:
            W[s, idx[0]] = 1.0
            continue
        # Weights on a 2^-40 grid: every partial sum is then exact in float64, so the row sums
        # to exactly 1.0 in any order (torch, numpy, Python, after a JSON round trip).
        w = torch.round(w / w.sum() / _GRID) * _GRID
        top = int(torch.argmax(w))
        w[top] += 1.0 - float(w.sum())  # the residue is itself a multiple of the grid
        W[s, idx] = w
    return W


def layer_map_to_json(
    W: torch.Tensor,
    sim: torch.Tensor,
    teacher_layers: int,
    student_layers: int,
    meta: dict,
    *,
    k: int | None = None,
) -> dict:
    """A JSON-ready record of a CKA layer map. k defaults to the most non-zeros in a row."""
    shape = (student_layers, teacher_layers)
    for name, t in (("map", W), ("similarity", sim)):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected [student_layers, teacher_layers] = {list(shape)}"
            )
    W = W.detach().to(torch.float64)
    _check_rows(W)
    if k is None:
        k = int((W != 0).sum(dim=1).max())
    return {
        "teacher_layers": int(teacher_layers),
        "student_layers": int(student_layers),
        "similarity": sim.detach().to(torch.float64).tolist(),
        "map": W.tolist(),
        "k": int(k),
        "method": CKA_METHOD,
        "meta": dict(meta),
    }


def layer_map_from_json(d: dict, teacher_layers: int, student_layers: int) -> torch.Tensor:
    """W [L_s, L_t] float64 from a `layer_map_to_json` record, checked against the models in use."""
    missing = [key for key in ("teacher_layers", "student_layers", "map", "method") if key not in d]
    if missing:
        raise ValueError(f"layer map record lacks {missing}; recompute it with `kvdistill align calibrate`")
    if d["method"] != CKA_METHOD:
        raise ValueError(f"layer map method {d['method']!r} is not {CKA_METHOD!r}")
    rec_t, rec_s = int(d["teacher_layers"]), int(d["student_layers"])
    if (rec_t, rec_s) != (teacher_layers, student_layers):
        now = []
        if rec_t != teacher_layers:
            now.append(f"this teacher has {teacher_layers} layers")
        if rec_s != student_layers:
            now.append(f"this student has {student_layers} layers")
        raise ValueError(
            f"layer map is for a {rec_t}-layer teacher and {rec_s}-layer student; "
            f"{' and '.join(now)}: recompute it with `kvdistill align calibrate`"
        )
    W = torch.tensor(d["map"], dtype=torch.float64)
    if tuple(W.shape) != (student_layers, teacher_layers):
        raise ValueError(
            f"layer map matrix has shape {tuple(W.shape)} but the record says "
            f"[{student_layers}, {teacher_layers}]; the file is corrupt: recompute it with `kvdistill align calibrate`"
        )
    _check_rows(W)
    return W


def _check_rows(W: torch.Tensor) -> None:
    if not torch.isfinite(W).all() or (W < 0).any():
        raise ValueError("layer map weights must be finite and non-negative")
    sums = W.sum(dim=1)
    bad = torch.nonzero((sums - 1).abs() > _ROW_SUM_TOL).flatten().tolist()
    if bad:
        raise ValueError(f"layer map rows {bad} do not sum to 1 (sums {sums[bad].tolist()})")
