"""`kvdistill store convert`: a new store with the records of another, either backend to either
(zarr <-> webdataset, or zarr -> zarr with another codec or compression), in the same order.
Every source chunk / tar is read checked (store/rows.py, store/wds_reader.py) and written by the
target backend's own writer (store/writer.py, store/wds_writer.py), so a converted store is one
a dump could have written; a zarr -> zarr teacher whose codec stays is copied as stored."""

from __future__ import annotations

import os
import shutil
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from . import codecs
from .errors import CorruptShard, StoreError, names_path
from .index import finalize
from .layout import (
    init_store,
    init_teacher,
    init_tokenizer,
    partial_dir,
    read_store_spec,
    read_teacher_specs,
    read_tokenizer,
    shard_attrs,
    shard_name,
    teacher_dir,
)
from .reader import ShardReader
from .wds_reader import wds_samples
from .wds_writer import WDS_CODECS, WdsShardWriter
from .writer import WRITE_ALL, ShardWriter, acquire_shard, compression, release_shard

__all__ = ["convert", "zarr_to_wds", "wds_to_zarr"]

_DUMP_ATTRS = (
    "skipped",
    "max_len",
    "fingerprint",
    "data_fingerprint",
)  # the dump's part of a shard's record, carried over


def convert(
    src: str | Path,
    dst: str | Path,
    backend: str | None = None,
    kv_dtype: str | None = None,
    *,
    compression_level: int | None = None,
    blosc_shuffle: str | None = None,
) -> Path:
    """A new store at `dst` with the records of `src`, in the same order, as `backend` (default:
    the other backend). K/V keep their codec where the target holds it (zarr: any; webdataset:
    float16 / float32); `kv_dtype` re-stores every teacher in that codec instead. A quantised or
    bfloat16 teacher bound for webdataset without `kv_dtype` is refused before anything is
    written. Every source chunk / tar is read checked; on any failure `dst` is removed.

    zarr -> zarr, a teacher whose codec stays (no `kv_dtype`, or `kv_dtype` equal to its own):
    every array of its shards is copied as stored, block by block (one zarr shard of an array at
    a time, never a whole shard in memory): int8 / int4 codes with their float16 scales and
    zeros, bfloat16 bit patterns, tokens, latent arrays, ids, and the shard's completion record,
    bit for bit (each array's crc32 checked against that record as it is copied), never
    decoded and quantised again. Only the blosc level / shuffle of the chunks change, where
    `compression_level` / `blosc_shuffle` ask (zarr target only; default: the source store's).
    A teacher whose codec changes, or any teacher crossing backends, is decoded to float and
    encoded with the target codec."""
    src, dst = Path(src), Path(dst)
    spec, teachers = read_store_spec(src), read_teacher_specs(src)
    backend = backend or ("zarr" if spec.backend == "webdataset" else "webdataset")
    if backend not in ("zarr", "webdataset"):
        raise ValueError(f"backend: 'zarr' or 'webdataset', got {backend!r}")
    if kv_dtype is not None and kv_dtype not in ("float32", *codecs.CODECS):
        raise ValueError(f"kv_dtype: one of {['float32', *codecs.CODECS]}, got {kv_dtype!r}")
    if backend == "webdataset" and kv_dtype is not None and kv_dtype not in WDS_CODECS:
        raise StoreError(
            f"--kv-dtype {kv_dtype}: webdataset tars hold float16 or float32 K/V; pass --kv-dtype float16 or float32,"
            " or convert to zarr"
        )
    if compression_level is not None and not (isinstance(compression_level, int) and 0 <= compression_level <= 9):
        raise ValueError(f"compression_level: blosc levels are 0 (none) to 9, got {compression_level!r}")
    if blosc_shuffle is not None and blosc_shuffle not in ("byte", "bit"):
        raise ValueError(f"blosc_shuffle: 'byte' or 'bit', got {blosc_shuffle!r}")
    if backend == "webdataset" and (compression_level, blosc_shuffle) != (None, None):
        raise StoreError(
            "--compression-level / --blosc-shuffle: webdataset tars store K/V uncompressed; drop them, or convert to"
            " zarr"
        )
    if not teachers:
        raise StoreError(f"{src} holds no teachers; nothing to convert")
    targets = {name: kv_dtype or t.kv_dtype for name, t in teachers.items()}
    unfit = {
        n: c for n, c in targets.items() if backend == "webdataset" and c not in WDS_CODECS
    }  # only without kv_dtype
    if unfit:
        what = (
            f"teacher {next(iter(unfit))!r} is stored as {next(iter(unfit.values()))}, which webdataset tars cannot"
            " hold"
            if len(unfit) == 1
            else "teachers "
            + ", ".join(f"{n!r} ({c})" for n, c in unfit.items())
            + " are stored in codecs webdataset tars cannot hold"
        )
        raise StoreError(
            f"{what}; pass --kv-dtype float16 or float32 to store {'it' if len(unfit) == 1 else 'them'} decoded, or"
            " keep the zarr store"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise StoreError(f"{dst} exists; convert writes a new store: pick another path or delete it")
    made = not dst.exists()
    level = {
        k: v for k, v in (("compression_level", compression_level), ("blosc_shuffle", blosc_shuffle)) if v is not None
    }
    try:
        _convert(src, dst, spec, teachers, backend, targets, kv_dtype, level)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # nothing half-made is left behind
        if not made:
            dst.mkdir()
        raise
    return dst


def _convert(
    src: Path,
    dst: Path,
    spec,
    teachers: dict,
    backend: str,
    targets: dict[str, str],
    kv_dtype: str | None,
    level: dict[str, Any],
) -> None:
    store_codec = kv_dtype or spec.kv_dtype
    if backend == "webdataset" and store_codec not in WDS_CODECS:
        store_codec = next(iter(targets.values()))
    out = type(spec).from_dict(
        {
            **spec.to_dict(),
            **level,
            "backend": backend,
            "kv_dtype": store_codec,
            "teacher_kv_dtype": {n: c for n, c in targets.items() if c != store_codec},
        }
    )
    init_store(dst, out)
    writer_cls = ShardWriter if backend == "zarr" else WdsShardWriter
    kw = compression(out) if backend == "zarr" else {}
    for who in (None, *teachers):  # the dump's tokenizers, where recorded
        if (tok := read_tokenizer(src, who)) is not None:
            init_tokenizer(dst, *tok, teacher=who)
    for name, t in teachers.items():
        init_teacher(dst, type(t).from_dict({**t.to_dict(), "kv_dtype": targets[name]}), _projection(src, name))
        as_stored = spec.backend == backend == "zarr" and targets[name] == t.kv_dtype
        for i in range(spec.num_shards):
            if as_stored:  # same codec, zarr to zarr: the stored arrays as they are
                _copy_shard(src, dst, name, i, level)
                continue
            slots = t.latent.slots if t.latent else None
            rec = shard_attrs(teacher_dir(src, name) / shard_name(i)) or {}
            with writer_cls(
                dst,
                name,
                i,
                num_layers=spec.geometry.num_layers,
                width=t.width,
                codec=targets[name],
                latent_slots=slots,
                **kw,
            ) as w:
                for s in wds_samples(src, [name], i) if spec.backend == "webdataset" else _zarr_samples(src, name, i):
                    k, v = s["kv"][name]
                    w.write(
                        s["sample_id"],
                        k,
                        v,
                        s["input_ids"],
                        s["loss_mask"],
                        s.get("segment_ids"),
                        s.get("latent", {}).get(name),
                        s.get("example"),
                    )
                w.close(extra_attrs={a: rec[a] for a in _DUMP_ATTRS if a in rec})
    finalize(dst)


def _recompress(codec, level: dict[str, Any]):
    """A K/V chunk compressor with the blosc level / shuffle `level` asks for (others as they are)."""
    if not level or not isinstance(codec, BloscCodec):
        return codec
    shuffle = (
        {"byte": BloscShuffle.shuffle, "bit": BloscShuffle.bitshuffle}[level["blosc_shuffle"]]
        if "blosc_shuffle" in level
        else codec.shuffle
    )
    return BloscCodec(
        typesize=codec.typesize,
        cname=codec.cname,
        clevel=level.get("compression_level", codec.clevel),
        shuffle=shuffle,
        blocksize=codec.blocksize,
    )


def _copy_shard(src: Path, dst: Path, teacher: str, shard: int, level: dict[str, Any]) -> Path:
    """Copy one complete zarr shard into `dst` as stored: every array with its dtype, chunks,
    zarr shards and codecs (blosc level / shuffle as `level` asks), one zarr shard of rows at
    a time, read through ShardReader's checked readers (every chunk's crc32c, none missing) and
    checked against the record's crc32; then the record itself. Written in `.partial/` and
    renamed into place under the shard's lock, as ShardWriter does."""
    r = ShardReader(src, teacher, shard)
    want = r.attrs.get("crc32") or {}
    lock = acquire_shard(dst, teacher, shard)
    tmp = partial_dir(dst, teacher) / f"{shard_name(shard)}.{socket.gethostname()}-{os.getpid()}"
    final = teacher_dir(dst, teacher) / shard_name(shard)
    try:
        with names_path(tmp):
            group = zarr.open_group(tmp, mode="w")
            for name in r.names:
                a = r.array(name)
                out = group.create_array(
                    name,
                    shape=a.shape,
                    dtype=a.dtype,
                    chunks=a.chunks,
                    shards=a.shards,
                    filters=a.filters,
                    serializer=a.serializer,
                    compressors=[_recompress(c, level) for c in a.compressors],
                    fill_value=a.fill_value,
                    attributes=dict(a.attrs),
                    chunk_key_encoding=a.metadata.chunk_key_encoding,
                    dimension_names=a.metadata.dimension_names,
                    config=WRITE_ALL,
                )
                if a.ndim == 0:
                    out[()] = a[()]
                    continue
                crc, step, rows = 0, max(1, (a.shards or a.chunks)[0]), r.reader(name)
                for start in range(0, a.shape[0], step):
                    block = rows[start : start + step]
                    out[start : start + len(block)] = block
                    if name in want:
                        crc = zlib.crc32(np.ascontiguousarray(block).tobytes(), crc)
                if name in want and crc != want[name]:
                    raise CorruptShard(
                        f"{r.dir}: array {name!r} reads back with crc32 {crc:08x}, its record says {want[name]:08x};"
                        f" run `kvdistill store verify {src}`"
                    )
            group.attrs.update(dict(zarr.open_group(r.dir, mode="r").attrs))  # the completion record (KEY), last
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)  # atomic: the shard appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_shard(lock, dst, teacher)
    return final


def _projection(src: Path, teacher: str) -> dict[str, np.ndarray] | None:
    """The teacher's stored PCA projection arrays (teachers/<name>/projection/), if any."""
    group = zarr.open_group(teacher_dir(src, teacher), mode="r")
    if "projection" not in group:
        return None
    return {n: a[...] for n, a in group["projection"].arrays()}


def _zarr_samples(src: Path, teacher: str, shard: int) -> Iterator[dict[str, Any]]:
    """One zarr shard's samples, decoded, through ShardReader's checked readers (every chunk's
    crc32c; a missing chunk is CorruptShard)."""
    r = ShardReader(src, teacher, shard)
    names = ("k", "v", "input_ids", "loss_mask", *(("segment_ids",) if "segment_ids" in r.group else ()))
    examples = r.examples()
    for j, sid in enumerate(r.sample_ids):
        x = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), names)
        s = {
            "sample_id": sid,
            "input_ids": x["input_ids"],
            "loss_mask": x["loss_mask"],
            "kv": {teacher: (x["k"], x["v"])},
        }
        if "segment_ids" in x:
            s["segment_ids"] = x["segment_ids"]
        if r.has_latent:
            s["latent"] = {teacher: {a: b[0] for a, b in r.latent(j, j + 1).items()}}
        if examples is not None:
            s["example"] = examples[j]
        yield s


def zarr_to_wds(src: str | Path, dst: str | Path, kv_dtype: str | None = None) -> Path:
    """Same records, same order, as tars (float16 / float32 teachers as they are; a quantised or
    bfloat16 teacher only with kv_dtype "float16" or "float32", stored decoded)."""
    return convert(src, dst, "webdataset", kv_dtype)


def wds_to_zarr(src: str | Path, dst: str | Path, kv_dtype: str | None = None) -> Path:
    """Same records, same order, as a zarr store (the tars' codec unless kv_dtype says otherwise)."""
    return convert(src, dst, "zarr", kv_dtype)
