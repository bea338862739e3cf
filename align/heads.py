"""Head geometry: flatten [.., H, d] -> [.., H*d] (GQA-aware: H is the number of KV heads)."""

from __future__ import annotations

import torch

__all__ = ["flatten_heads", "unflatten_heads"]


def flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """x: [..., H, d] -> [..., H*d], head-major (the layout of k_proj's output)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def unflatten_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x: [..., H*d] -> [..., H, d]."""
    if x.shape[-1] % num_heads:
        raise ValueError(f"width {x.shape[-1]} is not divisible by {num_heads} heads")
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
