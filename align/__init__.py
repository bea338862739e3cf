"""Pure tensor math for aligning a teacher's KV onto the student's geometry; no I/O.

layers: ratio / CKA top-k layer maps; time: identity, char-overlap and per-segment linear
time maps; heads: GQA-aware flattening; rope: rotate / derotate; cka: debiased linear CKA;
projection: per-layer PCA; pipeline: one sample end to end; batch: a padded batch at once (the
dump's), equal to aligning each sample alone."""

from .batch import align_batch, batch_time_map, compress_batch, kv_block_projection
from .cka import (
    cka_matrix,
    layer_map_from_json,
    layer_map_to_json,
    linear_cka,
    linear_hsic_unbiased,
    masked_tokens,
    topk_layer_map,
)
from .heads import flatten_heads, unflatten_heads
from .layers import apply_layer_map, ratio_layer_map
from .pipeline import align_kv, build_time_map, map_layers, resolve_time_map
from .projection import (
    fit_layer_pca,
    fit_pca,
    project,
    project_layers,
    reconstruct,
    reconstruct_layers,
)
from .rope import derotate, rotate
from .time import (
    TimeMap,
    char_overlap_time_map,
    identity_time_map,
    linear_resample_time_map,
    segment_time_map,
)

__all__ = [
    "TimeMap",
    "align_batch",
    "align_kv",
    "apply_layer_map",
    "batch_time_map",
    "build_time_map",
    "char_overlap_time_map",
    "cka_matrix",
    "compress_batch",
    "derotate",
    "fit_layer_pca",
    "fit_pca",
    "flatten_heads",
    "identity_time_map",
    "kv_block_projection",
    "layer_map_from_json",
    "layer_map_to_json",
    "linear_cka",
    "linear_hsic_unbiased",
    "linear_resample_time_map",
    "map_layers",
    "masked_tokens",
    "project",
    "project_layers",
    "ratio_layer_map",
    "reconstruct",
    "reconstruct_layers",
    "resolve_time_map",
    "rotate",
    "segment_time_map",
    "topk_layer_map",
    "unflatten_heads",
]
