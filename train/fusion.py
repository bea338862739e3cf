"""Fusion over teachers: the weights that mix the teachers' adapted K/V (or their Z) into one
target. fixed (`fixed_weights`), similarity (per token, to the student) or a learned `Router`
(per sample, from the student's pooled hidden state); `fusion_weights` gives them for a batch."""

from __future__ import annotations

import math

import torch
from torch import nn

from kvdistill.schemas import TrainConfig

__all__ = ["fixed_weights", "Router", "router_entropy", "fusion_weights"]


def fixed_weights(teacher_weights: dict[str, float] | None, teachers: list[str]) -> dict[str, float]:
    """Fixed fusion weights over `teachers`, normalised to sum 1 (default: equal)."""
    w = teacher_weights or dict.fromkeys(teachers, 1.0)
    unknown = sorted(set(w) - set(teachers))
    if unknown or not any(w.get(t, 0) > 0 for t in teachers):
        raise ValueError(f"teacher_weights {w} must name only teachers {teachers} with some weight > 0")
    total = sum(w.get(t, 0.0) for t in teachers)
    return {t: w.get(t, 0.0) / total for t in teachers}


class Router(nn.Module):
    """Teacher weights per sample from the student's pooled last hidden state: an MLP
    hidden -> GELU -> groups * N logits, softmax over the N teachers. The last layer starts
    at zero weight and bias log(initial weights), so the router begins as the fixed fusion.
    groups 3: one weight vector per shallow / middle / deep third of the student layers
    (layer l is in group floor(3 l / L))."""

    def __init__(
        self, hidden_size: int, init_weights: list[float], num_layers: int, groups: int = 1, width: int = 64
    ) -> None:
        super().__init__()
        if num_layers < groups:
            raise ValueError(
                f"router_groups {groups} needs at least {groups} student layers, the student has {num_layers}; use"
                " router_groups 1"
            )
        self.n, self.groups = len(init_weights), groups
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, groups * self.n))
        nn.init.zeros_(self.mlp[2].weight)
        with torch.no_grad():
            self.mlp[2].bias.copy_(torch.tensor([math.log(w) for w in init_weights]).repeat(groups))
        self.register_buffer("layer_group", torch.arange(num_layers) * groups // num_layers, persistent=False)  # [L]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, hidden] -> teacher weights [B, G, N] (rows sum to 1)."""
        return torch.softmax(self.mlp(pooled).view(len(pooled), self.groups, self.n), dim=-1)


def router_entropy(w: torch.Tensor) -> torch.Tensor:
    """Mean over samples and groups of the entropy of router weights w [B, G, N]."""
    return -(w * torch.log(w.clamp_min(1e-12))).sum(-1).mean()


def fusion_weights(
    cfg: TrainConfig,
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    fixed: list[float],
    router_w: torch.Tensor | None = None,
    layer_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fusion weights over the N teachers of z_t [N, B, T, L, D] (z_s [B, T, L, D] the student's),
    by cfg.fusion. fixed: the teachers' `fixed` weights -> [N, 1, 1, 1]. similarity: per token and
    layer, softmax over teachers of cosine(student, teacher) / cfg.fusion_temperature -> [N, B, T, L],
    detached (routing picks the target; it is not itself trained). router: the router's per-sample
    weights router_w [B, G, N] spread over each group's layers (layer_group [L]) -> [N, B, 1, L]
    (trained through the loss)."""
    if cfg.fusion == "fixed":
        return torch.tensor(fixed, dtype=z_t.dtype, device=z_t.device).view(-1, 1, 1, 1)
    if cfg.fusion == "router":
        return router_w[:, layer_group].permute(2, 0, 1)[:, :, None, :]  # [N, B, 1, L]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(z_s[None], z_t, dim=-1)  # [N, B, T, L]
        return torch.softmax(cos / cfg.fusion_temperature, dim=0)
