"""The webdataset backend: the same logical records as the zarr store, as tar shards for
sequential streaming (object stores, `curl | tar`), written with webdataset's TarWriter and
read with its WebDataset pipeline.

    OUT.wds/
      kvdistill.json                 {"schema_version", "store_spec", "teachers": {name: TeacherSpec}}
      index.parquet                  as in the zarr store
      teachers/<name>/shard-00000.tar    one per array task; one record per sample:
          <id>.k.npy, <id>.v.npy         [T, L_s, D] float16 / float32
          <id>.input_ids.npy, <id>.loss_mask.npy   [T]
          <id>.json                      {"sample_id", "teacher", "shard", "tokens"}

A tar is written under a temporary name and renamed when complete. Records are decoded with
`np.load(..., allow_pickle=False)` only: an object-dtype array (which would need pickle) or any
other member is refused. Quantised codecs are zarr-only for now.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from kvdistill.schemas import SCHEMA_VERSION, StoreSpec, TeacherSpec

from .zarr_store import (
    INDEX,
    ShardReader,
    ShardWriter,
    StoreError,
    init_store,
    init_teacher,
    read_store_spec,
    read_teacher_specs,
    shard_name,
)

__all__ = ["META", "is_wds_store", "WdsShardWriter", "wds_samples", "read_wds_meta", "zarr_to_wds", "wds_to_zarr"]

META = "kvdistill.json"
ARRAYS = ("k", "v", "input_ids", "loss_mask")


def is_wds_store(path: str | Path) -> bool:
    return (Path(path) / META).exists()


def _tar(root: Path, teacher: str, shard: int) -> Path:
    return Path(root) / "teachers" / teacher / f"{shard_name(shard)}.tar"


def read_wds_meta(path: str | Path) -> tuple[StoreSpec, dict[str, TeacherSpec]]:
    meta = json.loads((Path(path) / META).read_text())
    if meta["schema_version"] != SCHEMA_VERSION:
        raise StoreError(f"{path} has store schema version {meta['schema_version']}, this kvdistill reads {SCHEMA_VERSION}")
    return StoreSpec.from_dict(meta["store_spec"]), {n: TeacherSpec.from_dict(t) for n, t in meta["teachers"].items()}


class WdsShardWriter:
    """Same interface as ShardWriter: write(sample_id, k, v, input_ids, loss_mask), close()."""

    def __init__(self, root: str | Path, teacher: str, shard: int, *, num_layers: int, width: int, codec: str = "float16") -> None:
        if codec not in ("float16", "float32"):
            raise ValueError(f"the webdataset backend stores float16 or float32 K/V, not {codec!r}; use the zarr backend for quantised codecs")
        self.final = _tar(Path(root), teacher, shard)
        if self.final.exists():
            raise StoreError(f"{self.final} already exists; a complete shard is never rewritten")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.{os.getpid()}.partial")
        self.teacher, self.shard, self.L, self.D, self.dtype = teacher, shard, num_layers, width, np.dtype(codec)
        self.writer = wds.TarWriter(str(self.tmp))
        self.samples = self.rows = 0
        self.closed = False

    def write(self, sample_id: str, k: np.ndarray, v: np.ndarray, input_ids: np.ndarray, loss_mask: np.ndarray) -> None:
        T = len(input_ids)
        if k.shape != (T, self.L, self.D) or v.shape != (T, self.L, self.D):
            raise ValueError(f"sample {sample_id}: expected k, v of shape {(T, self.L, self.D)}, got {k.shape}, {v.shape}")
        if "." in sample_id:
            raise ValueError(f"sample id {sample_id!r} contains '.', which webdataset reads as an extension")
        self.writer.write({
            "__key__": sample_id,
            "k.npy": np.ascontiguousarray(k, dtype=self.dtype),
            "v.npy": np.ascontiguousarray(v, dtype=self.dtype),
            "input_ids.npy": np.asarray(input_ids, dtype=np.int32),
            "loss_mask.npy": np.asarray(loss_mask, dtype=np.bool_),
            "json": {"sample_id": sample_id, "teacher": self.teacher, "shard": self.shard, "tokens": T},
        })
        self.samples += 1
        self.rows += T

    def close(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        self.writer.close()
        os.replace(self.tmp, self.final)  # atomic: the tar appears complete or not at all
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
    out: dict[str, Any] = {"sample_id": sample["__key__"]}
    unknown = sorted(k for k in sample if not k.startswith("__") and k not in {f"{a}.npy" for a in ARRAYS} | {"json"})
    if unknown:
        raise StoreError(f"{sample.get('__url__')}: record {sample['__key__']} has unexpected members {unknown}")
    for name in ARRAYS:
        try:
            out[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refused
            raise StoreError(f"{sample.get('__url__')}: {sample['__key__']}.{name}.npy cannot be read without pickle ({e}); refusing it") from e
    return out


def wds_samples(root: str | Path, teachers: list[str], shard: int) -> Iterator[dict[str, Any]]:
    """The samples of one shard, every teacher zipped, in the trainer's sample format."""
    pipes = [wds.WebDataset(str(_tar(Path(root), t, shard)), shardshuffle=False, empty_check=False).map(_decode) for t in teachers]
    first, *rest = teachers
    iters = [iter(p) for p in pipes]
    for records in zip(*iters, strict=True):
        ids = {r["sample_id"] for r in records}
        if len(ids) != 1:
            raise StoreError(f"{shard_name(shard)}: teachers {teachers} hold other samples at one position ({sorted(ids)})")
        head = records[0]
        yield {
            "sample_id": head["sample_id"],
            "input_ids": head["input_ids"],
            "loss_mask": head["loss_mask"],
            "kv": {t: (r["k"], r["v"]) for t, r in zip(teachers, records, strict=True)},
        }


def zarr_to_wds(src: str | Path, dst: str | Path) -> Path:
    """Convert a finalized zarr store into the webdataset layout (same records, same order)."""
    src, dst = Path(src), Path(dst)
    spec, teachers = read_store_spec(src), read_teacher_specs(src)
    if not (src / INDEX).exists():
        raise StoreError(f"{src} is not finalized; run `kvdistill store finalize {src}` first")
    dst.mkdir(parents=True, exist_ok=True)
    for name, t in teachers.items():
        for i in range(spec.num_shards):
            r = ShardReader(src, name, i)
            codec = r.attrs.get("codec", "float16")
            with WdsShardWriter(dst, name, i, num_layers=spec.geometry.num_layers, width=t.width, codec=codec if codec in ("float16", "float32") else "float32") as w:
                for j, sid in enumerate(r.sample_ids):
                    x = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]))
                    w.write(sid, x["k"], x["v"], x["input_ids"], x["loss_mask"])
    shutil.copy(src / INDEX, dst / INDEX)
    meta = {"schema_version": SCHEMA_VERSION, "store_spec": spec.to_dict(), "teachers": {n: t.to_dict() for n, t in teachers.items()}}
    (dst / META).write_text(json.dumps(meta, indent=1))  # last: marks the converted store complete
    return dst


def wds_to_zarr(src: str | Path, dst: str | Path) -> Path:
    """Convert a webdataset store back into a zarr store (then finalize it)."""
    from .zarr_store import finalize

    spec, teachers = read_wds_meta(src)
    init_store(dst, spec)
    for name, t in teachers.items():
        init_teacher(dst, t)
        for i in range(spec.num_shards):
            with ShardWriter(dst, name, i, num_layers=spec.geometry.num_layers, width=t.width, codec=t.kv_dtype if t.kv_dtype in ("float16", "float32") else "float32") as w:
                for s in wds_samples(src, [name], i):
                    k, v = s["kv"][name]
                    w.write(s["sample_id"], k, v, s["input_ids"], s["loss_mask"])
    finalize(dst)
    return Path(dst)
