"""The webdataset backend: the same logical records as the zarr store, as one tar per dump
task, for sequential streaming (object stores, `curl | tar`), written with webdataset's
TarWriter and read through a webdataset pipeline. The store's metadata (StoreSpec,
TeacherSpec) is the same zarr JSON as the zarr backend's, so every metadata tool works on both:

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
tar is renamed into place: a visible tar with its record is a complete shard.

Integrity: nothing corrupt is read as data. Every reader (`wds_samples`, `wds_stream`,
`wds_shard_samples` (the trainer's, through backend.shard_samples), `convert`, `verify`) reads
a tar through `tar_records`, which checks

- each member's crc32c against the completion record before anything decodes it;
- that the records arrive in the recorded order with the recorded members, and that the tar
  holds all of them: Python's tarfile ends an archive silently at a damaged header, so a
  damaged or truncated tar would otherwise just end early;
- the crc32c and size of the whole file, computed from the very bytes tarfile reads (the
  file object is wrapped) plus the rest after the end-of-archive marker, when the tar has been
  read to its end: a flipped byte in a header, padding or the end blocks is refused too.

Each failure is a one-line CorruptShard naming store, teacher, shard, member and tar (a missing
tar: "missing (deleted or lost)"). Checked records are decoded with `np.load(...,
allow_pickle=False)` only: an object-dtype array (which would need pickle) or any other member
is refused. Quantised and bfloat16 K/V are zarr-only: `convert` refuses them unless told to
store them decoded (`--kv-dtype float16 / float32`).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import socket
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import webdataset as wds
import zarr
from webdataset.tariterators import base_plus_ext, tar_file_iterator
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
    sidecar_path,
    tar_path,
    teacher_dir,
)
from .reader import ShardReader
from .writer import WRITE_ALL, ShardWriter, acquire_shard, compression, example_json, release_shard

__all__ = [
    "WdsShardWriter",
    "tar_records",
    "read_sidecar",
    "decode_record",
    "latent_record",
    "wds_samples",
    "wds_stream",
    "wds_shard_samples",
    "convert",
    "zarr_to_wds",
    "wds_to_zarr",
]

ARRAYS = ("k", "v", "input_ids", "loss_mask")
OPTIONAL = (
    "segment_ids",
    "latent_k",
    "latent_v",
    "latent_mask",
    "latent_pos",
    "codi_hidden",
)  # members only some shards hold
WDS_CODECS = ("float16", "float32")  # K/V dtypes a tar holds (npy of plain floats)
_BLOCK = 1 << 24  # bytes per read when checksumming a whole file


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
                f"the webdataset backend stores float16 or float32 K/V, not {codec!r}; use the zarr backend for quantised codecs"
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
                    f"{self.final} exists without its completion record {self.sidecar.name}; delete it to re-dump the shard"
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
                f"sample {sample_id}: {name} holds values up to {float(np.abs(x).max()):.4g}, beyond {self.codec}'s range; "
                "store it as float32 (or in a zarr store as bfloat16)"
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
                f"sample {sample_id}: segment_ids must be given for every sample of a shard or for none, one per token ({T})"
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
                f"sample {sample_id}: latent k {latent['k'].shape}, v {latent['v'].shape}, mask {mask.shape}, pos {pos.shape}; "
                f"expected {(M, self.L, self.D)}, ({M},), ({M}, L_t, H_t)"
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
            crc, size = _file_crc32c(self.tmp)
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


def _file_crc32c(path: Path) -> tuple[int, int]:
    crc = size = 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            crc = google_crc32c.extend(crc, block)
            size += len(block)
    return crc, size


# --- reading: every byte checked -----------------------------------------------------------------

OnProblem = Callable[..., None]  # problem(what, kind=CorruptShard): raise (readers) or record (verify)
OLD_FIX = "re-dump this teacher into a new store (or convert its zarr store again) with this kvdistill"

# What Python's tarfile raises on bytes that are not a well-formed tar (a damaged first header,
# data cut short, a header that claims a compression it does not have).
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)


class _Crc32cReader:
    """The tar's file object as webdataset's tar reader sees it: every byte read goes into a
    running crc32c and a byte count, so the whole-file checksum costs no second pass."""

    def __init__(self, f, name: str) -> None:
        self.f, self.name, self.crc, self.size = f, name, 0, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.crc = google_crc32c.extend(self.crc, b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        """Read what tarfile left: the rest of the end-of-archive blocks (and anything after)."""
        while self.read(_BLOCK):
            pass


def _where(tar: Path) -> str:
    """'store S: teacher 'T' shard-00003' for S/teachers/T/shard-00003.tar."""
    return f"store {tar.parent.parent.parent}: teacher {tar.parent.name!r} {tar.stem}"


def _refuse(tar: Path) -> OnProblem:
    """The readers' problem(): one line naming store, teacher, shard, what, and the fix."""

    def problem(what: str, kind: type[StoreError] = CorruptShard) -> None:
        fix = "re-dump this shard (`kvdistill store verify` names the command)" if kind is CorruptShard else OLD_FIX
        raise kind(f"{_where(tar)}: {what}; {fix}")

    return problem


def read_sidecar(tar: Path, problem: OnProblem) -> dict[str, Any] | None:
    """The completion record of `tar`, with its checksums in a usable shape, or None (reported)."""
    sidecar = tar.with_suffix(".json")
    try:
        attrs = json.loads(sidecar.read_text())
    except FileNotFoundError:
        problem(f"completion record {sidecar} is missing (deleted or lost)")
        return None
    except (OSError, ValueError) as e:
        problem(f"completion record {sidecar} is unreadable ({type(e).__name__}: {e})")
        return None
    sums = attrs.get("crc32c") if isinstance(attrs, dict) else None
    if sums is None:
        problem(
            f"{tar.name} was written by an older kvdistill, without per-record checksums, so it cannot be checked while it streams",
            StoreError,
        )
        return None
    ids = attrs.get("sample_ids")
    if (
        not isinstance(sums, dict)
        or not isinstance(ids, list)
        or not all(isinstance(sums.get(a), int) for a in ("tar", "size"))
        or not isinstance(sums.get("members"), list)
        or not isinstance(sums.get("records"), list)
        or len(sums["records"]) != len(ids)
        or any(not isinstance(r, list) or len(r) != len(sums["members"]) for r in sums["records"])
    ):
        problem(f"completion record {sidecar} has malformed sample ids / checksums")
        return None
    return attrs


def tar_records(
    tar: str | Path, problem: OnProblem | None = None, attrs: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The records of one shard's tar, each checked before it is yielded: {"__key__": sample id,
    "__url__": the tar, "__index__": its position, "<member>": bytes}. Every problem (see the
    module docstring) goes to `problem(what, kind)`: by default it raises one line naming store,
    teacher, shard and the fix (CorruptShard; StoreError for a tar written without checksums).
    verify records it and reads on where it can (a record with a bad member is skipped, a tar
    that no longer parses ends the scan, the whole-file checksum is always checked).
    `attrs`: the completion record, if read already."""
    tar = Path(tar)
    problem = problem or _refuse(tar)
    attrs = attrs if attrs is not None else read_sidecar(tar, problem)
    if attrs is None:
        return
    ids, sums = attrs["sample_ids"], attrs["crc32c"]
    members, crcs, n = sums["members"], sums["records"], len(attrs["sample_ids"])
    slot = {m: c for c, m in enumerate(members)}
    try:
        f = tar.open("rb")
    except FileNotFoundError:
        problem(f"tar {tar} is missing (deleted or lost)")
        return
    with f:
        stream = _Crc32cReader(f, str(tar))
        files = tar_file_iterator(stream)  # webdataset's streaming reader of tar members
        j, record, sound = 0, None, True  # records complete so far, the one being read, no structural damage

        def damaged(what: str) -> None:
            nonlocal sound
            sound = False
            problem(f"tar {tar} {what}")

        while True:
            try:
                item = next(files, None)
            except _TAR_ERRORS as e:
                damaged(f"does not parse after {j} of {n} records ({type(e).__name__}: {str(e).split(' @ ')[0]})")
                break
            if item is None:
                break
            key, suffix = base_plus_ext(item["fname"])
            if record is None:
                if j >= n or key != ids[j]:
                    damaged(
                        f"holds record {key!r} where its completion record lists "
                        + (f"{ids[j]!r} (record {j} of {n})" if j < n else f"only {n} records")
                    )
                    break
                record, good = {"__key__": key, "__url__": str(tar), "__index__": j}, True
            if key != record["__key__"] or suffix not in slot or suffix in record:
                damaged(
                    f"holds member {item['fname']!r} where record {j} ({ids[j]!r}) of {n} should have members {members}"
                )
                break
            data = item["data"]
            got, want = google_crc32c.value(data), crcs[j][slot[suffix]]
            if got != want:
                good = False
                problem(f"member {key}.{suffix} of {tar} fails its crc32c ({got:08x}, written as {want:08x})")
            record[suffix] = data
            if len(record) - 3 == len(members):
                j += 1
                if good:
                    yield record
                record = None
        if sound and record is not None:
            damaged(
                f"ends inside record {j} ({ids[j]!r}) of {n}: it has members {sorted(k for k in record if not k.startswith('__'))} of {members}"
            )
        elif sound and j != n:
            damaged(f"ends after {j} of {n} records (truncated, or a damaged header ended it early)")
        try:
            stream.drain()
        except OSError as e:
            problem(f"tar {tar} cannot be read to its end ({e})")
            return
    if (stream.crc, stream.size) != (sums["tar"], sums["size"]):
        problem(
            f"tar {tar} fails its whole-file crc32c: {stream.size} bytes with crc32c {stream.crc:08x}, "
            f"written as {sums['size']} bytes with {sums['tar']:08x} (a damaged header, padding or end block, or a changed file)"
        )


def decode_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A checked record's arrays: only our members, only pickle-free npy."""
    out: dict[str, Any] = {"sample_id": sample["__key__"], "url": sample.get("__url__")}
    unknown = sorted(
        k for k in sample if not k.startswith("__") and k not in {f"{a}.npy" for a in ARRAYS + OPTIONAL} | {"json"}
    )
    if unknown:
        raise StoreError(f"{sample.get('__url__')}: record {sample['__key__']} has unexpected members {unknown}")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise StoreError(f"{sample.get('__url__')}: {sample['__key__']}.json is not valid JSON ({e})") from e
        if isinstance(meta, dict) and meta.get("example") is not None:
            out["example"] = meta["example"]
    for name in ARRAYS + tuple(a for a in OPTIONAL if f"{a}.npy" in sample):
        try:
            out[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refused
            raise StoreError(
                f"{sample.get('__url__')}: {sample['__key__']}.{name}.npy cannot be read without pickle ({e}); refusing it"
            ) from e
    return out


def _checked_tars(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage in place of webdataset's url opener + tar expander: {"url": tar} in, its
    checked records out (tar_records)."""
    for item in src:
        yield from tar_records(item["url"])


def _pipeline(
    root: Path, teacher: str, shards: list[int], rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, Any]]:
    """One teacher's decoded records of `shards`: this rank's shards (shards[rank::world_size]),
    of those this DataLoader worker's (webdataset's split_by_worker), each tar checked."""

    def by_rank(src):
        yield from itertools.islice(src, rank, None, world_size)

    if not shards:
        return iter(())
    return iter(
        wds.DataPipeline(
            wds.SimpleShardList([str(tar_path(root, teacher, s)) for s in shards]),
            by_rank,
            wds.split_by_worker,
            _checked_tars,
            wds.map(decode_record),
        )
    )


def _zip(teachers: list[str], pipes) -> Iterator[dict[str, Any]]:
    """Records of the teachers' pipelines, zipped by position, in the trainer's sample format
    (sample_id, shard, input_ids, loss_mask, kv, and segment_ids / latent when stored)."""
    for records in zip(*pipes, strict=True):
        ids = {r["sample_id"] for r in records}
        shard = int(Path(records[0]["url"]).stem.removeprefix("shard-"))
        if len(ids) != 1:
            raise StoreError(
                f"{shard_name(shard)}: teachers {teachers} hold other samples at one position ({sorted(ids)})"
            )
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
        if "example" in head:
            out["example"] = head["example"]
        latent = {t: latent_record(r) for t, r in zip(teachers, records, strict=True) if "latent_k" in r}
        if latent:
            out["latent"] = latent
        yield out


def wds_samples(root: str | Path, teachers: list[str], shard: int) -> Iterator[dict[str, Any]]:
    """The samples of one shard, every teacher zipped, in the trainer's sample format; every
    tar checked as it streams (tar_records: CorruptShard on any damage)."""
    return _zip(teachers, [_pipeline(Path(root), t, [shard]) for t in teachers])


def latent_record(r: dict[str, Any]) -> dict[str, np.ndarray]:
    """One sample's latent members in the stream's form: k, v float32 [M, L, D], mask, pos, hidden."""
    out = {
        "k": r["latent_k"].astype(np.float32),
        "v": r["latent_v"].astype(np.float32),
        "mask": r["latent_mask"],
        "pos": r["latent_pos"],
    }
    if "codi_hidden" in r:
        out["hidden"] = r["codi_hidden"]
    return out


def wds_stream(
    root: str | Path, teachers: list[str], shards: list[int], *, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, Any]]:
    """The samples of `shards` (in this order, the same list on every rank and worker) through
    one webdataset pipeline per teacher: a rank stage keeps this rank's shards
    (shards[rank::world_size], the trainer's rank as accelerate reports it), webdataset's
    `split_by_worker` those of this DataLoader worker, and every tar is checked as it streams
    (tar_records); records of the teachers are zipped, and every pipeline sees the same shard
    list, so they stay in lockstep (checked per sample)."""
    return _zip(teachers, [_pipeline(Path(root), t, list(shards), rank, world_size) for t in teachers])


def _records(root: Path, teacher: str, shards: list[int]) -> Iterator[dict[str, Any]]:
    """One teacher's decoded records of exactly `shards`, in this order, each tar checked."""
    for shard in shards:
        for record in tar_records(tar_path(root, teacher, shard)):
            yield decode_record(record)


def wds_shard_samples(root: str | Path, teachers: list[str], shards: list[int]) -> Iterator[dict[str, Any]]:
    """The samples of exactly `shards`, in this order (the caller has split the shards across
    ranks and workers), every teacher zipped, every tar checked as it streams (tar_records)."""
    return _zip(teachers, [_records(Path(root), t, list(shards)) for t in teachers])


# --- convert ---------------------------------------------------------------------------------

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
            f"--kv-dtype {kv_dtype}: webdataset tars hold float16 or float32 K/V; pass --kv-dtype float16 or float32, or convert to zarr"
        )
    if compression_level is not None and not (isinstance(compression_level, int) and 0 <= compression_level <= 9):
        raise ValueError(f"compression_level: blosc levels are 0 (none) to 9, got {compression_level!r}")
    if blosc_shuffle is not None and blosc_shuffle not in ("byte", "bit"):
        raise ValueError(f"blosc_shuffle: 'byte' or 'bit', got {blosc_shuffle!r}")
    if backend == "webdataset" and (compression_level, blosc_shuffle) != (None, None):
        raise StoreError(
            "--compression-level / --blosc-shuffle: webdataset tars store K/V uncompressed; drop them, or convert to zarr"
        )
    if not teachers:
        raise StoreError(f"{src} holds no teachers; nothing to convert")
    targets = {name: kv_dtype or t.kv_dtype for name, t in teachers.items()}
    unfit = {
        n: c for n, c in targets.items() if backend == "webdataset" and c not in WDS_CODECS
    }  # only without kv_dtype
    if unfit:
        what = (
            f"teacher {next(iter(unfit))!r} is stored as {next(iter(unfit.values()))}, which webdataset tars cannot hold"
            if len(unfit) == 1
            else "teachers "
            + ", ".join(f"{n!r} ({c})" for n, c in unfit.items())
            + " are stored in codecs webdataset tars cannot hold"
        )
        raise StoreError(
            f"{what}; pass --kv-dtype float16 or float32 to store {'it' if len(unfit) == 1 else 'them'} decoded, or keep the zarr store"
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
                        f"{r.dir}: array {name!r} reads back with crc32 {crc:08x}, its record says {want[name]:08x}; run `kvdistill store verify {src}`"
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
