"""Rotary position embeddings, forwards and backwards, in the rotate-half convention that
Llama / Qwen2 / Qwen3 use: for each pair (x1, x2) = (x[..., i], x[..., i + d/2]),
rotate: (x1 c - x2 s, x2 c + x1 s) with (c, s) the model's cos / sin at that position.

`cos, sin` come from the model's own rotary embedding (`model.model.rotary_emb(x, position_ids)`),
so every `rope_scaling` variant (linear, dynamic, llama3, yarn, ...) is covered, including those
that fold an attention scaling factor into cos / sin: `derotate` divides by c^2 + s^2, so it is
the exact inverse even when the rotation is not orthonormal."""

from __future__ import annotations

import torch

__all__ = ["rotate", "derotate"]


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    return x[..., : d // 2], x[..., d // 2 :]


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """k: [..., T, d] pre-RoPE; cos, sin: broadcastable to k (e.g. [T, d] or [B, 1, T, d])."""
    k1, k2 = _halves(k)
    c, _ = _halves(cos)
    s, _ = _halves(sin)
    return torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1)


def derotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`: post-RoPE keys back to position-free keys."""
    y1, y2 = _halves(k)
    c, _ = _halves(cos)
    s, _ = _halves(sin)
    norm = c * c + s * s
    return torch.cat([(y1 * c + y2 * s) / norm, (y2 * c - y1 * s) / norm], dim=-1)
