"""Pure tensor math for aligning a teacher's KV onto the student's geometry; no I/O."""

from .heads import flatten_heads, unflatten_heads
from .layers import apply_layer_map, ratio_layer_map

__all__ = ["flatten_heads", "unflatten_heads", "apply_layer_map", "ratio_layer_map"]
