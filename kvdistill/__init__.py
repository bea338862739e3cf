"""kvdistill: distil teacher reasoning into a student through its KV cache, offline."""

__version__ = "0.1.0"
