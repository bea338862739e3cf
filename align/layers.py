"""Layer maps: which teacher layers (with which weights) feed each student layer.

A map is a dense matrix W [L_s, L_t] whose row l_s holds the mixing weights over teacher
layers; `apply_layer_map` touches only the non-zero entries, so a one-hot row copies the
teacher layer bit for bit."""

from __future__ import annotations

import math

import torch

__all__ = ["ratio_layer_map", "apply_layer_map"]


def ratio_layer_map(num_teacher_layers: int, num_student_layers: int) -> torch.Tensor:
    """W [L_s, L_t]: l_s -> l_t = l_s * (L_t - 1) / (L_s - 1), linearly interpolated between
    the two neighbouring teacher layers. First maps to first, last to last; L_s == L_t is the
    identity. A one-layer student takes the teacher's last layer."""
    L_t, L_s = num_teacher_layers, num_student_layers
    if L_t < 1 or L_s < 1:
        raise ValueError(f"layer counts must be >= 1, got teacher {L_t}, student {L_s}")
    W = torch.zeros(L_s, L_t, dtype=torch.float64)
    for s in range(L_s):
        pos = (L_t - 1) if L_s == 1 else s * (L_t - 1) / (L_s - 1)
        lo = math.floor(pos + 1e-9)
        w = pos - lo
        if w < 1e-9:
            W[s, lo] = 1.0
        else:
            W[s, lo], W[s, lo + 1] = 1.0 - w, w
    return W


def apply_layer_map(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x: [..., L_t, D] -> [..., L_s, D] with out[.., s, :] = sum_t W[s, t] * x[.., t, :]."""
    if W.shape[1] != x.shape[-2]:
        raise ValueError(f"layer map expects {W.shape[1]} teacher layers, tensor has {x.shape[-2]}")
    rows = []
    for s in range(W.shape[0]):
        (ts,) = torch.nonzero(W[s], as_tuple=True)
        acc = None
        for t in ts.tolist():
            w = float(W[s, t])
            term = x[..., t, :] if w == 1.0 else x[..., t, :] * w
            acc = term if acc is None else acc + term
        rows.append(acc)
    return torch.stack(rows, dim=-2)
