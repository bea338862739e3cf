"""The KV store: zarr v3 shards with atomic commit, readers, finalize (index.parquet), inspect."""

from .zarr_store import (
    ShardReader,
    ShardWriter,
    StoreError,
    finalize,
    format_inspect,
    init_store,
    init_teacher,
    inspect,
    read_store_spec,
    read_teacher_specs,
    shard_is_complete,
    shard_name,
)

__all__ = [
    "ShardReader",
    "ShardWriter",
    "StoreError",
    "finalize",
    "format_inspect",
    "init_store",
    "init_teacher",
    "inspect",
    "read_store_spec",
    "read_teacher_specs",
    "shard_is_complete",
    "shard_name",
]
