"""The KV store: zarr v3 shards with atomic commit, readers, finalize (index.parquet), inspect;
and the same records as webdataset tars (store/wds.py)."""

from kvdistill.schemas import StoreSpec, TeacherSpec

from .wds import WdsShardWriter, is_wds_store, wds_samples, wds_stream, wds_to_zarr, zarr_to_wds  # noqa: E402
from .zarr_store import (
    ShardReader,
    ShardWriter,
    StoreError,
    compression,
    finalize,
    format_inspect,
    init_store,
    init_teacher,
    inspect,
    open_root,
    read_index,
    read_kv,
    read_store_spec,
    read_teacher_specs,
    shard_is_complete,
    shard_name,
)


def open_specs(path) -> tuple[StoreSpec, dict[str, TeacherSpec]]:
    """(StoreSpec, {teacher: TeacherSpec}) of a store, either backend."""
    return read_store_spec(path), read_teacher_specs(path)


__all__ = [
    "open_specs",
    "is_wds_store",
    "WdsShardWriter",
    "wds_samples",
    "wds_stream",
    "wds_to_zarr",
    "zarr_to_wds",
    "ShardReader",
    "ShardWriter",
    "StoreError",
    "compression",
    "finalize",
    "format_inspect",
    "init_store",
    "init_teacher",
    "inspect",
    "open_root",
    "read_index",
    "read_kv",
    "read_store_spec",
    "read_teacher_specs",
    "shard_is_complete",
    "shard_name",
]
