"""Fixed PCA projections: fitted once on a calibration sample, they let the store hold
[.., L, dim] instead of [.., L, D] KV to cut disk.

Fits are exact SVDs of the centred data in float64. Each component's sign is fixed so its
largest-magnitude entry is positive (as scikit-learn does), so refitting the same data gives
the same projection. `project`/`reconstruct` compute in the dtype of `components`: cast
mean and components to float32 to project large tensors cheaply."""

from __future__ import annotations

import torch

__all__ = [
    "fit_pca",
    "project",
    "reconstruct",
    "fit_layer_pca",
    "project_layers",
    "reconstruct_layers",
]


def _check_dim(dim: int, n: int, d: int) -> None:
    if not 1 <= dim <= min(n, d):
        raise ValueError(
            f"PCA dim must be in [1, min(N, D)] = [1, {min(n, d)}] for {n} samples of width {d}, got {dim}"
        )


def _svd_pca(x: torch.Tensor, mean: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N, D] float64, mean [..., D] -> components [..., D, dim], evr [..., dim]."""
    xc = x - mean[..., None, :]
    _, S, Vh = torch.linalg.svd(xc, full_matrices=False)  # S [..., K], Vh [..., K, D]
    var = S * S
    total = var.sum(dim=-1, keepdim=True)  # [..., 1]
    # Relative test: centring constant data in float64 leaves rounding-level residue.
    if (total <= 1e-24 * (x * x).sum(dim=(-2, -1))[..., None]).any():
        raise ValueError("PCA input has zero variance (every row is the same); nothing to project")
    comps = Vh[..., :dim, :]  # [..., dim, D]
    # Deterministic signs: the largest-|.| entry of each component is positive.
    pivot = comps.abs().argmax(dim=-1, keepdim=True)  # [..., dim, 1]
    sign = torch.sign(torch.gather(comps, -1, pivot))
    comps = comps * sign
    return comps.transpose(-1, -2).contiguous(), (var / total)[..., :dim]


def fit_pca(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D] -> (mean [D], components [D, dim], explained_variance_ratio [dim]), float64.

    Components are orthonormal columns sorted by variance; evr sums to 1 at dim = rank."""
    if x.dim() != 2:
        raise ValueError(f"fit_pca expects [N, D], got shape {tuple(x.shape)}")
    _check_dim(dim, *x.shape)
    x = x.detach().to(torch.float64)
    mean = x.mean(dim=0)  # [D]
    comps, evr = _svd_pca(x, mean, dim)
    return mean, comps, evr


def project(x: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> z [..., dim] = (x - mean) @ components."""
    return (x.to(components.dtype) - mean.to(components.dtype)) @ components


def reconstruct(z: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """z [..., dim] -> x [..., D] = z @ components^T + mean (exact when dim >= rank)."""
    return z.to(components.dtype) @ components.T + mean.to(components.dtype)


def fit_layer_pca(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, L, D] -> (mean [L, D], components [L, D, dim], evr [L, dim]): one PCA per layer."""
    if x.dim() != 3:
        raise ValueError(f"fit_layer_pca expects [N, L, D], got shape {tuple(x.shape)}")
    n, _, d = x.shape
    _check_dim(dim, n, d)
    x = x.detach().to(torch.float64).transpose(0, 1)  # [L, N, D]
    mean = x.mean(dim=1)  # [L, D]
    comps, evr = _svd_pca(x, mean, dim)
    return mean, comps, evr


def project_layers(x: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """x [..., L, D] -> [..., L, dim] with each layer's own mean and components."""
    dt = components.dtype
    return torch.einsum("...ld,ldk->...lk", x.to(dt) - mean.to(dt), components)


def reconstruct_layers(z: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """z [..., L, dim] -> [..., L, D]; inverse of `project_layers` on the fitted subspace."""
    dt = components.dtype
    return torch.einsum("...lk,ldk->...ld", z.to(dt), components) + mean.to(dt)
