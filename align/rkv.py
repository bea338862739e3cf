"""R-KV compression of a teacher's chain-of-thought KV for KaVa latent mode (pure torch, no I/O).

KaVa (arXiv 2510.02312) supervises a student's M latent tokens with the teacher's reasoning KV
compressed to M slots. Per teacher layer and KV head every reasoning token gets the score

    score = lam * importance + (1 - lam) * redundancy            (R-KV, arXiv 2505.24133)

- importance: the attention the answer tokens pay the token (eager attention probabilities,
  averaged over the query heads of the KV group and over the answer queries);
- redundancy: 1 - the largest cosine similarity of the token's pre-RoPE key to any *other*
  reasoning key of the same layer and head (a token with a near-duplicate is redundant, so it
  scores low). This is the definition the kvdistill brief gives, not R-KV's own: R-KV averages
  each key's cosine similarities to the others (diagonal zeroed, the most recent similar key
  above a threshold exempted), softmaxes that over tokens and *subtracts* it with weight
  (1 - lambda) (`score = lambda * attn - (1 - lambda) * sim`). The max form keeps exactly one
  copy of a repeated step at full value and needs no threshold.
  Pre-RoPE keys: the similarity of content, not of positions.

Both terms are min-max normalised to [0, 1] over the reasoning tokens of each (layer, head)
before mixing (a constant term becomes 0), so lam is the share of the score range each term can
move: lam = 1 ranks by importance only, lam = 0 by redundancy only.

The top-M tokens per (layer, head) are kept in their original time order. A chain shorter than
M keeps all of its tokens and marks the remaining slots as padding (mask False, position -1);
every layer is compressed on its own scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "importance_from_attention",
    "redundancy",
    "normalise",
    "rkv_scores",
    "select_top",
    "gather_slots",
    "compress",
]


def importance_from_attention(attn: torch.Tensor, queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """attn [B, H_q, T, T] attention probabilities, queries [B, T] bool (the answer tokens) ->
    [B, H_kv, T]: the mean attention the query tokens pay each key, averaged over the H_q / H_kv
    query heads that share a KV head (query head h reads KV head h // (H_q / H_kv), as
    transformers' repeat_kv lays them out). A sample without queries gets zeros."""
    B, Hq, T, _ = attn.shape
    if Hq % num_kv_heads:
        raise ValueError(f"{Hq} query heads do not split into {num_kv_heads} KV groups")
    q = queries.to(attn.dtype)  # [B, T]
    per_head = torch.einsum("bhqk,bq->bhk", attn, q) / q.sum(-1).clamp(min=1)[:, None, None]  # [B, H_q, T]
    return per_head.float().view(B, num_kv_heads, Hq // num_kv_heads, T).mean(2)


def redundancy(keys: torch.Tensor) -> torch.Tensor:
    """keys [..., R, d] -> [..., R]: 1 - max cosine similarity to the other R - 1 keys (in [0, 2]).
    A lone key (R = 1) has no duplicate: redundancy 1."""
    R = keys.shape[-2]
    if R < 2:
        return torch.ones(keys.shape[:-1], dtype=torch.float32, device=keys.device)
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn @ kn.transpose(-1, -2)  # [..., R, R]
    sim.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    return 1.0 - sim.amax(-1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the last axis; a constant row becomes 0 (it ranks nothing)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


def rkv_scores(importance: torch.Tensor, redundancy: torch.Tensor, lam: float) -> torch.Tensor:
    """[..., R] each -> lam * normalise(importance) + (1 - lam) * normalise(redundancy)."""
    return lam * normalise(importance.float()) + (1.0 - lam) * normalise(redundancy.float())


def select_top(scores: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [L, H, R] -> (idx [M, L, H] long: the top-min(M, R) token indices of every (layer,
    head) in ascending (time) order, -1 in padding slots; mask [M] bool: real slots)."""
    L, H, R = scores.shape
    m = min(M, R)
    top = scores.topk(m, dim=-1).indices.sort(-1).values  # [L, H, m]
    idx = torch.full((L, H, M), -1, dtype=torch.long, device=scores.device)
    idx[..., :m] = top
    return idx.permute(2, 0, 1), torch.arange(M, device=scores.device) < m


def gather_slots(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [T, L, H*d] (head-flattened K or V), pos [M, L, H] positions (-1 = padding) ->
    [M, L, H*d]: slot m of layer l holds head h's vector at time pos[m, l, h]; padding is 0."""
    T, L, D = x.shape
    M, _, H = pos.shape
    xh = x.view(T, L, H, D // H)
    layer = torch.arange(L, device=x.device)[None, :, None]
    head = torch.arange(H, device=x.device)[None, None, :]
    out = xh[pos.clamp(min=0), layer, head]  # [M, L, H, d]
    return (out * (pos >= 0)[..., None].to(out.dtype)).reshape(M, L, D)


def compress(
    k: torch.Tensor,  # [T, L, H*d] pre-RoPE keys of one sample (no padding)
    v: torch.Tensor,  # [T, L, H*d]
    importance: torch.Tensor,  # [L, H, T] from importance_from_attention
    reasoning: torch.Tensor,  # [T] bool: the chain-of-thought tokens
    slots: int,
    lam: float,
) -> dict[str, torch.Tensor]:
    """One sample -> {"pos" [M, L, H] long (absolute positions, ascending per (layer, head), -1
    padding), "mask" [M] bool, "k", "v" [M, L, H*d]} on the sample's own time grid."""
    T, L, D = k.shape
    H = importance.shape[1]
    r = torch.nonzero(reasoning, as_tuple=True)[0]  # [R] ascending
    R = len(r)
    if R == 0:
        pos = torch.full((slots, L, H), -1, dtype=torch.long, device=k.device)
        mask = torch.zeros(slots, dtype=torch.bool, device=k.device)
    else:
        keys = k[r].view(R, L, H, D // H).permute(1, 2, 0, 3)  # [L, H, R, d]
        scores = rkv_scores(importance[:, :, r], redundancy(keys), lam)  # [L, H, R]
        idx, mask = select_top(scores, slots)
        pos = torch.where(idx >= 0, r[idx.clamp(min=0)], -1)
    return {"pos": pos, "mask": mask, "k": gather_slots(k, pos), "v": gather_slots(v, pos)}
