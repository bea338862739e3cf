"""`finalize`: check that every teacher holds every shard, complete, not stale and with the same
samples, then write index.parquet (layout.INDEX_SCHEMA) and the consolidated metadata readers
open (reader.open_root), and record both's checksums in the store's root attributes
(attrs["kvdistill"]["finalized"]). `check_finalized`: what a reader checks before it trusts
them (the trainer's check_store)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .errors import CorruptShard, StoreError, names_path
from .layout import (
    INDEX,
    INDEX_COLUMNS,
    INDEX_SCHEMA,
    KEY,
    group_attrs,
    partial_attempts,
    read_store_spec,
    read_teacher_specs,
    shard_attrs,
    shard_is_complete,
    shard_name,
    shard_record_problems,
    tar_path,
    teacher_dir,
)
from .reader import ShardReader, read_index

__all__ = ["finalize", "check_finalized", "metadata_problems"]

FINALIZED = "finalized"  # attrs["kvdistill"][FINALIZED]: {"index": {"sha256", "bytes"}, "consolidated_sha256"}


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
    empty = [
        name
        for name in teachers
        if not any(
            (shard_attrs(teacher_dir(path, name) / shard_name(i)) or {}).get("rows") for i in range(spec.num_shards)
        )
    ]
    if empty:
        raise StoreError(
            f"cannot finalize {path}: teacher(s) {empty} hold 0 rows in all {spec.num_shards} shard(s); the dumps read"
            " no samples (an empty data file or a filter that left none?): fix the data, delete the store and dump"
            " again"
        )
    cols: dict[str, list] = {k: [] for k in INDEX_COLUMNS}
    for i in range(spec.num_shards):
        first = None
        for name in teachers:
            r = ShardReader(path, name, i) if spec.backend == "zarr" else _TarIndex(path, name, i)
            attrs = shard_attrs(teacher_dir(path, name) / shard_name(i)) or {}
            if (len(r), int(r.offsets[-1])) != (attrs.get("samples"), attrs.get("rows")):
                raise StoreError(
                    f"cannot finalize {path}: teacher {name!r} {shard_name(i)} holds {len(r)} samples /"
                    f" {int(r.offsets[-1])} rows, its completion record says {attrs.get('samples')} /"
                    f" {attrs.get('rows')}; run `kvdistill store verify {path}`, delete the shard and re-run its dump"
                    " task, then finalize again"
                )
            if first is None:
                first = (name, r.sample_ids, r.offsets, attrs)
            elif r.sample_ids != first[1] or not np.array_equal(r.offsets, first[2]):
                raise StoreError(_other_samples(i, (name, r.sample_ids, r.offsets, attrs), first))
            n = len(r)
            cols["teacher"] += [name] * n
            cols["shard"] += [i] * n
            cols["sample_id"] += r.sample_ids
            cols["sample_index"] += list(range(n))
            cols["row_start"] += r.offsets[:-1].tolist()
            cols["row_stop"] += r.offsets[1:].tolist()
            cols["length"] += np.diff(r.offsets).tolist()
    stale = []
    for name, tspec in teachers.items():
        for i in range(spec.num_shards):
            attrs = shard_attrs(teacher_dir(path, name) / shard_name(i)) or {}
            stale += [
                f"teacher {name!r} {shard_name(i)}: {what}" for what in shard_record_problems(attrs, spec, tspec, i)
            ]
    if stale:
        raise StoreError(
            f"cannot finalize {path}: {len(stale)} problem(s) with shards that do not match the store (`kvdistill"
            " store verify` lists them too):\n  "
            + "\n  ".join(stale)
            + "\ndelete each of those shards and re-run its dump task (`kvdistill dump --teacher-name T --shard I"
            " ...`), then finalize again"
        )
    tmp = path / f".{INDEX}.tmp"
    pq.write_table(pa.table(cols, schema=INDEX_SCHEMA), tmp)  # typed even with no rows at all
    index = tmp.read_bytes()
    os.replace(tmp, path / INDEX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not yet part of the v3 spec"
        zarr.consolidate_metadata(str(path))
    _record_checksums(path, index)
    return path / INDEX


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _consolidated_sha256(doc: dict) -> str:
    """Of the root zarr.json's consolidated metadata (every group's and array's metadata, the
    shards' records included), as canonical JSON: the root's own attributes are not part of it."""
    return _sha256(json.dumps(doc.get("consolidated_metadata"), sort_keys=True, separators=(",", ":")).encode())


def _root_doc(path: Path) -> dict:
    group_attrs(
        path, "restore the store's root metadata from a copy, or run `kvdistill store finalize` again"
    )  # CorruptShard naming it
    return json.loads((path / "zarr.json").read_text())


def _record_checksums(path: Path, index: bytes) -> None:
    """The sha256 of index.parquet (its bytes `index`) and of the consolidated metadata, into the
    root's attrs["kvdistill"]["finalized"]; the root zarr.json is replaced atomically (written
    beside, renamed), after consolidation, which rewrote it."""
    doc = _root_doc(path)
    doc["attributes"][KEY][FINALIZED] = {
        "index": {"sha256": _sha256(index), "bytes": len(index)},
        "consolidated_sha256": _consolidated_sha256(doc),
    }
    tmp = path / ".zarr.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path / "zarr.json")


def metadata_problems(path: str | Path) -> list[str]:
    """How index.parquet and the consolidated metadata differ from the checksums `finalize`
    recorded ([] when they match, or for a store finalized before kvdistill recorded them)."""
    path = Path(path)
    record = (group_attrs(path, "restore the store's root metadata from a copy").get(KEY) or {}).get(FINALIZED)
    if not record:
        return []
    out = []
    f = path / INDEX
    if f.exists():
        data = f.read_bytes()
        want = record["index"]
        if _sha256(data) != want["sha256"]:
            out.append(
                f"{f} fails its checksum ({len(data)} bytes, sha256 {_sha256(data)[:16]}..., finalize wrote"
                f" {want['bytes']} bytes, sha256 {want['sha256'][:16]}...): corrupt, or changed since `kvdistill store"
                " finalize`"
            )
    if _consolidated_sha256(_root_doc(path)) != record["consolidated_sha256"]:
        out.append(
            f"the consolidated metadata in {path / 'zarr.json'} fails its checksum: corrupt, or rewritten since"
            " `kvdistill store finalize`"
        )
    return out


def check_finalized(path: str | Path, teachers: list[str] | None = None) -> None:
    """What a reader checks before it trusts a finalized store's metadata (the trainer, through
    train.student.check_store): index.parquet and the consolidated metadata have the checksums
    finalize recorded (CorruptShard otherwise, naming the file); every shard 0..num_shards-1 of
    every teacher in `teachers` (default: all) is complete and its record passes the checks
    `store verify` makes of it (not stale: layout.shard_record_problems); and index.parquet lists
    each of them with exactly the samples and rows its record counts, and nothing beyond
    (StoreError naming each problem otherwise)."""
    path = Path(path)
    spec, specs = read_store_spec(path), read_teacher_specs(path)
    teachers = sorted(specs) if teachers is None else list(teachers)
    if not (path / INDEX).exists():
        raise StoreError(f"store {path} is not finalized (no {INDEX}); run `kvdistill store finalize {path}`")
    bad = metadata_problems(path)
    if bad:
        raise CorruptShard(
            f"store {path}: "
            + "; ".join(bad)
            + f"; run `kvdistill store verify {path}`, then `kvdistill store finalize {path}` again"
        )
    index = read_index(path, teachers)
    problems = []
    for name in teachers:
        for i in range(spec.num_shards):
            attrs = shard_attrs(teacher_dir(path, name) / shard_name(i))
            where = f"teacher {name!r} {shard_name(i)}"
            if not attrs or not attrs.get("complete"):
                problems.append(f"{where}: missing or incomplete")
                continue
            problems += [f"{where}: {what}" for what in shard_record_problems(attrs, spec, specs[name], i)]
            offsets, ids = index.pop((name, i), (np.zeros(1, np.int64), []))
            have, want = (len(ids), int(offsets[-1])), (attrs.get("samples"), attrs.get("rows"))
            if have != want or int(offsets[0]) != 0:
                problems.append(
                    f"{where}: index.parquet lists {have[0]} samples / {have[1]} rows from row {int(offsets[0])}, the"
                    f" shard records {want[0]} / {want[1]} from row 0"
                )
    problems += [
        f"teacher {name!r} {shard_name(i)}: index.parquet lists {len(ids)} samples of a shard the store does not hold"
        for (name, i), (_, ids) in sorted(index.items())
    ]
    if problems:
        raise StoreError(
            f"store {path} does not match its index.parquet, or holds shards that do not match the store:\n  "
            + "\n  ".join(problems)
            + f"\nrun `kvdistill store verify {path}`; re-dump what it names, then `kvdistill store finalize {path}`"
            " again"
        )


class _TarIndex:
    """sample_ids / offsets of a webdataset shard, from the JSON written beside its tar."""

    def __init__(self, path: Path, teacher: str, shard: int) -> None:
        attrs = shard_attrs(teacher_dir(path, teacher) / shard_name(shard))
        self.sample_ids, self.offsets = attrs["sample_ids"], np.asarray(attrs["offsets"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sample_ids)


def _other_samples(shard: int, this: tuple, first: tuple) -> str:
    """Why teacher `this` (name, sample ids, offsets, shard attrs) of a shard holds other samples
    than teacher `first` (the same), and the fix: skips over max_len only one of them made, or other data."""
    (name, ids, _, attrs), (name0, ids0, _, attrs0) = this, first
    head = f"{shard_name(shard)}: teacher {name!r} holds other samples (or lengths) than teacher {name0!r}"
    only = {name: sorted(set(ids0) - set(ids)), name0: sorted(set(ids) - set(ids0))}  # skipped by one only
    skipped = {name: set(attrs.get("skipped", [])), name0: set(attrs0.get("skipped", []))}
    if any(only.values()) and all(set(miss) <= skipped[t] for t, miss in only.items()):
        who = "; ".join(
            f"{t!r} skipped {len(miss)} over max_len {a.get('max_len')} that the other holds (e.g. {miss[0]!r})"
            for (t, miss), a in zip(only.items(), (attrs, attrs0), strict=True)
            if miss
        )
        return (
            f"{head}: {who}. Dump every teacher of a store in one jobs config (or pass --length-teachers with all"
            " of them): a sample too long for any teacher is then skipped by all; or raise --max-len. Delete the"
            " teachers' shards and re-run their dump tasks, then finalize"
        )
    return f"{head}; every teacher must be dumped from the same data, split, num_shards and student tokenizer"
