"""CKA layer maps and PCA projections (align/cka.py, align/projection.py): the feature-space
unbiased HSIC equals the N x N Gram-matrix definition, CKA has the invariances it promises,
the debiased estimator is ~0 on independent wide features where the biased one is not, the
top-k map and its JSON record are well formed, and PCA reconstructs what it should."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.align.cka import (
    CKA_METHOD,
    cka_matrix,
    layer_map_from_json,
    layer_map_to_json,
    linear_cka,
    linear_hsic_unbiased,
    masked_tokens,
    topk_layer_map,
)
from kvdistill.align.projection import (
    fit_layer_pca,
    fit_pca,
    project,
    project_layers,
    reconstruct,
    reconstruct_layers,
)

FAST = settings(max_examples=100, deadline=None)
F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _orthogonal(seed: int, d: int) -> torch.Tensor:
    q, r = torch.linalg.qr(_randn(seed, d, d))
    return q * torch.sign(torch.diagonal(r))


def _hsic_u_gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012, literally: N x N Gram matrices with zeroed diagonals."""
    n = X.shape[0]
    K, L = X @ X.T, Y @ Y.T
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, dtype=F64)
    return (
        torch.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


# ----------------------------------------------------------------------------- HSIC / CKA


@FAST
@given(
    n=st.integers(4, 40),
    d1=st.integers(1, 12),
    d2=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    offset=st.floats(-5, 5),
)
def test_feature_space_unbiased_hsic_equals_gram_matrix_definition(n, d1, d2, seed, offset):
    X = _randn(seed, n, d1) + offset  # a mean: the estimator is translation invariant
    Y = _randn(seed + 1, n, d2) * 3
    got, ref = linear_hsic_unbiased(X, Y), _hsic_u_gram(X, Y)
    scale = float(X.norm() ** 2 * Y.norm() ** 2) / n**2
    assert abs(float(got - ref)) <= 1e-9 * max(1.0, scale)


def test_unbiased_hsic_needs_four_tokens_and_equal_rows():
    with pytest.raises(ValueError, match="n >= 4"):
        linear_hsic_unbiased(_randn(0, 3, 2), _randn(1, 3, 2))
    with pytest.raises(ValueError, match="same tokens"):
        linear_hsic_unbiased(_randn(0, 5, 2), _randn(1, 6, 2))


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    X = _randn(0, 50, 7) + 2.0
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_is_invariant_to_rotation_and_isotropic_scaling(debiased):
    X, Y = _randn(0, 60, 8), _randn(1, 60, 5)
    Y = Y + 2.0 * X[:, :5]  # related, so CKA is far from 0 and the check means something
    base = linear_cka(X, Y, debiased=debiased)
    assert base > 0.1
    Q = _orthogonal(2, 8)
    assert linear_cka(X @ Q, Y, debiased=debiased) == pytest.approx(base, abs=1e-9)
    assert linear_cka(3.7 * X, Y, debiased=debiased) == pytest.approx(base, abs=1e-9)
    assert linear_cka(X, 0.01 * Y, debiased=debiased) == pytest.approx(base, abs=1e-9)


def test_debiased_cka_is_near_zero_on_independent_wide_features_where_biased_is_not():
    X, Y = _randn(0, 200, 256), _randn(1, 200, 256)
    assert abs(linear_cka(X, Y, debiased=True)) < 0.05
    assert linear_cka(X, Y, debiased=False) > 0.3


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_of_a_constant_input_raises_instead_of_nan(debiased):
    X = torch.full((20, 4), 0.1, dtype=torch.float32)
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(X, _randn(0, 20, 3), debiased=debiased)
    with pytest.raises(ValueError, match="zero variance"):
        cka_matrix([_randn(0, 20, 3)], [torch.zeros(20, 5)], debiased=debiased)


def test_cka_matrix_shape_and_rotated_copy_is_the_row_argmax():
    n = 120
    teacher = [_randn(10 + t, n, 16) for t in range(5)]
    # Student layer s is teacher layer perm[s] seen through a rotation (different width is fine
    # for CKA, so also drop to 16 -> 16 with a rotation and append noise columns for layer 2).
    perm = [3, 0, 4]
    student = [teacher[t] @ _orthogonal(20 + s, 16) for s, t in enumerate(perm)]
    student[2] = torch.cat([student[2], 0.1 * _randn(30, n, 4)], dim=1)
    for debiased in (True, False):
        sim = cka_matrix(student, teacher, debiased=debiased)
        assert sim.shape == (3, 5) and sim.dtype == F64
        assert sim.argmax(dim=1).tolist() == perm
        for s, t in enumerate(perm):
            assert float(sim[s, t]) == pytest.approx(linear_cka(student[s], teacher[t], debiased=debiased), abs=1e-12)
    assert float(cka_matrix(student[:1], teacher)[0, 3]) == pytest.approx(1.0, abs=1e-9)


def test_cka_matrix_accepts_float32_and_bfloat16_layers():
    X = _randn(0, 40, 6)
    sim = cka_matrix([X.float(), X.bfloat16()], [X])
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert sim[1, 0] > 0.99


# ----------------------------------------------------------------------------- masked tokens


def test_masked_tokens_drops_padding_and_keeps_order():
    B, T, H, d = 3, 5, 2, 4
    x = torch.arange(B * T * H * d, dtype=torch.float32).reshape(B, T, H, d)
    lengths = [5, 2, 0]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # right padding
    mask[0, 1] = False  # and a hole in the middle
    out = masked_tokens(x, mask)
    expected = [x[0, t] for t in (0, 2, 3, 4)] + [x[1, t] for t in (0, 1)]
    assert out.shape == (6, H, d)
    assert torch.equal(out, torch.stack(expected))
    with pytest.raises(ValueError, match="bool"):
        masked_tokens(x, mask.long())
    with pytest.raises(ValueError, match="matching"):
        masked_tokens(x, mask[:, :4])


# ----------------------------------------------------------------------------- top-k map


@FAST
@given(
    L_s=st.integers(1, 8),
    L_t=st.integers(1, 12),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-1.0, 0.5),
)
def test_topk_layer_map_rows_are_top_k_convex_weights(L_s, L_t, k, seed, shift):
    sim = torch.rand(L_s, L_t, generator=torch.Generator().manual_seed(seed), dtype=F64) + shift
    if k > L_t:
        with pytest.raises(ValueError, match="k must be in"):
            topk_layer_map(sim, k)
        return
    W = topk_layer_map(sim, k)
    assert W.shape == (L_s, L_t) and W.dtype == F64
    assert (W >= 0).all()
    assert (W.sum(dim=1) == 1.0).all()  # exactly, in any summation order
    assert all(sum(row) == 1.0 for row in W.tolist())
    for s in range(L_s):
        top = set(torch.topk(sim[s], k).indices.tolist())
        nz = set(torch.nonzero(W[s]).flatten().tolist())
        assert len(nz) <= k and nz <= top
        if (sim[s][list(top)] <= 0).all():  # documented fallback: all of the argmax
            assert nz == {int(sim[s].argmax())}
        else:
            kept = sorted(top)
            w = sim[s, kept].clamp(min=0)
            assert torch.allclose(W[s, kept], w / w.sum(), atol=1e-11, rtol=0)


def test_topk_layer_map_on_a_known_matrix():
    sim = torch.tensor([[0.9, 0.3, 0.6, -0.2], [-0.5, -0.1, -0.3, -0.4]], dtype=F64)
    W = topk_layer_map(sim, 2)
    expected = torch.tensor([[0.6, 0.0, 0.4, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(W, expected, atol=1e-11, rtol=0)
    assert topk_layer_map(sim, 1).tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- JSON record


def test_layer_map_json_round_trip():
    sim = torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    W = topk_layer_map(sim, 2)
    rec = layer_map_to_json(W, sim, teacher_layers=5, student_layers=3, meta={"tokens": 4096})
    rec = json.loads(json.dumps(rec))
    assert rec["method"] == CKA_METHOD and rec["k"] == 2 and rec["meta"] == {"tokens": 4096}
    assert rec["teacher_layers"] == 5 and rec["student_layers"] == 3
    assert torch.equal(torch.tensor(rec["similarity"], dtype=F64), sim)
    assert torch.equal(layer_map_from_json(rec, teacher_layers=5, student_layers=3), W)
    assert layer_map_to_json(W, sim, 5, 3, {}, k=3)["k"] == 3


def test_layer_map_for_other_layer_counts_raises_naming_both():
    sim = torch.rand(12, 24, generator=torch.Generator().manual_seed(0), dtype=F64)
    rec = layer_map_to_json(topk_layer_map(sim, 2), sim, 24, 12, {})
    with pytest.raises(ValueError) as err:
        layer_map_from_json(rec, teacher_layers=28, student_layers=12)
    msg = str(err.value)
    assert "24-layer teacher and 12-layer student" in msg
    assert "this teacher has 28 layers" in msg and "kvdistill align calibrate" in msg
    with pytest.raises(ValueError, match="this student has 10 layers"):
        layer_map_from_json(rec, teacher_layers=24, student_layers=10)


def test_layer_map_record_with_bad_rows_or_shape_raises():
    sim = torch.rand(2, 3, dtype=F64)
    W = topk_layer_map(sim, 2)
    with pytest.raises(ValueError, match="expected"):
        layer_map_to_json(W, sim, teacher_layers=2, student_layers=3, meta={})
    rec = layer_map_to_json(W, sim, 3, 2, {})
    bad = dict(rec, map=[[0.5, 0.2, 0.2], rec["map"][1]])
    with pytest.raises(ValueError, match="sum to 1"):
        layer_map_from_json(bad, 3, 2)
    bad = dict(rec, map=[[1.5, -0.5, 0.0], rec["map"][1]])
    with pytest.raises(ValueError, match="non-negative"):
        layer_map_from_json(bad, 3, 2)
    bad = dict(rec, map=rec["map"][:1])
    with pytest.raises(ValueError, match="corrupt"):
        layer_map_from_json(bad, 3, 2)


# ----------------------------------------------------------------------------- PCA


def test_full_rank_pca_reconstructs_exactly_and_ratios_are_sorted():
    x = _randn(0, 80, 10) @ torch.diag(torch.linspace(0.1, 3, 10, dtype=F64)) + 4.0
    mean, comps, evr = fit_pca(x.float(), 10)
    assert mean.shape == (10,) and comps.shape == (10, 10) and evr.shape == (10,)
    assert torch.allclose(comps.T @ comps, torch.eye(10, dtype=F64), atol=1e-12)
    assert torch.allclose(reconstruct(project(x, mean, comps), mean, comps), x, atol=1e-9, rtol=0)
    assert (evr[:-1] >= evr[1:]).all() and (evr >= 0).all() and (evr <= 1).all()
    assert float(evr.sum()) == pytest.approx(1.0, abs=1e-12)


def test_pca_of_data_in_a_three_dim_subspace():
    basis = torch.linalg.qr(_randn(1, 12, 3))[0]  # [12, 3]
    x = _randn(2, 50, 3) @ basis.T + _randn(3, 12)  # rank-3 cloud around a mean
    mean, comps, evr = fit_pca(x, 3)
    assert float(evr.sum()) == pytest.approx(1.0, abs=1e-9)
    z = project(x, mean, comps)
    assert z.shape == (50, 3)
    assert torch.allclose(reconstruct(z, mean, comps), x, atol=1e-9, rtol=0)
    assert float(fit_pca(x, 5)[2][3:].sum()) < 1e-20


def test_pca_is_deterministic_and_rejects_bad_dims():
    x = _randn(0, 30, 6)
    a, b = fit_pca(x, 4), fit_pca(x.clone(), 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="min"):
        fit_pca(x, 7)
    with pytest.raises(ValueError, match="min"):
        fit_pca(x[:5], 6)
    with pytest.raises(ValueError, match="zero variance"):
        fit_pca(torch.ones(10, 3), 2)


def test_per_layer_pca_agrees_with_one_pca_per_layer():
    N, L, D, dim = 40, 3, 8, 5
    x = _randn(0, N, L, D) * torch.arange(1, D + 1, dtype=F64) + torch.arange(L, dtype=F64)[:, None]
    mean, comps, evr = fit_layer_pca(x, dim)
    assert mean.shape == (L, D) and comps.shape == (L, D, dim) and evr.shape == (L, dim)
    z = project_layers(x[:7], mean, comps)  # [7, L, dim]
    for layer in range(L):
        m1, c1, e1 = fit_pca(x[:, layer], dim)
        assert torch.allclose(mean[layer], m1, atol=1e-12)
        assert torch.allclose(comps[layer], c1, atol=1e-10)
        assert torch.allclose(evr[layer], e1, atol=1e-12)
        assert torch.allclose(z[:, layer], project(x[:7, layer], m1, c1), atol=1e-10)
    full = fit_layer_pca(x, D)
    back = reconstruct_layers(project_layers(x, full[0], full[1]), full[0], full[1])
    assert torch.allclose(back, x, atol=1e-9, rtol=0)
