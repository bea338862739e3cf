"""The KV store: zarr v3 shards with atomic commit, or the same records as webdataset tars.

layout.py    names, paths, the index schema, store / teacher specs, the dump's tokenizers
errors.py    StoreError and its kinds (the CLI maps them to exit codes)
writer.py    ShardWriter and the one-writer-per-shard protocol (both backends); lock.py
rows.py      read layer 1: one array's rows, every chunk checked
reader.py    read layer 2: ShardReader (one shard), kv_rows, open_root, read_index
codecs.py    K/V codecs: float16 / bfloat16 / int8 / int4
index.py     finalize: index.parquet and consolidated metadata
summary.py   inspect / format_inspect
samples.py   read layer 3: a zarr store's samples in the trainer's format, read ahead
wds_writer.py  WdsShardWriter: the webdataset backend's tars and their completion records
wds_reader.py  a webdataset shard's records, every byte checked (tar_records), as samples
convert.py     `kvdistill store convert`: either backend to either
backend.py   open_shard_writer / shard_samples / read_sample: either backend behind one call
verify.py, stats.py, plan.py, cli.py   `kvdistill store verify / stats / plan / ...`
"""

from kvdistill.schemas import StoreSpec, TeacherSpec

from .backend import open_shard_writer, read_sample, shard_samples
from .convert import wds_to_zarr, zarr_to_wds
from .errors import StoreError
from .index import finalize
from .layout import (
    init_store,
    init_teacher,
    init_tokenizer,
    is_wds_store,
    read_store_spec,
    read_teacher_specs,
    shard_is_complete,
    shard_name,
)
from .reader import ShardReader, kv_rows, open_root, read_index
from .summary import format_inspect, inspect
from .wds_reader import wds_samples
from .wds_writer import WdsShardWriter
from .writer import ShardWriter, compression


def open_specs(path) -> tuple[StoreSpec, dict[str, TeacherSpec]]:
    """(StoreSpec, {teacher: TeacherSpec}) of a store, either backend."""
    return read_store_spec(path), read_teacher_specs(path)


__all__ = [
    "open_specs",
    "open_shard_writer",
    "read_sample",
    "shard_samples",
    "is_wds_store",
    "WdsShardWriter",
    "wds_samples",
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
    "init_tokenizer",
    "inspect",
    "open_root",
    "read_index",
    "kv_rows",
    "read_store_spec",
    "read_teacher_specs",
    "shard_is_complete",
    "shard_name",
]
