"""Loss components, each a pure function of tensors and masks (testable alone).

Shapes: logits [B, T, V]; input_ids, masks [B, T]; K/V [B, T, L, D]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_ce", "layer_std_norm", "masked_kv_loss", "masked_mse"]


def masked_ce(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token CE on positions whose *target* token is in loss_mask (reasoning + answer)."""
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # [B, T-1]
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def layer_std_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each layer of x [B, T, L, D] by its mean and std over valid positions and
    channels. Makes the KV loss scale-free per layer, so a trainable adapter cannot shrink its
    way to a small loss and deep layers with large activations do not dominate."""
    m = mask[:, :, None, None]  # [B, T, 1, 1]
    n = m.sum() * x.shape[-1]
    xm = torch.where(m, x, 0.0)  # padded positions cannot leak into the statistics, even as NaN
    mean = xm.sum(dim=(0, 1, 3), keepdim=True) / n  # [1, 1, L, 1]
    var = torch.where(m, (x - mean) ** 2, 0.0).sum(dim=(0, 1, 3), keepdim=True) / n
    return (x - mean) / (var + eps).sqrt()


def masked_kv_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """A K or V loss over valid positions of a, b [B, T, L, D]; padded positions contribute
    exactly nothing (selected away, so even NaN there cannot leak in).
    kind: "mse" | "smooth_l1" (Huber, beta 1) | "cosine" (1 - cosine similarity per token).
    Returns (scalar loss, per-layer loss [L])."""
    a, b = a[mask], b[mask]  # [N, L, D] real tokens only
    if kind == "mse":
        per_layer = ((a - b) ** 2).mean(dim=(0, 2)) if len(a) else a.new_zeros(a.shape[1])
    elif kind == "smooth_l1":
        per_layer = F.smooth_l1_loss(a, b, reduction="none").mean(dim=(0, 2)) if len(a) else a.new_zeros(a.shape[1])
    elif kind == "cosine":
        per_layer = (1 - F.cosine_similarity(a, b, dim=-1)).mean(dim=0) if len(a) else a.new_zeros(a.shape[1])
    else:
        raise ValueError(f"unknown KV loss {kind!r}; choose mse, smooth_l1 or cosine")
    return per_layer.mean(), per_layer


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over valid positions of a, b [B, T, L, D]: (scalar, per layer [L])."""
    return masked_kv_loss(a, b, mask, "mse")
