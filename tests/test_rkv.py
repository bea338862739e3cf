"""R-KV compression (align/rkv.py) on hand-built tensors with known answers."""

from __future__ import annotations

import pytest
import torch

from kvdistill.align.rkv import (
    compress,
    gather_slots,
    importance_from_attention,
    normalise,
    redundancy,
    rkv_scores,
    select_top,
)


def test_importance_averages_answer_queries_and_the_query_heads_of_each_kv_group():
    B, Hq, T = 1, 4, 5
    attn = torch.zeros(B, Hq, T, T)
    # query 3 and 4 are the answer; query heads 0, 1 share KV head 0, heads 2, 3 KV head 1
    attn[0, 0, 3, 1] = 1.0
    attn[0, 1, 4, 2] = 1.0
    attn[0, 2, 3, 0] = 0.5
    attn[0, 2, 3, 1] = 0.5
    attn[0, 3, 4, 1] = 1.0
    attn[0, :, 0, 0] = 100.0  # a non-answer query: must not count
    queries = torch.tensor([[False, False, False, True, True]])
    imp = importance_from_attention(attn, queries, num_kv_heads=2)  # [1, 2, 5]
    # head 0: (1 at key 1 from head 0 query 3 + 1 at key 2 from head 1 query 4) / 2 queries / 2 heads
    torch.testing.assert_close(imp[0, 0], torch.tensor([0.0, 0.25, 0.25, 0.0, 0.0]))
    torch.testing.assert_close(imp[0, 1], torch.tensor([0.125, 0.375, 0.0, 0.0, 0.0]))


def test_redundancy_is_one_minus_max_cosine_to_the_other_keys():
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # 0 and 1 are duplicates in direction
    torch.testing.assert_close(redundancy(keys), torch.tensor([0.0, 0.0, 1.0]))
    assert redundancy(keys[:1]).tolist() == [1.0]  # a lone key has no duplicate


def test_normalise_maps_to_unit_range_and_constant_rows_to_zero():
    torch.testing.assert_close(
        normalise(torch.tensor([[2.0, 4.0, 3.0], [5.0, 5.0, 5.0]])), torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    )


def test_lambda_weighs_the_normalised_terms():
    imp = torch.tensor([0.0, 10.0, 5.0])  # normalised 0, 1, .5
    red = torch.tensor([2.0, 0.0, 1.0])  # normalised 1, 0, .5
    torch.testing.assert_close(rkv_scores(imp, red, 1.0), torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(rkv_scores(imp, red, 0.0), torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(rkv_scores(imp, red, 0.25), torch.tensor([0.75, 0.25, 0.5]))


def test_select_keeps_top_m_in_time_order_and_pads_short_chains():
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.2]]])  # [L=1, H=1, R=5]
    idx, mask = select_top(scores, 3)
    assert idx[:, 0, 0].tolist() == [1, 2, 3]  # top-3 are 1, 3, 2: kept in time order, not score order
    assert mask.tolist() == [True, True, True]
    idx, mask = select_top(scores, 7)
    assert idx[:, 0, 0].tolist() == [0, 1, 2, 3, 4, -1, -1]
    assert mask.tolist() == [True] * 5 + [False] * 2


def test_gather_picks_each_heads_vector_at_its_own_position_and_zeroes_padding():
    T, L, H, d = 4, 2, 2, 3
    x = torch.arange(T * L * H * d, dtype=torch.float32).view(T, L, H * d)
    pos = torch.tensor([[[0, 3], [2, 1]], [[-1, -1], [-1, -1]]])  # [M=2, L, H]
    out = gather_slots(x, pos).view(2, L, H, d)
    xh = x.view(T, L, H, d)
    assert torch.equal(out[0, 0, 0], xh[0, 0, 0]) and torch.equal(out[0, 0, 1], xh[3, 0, 1])
    assert torch.equal(out[0, 1, 0], xh[2, 1, 0]) and torch.equal(out[0, 1, 1], xh[1, 1, 1])
    assert torch.equal(out[1], torch.zeros(L, H, d))


def _hand_sample():
    """T = 8: prompt 0-1, reasoning 2-6, answer 7. L = 2 layers, H = 2 heads, d = 2.
    Layer 0 head 0: keys 2 and 3 duplicate (redundancy 0), 4, 5, 6 orthogonal-ish; layer 1
    head 0 has other duplicates, so the layers must keep other sets."""
    T, L, H, d = 8, 2, 2, 2
    k = torch.zeros(T, L, H, d)
    base = {2: [1.0, 0.0], 3: [1.0, 0.01], 4: [0.0, 1.0], 5: [-1.0, 0.2], 6: [0.3, -1.0]}
    for t, vec in base.items():
        k[t, 0, 0] = torch.tensor(vec)
        k[t, 0, 1] = torch.tensor(vec)
    # layer 1: 5 and 6 duplicate, 2, 3, 4 distinct
    for t, vec in {2: [1.0, 0.0], 3: [0.0, 1.0], 4: [-1.0, 0.1], 5: [0.2, -1.0], 6: [0.2, -1.01]}.items():
        k[t, 1, 0] = torch.tensor(vec)
        k[t, 1, 1] = torch.tensor(vec)
    k[:2] = 5.0  # prompt keys: never candidates
    v = -k
    reasoning = torch.tensor([False, False, True, True, True, True, True, False])
    return k.view(T, L, H * d), v.view(T, L, H * d), reasoning


def test_compress_keeps_low_redundancy_tokens_per_layer_in_time_order_with_lambda_zero():
    k, v, reasoning = _hand_sample()
    importance = torch.zeros(2, 2, 8)
    out = compress(k, v, importance, reasoning, slots=3, lam=0.0)
    # layer 0 drops one of the duplicates 2 / 3 (both redundancy ~0) and keeps 4, 5, 6
    assert out["pos"][:, 0, 0].tolist() == [4, 5, 6]
    # layer 1 drops the duplicates 5 / 6 and keeps 2, 3, 4: every layer is compressed on its own
    assert out["pos"][:, 1, 0].tolist() == [2, 3, 4]
    assert out["mask"].all()
    # gathered values are the originals at the kept positions
    kh = k.view(8, 2, 2, 2)
    for m in range(3):
        for layer in range(2):
            assert torch.equal(out["k"].view(3, 2, 2, 2)[m, layer, 0], kh[out["pos"][m, layer, 0], layer, 0])
            assert torch.equal(out["v"].view(3, 2, 2, 2)[m, layer, 1], -kh[out["pos"][m, layer, 1], layer, 1])


def test_compress_with_lambda_one_follows_the_answer_attention():
    k, v, reasoning = _hand_sample()
    importance = torch.zeros(2, 2, 8)
    importance[:, :, 2] = 0.5  # the duplicate 2 is what the answer reads
    importance[:, :, 3] = 0.4
    importance[:, :, 0] = 9.0  # prompt attention is ignored: not a reasoning token
    importance[0, 1, 6] = 0.45  # head 1 of layer 0 prefers 6 over 3
    out = compress(k, v, importance, reasoning, slots=2, lam=1.0)
    assert out["pos"][:, 0, 0].tolist() == [2, 3]
    assert out["pos"][:, 0, 1].tolist() == [2, 6]
    assert out["pos"][:, 1, 0].tolist() == [2, 3]


def test_short_chain_is_padded_with_the_mask_never_an_error():
    k, v, reasoning = _hand_sample()
    out = compress(k, v, torch.rand(2, 2, 8), reasoning, slots=8, lam=0.1)
    assert out["mask"].tolist() == [True] * 5 + [False] * 3
    assert (out["pos"][:5] == torch.arange(2, 7)[:, None, None]).all()  # all of it, in order
    assert (out["pos"][5:] == -1).all()
    assert torch.equal(out["k"][5:], torch.zeros(3, 2, 4)) and torch.equal(out["v"][5:], torch.zeros(3, 2, 4))
    empty = compress(k, v, torch.rand(2, 2, 8), torch.zeros(8, dtype=torch.bool), slots=4, lam=0.1)
    assert not empty["mask"].any() and (empty["pos"] == -1).all()


def test_mask_is_not_inverted_and_every_layer_differs_from_layer_zero_selection():
    """The public prototype's two bugs: an inverted eviction mask (keeping the *lowest* scores)
    and compressing layer 0 only (every layer reusing layer 0's positions)."""
    torch.manual_seed(0)
    T, L, H, d = 40, 3, 2, 4
    k, v = torch.randn(T, L, H * d), torch.randn(T, L, H * d)
    reasoning = torch.zeros(T, dtype=torch.bool)
    reasoning[5:35] = True
    importance = torch.rand(L, H, T)
    out = compress(k, v, importance, reasoning, slots=6, lam=1.0)
    for layer in range(L):
        for h in range(H):
            kept = out["pos"][:, layer, h]
            r = importance[layer, h, 5:35]
            assert kept.tolist() == sorted(kept.tolist())
            assert set((kept - 5).tolist()) == set(r.topk(6).indices.tolist())  # the highest, not the lowest
    assert not torch.equal(out["pos"][:, 1], out["pos"][:, 0]) and not torch.equal(out["pos"][:, 2], out["pos"][:, 0])


def test_gqa_head_count_must_divide():
    with pytest.raises(ValueError, match="KV groups"):
        importance_from_attention(torch.zeros(1, 3, 2, 2), torch.ones(1, 2, dtype=torch.bool), 2)
