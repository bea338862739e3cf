"""The zarr v3 KV store: one writer per shard, atomic shard commit, readers, finalize, inspect.

Layout (self-describing: plain `zarr.open_group` and `pyarrow.parquet` read all of it):

    OUT.zarr/                       attrs["kvdistill"] = {schema_version, store_spec}
      teachers/<name>/              attrs["kvdistill"] = {teacher_spec}
        shard-00000/                attrs["kvdistill"] = {complete, samples, rows, crc32, ...}
          k, v        [N, L_s, D_t] K/V on the student's token grid, all samples concatenated
          input_ids   [N] int32     the student's tokens (the grid k and v are aligned to)
          loss_mask   [N] bool      reasoning + answer tokens
          segment_ids [N] uint8     0 prompt, 1 reasoning, 2 answer (dump.prompts.SEGMENTS)
          offsets     [n + 1] int64 sample j is rows offsets[j]:offsets[j+1]
          sample_ids  [n] str
          latent_k, latent_v [n, M, L_s, D_t]  KaVa latent mode only (teacher spec `latent`): per
                                    sample, the teacher's R-KV compressed reasoning K/V
                                    (align/rkv.py), layer-mapped like k / v
          latent_mask [n, M] bool   False = padding slot (a chain shorter than M)
          latent_pos  [n, M, L_t, H_t] int32  kept teacher positions per teacher layer and
                                    KV head, ascending; -1 = padding
          codi_hidden [n, H_t] float32  teacher's final-norm hidden state before the answer
      index.parquet                 written by `finalize`

Each array task writes one shard of one teacher under the store's hidden `.partial/<teacher>/`
folder and renames it into place when complete, so a visible shard is always a complete one
and a killed task leaves nothing visible behind. One writer owns a (teacher, shard) at a time:
it holds `.partial/<teacher>/shard-NNNNN.lock` (store/lock.py) from before it touches anything
until its shard is in place; a second writer of the same shard fails naming the owner, or
waits (`on_busy`). The student tokens live in each teacher's shard (tiny next to K/V) so a
shard is readable alone and no two tasks ever write the same file.

Integrity: every chunk of every array carries a crc32c (zarr v3's `crc32c` codec, inside the
shard for sharded arrays), which plain zarr checks on every read and store/rows.py checks too;
every chunk is written (`write_empty_chunks`), so a chunk missing on disk is always damage and
every kvdistill reader refuses it instead of reading zarr's fill value.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from kvdistill.schemas import SCHEMA_VERSION, StoreSpec, TeacherSpec

from . import codecs
from .errors import CorruptShard, ShardComplete, StoreError
from .lock import FileLock, lock_holder
from .rows import ShardedRows, ZarrRows, checked_reader

__all__ = [
    "StoreError",
    "shard_name",
    "teacher_dir",
    "partial_dir",
    "partial_attempts",
    "shard_lock",
    "shard_attrs",
    "init_store",
    "init_teacher",
    "read_store_spec",
    "read_teacher_specs",
    "shard_is_complete",
    "ShardWriter",
    "ShardReader",
    "read_kv",
    "compression",
    "finalize",
    "open_root",
    "read_index",
    "inspect",
    "format_inspect",
]

KEY = "kvdistill"
INDEX = "index.parquet"
INDEX_SCHEMA = pa.schema(
    [("teacher", pa.string()), ("shard", pa.int64()), ("sample_id", pa.string()), ("sample_index", pa.int64()), ("row_start", pa.int64()), ("row_stop", pa.int64()), ("length", pa.int64())]
)
CHUNK_BYTES = 1 << 20  # read unit: ~1 MiB chunks
CHUNKS_PER_SHARD = 16  # write unit: zarr shard = 16 chunks


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def teacher_dir(path: str | Path, teacher: str) -> Path:
    return Path(path) / "teachers" / teacher


PARTIAL = ".partial"  # inside the store: shards being written, their locks, the metadata lock


def partial_dir(path: str | Path, teacher: str) -> Path:
    """Where shards of `teacher` are written before they are complete (and their lock files)."""
    return Path(path).absolute() / PARTIAL / teacher


def partial_attempts(path: str | Path, teacher: str, shard: int) -> list[Path]:
    """Unfinished attempts at a shard (a killed task's, or one still running), not its lock file."""
    return sorted(p for p in partial_dir(path, teacher).glob(f"{shard_name(shard)}.*") if p.suffix != ".lock")


def shard_lock(path: str | Path, teacher: str, shard: int, on_busy: str = "fail") -> FileLock:
    """The lock that makes one process the only writer of (teacher, shard); not yet acquired."""
    return FileLock(partial_dir(path, teacher) / f"{shard_name(shard)}.lock", f"teacher {teacher!r} {shard_name(shard)} of store {path}", on_busy)


def remove_empty_partial_dirs(path: str | Path, teacher: str) -> None:
    """After a commit: drop `.partial/<teacher>/` and `.partial/` if nothing is left in them
    (another task may be creating its own there at the same moment: then they stay)."""
    for d in (partial_dir(path, teacher), partial_dir(path, teacher).parent):
        try:
            d.rmdir()
        except OSError:  # not empty (another task's lock or attempt), or gone already
            return


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: store has {a!r}, this run has {b!r}")
    return out


# Fields of StoreSpec that must agree between every task writing into one store. The student's
# path may differ (a moved checkpoint); its geometry and tokenizer may not.
_STORE_KEYS = ("schema_version", "geometry", "tokenizer_fingerprint", "data_fingerprint", "num_shards", "kv_dtype", "teacher_kv_dtype")


@contextmanager
def _metadata_lock(path: Path):
    """Serialise metadata creation between the array tasks that start together (they would
    otherwise race to create the same zarr groups). An flock inside the store (store/lock.py)."""
    lock = FileLock(Path(path).absolute() / PARTIAL / "metadata.lock", f"metadata of store {path}", on_busy="wait", poll=0.05, quiet=True)
    with lock:
        yield
    with suppress(OSError):  # not empty: a shard is being written
        lock.path.parent.rmdir()  # .partial/


def init_store(path: str | Path, spec: StoreSpec) -> None:
    """Create the store root with its spec, or check that an existing store agrees with it."""
    with _metadata_lock(Path(path)):
        _init_store(Path(path), spec)


def _init_store(path: Path, spec: StoreSpec) -> None:
    root = zarr.open_group(path, mode="a")
    have = root.attrs.get(KEY)
    if have is None:
        root.attrs[KEY] = {"schema_version": SCHEMA_VERSION, "store_spec": spec.to_dict()}
        zarr.open_group(path / "teachers", mode="a")
        return
    old = {k: have["store_spec"].get(k) for k in _STORE_KEYS}
    new = {k: spec.to_dict()[k] for k in _STORE_KEYS}
    problems = _diff(old, new)
    if problems and not _holds_shards(path):
        # Nothing was ever committed (e.g. a first run failed after creating the metadata): the
        # metadata describes no data, so a corrected run may replace it.
        shutil.rmtree(path / "teachers", ignore_errors=True)
        root.attrs[KEY] = {"schema_version": SCHEMA_VERSION, "store_spec": spec.to_dict()}
        zarr.open_group(path / "teachers", mode="a")
        return
    if problems:
        raise StoreError(
            f"store {path} was built for another student / data set / layout:\n  "
            + "\n  ".join(problems)
            + "\nwrite into a new --store, or run with the settings the store was built with "
            "(a store with no complete shard yet is re-initialised by the next run)"
        )


def _holds_shards(path: Path, teacher: str = "*") -> bool:
    """Any complete shard of any teacher (or of `teacher`), or any shard being written (its lock held)?"""
    if any(p.name.startswith("shard-") for p in (path / "teachers").glob(f"{teacher}/*")):
        return True
    # A live writer: its shard would land in a store re-made under it.
    return any(lock_holder(f) is not None for f in (path.absolute() / PARTIAL).glob(f"{teacher}/shard-*.lock"))


def init_teacher(path: str | Path, spec: TeacherSpec, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Create teachers/<name> with its spec (and `arrays`, e.g. the PCA projection the K/V were
    reduced with, as teachers/<name>/projection/<array>), or check the existing one agrees."""
    with _metadata_lock(Path(path)):
        _init_teacher(Path(path), spec, arrays)


def _init_teacher(path: Path, spec: TeacherSpec, arrays: dict[str, np.ndarray] | None) -> None:
    group = zarr.open_group(teacher_dir(path, spec.name), mode="a")
    have = group.attrs.get(KEY)
    if have is None:
        if arrays:
            proj = group.require_group("projection")
            for key, arr in arrays.items():
                proj.create_array(key, data=np.asarray(arr), overwrite=True)
        group.attrs[KEY] = {"teacher_spec": spec.to_dict()}  # last: marks the group as initialised
        return
    old = TeacherSpec.from_dict(have["teacher_spec"])
    if (old.fingerprint != spec.fingerprint or old.layer_map != spec.layer_map) and not _holds_shards(path, spec.name):
        shutil.rmtree(teacher_dir(path, spec.name))  # no shard of it was ever committed: its spec describes no data
        return _init_teacher(path, spec, arrays)
    if old.fingerprint != spec.fingerprint or old.layer_map != spec.layer_map:
        problems = _diff(old.to_dict(), spec.to_dict())
        raise StoreError(
            f"store {path}: teacher {spec.name!r} already holds shards of another teacher setup:\n  "
            + "\n  ".join(problems)
            + "\ngive this teacher another name (--teacher-name) or use a new --store (a teacher with no complete shard "
            "yet is re-initialised by the next run)"
        )


def group_attrs(group_dir: Path, fix: str) -> dict:
    """The attributes in a zarr group's zarr.json, read directly; a file that is not valid JSON
    (truncated, overwritten) is CorruptShard naming it, with `fix`."""
    f = Path(group_dir) / "zarr.json"
    try:
        meta = json.loads(f.read_text())
    except UnicodeDecodeError as e:
        raise CorruptShard(f"{f}: not valid JSON (undecodable bytes at {e.start}; corrupt); {fix}") from e
    except json.JSONDecodeError as e:
        raise CorruptShard(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated or corrupt); {fix}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("attributes", {}), dict):
        raise CorruptShard(f"{f}: not a zarr v3 metadata document; {fix}")
    return meta.get("attributes", {})


def read_store_spec(path: str | Path) -> StoreSpec:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a kvdistill store (no zarr.json); run `kvdistill dump` first")
    have = group_attrs(path, "restore the store's root metadata from a copy, or dump into a new --store").get(KEY)
    if have is None:
        raise StoreError(f"{path} is a zarr group but not a kvdistill store (no '{KEY}' attribute)")
    if have["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema version {have['schema_version']}, this kvdistill reads "
            f"version {SCHEMA_VERSION}; re-dump or install the matching kvdistill"
        )
    return StoreSpec.from_dict(have["store_spec"])


def read_teacher_specs(path: str | Path) -> dict[str, TeacherSpec]:
    tdir = Path(path) / "teachers"
    out = {}
    for d in sorted(tdir.iterdir()) if tdir.exists() else []:
        if (d / "zarr.json").exists():
            attrs = group_attrs(d, f"restore it from a copy, or dump teacher {d.name!r} into a new --store")
            if KEY not in attrs:
                raise StoreError(f"{d / 'zarr.json'}: teacher {d.name!r} has no '{KEY}' record (not initialised); delete {d} and dump it again")
            out[d.name] = TeacherSpec.from_dict(attrs[KEY]["teacher_spec"])
    return out


def shard_attrs(path: Path) -> dict | None:
    """The completion record of a shard: zarr attrs, or the JSON beside a webdataset tar."""
    fix = f"delete {path.name} of teacher {path.parent.name!r} and re-run its dump task, then `kvdistill store finalize`"
    if (path / "zarr.json").exists():  # the group's zarr v3 metadata document, read directly (no zarr round trip)
        return group_attrs(path, fix).get(KEY)
    tar, sidecar = path.with_name(path.name + ".tar"), path.with_name(path.name + ".json")
    if tar.exists() and sidecar.exists():
        try:
            return json.loads(sidecar.read_text())
        except ValueError as e:
            raise CorruptShard(f"{sidecar}: the shard's completion record is not valid JSON ({e}); {fix}") from e
    return None


def shard_is_complete(path: str | Path, teacher: str, shard: int) -> bool:
    """Either backend: a zarr shard group, or a tar with its completion record."""
    attrs = shard_attrs(teacher_dir(path, teacher) / shard_name(shard))
    return bool(attrs and attrs.get("complete"))


def compression(rec: StoreSpec | Any) -> dict[str, Any]:
    """ShardWriter's compression arguments from a StoreSpec or DumpTask."""
    return {"compression_level": rec.compression_level, "blosc_shuffle": rec.blosc_shuffle}


_SHUFFLE = {"byte": BloscShuffle.shuffle, "bit": BloscShuffle.bitshuffle}


def _kv_codec(chunk_bytes: int, level: int, shuffle: str) -> list:
    # Byte shuffle groups the exponent bytes of float16 / bfloat16 together, and one blosc block
    # per chunk (instead of blosc's small default blocks) lets zstd see the whole chunk:
    # +16-18% compression on K/V of a trained teacher (bench/store.py). crc32c last: the
    # checksum of the bytes on disk, checked before anything decompresses them.
    return [BloscCodec(cname="zstd", clevel=level, shuffle=_SHUFFLE[shuffle], blocksize=int(chunk_bytes)), Crc32cCodec()]


SMALL_CODECS = [ZstdCodec(level=0), Crc32cCodec()]  # token arrays, offsets, ids, masks
# Every chunk is written even when it holds only the fill value (a loss mask of zeros, a K of
# zeros), so a chunk missing on disk is always damage, never "all fill value".
WRITE_ALL = {"write_empty_chunks": True}


class ShardWriter:
    """Write one shard of one teacher; visible in the store only after a successful close.

        with ShardWriter(store, "teacher-a", shard=3, num_layers=4, width=64, codec="int8") as w:
            w.write("id-1", k, v, input_ids, loss_mask, segment_ids)   # k, v: [T, L, D] float16 / float32

    K and V are stored with `codec` (store/codecs.py): float16 / float32 as is, bfloat16 as its
    bits, int8 / int4 quantised with scale arrays beside (`k_scale`, ...), all plain zarr
    arrays. An exception inside the block discards the partial shard (nothing visible is
    touched).

    With `latent_slots=M` every write also takes `latent={"k", "v": [M, L, D], "mask": [M],
    "pos": [M, L_t, H_t], "hidden": [H] (optional, all samples or none)}`, stored per sample
    (see the module docstring). The latent K/V keep the codec's float member: float32 as
    float32, bfloat16 as its bits, float16 / int8 / int4 as float16 (M rows per sample are a
    small part of the shard, and int8 / int4 scale groups of 32 rows would straddle samples).
    """

    def __init__(
        self,
        path: str | Path,
        teacher: str,
        shard: int,
        *,
        num_layers: int,
        width: int,
        codec: str = "float16",
        latent_slots: int | None = None,
        compression_level: int = 1,
        blosc_shuffle: str = "byte",
        on_busy: str = "fail",
    ) -> None:
        if codec not in ("float32", *codecs.CODECS):
            raise ValueError(f"unknown K/V codec {codec!r}; choose one of {['float32', *codecs.CODECS]}")
        if not 0 <= compression_level <= 9:
            raise ValueError(f"compression_level: blosc levels are 0 (none) to 9, got {compression_level}")
        if blosc_shuffle not in _SHUFFLE:
            raise ValueError(f"blosc_shuffle: 'byte' or 'bit', got {blosc_shuffle!r}")
        self.path, self.teacher, self.shard = Path(path), teacher, shard
        self.final = teacher_dir(path, teacher) / shard_name(shard)
        self.closed = False
        self.lock = acquire_shard(path, teacher, shard, on_busy)  # released by close / abort
        self.tmp = partial_dir(path, teacher) / f"{shard_name(shard)}.{socket.gethostname()}-{os.getpid()}"
        self.L, self.D, self.codec = num_layers, width, codec
        self.level, self.shuffle = compression_level, blosc_shuffle
        row_bytes = 4 * num_layers * width if codec == "float32" else codecs.bytes_per_row(codec, num_layers, width, part="k")
        # Chunks of ~1 MiB (the read unit), whole key-scale groups; zarr shards of 16 chunks (the write unit).
        self.chunk_rows = max(codecs.GROUP, int(CHUNK_BYTES // row_bytes) // codecs.GROUP * codecs.GROUP)
        self.shard_rows = self.chunk_rows * CHUNKS_PER_SHARD
        self.group = zarr.open_group(self.tmp, mode="w")
        self.arrays: dict[str, zarr.Array] = {}
        self.aux: dict[str, list[str]] = {"k": [], "v": []}  # scale arrays per part
        self._buf: dict[str, list[np.ndarray]] = {n: [] for n in ("k", "v", "input_ids", "loss_mask")}
        kv_empty = np.zeros((0, num_layers, width), np.float16 if codec == "float16" else np.float32)
        # An empty shard still gets every array (with the codec's layout).
        self._empty = {"k": kv_empty, "v": kv_empty, "input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.bool_), "segment_ids": np.zeros(0, np.uint8)}
        self._buf_rows = 0
        self.rows = 0
        self.sample_ids: list[str] = []
        self.offsets = [0]
        self.crc: dict[str, int] = {}
        self.has_segments: bool | None = None  # decided by the first write
        self.M = latent_slots
        self.latent_codec = latent_codec(codec)
        self._lat: dict[str, list[np.ndarray]] = {}  # latent arrays per sample, flushed in whole zarr shards
        self._lat_samples = 0  # flushed
        self.has_hidden: bool | None = None

    def write(
        self,
        sample_id: str,
        k: np.ndarray,
        v: np.ndarray,
        input_ids: np.ndarray,
        loss_mask: np.ndarray,
        segment_ids: np.ndarray | None = None,
        latent: dict[str, np.ndarray] | None = None,
    ) -> None:
        """k, v: [T, L, D]; input_ids, loss_mask, segment_ids: [T]; latent: see the class
        docstring. Encoded with the codec at flush."""
        T = len(input_ids)
        if k.shape != (T, self.L, self.D) or v.shape != (T, self.L, self.D) or len(loss_mask) != T:
            raise ValueError(
                f"sample {sample_id}: expected k, v of shape {(T, self.L, self.D)} and {T} mask "
                f"entries, got k {k.shape}, v {v.shape}, mask {len(loss_mask)}"
            )
        if self.has_segments is None:
            self.has_segments = segment_ids is not None
            if self.has_segments:
                self._buf["segment_ids"] = []
        if (segment_ids is not None) != self.has_segments or (segment_ids is not None and len(segment_ids) != T):
            raise ValueError(
                f"sample {sample_id}: segment_ids must be given for every sample of a shard or for none, "
                f"with one entry per token ({T}); got {None if segment_ids is None else len(segment_ids)}"
            )
        if segment_ids is not None:
            self._buf["segment_ids"].append(np.asarray(segment_ids, dtype=np.uint8))
        self._add_latent(sample_id, latent)
        kv_dtype = np.float16 if self.codec == "float16" else np.float32
        self._buf["k"].append(np.ascontiguousarray(k, dtype=kv_dtype))
        self._buf["v"].append(np.ascontiguousarray(v, dtype=kv_dtype))
        self._buf["input_ids"].append(np.asarray(input_ids, dtype=np.int32))
        self._buf["loss_mask"].append(np.asarray(loss_mask, dtype=np.bool_))
        self._buf_rows += T
        self.rows += T
        self.sample_ids.append(sample_id)
        self.offsets.append(self.rows)
        if self._buf_rows >= self.shard_rows:
            with names_path(self.tmp):
                self._flush(final=False)

    def _add_latent(self, sample_id: str, latent: dict[str, np.ndarray] | None) -> None:
        if (latent is None) != (self.M is None):
            raise ValueError(
                f"sample {sample_id}: " + ("latent arrays given but the writer has no latent_slots"
                                          if self.M is None else f"the writer stores {self.M} latent slots per sample; pass latent=")
            )
        if latent is None:
            return
        M, L, D = self.M, self.L, self.D
        if self.has_hidden is None:
            self.has_hidden = latent.get("hidden") is not None
            self._lat = {n: [] for n in ("latent_k", "latent_v", "latent_mask", "latent_pos", *(("codi_hidden",) if self.has_hidden else ()))}
        pos = np.asarray(latent["pos"], dtype=np.int32)
        mask = np.asarray(latent["mask"], dtype=np.bool_)
        problems = []
        for part in ("k", "v"):
            if latent[part].shape != (M, L, D):
                problems.append(f"latent {part} has shape {latent[part].shape}, expected {(M, L, D)}")
        if mask.shape != (M,) or pos.ndim != 3 or pos.shape[0] != M:
            problems.append(f"latent mask {mask.shape} / pos {pos.shape}, expected ({M},) / ({M}, L_t, H_t)")
        elif not np.array_equal(np.all(pos >= 0, axis=(1, 2)), mask) or not np.all((pos >= 0) | (pos == -1)):
            problems.append("latent pos must be >= 0 exactly at the mask's slots and -1 at padding slots")
        if (latent.get("hidden") is not None) != self.has_hidden:
            problems.append("codi hidden states must be given for every sample of a shard or for none")
        if problems:
            raise ValueError(f"sample {sample_id}: " + "; ".join(problems))
        self._lat["latent_k"].append(np.asarray(latent["k"], dtype=np.float32))
        self._lat["latent_v"].append(np.asarray(latent["v"], dtype=np.float32))
        self._lat["latent_mask"].append(mask)
        self._lat["latent_pos"].append(pos)
        if self.has_hidden:
            self._lat["codi_hidden"].append(np.asarray(latent["hidden"], dtype=np.float32))
        per_shard = self._latent_chunk() * CHUNKS_PER_SHARD
        if len(self._lat["latent_k"]) >= per_shard:
            self._flush_latent(per_shard)

    def _latent_chunk(self) -> int:
        """Samples per latent chunk: ~1 MiB of latent K."""
        return max(1, int(CHUNK_BYTES // (self.M * self.L * self.D * np.dtype(np.float32 if self.latent_codec == "float32" else np.uint16).itemsize)))

    def _flush_latent(self, n: int) -> None:
        """Append the first n buffered samples of every latent array (whole zarr shards, or the rest at close)."""
        chunk = self._latent_chunk()
        for name, parts in self._lat.items():
            block = np.stack(parts[:n]) if n else None
            self._lat[name] = parts[n:]
            if block is None:
                continue
            if name in ("latent_k", "latent_v"):  # [n, M, L, D]
                enc = block if self.latent_codec == "float32" else codecs.encode(self.latent_codec, name[-1], block.reshape(-1, self.L, self.D))[""]
                block = enc.reshape(block.shape)
            if name not in self.arrays:
                chunks = (chunk, *block.shape[1:])
                self.arrays[name] = self.group.create_array(
                    name, shape=(0, *block.shape[1:]), chunks=chunks, shards=(chunk * CHUNKS_PER_SHARD, *block.shape[1:]),
                    dtype=block.dtype, compressors=_kv_codec(chunk * block[:1].nbytes, self.level, self.shuffle), config=WRITE_ALL,
                )
                self.crc[name] = 0
            block = np.ascontiguousarray(block)
            self.arrays[name].append(block)
            self.crc[name] = zlib.crc32(block.tobytes(), self.crc[name])
        self._lat_samples += n

    def _encode(self, name: str, block: np.ndarray) -> dict[str, np.ndarray]:
        """Stored arrays for a block of rows: {suffix: data}; "" is the array itself, other
        suffixes are K / V scale arrays stored as `<name>_<suffix>`."""
        if name in ("k", "v") and self.codec not in ("float16", "float32"):
            return codecs.encode(self.codec, name, block.astype(np.float32))
        return {"": block}

    def _append(self, name: str, suffix: str, data: np.ndarray, rows: int) -> None:
        key = f"{name}_{suffix}" if suffix else name
        if key not in self.arrays:
            # Row-indexed arrays chunk like K / V; key scales (one row per GROUP rows) proportionally;
            # 1-D token arrays in large chunks.
            lead = 1 << 18 if data.ndim == 1 else self.chunk_rows if len(data) == rows else max(1, self.chunk_rows // codecs.GROUP)
            chunks = (lead, *data.shape[1:])
            self.arrays[key] = self.group.create_array(
                key,
                shape=(0, *data.shape[1:]),
                chunks=chunks,
                shards=(chunks[0] * CHUNKS_PER_SHARD, *chunks[1:]),
                dtype=data.dtype,
                compressors=_kv_codec(chunks[0] * data[:1].nbytes, self.level, self.shuffle) if data.ndim > 1 else SMALL_CODECS,
                config=WRITE_ALL,
            )
            if suffix:
                self.aux[name].append(suffix)
            self.crc[key] = 0
        data = np.ascontiguousarray(data)
        self.arrays[key].append(data)
        self.crc[key] = zlib.crc32(data.tobytes(), self.crc[key])

    def _flush(self, final: bool) -> None:
        # Append whole zarr shards only (each written once); keep the remainder buffered. Blocks
        # start at multiples of shard_rows, hence of the key-scale group size.
        n = self._buf_rows if final else (self._buf_rows // self.shard_rows) * self.shard_rows
        if n == 0 and self.arrays:
            return
        for name, parts in self._buf.items():
            block = np.concatenate(parts) if parts else self._empty[name]
            for suffix, data in self._encode(name, block[:n]).items():
                self._append(name, suffix, data, n)
            self._buf[name] = [block[n:]] if n < len(block) else []
        self._buf_rows -= n

    def close(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Flush, write offsets / ids / completion record, and move the shard into place."""
        with names_path(self.tmp):
            return self._close(extra_attrs)

    def _close(self, extra_attrs: dict[str, Any] | None) -> Path:
        if self.has_segments is None:  # no sample written: the shard still has every array
            self._buf["segment_ids"] = []
        self._flush(final=True)
        n = len(self.sample_ids)
        if self.M is not None:
            if self.has_hidden is None:  # empty shard
                self._lat = {a: [] for a in ("latent_k", "latent_v", "latent_mask", "latent_pos")}
            self._flush_latent(len(self._lat["latent_k"]))
            for name in ("latent_k", "latent_v", "latent_mask", "latent_pos"):
                if name not in self.arrays:  # no sample: empty arrays of the right rank
                    dt = np.float32 if self.latent_codec == "float32" else codecs.stored_dtype(self.latent_codec)
                    shape = {"latent_k": (0, self.M, self.L, self.D), "latent_v": (0, self.M, self.L, self.D),
                             "latent_mask": (0, self.M), "latent_pos": (0, self.M, 0, 0)}[name]
                    dtype = {"latent_mask": np.bool_, "latent_pos": np.int32}.get(name, dt)
                    self.group.create_array(name, shape=shape, dtype=dtype, compressors=SMALL_CODECS, config=WRITE_ALL)
        self.group.create_array("offsets", data=np.asarray(self.offsets, dtype=np.int64), compressors=SMALL_CODECS, config=WRITE_ALL)
        ids = self.group.create_array("sample_ids", shape=(n,), dtype=str, compressors=SMALL_CODECS, config=WRITE_ALL)
        if n:
            ids[:] = np.asarray(self.sample_ids, dtype=str)
        self.group.attrs[KEY] = {
            "complete": True,
            "teacher": self.teacher,
            "shard": self.shard,
            "samples": n,
            "rows": self.rows,
            "codec": self.codec,
            "width": self.D,
            "scales": self.aux,
            "crc32": self.crc,
            **({"latent": {"slots": self.M, "codec": self.latent_codec, "hidden": bool(self.has_hidden)}} if self.M is not None else {}),
            **(extra_attrs or {}),
        }
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.tmp, self.final)  # atomic: the shard appears complete or not at all (we own it: no one else renames here)
        self.closed = True
        release_shard(self.lock, self.path, self.teacher)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.closed = True
        release_shard(self.lock, self.path, self.teacher)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def acquire_shard(path: str | Path, teacher: str, shard: int, on_busy: str = "fail") -> FileLock:
    """Become the only writer of (teacher, shard): take its lock (ShardBusy if another live
    writer has it and on_busy is "fail"), refuse a shard that is complete already
    (ShardComplete: a task we waited for finished it), and discard what killed earlier attempts
    left. Both backends' writers start here."""
    lock = shard_lock(path, teacher, shard, on_busy).acquire()
    try:
        if shard_is_complete(path, teacher, shard) or (teacher_dir(path, teacher) / shard_name(shard)).exists():
            raise ShardComplete(f"teacher {teacher!r} {shard_name(shard)} of store {path} is complete already; a complete shard is never rewritten")
        for stale in partial_attempts(path, teacher, shard):  # a killed earlier attempt's: no live writer holds it
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    except BaseException:
        release_shard(lock, path, teacher)
        raise
    return lock


def release_shard(lock: FileLock, path: str | Path, teacher: str) -> None:
    lock.release()
    remove_empty_partial_dirs(path, teacher)


def latent_codec(codec: str) -> str:
    """How a shard of K/V codec `codec` stores its latent K/V (see ShardWriter)."""
    return codec if codec in ("float32", "bfloat16") else "float16"


class ShardReader:
    """Read one complete shard of one teacher: offsets, sample ids, and row blocks."""

    def __init__(
        self,
        path: str | Path,
        teacher: str,
        shard: int,
        group: zarr.Group | None = None,
        index: tuple[np.ndarray, list[str]] | None = None,
    ) -> None:
        """`group`: this shard's group from a store root opened once with consolidated metadata
        (`open_root`), so no array's metadata is read from disk again; checked against the
        shard's own record on disk, which must be the same (else the store needs `finalize`).
        `index`: (offsets, sample ids) of the shard from index.parquet (`read_index`), instead
        of reading its offsets and sample_ids arrays (both written by the same finalize)."""
        self.dir = teacher_dir(path, teacher) / shard_name(shard)
        attrs = shard_attrs(self.dir)
        if not attrs or not attrs.get("complete"):
            raise StoreError(
                f"{self.dir} is missing or incomplete; re-run `kvdistill dump --shard {shard}` "
                f"for teacher {teacher!r}, then `kvdistill store finalize`"
            )
        if group is not None and group.attrs.get(KEY) != attrs:
            raise StoreError(
                f"{self.dir} was rewritten after the store's metadata was consolidated; "
                f"run `kvdistill store finalize {path}` again"
            )
        self.attrs = attrs
        self.group = group if group is not None else zarr.open_group(self.dir, mode="r")
        self._arrays: dict[str, zarr.Array] = dict(self.group.arrays())  # every array's metadata, read once
        self.names = tuple(sorted(self._arrays))
        # Rows straight from the shard files (store/rows.py) where the layout is ShardWriter's
        # sharded one; zarr for anything else (the same values, slower). Both check every
        # chunk's crc32c and refuse a missing chunk.
        readers = {n: checked_reader(a, self.dir / n) for n, a in self._arrays.items()}
        self.fast = {n: r for n, r in readers.items() if isinstance(r, ShardedRows)}
        self._zarr = {n: r for n, r in readers.items() if isinstance(r, ZarrRows)}
        if index is None:
            self.offsets = self.reader("offsets")[:]  # [n + 1]
            self.sample_ids = [str(s) for s in self.reader("sample_ids")[:]]
        else:
            self.offsets, self.sample_ids = index
            if len(self.sample_ids) != attrs["samples"] or int(self.offsets[-1]) != attrs["rows"]:
                raise StoreError(
                    f"{self.dir}: index.parquet lists {len(self.sample_ids)} samples / {int(self.offsets[-1])} rows, "
                    f"the shard holds {attrs['samples']} / {attrs['rows']}; run `kvdistill store finalize {path}` again"
                )

    def check_unread(self, read: set[str]) -> None:
        """Check the chunks of every array not in `read` (crc32c, none missing), without
        decoding them: a reader that reads only some arrays still refuses a damaged shard. The
        offsets and sample ids, when they came from index.parquet, must also agree with it."""
        for name in sorted(set(self._arrays) - read):
            r = self.reader(name)
            if isinstance(r, ShardedRows):
                r.check()
            else:
                got = r[:]
                if name == "offsets" and not np.array_equal(got, self.offsets):
                    raise StoreError(f"{self.dir}: its offsets differ from index.parquet; run `kvdistill store verify`, then `kvdistill store finalize` again")
                if name == "sample_ids" and [str(x) for x in got] != self.sample_ids:
                    raise StoreError(f"{self.dir}: its sample ids differ from index.parquet; run `kvdistill store verify`, then `kvdistill store finalize` again")

    def array(self, name: str) -> zarr.Array:
        try:
            return self._arrays[name]
        except KeyError:
            raise StoreError(f"{self.dir} has no array {name!r}; it holds {sorted(self._arrays)}") from None

    def reader(self, name: str) -> ShardedRows | ZarrRows:
        """The checked reader of an array: reader(name)[a:b] == array(name)[a:b] for intact data."""
        self.array(name)
        return self.fast.get(name) or self._zarr[name]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def rows(self, start: int, stop: int, names: tuple[str, ...] = ("k", "v", "input_ids", "loss_mask"), decode: bool = True) -> dict[str, np.ndarray | codecs.QuantRows]:
        """Token rows [start, stop) of the given arrays (one read per stored array); K and V
        come back decoded: float16 / float32 as stored, the other codecs as float32; decode=False
        leaves them as stored (bfloat16 bit patterns as uint16, int8 / int4 as `codecs.QuantRows`)."""
        if "segment_ids" in names and "segment_ids" not in self._arrays:
            raise StoreError(
                f"{self.dir} has no segment_ids (written before kvdistill stored them); re-dump this "
                "teacher into a new --store to use latent mode"
            )
        return {n: self._kv(n, start, stop, decode) if n in ("k", "v") else self.reader(n)[start:stop] for n in names}

    @property
    def has_latent(self) -> bool:
        return "latent" in self.attrs

    def latent(self, j0: int, j1: int) -> dict[str, np.ndarray]:
        """Latent arrays of samples [j0, j1): "k", "v" float32 [n, M, L_s, D], "mask" [n, M]
        bool, "pos" [n, M, L_t, H_t] int32, and "hidden" float32 [n, H] when stored."""
        if not self.has_latent:
            raise StoreError(
                f"{self.dir} holds no latent (compressed reasoning) K/V; re-dump this teacher with "
                "`kvdistill dump --latent-slots M` (or `latent:` in the dump config) into a new --store"
            )
        info = self.attrs["latent"]
        out = {}
        for part in ("k", "v"):
            x = self.reader(f"latent_{part}")[j0:j1]
            if info["codec"] != "float32":
                x = codecs.decode(info["codec"], part, {"": x.reshape(-1, *x.shape[2:])}, 0, x.shape[-1]).reshape(x.shape)
            out[part] = x
        out["mask"] = self.reader("latent_mask")[j0:j1]
        out["pos"] = self.reader("latent_pos")[j0:j1]
        if info["hidden"]:
            out["hidden"] = self.reader("codi_hidden")[j0:j1]
        return out

    def _kv(self, part: str, start: int, stop: int, decode: bool = True) -> np.ndarray | codecs.QuantRows:
        codec = self.attrs.get("codec", "float16")
        aux = self.attrs["scales"][part] if codec in ("int8", "int4") else []
        # Scales and zeros through store/rows.py too where their layout allows (zarr otherwise).
        arrays = {"": self.reader(part), **{a: self.reader(f"{part}_{a}") for a in aux}}
        return read_kv(arrays, codec, part, start, stop, self.attrs["width"], self.fast.get(part), decode)


def read_kv(
    arrays: dict[str, zarr.Array | ShardedRows], codec: str, part: str, start: int, stop: int, width: int, fast: ShardedRows | None = None, decode: bool = True
) -> np.ndarray | codecs.QuantRows:
    """Rows [start, stop) of K or V decoded: float16 / float32 as stored, the other codecs as
    float32; with decode=False as stored: bfloat16 as its uint16 bit patterns, int8 / int4 as
    `codecs.QuantRows`. arrays: the main array ("") and its scale arrays by
    codecs.array_names' names (zarr arrays or store/rows.py readers); with `fast`
    (store/rows.py over arrays[""]) the chunks are decoded as they decompress."""
    if codec in ("float16", "float32") or (codec == "bfloat16" and not decode):
        return fast(start, stop) if fast else arrays[""][start:stop]
    scales, s0 = {}, 0
    if len(arrays) > 1:
        s0, s1 = codecs.scale_rows(codec, part, start, stop)
        scales = {aux: a[s0:s1] for aux, a in arrays.items() if aux}
    if not decode and codec in ("int8", "int4"):
        return codecs.QuantRows(codec, part, width, start, fast(start, stop) if fast else arrays[""][start:stop], **scales)

    def decode_rows(x: np.ndarray, r0: int) -> np.ndarray:  # stored rows [r0, r0 + len(x)) -> float32
        got = {"": x}
        if scales:
            lo, hi = codecs.scale_rows(codec, part, r0, r0 + len(x))
            got.update({aux: sc[lo - s0 : hi - s0] for aux, sc in scales.items()})
        return codecs.decode(codec, part, got, r0, width)

    return fast(start, stop, decode_rows) if fast else decode_rows(arrays[""][start:stop], start)


def read_index(path: str | Path, teachers: list[str]) -> dict[tuple[str, int], tuple[np.ndarray, list[str]]]:
    """index.parquet as {(teacher, shard): (offsets [n + 1] int64, sample ids [n])}; a shard
    with no samples has no entry (its offsets are [0])."""
    f = Path(path) / INDEX
    if not f.exists():
        raise StoreError(f"store {path} is not finalized (no {INDEX}); run `kvdistill store finalize {path}`")
    t = pq.read_table(f, columns=["teacher", "shard", "sample_id", "sample_index", "row_start", "row_stop"], filters=[("teacher", "in", list(teachers))])
    t = t.sort_by([("teacher", "ascending"), ("shard", "ascending"), ("sample_index", "ascending")])
    teacher, shard = t["teacher"].to_numpy(zero_copy_only=False), t["shard"].to_numpy()
    ids, start, stop = t["sample_id"].to_pylist(), t["row_start"].to_numpy(), t["row_stop"].to_numpy()
    cuts = np.flatnonzero((teacher[1:] != teacher[:-1]) | (shard[1:] != shard[:-1])) + 1  # a loop per shard, not per row
    bounds = [0, *cuts.tolist(), len(ids)] if len(ids) else []
    return {
        (str(teacher[a]), int(shard[a])): (np.append(start[a:b], stop[b - 1]).astype(np.int64), ids[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    }


def open_root(path: str | Path) -> zarr.Group:
    """The store's root group with the metadata `finalize` consolidated: child groups and arrays
    then open without reading their metadata from disk (a shard's ~10 metadata reads cost more
    than reading a small shard's data)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "consolidated metadata is not yet part of the v3 spec"
            root = zarr.open_group(path, mode="r", use_consolidated=True)
    except ValueError as e:
        raise StoreError(f"store {path} has no consolidated metadata ({e}); run `kvdistill store finalize {path}`") from e
    return root


@contextmanager
def names_path(path: Path):
    """An OSError without a file name (zarr's writes: "No space left on device") gets `path`, so
    the one-line error says where the disk is full or read-only."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


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
            d = teacher_dir(path, name) / shard_name(i)
            if not (d.exists() or d.with_name(d.name + ".tar").exists()):
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
    cols: dict[str, list] = {k: [] for k in ("teacher", "shard", "sample_id", "sample_index", "row_start", "row_stop", "length")}
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


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def inspect(path: str | Path) -> dict[str, Any]:
    """Layout summary: per teacher shards complete, samples, tokens, bytes, bytes/token."""
    path = Path(path)
    spec = read_store_spec(path)
    out: dict[str, Any] = {
        "store": str(path),
        "student": spec.student.name_or_path,
        "geometry": spec.geometry.to_dict(),
        "kv_dtype": spec.kv_dtype,
        "compression_level": spec.compression_level,
        "blosc_shuffle": spec.blosc_shuffle,
        "num_shards": spec.num_shards,
        "fingerprints": {"tokenizer": spec.tokenizer_fingerprint, "data": spec.data_fingerprint},
        "finalized": (path / INDEX).exists(),
        "teachers": {},
    }
    for name, t in read_teacher_specs(path).items():
        done = [i for i in range(spec.num_shards) if shard_is_complete(path, name, i)]
        samples = tokens = 0
        for i in done:
            a = shard_attrs(teacher_dir(path, name) / shard_name(i))
            samples += a["samples"]
            tokens += a["rows"]
        nbytes = _du(teacher_dir(path, name))
        raw = tokens * 2 * spec.geometry.num_layers * t.width * 2  # as plain float16
        out["teachers"][name] = {
            "model": t.model.name_or_path,
            "codec": t.kv_dtype,
            "fingerprint": t.fingerprint,
            "shards_partial": sum(1 for i in range(spec.num_shards) if i not in done and partial_attempts(path, name, i)),
            "time_map": t.time_map,
            "width": t.width,
            "latent_slots": t.latent.slots if t.latent else None,
            "shards_complete": len(done),
            "samples": samples,
            "tokens": tokens,
            "bytes": nbytes,
            "bytes_per_token": nbytes / tokens if tokens else float("nan"),
            "compression_ratio": raw / nbytes if nbytes else float("nan"),
        }
    out["bytes"] = _du(path)
    total_tokens = sum(t["tokens"] for t in out["teachers"].values())
    out["bytes_per_token"] = out["bytes"] / total_tokens if total_tokens else float("nan")
    return out


def format_inspect(info: dict[str, Any]) -> str:
    g = info["geometry"]
    fp = info["fingerprints"]
    lines = [
        f"store {info['store']}  ({'finalized' if info['finalized'] else 'NOT finalized'})",
        f"student {info['student']}: {g['num_layers']} layers x {g['num_kv_heads']} kv heads x "
        f"{g['head_dim']} dims; {info['num_shards']} shards; K/V blosc-zstd level {info['compression_level']}, {info['blosc_shuffle']} shuffle; "
        f"tokenizer {fp['tokenizer']}, data {fp['data']}",
        f"{'teacher':<20} {'time map':<14} {'codec':<8} {'width':>6} {'shards':>8} {'samples':>8} {'tokens':>10} "
        f"{'bytes':>12} {'B/token':>9} {'ratio':>6} {'latent':>6}  fingerprint",
    ]
    for name, t in info["teachers"].items():
        partial = f" ({t['shards_partial']} partial)" if t["shards_partial"] else ""
        lines.append(
            f"{name:<20} {t['time_map']:<14} {t['codec']:<8} {t['width']:>6} {t['shards_complete']:>4}/{info['num_shards']:<3} "
            f"{t['samples']:>8} {t['tokens']:>10} {t['bytes']:>12,} {t['bytes_per_token']:>9.1f} "
            f"{t['compression_ratio']:>6.2f} {t['latent_slots'] or '-':>6}  {t['fingerprint']}{partial}"
        )
    lines.append(
        f"total {info['bytes']:,} bytes on disk, {info['bytes_per_token']:.1f} bytes per token (all teachers); "
        "ratio = plain float16 bytes / bytes on disk; latent = M compressed reasoning slots per sample (KaVa latent mode)"
    )
    return "\n".join(lines)
