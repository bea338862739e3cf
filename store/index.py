"""`finalize`: check that every teacher holds every shard, complete and with the same samples,
then write index.parquet (layout.INDEX_SCHEMA) and the consolidated metadata readers open
(reader.open_root)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .errors import StoreError, names_path
from .layout import (
    INDEX,
    INDEX_COLUMNS,
    INDEX_SCHEMA,
    partial_attempts,
    read_store_spec,
    read_teacher_specs,
    shard_attrs,
    shard_is_complete,
    shard_name,
    tar_path,
    teacher_dir,
)
from .reader import ShardReader

__all__ = ["finalize"]


def finalize(path: str | Path) -> Path:
    """Check every teacher has every shard complete and identical sample ids across teachers,
    then write index.parquet and consolidated metadata. Refuses (StoreError) otherwise."""
    with names_path(Path(path)):
        return _finalize(Path(path))


def _finalize(path: Path) -> Path:
    spec = read_store_spec(path)
    teachers = read_teacher_specs(path)
    if not teachers:
        raise StoreError(f"store {path} holds no teachers yet; run `kvdistill dump` first")
    problems = []
    for name in teachers:
        for i in range(spec.num_shards):
            if not ((teacher_dir(path, name) / shard_name(i)).exists() or tar_path(path, name, i).exists()):
                partial = partial_attempts(path, name, i)
                state = "partial (its task did not finish)" if partial else "missing"
                problems.append(f"teacher {name!r} {shard_name(i)}: {state}")
            elif not shard_is_complete(path, name, i):
                problems.append(f"teacher {name!r} {shard_name(i)}: incomplete")
    if problems:
        raise StoreError(
            f"cannot finalize {path}: {len(problems)} shard(s) not complete:\n  "
            + "\n  ".join(problems)
            + "\nre-run those dump tasks (`kvdistill dump --shard I ...`), then finalize again"
        )
    empty = [name for name in teachers if not any((shard_attrs(teacher_dir(path, name) / shard_name(i)) or {}).get("rows") for i in range(spec.num_shards))]
    if empty:
        raise StoreError(
            f"cannot finalize {path}: teacher(s) {empty} hold 0 rows in all {spec.num_shards} shard(s); the dumps read no "
            "samples (an empty data file or a filter that left none?): fix the data, delete the store and dump again"
        )
    cols: dict[str, list] = {k: [] for k in INDEX_COLUMNS}
    for i in range(spec.num_shards):
        first = None
        for name in teachers:
            r = ShardReader(path, name, i) if spec.backend == "zarr" else _TarIndex(path, name, i)
            if first is None:
                first = (name, r.sample_ids, r.offsets)
            elif r.sample_ids != first[1] or not np.array_equal(r.offsets, first[2]):
                raise StoreError(
                    f"{shard_name(i)}: teacher {name!r} holds other samples (or lengths) than "
                    f"teacher {first[0]!r}; every teacher must be dumped from the same data, "
                    "split, num_shards and student tokenizer"
                )
            n = len(r)
            cols["teacher"] += [name] * n
            cols["shard"] += [i] * n
            cols["sample_id"] += r.sample_ids
            cols["sample_index"] += list(range(n))
            cols["row_start"] += r.offsets[:-1].tolist()
            cols["row_stop"] += r.offsets[1:].tolist()
            cols["length"] += np.diff(r.offsets).tolist()
    tmp = path / f".{INDEX}.tmp"
    pq.write_table(pa.table(cols, schema=INDEX_SCHEMA), tmp)  # typed even with no rows at all
    os.replace(tmp, path / INDEX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not yet part of the v3 spec"
        zarr.consolidate_metadata(str(path))
    return path / INDEX


class _TarIndex:
    """sample_ids / offsets of a webdataset shard, from the JSON written beside its tar."""

    def __init__(self, path: Path, teacher: str, shard: int) -> None:
        attrs = shard_attrs(teacher_dir(path, teacher) / shard_name(shard))
        self.sample_ids, self.offsets = attrs["sample_ids"], np.asarray(attrs["offsets"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sample_ids)
