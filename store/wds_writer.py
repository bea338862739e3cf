"""Writing a webdataset shard: WdsShardWriter, the same logical records as the zarr store's
ShardWriter (store/writer.py), as one tar per dump task, for sequential streaming (object stores,
`curl | tar`), written with webdataset's TarWriter. The store's metadata (StoreSpec, TeacherSpec)
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
            <id>.json                        {"sample_id", "teacher", "shard", "tokens", "example":
                                             {"question", "reasoning", "answer"} (newer stores)}
        shard-00000.json             completion record: samples, rows, offsets, sample_ids and
                                     "crc32c": {"tar": crc32c of the whole tar file, "size": its
                                     bytes, "members": the member suffixes of every record
                                     (sorted, e.g. ["input_ids.npy", "json", "k.npy", ...]),
                                     "records": [[crc32c of each member's bytes, in that order]
                                     per sample]}

Ownership: one writer per (teacher, shard), the zarr backend's protocol (`acquire_shard`: a
second writer fails naming the owner, or waits). The tar is written in the store's
`.partial/<teacher>/`, its completion record is written beside where it will land, then the
tar is renamed into place: a visible tar with its record is a complete shard. The checksums are
what store/wds_reader.py checks on every read. Quantised and bfloat16 K/V are zarr-only.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import webdataset as wds

from .errors import StoreError
from .layout import partial_dir, shard_name, sidecar_path, tar_path
from .wds_reader import file_crc32c
from .writer import acquire_shard, example_json, release_shard

__all__ = ["WdsShardWriter", "WDS_CODECS"]

WDS_CODECS = ("float16", "float32")  # K/V dtypes a tar holds (npy of plain floats)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class WdsShardWriter:
    """Same interface as ShardWriter: write(sample_id, k, v, input_ids, loss_mask, segment_ids,
    latent), close(), abort(), and `on_busy` ("fail" / "wait") for a shard another live writer
    owns. Latent K/V are stored in the shard's K/V dtype."""

    def __init__(
        self,
        root: str | Path,
        teacher: str,
        shard: int,
        *,
        num_layers: int,
        width: int,
        codec: str = "float16",
        latent_slots: int | None = None,
        on_busy: str = "fail",
    ) -> None:
        if codec not in WDS_CODECS:
            raise ValueError(
                f"the webdataset backend stores float16 or float32 K/V, not {codec!r}; use the zarr backend for"
                " quantised codecs"
            )
        self.root, self.teacher, self.shard = Path(root), teacher, shard
        self.final = tar_path(self.root, teacher, shard)
        self.sidecar = sidecar_path(self.root, teacher, shard)
        self.closed = False
        # Ours alone from here until release: ShardBusy / ShardComplete, killed attempts removed.
        self.lock = acquire_shard(root, teacher, shard, on_busy)
        try:
            if self.final.exists():  # a tar without its record: not complete, and not ours to overwrite
                raise StoreError(
                    f"{self.final} exists without its completion record {self.sidecar.name}; delete it to re-dump the"
                    " shard"
                )
            self.sidecar.unlink(missing_ok=True)  # a record whose tar never arrived (killed between the two)
            self.tmp = partial_dir(root, teacher) / f"{shard_name(shard)}.{socket.gethostname()}-{os.getpid()}.tar"
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.tmp.open("wb")
            # Members are our bytes (their crc32c is theirs); a whole-second mtime keeps each member
            # one plain ustar header (a float one would add a pax header block pair per member).
            self.writer = wds.TarWriter(self.file, encoder=False, mtime=int(time.time()))
        except BaseException:
            release_shard(self.lock, root, teacher)
            raise
        self.L, self.D, self.codec = num_layers, width, codec
        self.dtype = np.dtype(codec)
        self.sample_ids: list[str] = []
        self.offsets = [0]
        self.members: list[str] | None = None  # member suffixes of every record, sorted (TarWriter's order)
        self.crcs: list[list[int]] = []  # [samples][members]
        self.sidecar_written = False
        self.M = latent_slots
        self.has_segments: bool | None = None
        self.has_hidden: bool | None = None
        self.has_examples: bool | None = None

    def _kv(self, sample_id: str, name: str, x: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(x, dtype=self.dtype)
        if out.dtype != x.dtype and np.isinf(out).any() and np.isfinite(x).all():
            raise ValueError(
                f"sample {sample_id}: {name} holds values up to {float(np.abs(x).max()):.4g}, beyond {self.codec}'s"
                " range; store it as float32 (or in a zarr store as bfloat16)"
            )
        return out

    def write(
        self,
        sample_id: str,
        k: np.ndarray,
        v: np.ndarray,
        input_ids: np.ndarray,
        loss_mask: np.ndarray,
        segment_ids: np.ndarray | None = None,
        latent: dict[str, np.ndarray] | None = None,
        example: dict[str, str] | None = None,
    ) -> None:
        T = len(input_ids)
        if k.shape != (T, self.L, self.D) or v.shape != (T, self.L, self.D):
            raise ValueError(
                f"sample {sample_id}: expected k, v of shape {(T, self.L, self.D)}, got {k.shape}, {v.shape}"
            )
        if "." in sample_id:
            raise ValueError(f"sample id {sample_id!r} contains '.', which webdataset reads as an extension")
        arrays = {
            **self._extra(sample_id, T, segment_ids, latent),
            "k.npy": self._kv(sample_id, "k", k),
            "v.npy": self._kv(sample_id, "v", v),
            "input_ids.npy": np.asarray(input_ids, dtype=np.int32),
            "loss_mask.npy": np.asarray(loss_mask, dtype=np.bool_),
        }
        record = {n: _npy(x) for n, x in arrays.items()}
        meta = {"sample_id": sample_id, "teacher": self.teacher, "shard": self.shard, "tokens": T}
        if not self.sample_ids:
            self.has_examples = example is not None
        if (example is not None) != self.has_examples:
            raise ValueError(f"sample {sample_id}: an example must be given for every sample of a shard or for none")
        if example is not None:
            meta["example"] = json.loads(example_json(sample_id, example))
        record["json"] = json.dumps(meta, ensure_ascii=False).encode()
        members = sorted(record)
        if self.members is None:
            self.members = members
        elif members != self.members:  # _extra's all-or-none checks make this a bug, not bad input
            raise ValueError(f"sample {sample_id}: members {members}, the shard's records have {self.members}")
        self.writer.write({"__key__": sample_id, **record})
        self.crcs.append([google_crc32c.value(record[m]) for m in members])
        self.sample_ids.append(sample_id)
        self.offsets.append(self.offsets[-1] + T)

    def _extra(self, sample_id: str, T: int, segment_ids, latent) -> dict[str, np.ndarray]:
        """The optional members, checked like ShardWriter checks them."""
        out: dict[str, np.ndarray] = {}
        if self.has_segments is None:
            self.has_segments = segment_ids is not None
        if (segment_ids is not None) != self.has_segments or (segment_ids is not None and len(segment_ids) != T):
            raise ValueError(
                f"sample {sample_id}: segment_ids must be given for every sample of a shard or for none, one per token"
                f" ({T})"
            )
        if segment_ids is not None:
            out["segment_ids.npy"] = np.asarray(segment_ids, dtype=np.uint8)
        if (latent is None) != (self.M is None):
            raise ValueError(
                f"sample {sample_id}: latent arrays must be given exactly when the writer has latent_slots ({self.M})"
            )
        if latent is None:
            return out
        M = self.M
        pos, mask = np.asarray(latent["pos"], dtype=np.int32), np.asarray(latent["mask"], dtype=np.bool_)
        if (
            latent["k"].shape != (M, self.L, self.D)
            or latent["v"].shape != (M, self.L, self.D)
            or mask.shape != (M,)
            or pos.ndim != 3
            or len(pos) != M
        ):
            raise ValueError(
                f"sample {sample_id}: latent k {latent['k'].shape}, v {latent['v'].shape}, mask {mask.shape}, pos"
                f" {pos.shape}; expected {(M, self.L, self.D)}, ({M},), ({M}, L_t, H_t)"
            )
        if not np.array_equal(np.all(pos >= 0, axis=(1, 2)), mask):
            raise ValueError(
                f"sample {sample_id}: latent pos must be >= 0 exactly at the mask's slots and -1 at padding slots"
            )
        if self.has_hidden is None:
            self.has_hidden = latent.get("hidden") is not None
        if (latent.get("hidden") is not None) != self.has_hidden:
            raise ValueError(
                f"sample {sample_id}: codi hidden states must be given for every sample of a shard or for none"
            )
        out |= {
            "latent_k.npy": self._kv(sample_id, "latent k", latent["k"]),
            "latent_v.npy": self._kv(sample_id, "latent v", latent["v"]),
            "latent_mask.npy": mask,
            "latent_pos.npy": pos,
        }
        if self.has_hidden:
            out["codi_hidden.npy"] = np.asarray(latent["hidden"], dtype=np.float32)
        return out

    def close(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        try:
            self.writer.close()
            self.file.close()
            crc, size = file_crc32c(self.tmp)
            record = {
                "complete": True,
                "teacher": self.teacher,
                "shard": self.shard,
                "samples": len(self.sample_ids),
                "rows": self.offsets[-1],
                "codec": self.codec,
                "width": self.D,
                "crc32c": {"tar": crc, "size": size, "members": self.members or [], "records": self.crcs},
                "sample_ids": self.sample_ids,
                "offsets": self.offsets,
                **(
                    {"latent": {"slots": self.M, "codec": self.codec, "hidden": bool(self.has_hidden)}}
                    if self.M is not None
                    else {}
                ),
                **(extra_attrs or {}),
            }
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.sidecar_written = True
            self.sidecar.write_text(json.dumps(record))
            os.replace(self.tmp, self.final)  # atomic, and last: a visible tar (with its record) is a complete shard
        except BaseException:
            self.abort()
            raise
        self.closed = True
        release_shard(self.lock, self.root, self.teacher)
        return self.final

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with suppress(OSError):  # a failed write of bytes about to be deleted changes nothing
                self.writer.close()
            with suppress(OSError):
                self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            if self.sidecar_written and not self.final.exists():  # our record, whose tar never arrived
                self.sidecar.unlink(missing_ok=True)
            release_shard(self.lock, self.root, self.teacher)

    def __enter__(self) -> WdsShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            self.close() if exc_type is None else self.abort()
