"""The alignment of one sample, end to end: teacher K or V [T_t, L_t, D_t] -> layer map ->
time map onto the student's tokens -> optional fixed projection -> [T_s, L_s, D].

Pure functions of arrays; the dump decides what to pass (it knows tokenizers and texts)."""

from __future__ import annotations

import numpy as np
import torch

from .layers import apply_layer_map
from .time import TimeMap, char_overlap_time_map, segment_time_map

__all__ = ["TIME_MAPS", "resolve_time_map", "build_time_map", "map_layers", "align_kv"]

TIME_MAPS = ("identity", "char_overlap", "segment_linear")


def resolve_time_map(requested: str, same_tokenizer: bool, same_text: bool) -> str:
    """Pick (for "auto") or check the time map from what teacher and student read.

    identity: same tokenizer and same text, so the tokens are identical;
    char_overlap: same text, other tokenizer (IoU of character spans is meaningful);
    segment_linear: other text (another template or reasoning style): resample per segment."""
    if requested == "auto":
        if same_text:
            return "identity" if same_tokenizer else "char_overlap"
        return "segment_linear"
    if requested == "identity" and not (same_tokenizer and same_text):
        raise ValueError(
            "time_map 'identity' needs the student's tokenizer and prompt template on the teacher; "
            "use time_map 'auto' (or char_overlap / segment_linear)"
        )
    if requested == "char_overlap" and not same_text:
        raise ValueError(
            "time_map 'char_overlap' needs teacher and student to read the same text (same prompt "
            "template); with different templates use 'segment_linear' or 'auto'"
        )
    if requested not in TIME_MAPS:
        raise ValueError(f"unknown time map {requested!r}; choose one of {('auto', *TIME_MAPS)}")
    return requested


def build_time_map(
    kind: str,
    student_offsets: np.ndarray,  # [T_s, 2]
    teacher_offsets: np.ndarray,  # [T_t, 2]
    student_segments: np.ndarray,  # [T_s]
    teacher_segments: np.ndarray,  # [T_t]
) -> TimeMap | None:
    """None means identity (the teacher rows are the student rows)."""
    if kind == "identity":
        if len(student_offsets) != len(teacher_offsets):
            raise ValueError(
                f"identity time map with {len(teacher_offsets)} teacher vs {len(student_offsets)} student tokens"
            )
        return None
    if kind == "char_overlap":
        return char_overlap_time_map(student_offsets, teacher_offsets)
    if kind == "segment_linear":
        return segment_time_map(student_segments, teacher_segments)
    raise ValueError(f"unknown time map {kind!r}")


def map_layers(
    x: torch.Tensor,  # [..., L_t, D_t]
    layer_map: torch.Tensor,  # [L_s, L_t]
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,  # mean [L_s, D_t], components [L_s, D_t, D]
) -> torch.Tensor:
    """Layer map, then the optional per-layer projection: -> [..., L_s, D]. Both act per token,
    so `batch.align_batch` runs them on whole padded batches before the time map (they commute
    with it: time-map rows sum to 1)."""
    x = apply_layer_map(layer_map, x)
    if projection is not None:
        mean, comp = projection
        x = torch.einsum("...ld,lde->...le", x - mean.to(x.dtype), comp.to(x.dtype))
    return x


def align_kv(
    x: torch.Tensor,  # [T_t, L_t, D_t]
    layer_map: torch.Tensor,  # [L_s, L_t]
    time_map: TimeMap | None,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One sample: -> [T_s, L_s, D] (D = D_t without projection)."""
    x = map_layers(x, layer_map, projection)
    return x if time_map is None else time_map.apply(x)
