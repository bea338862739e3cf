"""Writing a zarr shard: ShardWriter, and the ownership protocol both backends' writers follow.

Each array task writes one shard of one teacher under the store's hidden `.partial/<teacher>/`
folder and renames it into place when complete, so a visible shard is always a complete one
and a killed task leaves nothing visible behind. One writer owns a (teacher, shard) at a time:
it holds `.partial/<teacher>/shard-NNNNN.lock` (store/lock.py) from before it touches anything
until its shard is in place (`acquire_shard` / `release_shard`); a second writer of the same
shard fails naming the owner, or waits (`on_busy`). The student tokens live in each teacher's
shard (tiny next to K/V) so a shard is readable alone and no two tasks ever write the same file.

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
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from kvdistill.schemas import StoreSpec

from . import codecs
from .errors import ShardComplete, names_path
from .layout import (
    KEY,
    lock_path,
    partial_attempts,
    partial_dir,
    shard_is_complete,
    shard_name,
    teacher_dir,
)
from .lock import FileLock

__all__ = [
    "CHUNK_BYTES",
    "CHUNKS_PER_SHARD",
    "ShardWriter",
    "compression",
    "latent_codec",
    "EXAMPLE_KEYS",
    "example_json",
    "shard_lock",
    "acquire_shard",
    "release_shard",
]

CHUNK_BYTES = 1 << 20  # read unit: ~1 MiB chunks
CHUNKS_PER_SHARD = 16  # write unit: zarr shard = 16 chunks


def shard_lock(path: str | Path, teacher: str, shard: int, on_busy: str = "fail") -> FileLock:
    """The lock that makes one process the only writer of (teacher, shard); not yet acquired."""
    return FileLock(
        lock_path(path, teacher, shard), f"teacher {teacher!r} {shard_name(shard)} of store {path}", on_busy
    )


def _remove_empty_partial_dirs(path: str | Path, teacher: str) -> None:
    """After a commit: drop `.partial/<teacher>/` and `.partial/` if nothing is left in them
    (another task may be creating its own there at the same moment: then they stay)."""
    for d in (partial_dir(path, teacher), partial_dir(path, teacher).parent):
        try:
            d.rmdir()
        except OSError:  # not empty (another task's lock or attempt), or gone already
            return


def compression(rec: StoreSpec | Any) -> dict[str, Any]:
    """ShardWriter's compression arguments from a StoreSpec or DumpTask."""
    return {"compression_level": rec.compression_level, "blosc_shuffle": rec.blosc_shuffle}


_SHUFFLE = {"byte": BloscShuffle.shuffle, "bit": BloscShuffle.bitshuffle}


def _kv_codec(chunk_bytes: int, level: int, shuffle: str) -> list:
    # Byte shuffle groups the exponent bytes of float16 / bfloat16 together, and one blosc block
    # per chunk (instead of blosc's small default blocks) lets zstd see the whole chunk (the
    # gain is in BENCHMARKS.md, bench/store.py). crc32c last: the checksum of the bytes on
    # disk, checked before anything decompresses them.
    return [
        BloscCodec(cname="zstd", clevel=level, shuffle=_SHUFFLE[shuffle], blocksize=int(chunk_bytes)),
        Crc32cCodec(),
    ]


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
    (store/layout.py). The latent K/V keep the codec's float member: float32 as
    float32, bfloat16 as its bits, float16 / int8 / int4 as float16 (M rows per sample are a
    small part of the shard, and int8 / int4 scale groups of 32 rows would straddle samples).

    With `logits_top_k=K` every write also takes `logits=(ids, lp)`: the teacher's K most likely
    next tokens per row ([T, K] vocabulary ids below `vocab_size`, and their log-probs, descending),
    stored as `logits_ids` int32 and `logits_lp` float16 [rows, K], chunked by rows like K / V.
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
        logits_top_k: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if codec not in ("float32", *codecs.CODECS):
            raise ValueError(f"unknown K/V codec {codec!r}; choose one of {['float32', *codecs.CODECS]}")
        if not 0 <= compression_level <= 9:
            raise ValueError(f"compression_level: blosc levels are 0 (none) to 9, got {compression_level}")
        if blosc_shuffle not in _SHUFFLE:
            raise ValueError(f"blosc_shuffle: 'byte' or 'bit', got {blosc_shuffle!r}")
        if logits_top_k < 0 or (logits_top_k and vocab_size is not None and not 0 < logits_top_k <= vocab_size):
            raise ValueError(f"logits_top_k: 0 (none) or 1 to the vocabulary's {vocab_size}, got {logits_top_k}")
        self.path, self.teacher, self.shard = Path(path), teacher, shard
        self.final = teacher_dir(path, teacher) / shard_name(shard)
        self.closed = False
        self.lock = acquire_shard(path, teacher, shard, on_busy)  # released by close / abort
        self.tmp = partial_dir(path, teacher) / f"{shard_name(shard)}.{socket.gethostname()}-{os.getpid()}"
        self.L, self.D, self.codec = num_layers, width, codec
        self.level, self.shuffle = compression_level, blosc_shuffle
        row_bytes = (
            4 * num_layers * width if codec == "float32" else codecs.bytes_per_row(codec, num_layers, width, part="k")
        )
        # Chunks of ~1 MiB (the read unit), whole key-scale groups; zarr shards of 16 chunks (the write unit).
        self.chunk_rows = max(codecs.GROUP, int(CHUNK_BYTES // row_bytes) // codecs.GROUP * codecs.GROUP)
        self.shard_rows = self.chunk_rows * CHUNKS_PER_SHARD
        self.group = zarr.open_group(self.tmp, mode="w")
        self.arrays: dict[str, zarr.Array] = {}
        self.aux: dict[str, list[str]] = {"k": [], "v": []}  # scale arrays per part
        self._buf: dict[str, list[np.ndarray]] = {n: [] for n in ("k", "v", "input_ids", "loss_mask")}
        self.K, self.V = logits_top_k, vocab_size
        if self.K:
            self._buf |= {"logits_ids": [], "logits_lp": []}
        kv_empty = np.zeros((0, num_layers, width), np.float16 if codec == "float16" else np.float32)
        # An empty shard still gets every array (with the codec's layout).
        self._empty = {
            "k": kv_empty,
            "v": kv_empty,
            "input_ids": np.zeros(0, np.int32),
            "loss_mask": np.zeros(0, np.bool_),
            "segment_ids": np.zeros(0, np.uint8),
            "logits_ids": np.zeros((0, self.K), np.int32),
            "logits_lp": np.zeros((0, self.K), np.float16),
        }
        self._buf_rows = 0
        self.rows = 0
        self.sample_ids: list[str] = []
        self.offsets = [0]
        self.crc: dict[str, int] = {}
        self.has_segments: bool | None = None  # decided by the first write
        self.examples: list[str] | None = None  # JSON per sample, when the first write gives one
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
        example: dict[str, str] | None = None,
        logits: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """k, v: [T, L, D]; input_ids, loss_mask, segment_ids: [T]; latent: see the class
        docstring; example: the sample's {"question", "reasoning", "answer"} (every sample of a
        shard or none), stored as JSON in `examples`; logits: (ids, log-probs) [T, K], exactly
        when the writer has logits_top_k. Encoded with the codec at flush."""
        T = len(input_ids)
        if k.shape != (T, self.L, self.D) or v.shape != (T, self.L, self.D) or len(loss_mask) != T:
            raise ValueError(
                f"sample {sample_id}: expected k, v of shape {(T, self.L, self.D)} and {T} mask "
                f"entries, got k {k.shape}, v {v.shape}, mask {len(loss_mask)}"
            )
        top = self._check_logits(sample_id, T, logits)
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
        self._add_example(sample_id, example)
        self._add_latent(sample_id, latent)
        kv_dtype = np.float16 if self.codec == "float16" else np.float32
        self._buf["k"].append(np.ascontiguousarray(k, dtype=kv_dtype))
        self._buf["v"].append(np.ascontiguousarray(v, dtype=kv_dtype))
        self._buf["input_ids"].append(np.asarray(input_ids, dtype=np.int32))
        self._buf["loss_mask"].append(np.asarray(loss_mask, dtype=np.bool_))
        if top is not None:
            self._buf["logits_ids"].append(top[0])
            self._buf["logits_lp"].append(top[1])
        self._buf_rows += T
        self.rows += T
        self.sample_ids.append(sample_id)
        self.offsets.append(self.rows)
        if self._buf_rows >= self.shard_rows:
            with names_path(self.tmp):
                self._flush(final=False)

    def _check_logits(
        self, sample_id: str, T: int, logits: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """A sample's (ids int32, log-probs float16) [T, K], checked against the writer's K and vocabulary."""
        if (logits is None) != (self.K == 0):
            raise ValueError(
                f"sample {sample_id}: "
                + (
                    "logits given but the writer has no logits_top_k"
                    if self.K == 0
                    else f"the writer stores the top {self.K} log-probs per token; pass logits=(ids, lp)"
                )
            )
        if logits is None:
            return None
        ids, lp = np.asarray(logits[0]), np.asarray(logits[1])
        if ids.shape != (T, self.K) or lp.shape != (T, self.K):
            raise ValueError(
                f"sample {sample_id}: logits ids {ids.shape} / lp {lp.shape}, expected {(T, self.K)} each"
            )
        if ids.size and (ids.min() < 0 or (self.V is not None and ids.max() >= self.V)):
            raise ValueError(f"sample {sample_id}: logits ids outside the vocabulary [0, {self.V})")
        return np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(lp, dtype=np.float16)

    def _add_example(self, sample_id: str, example: dict[str, str] | None) -> None:
        if not self.sample_ids:
            self.examples = None if example is None else []
        if (example is None) != (self.examples is None):
            raise ValueError(f"sample {sample_id}: an example must be given for every sample of a shard or for none")
        if example is not None:
            self.examples.append(example_json(sample_id, example))

    def _add_latent(self, sample_id: str, latent: dict[str, np.ndarray] | None) -> None:
        if (latent is None) != (self.M is None):
            raise ValueError(
                f"sample {sample_id}: "
                + (
                    "latent arrays given but the writer has no latent_slots"
                    if self.M is None
                    else f"the writer stores {self.M} latent slots per sample; pass latent="
                )
            )
        if latent is None:
            return
        M, L, D = self.M, self.L, self.D
        if self.has_hidden is None:
            self.has_hidden = latent.get("hidden") is not None
            self._lat = {
                n: []
                for n in (
                    "latent_k",
                    "latent_v",
                    "latent_mask",
                    "latent_pos",
                    *(("codi_hidden",) if self.has_hidden else ()),
                )
            }
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
        return max(
            1,
            int(
                CHUNK_BYTES
                // (
                    self.M
                    * self.L
                    * self.D
                    * np.dtype(np.float32 if self.latent_codec == "float32" else np.uint16).itemsize
                )
            ),
        )

    def _flush_latent(self, n: int) -> None:
        """Append the first n buffered samples of every latent array (whole zarr shards, or the rest at close)."""
        chunk = self._latent_chunk()
        for name, parts in self._lat.items():
            block = np.stack(parts[:n]) if n else None
            self._lat[name] = parts[n:]
            if block is None:
                continue
            if name in ("latent_k", "latent_v"):  # [n, M, L, D]
                enc = (
                    block
                    if self.latent_codec == "float32"
                    else codecs.encode(self.latent_codec, name[-1], block.reshape(-1, self.L, self.D))[""]
                )
                block = enc.reshape(block.shape)
            if name not in self.arrays:
                chunks = (chunk, *block.shape[1:])
                self.arrays[name] = self.group.create_array(
                    name,
                    shape=(0, *block.shape[1:]),
                    chunks=chunks,
                    shards=(chunk * CHUNKS_PER_SHARD, *block.shape[1:]),
                    dtype=block.dtype,
                    compressors=_kv_codec(chunk * block[:1].nbytes, self.level, self.shuffle),
                    config=WRITE_ALL,
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
            lead = (
                1 << 18
                if data.ndim == 1
                else self.chunk_rows
                if len(data) == rows
                else max(1, self.chunk_rows // codecs.GROUP)
            )
            chunks = (lead, *data.shape[1:])
            self.arrays[key] = self.group.create_array(
                key,
                shape=(0, *data.shape[1:]),
                chunks=chunks,
                shards=(chunks[0] * CHUNKS_PER_SHARD, *chunks[1:]),
                dtype=data.dtype,
                compressors=(
                    _kv_codec(chunks[0] * data[:1].nbytes, self.level, self.shuffle) if data.ndim > 1 else SMALL_CODECS
                ),
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
                    shape = {
                        "latent_k": (0, self.M, self.L, self.D),
                        "latent_v": (0, self.M, self.L, self.D),
                        "latent_mask": (0, self.M),
                        "latent_pos": (0, self.M, 0, 0),
                    }[name]
                    dtype = {"latent_mask": np.bool_, "latent_pos": np.int32}.get(name, dt)
                    self.group.create_array(name, shape=shape, dtype=dtype, compressors=SMALL_CODECS, config=WRITE_ALL)
        self.group.create_array(
            "offsets", data=np.asarray(self.offsets, dtype=np.int64), compressors=SMALL_CODECS, config=WRITE_ALL
        )
        ids = self.group.create_array("sample_ids", shape=(n,), dtype=str, compressors=SMALL_CODECS, config=WRITE_ALL)
        if n:
            ids[:] = np.asarray(self.sample_ids, dtype=str)
        if self.examples:
            ex = self.group.create_array("examples", shape=(n,), dtype=str, compressors=SMALL_CODECS, config=WRITE_ALL)
            ex[:] = np.asarray(self.examples, dtype=str)
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
            **(
                {"latent": {"slots": self.M, "codec": self.latent_codec, "hidden": bool(self.has_hidden)}}
                if self.M is not None
                else {}
            ),
            **({"logits": {"top_k": self.K, "vocab_size": self.V}} if self.K else {}),
            **(extra_attrs or {}),
        }
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(
            self.tmp, self.final
        )  # atomic: the shard appears complete or not at all (we own it: no one else renames here)
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
            raise ShardComplete(
                f"teacher {teacher!r} {shard_name(shard)} of store {path} is complete already; a complete shard is"
                " never rewritten"
            )
        for stale in partial_attempts(path, teacher, shard):  # a killed earlier attempt's: no live writer holds it
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    except BaseException:
        release_shard(lock, path, teacher)
        raise
    return lock


def release_shard(lock: FileLock, path: str | Path, teacher: str) -> None:
    lock.release()
    _remove_empty_partial_dirs(path, teacher)


EXAMPLE_KEYS = ("question", "reasoning", "answer")


def example_json(sample_id: str, example: dict[str, str]) -> str:
    """A sample's text as stored (both backends): JSON of exactly EXAMPLE_KEYS, strings."""
    if sorted(example) != sorted(EXAMPLE_KEYS) or not all(isinstance(v, str) for v in example.values()):
        raise ValueError(
            f"sample {sample_id}: example must map {list(EXAMPLE_KEYS)} to strings, got keys {sorted(example)}"
        )
    return json.dumps({k: example[k] for k in EXAMPLE_KEYS}, ensure_ascii=False)


def latent_codec(codec: str) -> str:
    """How a shard of K/V codec `codec` stores its latent K/V (see ShardWriter)."""
    return codec if codec in ("float32", "bfloat16") else "float16"
