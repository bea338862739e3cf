"""The store's errors (one module, so every reader can raise them without import cycles)."""

from __future__ import annotations

__all__ = ["StoreError", "CorruptShard"]


class StoreError(RuntimeError):
    """The store is missing, incomplete, or inconsistent; the message names what and where."""


class CorruptShard(StoreError):
    """A shard file's index or chunk does not decode; the message names the file."""
