"""The store's errors (one module, so every reader can raise them without import cycles).

The CLI maps them to exit codes (README, "Exit codes"): StoreError -> bad input, CorruptShard
-> data integrity, ShardBusy -> busy."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["StoreError", "CorruptShard", "ShardBusy", "ShardComplete", "names_path"]


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


@contextmanager
def names_path(path: Path):
    """An OSError without a file name (zarr's writes: "No space left on device") gets `path`, so
    the one-line error says where the disk is full or read-only."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
