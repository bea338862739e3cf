"""The webdataset backend: the same logical records as the zarr store, as one tar per dump
task, for sequential streaming (object stores, `curl | tar`), written with webdataset's
TarWriter and read with its WebDataset pipeline. The store's metadata (StoreSpec, TeacherSpec)
is the same zarr JSON as the zarr backend's, so every metadata tool works on both:

    OUT/                             zarr.json: StoreSpec with backend "webdataset"
      index.parquet                  as in the zarr store (written by finalize)
      teachers/<name>/               zarr.json: TeacherSpec
        shard-00000.tar              one record per sample:
            <id>.k.npy, <id>.v.npy           [T, L_s, D] float16 / float32
            <id>.input_ids.npy, <id>.loss_mask.npy, <id>.segment_ids.npy   [T]
            <id>.latent_k.npy, <id>.latent_v.npy     [M, L_s, D]   latent mode only (as in the
            <id>.latent_mask.npy [M], <id>.latent_pos.npy [M, L_t, H_t]   zarr store, one sample)
            <id>.codi_hidden.npy [H_t]                               when stored
            <id>.json                        {"sample_id", "teacher", "shard", "tokens"}
        shard-00000.json             completion record: samples, rows, offsets, sample_ids, crc32

A tar is written in the store's hidden partial directory and renamed into place after its
completion record is written, so a visible tar is complete. Records are decoded with
`np.load(..., allow_pickle=False)` only: an object-dtype array (which would need pickle) or any
other member is refused. Quantised codecs are zarr-only.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from .zarr_store import (
    ShardReader,
    ShardWriter,
    StoreError,
    compression,
    finalize,
    init_store,
    init_teacher,
    partial_dir,
    read_store_spec,
    read_teacher_specs,
    shard_name,
    teacher_dir,
)

__all__ = ["is_wds_store", "WdsShardWriter", "wds_samples", "wds_stream", "zarr_to_wds", "wds_to_zarr"]

ARRAYS = ("k", "v", "input_ids", "loss_mask")
OPTIONAL = ("segment_ids", "latent_k", "latent_v", "latent_mask", "latent_pos", "codi_hidden")  # newer / latent-mode members


def is_wds_store(path: str | Path) -> bool:
    return (Path(path) / "zarr.json").exists() and read_store_spec(path).backend == "webdataset"


def _tar(root: Path, teacher: str, shard: int) -> Path:
    return teacher_dir(root, teacher) / f"{shard_name(shard)}.tar"


class WdsShardWriter:
    """Same interface as ShardWriter: write(sample_id, k, v, input_ids, loss_mask, segment_ids,
    latent), close(). Latent K/V are stored in the shard's K/V dtype."""

    def __init__(
        self, root: str | Path, teacher: str, shard: int, *, num_layers: int, width: int, codec: str = "float16",
        latent_slots: int | None = None,
    ) -> None:
        if codec not in ("float16", "float32"):
            raise ValueError(f"the webdataset backend stores float16 or float32 K/V, not {codec!r}; use the zarr backend for quantised codecs")
        self.final = _tar(Path(root), teacher, shard)
        self.sidecar = self.final.with_suffix(".json")
        if self.final.exists():
            raise StoreError(f"{self.final} already exists; a complete shard is never rewritten")
        self.sidecar.unlink(missing_ok=True)  # a record whose tar never arrived
        partial = partial_dir(root, teacher)
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.glob(f"{shard_name(shard)}.*"):  # left by a killed earlier attempt
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self.tmp = partial / f"{shard_name(shard)}.{socket.gethostname()}-{os.getpid()}.tar"
        self.teacher, self.shard, self.L, self.D, self.codec = teacher, shard, num_layers, width, codec
        self.dtype = np.dtype(codec)
        self.writer = wds.TarWriter(str(self.tmp))
        self.sample_ids: list[str] = []
        self.offsets = [0]
        self.closed = False
        self.M = latent_slots
        self.has_segments: bool | None = None
        self.has_hidden: bool | None = None

    def write(
        self, sample_id: str, k: np.ndarray, v: np.ndarray, input_ids: np.ndarray, loss_mask: np.ndarray,
        segment_ids: np.ndarray | None = None, latent: dict[str, np.ndarray] | None = None,
    ) -> None:
        T = len(input_ids)
        if k.shape != (T, self.L, self.D) or v.shape != (T, self.L, self.D):
            raise ValueError(f"sample {sample_id}: expected k, v of shape {(T, self.L, self.D)}, got {k.shape}, {v.shape}")
        if "." in sample_id:
            raise ValueError(f"sample id {sample_id!r} contains '.', which webdataset reads as an extension")
        extra = self._extra(sample_id, T, segment_ids, latent)
        self.writer.write({
            **extra,
            "__key__": sample_id,
            "k.npy": np.ascontiguousarray(k, dtype=self.dtype),
            "v.npy": np.ascontiguousarray(v, dtype=self.dtype),
            "input_ids.npy": np.asarray(input_ids, dtype=np.int32),
            "loss_mask.npy": np.asarray(loss_mask, dtype=np.bool_),
            "json": {"sample_id": sample_id, "teacher": self.teacher, "shard": self.shard, "tokens": T},
        })
        self.sample_ids.append(sample_id)
        self.offsets.append(self.offsets[-1] + T)

    def _extra(self, sample_id: str, T: int, segment_ids, latent) -> dict[str, np.ndarray]:
        """The optional members, checked like ShardWriter checks them."""
        out: dict[str, np.ndarray] = {}
        if self.has_segments is None:
            self.has_segments = segment_ids is not None
        if (segment_ids is not None) != self.has_segments or (segment_ids is not None and len(segment_ids) != T):
            raise ValueError(f"sample {sample_id}: segment_ids must be given for every sample of a shard or for none, one per token ({T})")
        if segment_ids is not None:
            out["segment_ids.npy"] = np.asarray(segment_ids, dtype=np.uint8)
        if (latent is None) != (self.M is None):
            raise ValueError(f"sample {sample_id}: latent arrays must be given exactly when the writer has latent_slots ({self.M})")
        if latent is None:
            return out
        M = self.M
        pos, mask = np.asarray(latent["pos"], dtype=np.int32), np.asarray(latent["mask"], dtype=np.bool_)
        if latent["k"].shape != (M, self.L, self.D) or latent["v"].shape != (M, self.L, self.D) or mask.shape != (M,) or pos.ndim != 3 or len(pos) != M:
            raise ValueError(
                f"sample {sample_id}: latent k {latent['k'].shape}, v {latent['v'].shape}, mask {mask.shape}, pos {pos.shape}; "
                f"expected {(M, self.L, self.D)}, ({M},), ({M}, L_t, H_t)"
            )
        if not np.array_equal(np.all(pos >= 0, axis=(1, 2)), mask):
            raise ValueError(f"sample {sample_id}: latent pos must be >= 0 exactly at the mask's slots and -1 at padding slots")
        if self.has_hidden is None:
            self.has_hidden = latent.get("hidden") is not None
        if (latent.get("hidden") is not None) != self.has_hidden:
            raise ValueError(f"sample {sample_id}: codi hidden states must be given for every sample of a shard or for none")
        out |= {
            "latent_k.npy": np.ascontiguousarray(latent["k"], dtype=self.dtype),
            "latent_v.npy": np.ascontiguousarray(latent["v"], dtype=self.dtype),
            "latent_mask.npy": mask,
            "latent_pos.npy": pos,
        }
        if self.has_hidden:
            out["codi_hidden.npy"] = np.asarray(latent["hidden"], dtype=np.float32)
        return out

    def close(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        self.writer.close()
        crc = 0
        with self.tmp.open("rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
        record = {
            "complete": True, "teacher": self.teacher, "shard": self.shard, "samples": len(self.sample_ids),
            "rows": self.offsets[-1], "codec": self.codec, "width": self.D, "crc32": {"tar": crc},
            "sample_ids": self.sample_ids, "offsets": self.offsets,
            **({"latent": {"slots": self.M, "codec": self.codec, "hidden": bool(self.has_hidden)}} if self.M is not None else {}),
            **(extra_attrs or {}),
        }
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.sidecar.write_text(json.dumps(record))
        os.replace(self.tmp, self.final)  # atomic, and last: a visible tar is a complete shard
        self.closed = True
        return self.final

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)
        self.closed = True

    def __enter__(self) -> WdsShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            self.close() if exc_type is None else self.abort()


def _decode(sample: dict[str, Any]) -> dict[str, Any]:
    """Only our members, only pickle-free npy."""
    out: dict[str, Any] = {"sample_id": sample["__key__"], "url": sample.get("__url__")}
    unknown = sorted(k for k in sample if not k.startswith("__") and k not in {f"{a}.npy" for a in ARRAYS + OPTIONAL} | {"json"})
    if unknown:
        raise StoreError(f"{sample.get('__url__')}: record {sample['__key__']} has unexpected members {unknown}")
    for name in ARRAYS + tuple(a for a in OPTIONAL if f"{a}.npy" in sample):
        try:
            out[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refused
            raise StoreError(f"{sample.get('__url__')}: {sample['__key__']}.{name}.npy cannot be read without pickle ({e}); refusing it") from e
    return out


def _zip(teachers: list[str], pipes) -> Iterator[dict[str, Any]]:
    """Records of the teachers' pipelines, zipped by position, in the trainer's sample format
    (sample_id, shard, input_ids, loss_mask, kv, and segment_ids / latent when stored)."""
    for records in zip(*pipes, strict=True):
        ids = {r["sample_id"] for r in records}
        shard = int(Path(records[0]["url"]).stem.removeprefix("shard-"))
        if len(ids) != 1:
            raise StoreError(f"{shard_name(shard)}: teachers {teachers} hold other samples at one position ({sorted(ids)})")
        head = records[0]
        out = {
            "sample_id": head["sample_id"],
            "shard": shard,
            "input_ids": head["input_ids"],
            "loss_mask": head["loss_mask"],
            "kv": {t: (r["k"], r["v"]) for t, r in zip(teachers, records, strict=True)},
        }
        if "segment_ids" in head:
            out["segment_ids"] = head["segment_ids"]
        latent = {t: _latent_record(r) for t, r in zip(teachers, records, strict=True) if "latent_k" in r}
        if latent:
            out["latent"] = latent
        yield out


def wds_samples(root: str | Path, teachers: list[str], shard: int) -> Iterator[dict[str, Any]]:
    """The samples of one shard, every teacher zipped, in the trainer's sample format."""
    return _zip(teachers, [wds.WebDataset(str(_tar(Path(root), t, shard)), shardshuffle=False, empty_check=False).map(_decode) for t in teachers])


def _latent_record(r: dict[str, Any]) -> dict[str, np.ndarray]:
    """One sample's latent members in the stream's form: k, v float32 [M, L, D], mask, pos, hidden."""
    out = {"k": r["latent_k"].astype(np.float32), "v": r["latent_v"].astype(np.float32), "mask": r["latent_mask"], "pos": r["latent_pos"]}
    if "codi_hidden" in r:
        out["hidden"] = r["codi_hidden"]
    return out


def wds_stream(root: str | Path, teachers: list[str], shards: list[int], *, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
    """The samples of `shards` (in this order, the same list on every rank and worker) through
    one webdataset pipeline per teacher: the `nodesplitter` stage keeps this rank's shards
    (shards[rank::world_size], the trainer's rank as accelerate reports it), webdataset's
    `split_by_worker` those of this DataLoader worker; records of the teachers are zipped, and
    every pipeline sees the same shard list, so they stay in lockstep (checked per sample)."""

    def by_rank(src):
        yield from itertools.islice(src, rank, None, world_size)

    pipes = [
        wds.WebDataset(
            [str(_tar(Path(root), t, s)) for s in shards],
            shardshuffle=False,
            nodesplitter=by_rank,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        ).map(_decode)
        for t in teachers
    ]
    return _zip(teachers, pipes)


def _convert(src: Path, dst: Path, backend: str, writer_cls) -> Path:
    spec, teachers = read_store_spec(src), read_teacher_specs(src)
    init_store(dst, type(spec).from_dict({**spec.to_dict(), "backend": backend}))
    for name, t in teachers.items():
        codec = t.kv_dtype if backend == "zarr" or t.kv_dtype in ("float16", "float32") else "float32"
        init_teacher(dst, type(t).from_dict({**t.to_dict(), "kv_dtype": codec}))
        for i in range(spec.num_shards):
            slots = t.latent.slots if t.latent else None
            level = compression(spec) if backend == "zarr" else {}
            with writer_cls(dst, name, i, num_layers=spec.geometry.num_layers, width=t.width, codec=codec, latent_slots=slots, **level) as w:
                for s in (wds_samples(src, [name], i) if spec.backend == "webdataset" else _zarr_samples(src, name, i)):
                    k, v = s["kv"][name]
                    w.write(s["sample_id"], k, v, s["input_ids"], s["loss_mask"], s.get("segment_ids"), s.get("latent", {}).get(name))
    finalize(dst)
    return dst


def _zarr_samples(src: Path, teacher: str, shard: int) -> Iterator[dict[str, Any]]:
    r = ShardReader(src, teacher, shard)
    names = ("k", "v", "input_ids", "loss_mask", *(("segment_ids",) if "segment_ids" in r.group else ()))
    for j, sid in enumerate(r.sample_ids):
        x = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), names)
        s = {"sample_id": sid, "input_ids": x["input_ids"], "loss_mask": x["loss_mask"], "kv": {teacher: (x["k"], x["v"])}}
        if "segment_ids" in x:
            s["segment_ids"] = x["segment_ids"]
        if r.has_latent:
            s["latent"] = {teacher: {a: b[0] for a, b in r.latent(j, j + 1).items()}}
        yield s


def zarr_to_wds(src: str | Path, dst: str | Path) -> Path:
    """Same records, same order, as tars (quantised teachers are stored decoded, float32)."""
    return _convert(Path(src), Path(dst), "webdataset", WdsShardWriter)


def wds_to_zarr(src: str | Path, dst: str | Path) -> Path:
    return _convert(Path(src), Path(dst), "zarr", ShardWriter)
