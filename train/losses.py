"""Loss components, each a pure function of tensors and masks (testable alone).

Shapes: logits [B, T, V]; input_ids, masks [B, T]; K/V [B, T, L, D]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_ce", "layer_std_norm", "masked_mse"]


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
    m = mask[:, :, None, None].to(x.dtype)  # [B, T, 1, 1]
    n = m.sum() * x.shape[-1]
    mean = (x * m).sum(dim=(0, 1, 3), keepdim=True) / n  # [1, 1, L, 1]
    var = (((x - mean) * m) ** 2).sum(dim=(0, 1, 3), keepdim=True) / n
    return (x - mean) / (var + eps).sqrt()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over valid positions of a, b [B, T, L, D].
    Returns (scalar loss, per-layer loss [L])."""
    m = mask[:, :, None, None].to(a.dtype)
    se = ((a - b) ** 2 * m).sum(dim=(0, 1, 3))  # [L]
    per_layer = se / (m.sum() * a.shape[-1]).clamp_min(1.0)
    return per_layer.mean(), per_layer
