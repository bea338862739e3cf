"""The store's errors (one module, so every reader can raise them without import cycles).

The CLI maps them to exit codes (README, "Exit codes"): StoreError -> bad input, CorruptShard
-> data integrity, ShardBusy -> busy."""

from __future__ import annotations

__all__ = ["StoreError", "CorruptShard", "ShardBusy", "ShardComplete"]


class StoreError(RuntimeError):
    """The store is missing, incomplete, or inconsistent; the message names what and where."""


class CorruptShard(StoreError):
    """A shard file's index or chunk fails its checksum, does not decode, or is missing; the
    message names store, teacher, shard, array and chunk (file)."""


class ShardBusy(StoreError):
    """Another live writer owns the (teacher, shard); the message names it (host, pid, start)."""


class ShardComplete(StoreError):
    """The shard this writer was about to write is complete already (another task finished it
    while this one waited for the lock): nothing to do."""
