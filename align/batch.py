"""A padded batch aligned at once, as the dump does it: K and V side by side ([.., 2D]) so one
layer map, one projection and one time map serve both.

    proj = kv_block_projection(k_mean, k_components, v_mean, v_components)
    tmap = batch_time_map(kind, student_offsets, teacher_offsets, student_segments, teacher_segments)
    kv = align_batch(torch.cat([k, v], -1), layer_map, tmap, proj)  # [sum T_s, L_s, 2D]

Each equals aligning every sample alone (`pipeline.align_kv`): the layer map and projection
act per token, and the stacked time map is block diagonal over the samples and drops padding.
KaVa latent mode's R-KV compression runs per sample on the teacher's grid, then shares the
batch's layer map and projection (`compress_batch`)."""

from __future__ import annotations

import numpy as np
import torch

from .pipeline import build_time_map, map_layers
from .rkv import compress
from .time import TimeMap, stack_time_maps

__all__ = ["kv_block_projection", "batch_time_map", "align_batch", "compress_batch"]


def kv_block_projection(
    k_mean: torch.Tensor,  # [L_s, D_t]
    k_components: torch.Tensor,  # [L_s, D_t, D]
    v_mean: torch.Tensor,  # [L_s, D_t]
    v_components: torch.Tensor,  # [L_s, D_t, D]
) -> tuple[torch.Tensor, torch.Tensor]:
    """K's and V's per-layer PCA as one projection of [.., L_s, 2D_t] (K then V) -> [.., L_s, 2D]:
    mean [L_s, 2D_t] and block-diagonal components [L_s, 2D_t, 2D] (K never mixes into V)."""
    zeros = torch.zeros_like(k_components)
    mean = torch.cat([k_mean, v_mean], dim=-1)  # [L_s, 2D_t]
    top = torch.cat([k_components, zeros], -1)  # [L_s, D_t, 2D]
    bottom = torch.cat([zeros, v_components], -1)  # [L_s, D_t, 2D]
    return mean, torch.cat([top, bottom], 1)


def batch_time_map(
    kind: str,
    student_offsets: list[np.ndarray],  # per sample [T_s, 2]
    teacher_offsets: list[np.ndarray],  # per sample [T_t, 2]
    student_segments: list[np.ndarray],  # per sample [T_s]
    teacher_segments: list[np.ndarray],  # per sample [T_t]
) -> TimeMap:
    """One block-diagonal map for the batch padded to its longest teacher sample: input
    [B * T_pad, ...] (sample j's step t at row j * T_pad + t), output the samples' student steps
    concatenated in batch order. CPU work on offsets only, so it can be built ahead of the forward."""
    samples = zip(student_offsets, teacher_offsets, student_segments, teacher_segments, strict=True)
    maps = [build_time_map(kind, s_off, t_off, s_seg, t_seg) for s_off, t_off, s_seg, t_seg in samples]
    lengths = [len(t_off) for t_off in teacher_offsets]  # T_t per sample
    return stack_time_maps(maps, lengths, max(lengths))


def align_batch(
    x: torch.Tensor,  # [B, T_pad, L_t, D_t]
    layer_map: torch.Tensor,  # [L_s, L_t]
    time_map: TimeMap,  # from batch_time_map: [sum T_s, B * T_pad]
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,  # mean [L_s, D_t], components [L_s, D_t, D]
) -> torch.Tensor:
    """A padded batch -> [sum T_s, L_s, D], padding dropped. Layer map and projection first, on
    the whole padded tensor (they act per token and commute with the time map: its rows sum to 1)."""
    x = map_layers(x, layer_map, projection)  # [B, T_pad, L_s, D]
    return time_map.apply(x.reshape(-1, *x.shape[2:]))


def compress_batch(
    k: torch.Tensor,  # [B, T_pad, L_t, D_t] pre-RoPE keys
    v: torch.Tensor,  # [B, T_pad, L_t, D_t]
    importance: torch.Tensor,  # [B, L_t, H_t, T_pad] from rkv.importance_from_attention
    reasoning: list[np.ndarray],  # per sample [T_t] bool: its chain-of-thought tokens (len = its length)
    slots: int,
    lam: float,
    layer_map: torch.Tensor,  # [L_s, L_t]
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,  # as in align_batch, for [.., 2D_t]
) -> dict[str, torch.Tensor]:
    """R-KV per sample on its own (unpadded) teacher grid, then K and V side by side through the
    layer map and projection: {"kv" [B, M, L_s, 2D], "mask" [B, M] bool, "pos" [B, M, L_t, H_t]
    long (-1 in padding slots)}. Padding slots stay exactly 0."""
    out = []
    for b, r in enumerate(reasoning):
        T = len(r)  # this sample's teacher tokens: padding is never scored
        out.append(
            compress(k[b, :T], v[b, :T], importance[b, ..., :T], torch.as_tensor(r, device=k.device), slots, lam)
        )
    mask = torch.stack([o["mask"] for o in out])  # [B, M]
    kv = torch.stack([torch.cat([o["k"], o["v"]], dim=-1) for o in out])  # [B, M, L_t, 2D_t]
    # A projection would move padding to -mean @ components; the mask puts it back to 0.
    kv = map_layers(kv, layer_map, projection) * mask[:, :, None, None]  # [B, M, L_s, 2D]
    return {"kv": kv, "mask": mask, "pos": torch.stack([o["pos"] for o in out])}
