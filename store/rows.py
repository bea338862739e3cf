"""Read layer 1 of 3, one array: row ranges of a sharded zarr v3 array read straight from its
shard files, every chunk checked (the K/V hot loop). store/reader.py (layer 2) reads a shard's
arrays through it; store/samples.py (layer 3) turns those rows into samples.

zarr is the reference reader of the store and every tool opens it with zarr alone. For the
training stream's reads (a few thousand contiguous rows of `k` / `v` at a time) zarr's generic
path costs more than the decompression itself: a partial-shard read fetches the chunks one
awaited request at a time, decodes into an intermediate buffer and copies it again, about
0.9 GB/s (logical) on the 2-core CI machine against ~2.5 GB/s for blosc decompressing the same
chunks on two threads (bench/store.py).

`ShardedRows(array)` reads exactly the layout `ShardWriter` writes and nothing else:

    one `sharding_indexed` codec, sharded along rows only, index at the end (bytes + crc32c),
    inner codecs `bytes` (little endian), optionally `blosc` or `zstd`, then `crc32c`

For rows [a, b) it reads the covered byte range of each shard file with one read, checks the
shard index's crc32c and every chunk's crc32c as zarr does, and decompresses every chunk on a
thread pool (blosc releases the GIL) directly into the output where a chunk lies inside the
range. ShardWriter writes every chunk, so a missing shard file or index entry is damage and
raises CorruptShard naming store, teacher, shard, array and chunk (zarr would read the fill
value). `ShardedRows.supports(array)` says whether an array has this layout; `ShardReader`
uses zarr for anything else (`zarr_read`, after `check_chunks_present`), and tests check both
readers agree bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numcodecs.zstd
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from .errors import CorruptShard

__all__ = ["ShardedRows", "ZarrRows", "check_chunks_present", "checked_reader", "describe", "missing_chunks"]

Decode = Callable[[np.ndarray, int], np.ndarray]  # (stored rows, first row index) -> decoded rows
_MISSING = 2**64 - 1  # index entry of a chunk zarr did not write (all fill value)
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """One pool per process, made on first use."""
    global _POOL
    if _POOL is None:
        # The cores this process may use (a SLURM task's cpuset, not the node's count); a read
        # span is 16 chunks, so more than 8 threads buy nothing.
        _POOL = ThreadPoolExecutor(min(8, len(os.sched_getaffinity(0))), thread_name_prefix="kvdistill-rows")
    return _POOL


def _forget_pool() -> None:
    # A forked child (a DataLoader worker) inherits the pool object but none of its threads:
    # submitting to it would wait forever. The child makes its own.
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def describe(array_dir: str | Path) -> str:
    """'store S: teacher 'T' shard-00003: array k' for an array folder inside a store."""
    p = Path(array_dir)
    if len(p.parts) >= 4 and p.parts[-4] == "teachers":
        return f"store {Path(*p.parts[:-4])}: teacher {p.parts[-3]!r} {p.parts[-2]}: array {p.parts[-1]}"
    return f"array {p}"


def _chunk_files(array: zarr.Array, path: Path) -> list[Path]:
    """The files zarr stores `array` in (one per shard for a sharded array)."""
    grid = [-(-s // c) if s else 0 for s, c in zip(array.shape, array.shards or array.chunks, strict=True)]
    return [path / array.metadata.encode_chunk_key(idx) for idx in np.ndindex(*grid)]


def missing_chunks(array: zarr.Array, path: str | Path) -> list[str]:
    """What of `array` is missing on disk: chunk (shard) files, and for ShardWriter's sharded
    layout chunks absent from a shard's index. ShardWriter writes every chunk, so each is damage
    (zarr would read it as the fill value)."""
    path, out = Path(path), []
    fast = ShardedRows(array, path) if ShardedRows.supports(array) else None
    for s, f in enumerate(_chunk_files(array, path)):
        if not f.exists():
            out.append(f"chunk file {f} is missing (deleted or lost)")
        elif fast is not None:
            rows = min(array.shape[0], (s + 1) * fast.shard_rows) - s * fast.shard_rows
            try:
                with open(f, "rb") as fh:
                    index = fast._index(fh, f)[: -(-rows // fast.chunk_rows)]
            except CorruptShard:
                out.append(f"shard file {f}: its chunk index is truncated or fails its crc32c check")
                continue
            out += [
                f"chunk {s * fast.per_shard + c} is missing from shard file {f}"
                for c in np.flatnonzero(index[:, 0] == _MISSING)
            ]
    return out


def check_chunks_present(array: zarr.Array, path: str | Path) -> None:
    """Raise CorruptShard naming the first missing chunk of `array` (see missing_chunks)."""
    missing = missing_chunks(array, path)
    if missing:
        raise CorruptShard(
            f"{describe(path)}: {missing[0]}; re-dump this shard (`kvdistill store verify` names the command)"
        )


class ZarrRows:
    """zarr's reading of an array ShardedRows does not support (offsets, sample ids, arrays of
    other layouts), with every chunk file checked present on first read and zarr's crc32c
    errors as CorruptShard. rows[a:b] == array[a:b]."""

    def __init__(self, array: zarr.Array, path: str | Path) -> None:
        self.array, self.path, self.checked = array, Path(path), False
        self.shape = array.shape

    def __getitem__(self, sl) -> np.ndarray:
        if not self.checked:
            check_chunks_present(self.array, self.path)
            self.checked = True
        try:
            return self.array[sl]
        except (ValueError, RuntimeError, OSError) as e:  # zarr: "Stored and computed checksum do not match"
            raise CorruptShard(
                f"{describe(self.path)}: a chunk fails its crc32c check or does not decode ({e}); run `kvdistill store"
                " verify`"
            ) from e

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return self[start:stop]


def checked_reader(array: zarr.Array, path: str | Path) -> ShardedRows | ZarrRows:
    """The fast reader where the layout allows, else zarr's; both check every chunk."""
    return ShardedRows(array, path) if ShardedRows.supports(array) else ZarrRows(array, path)


class ShardedRows:
    """rows = ShardedRows(group["k"], shard_dir / "k"); x = rows(a, b)  # == group["k"][a:b]"""

    # Checking each chunk's crc32c is what makes a flipped byte an error instead of data. Only
    # bench/store.py turns it off, to measure what it costs side by side.
    check_crc = True

    def __init__(self, array: zarr.Array, path: str | Path) -> None:
        if not self.supports(array):
            raise ValueError(f"{path}: not the row-sharded layout ShardWriter writes; read it with zarr")
        sharding: ShardingCodec = array.metadata.codecs[0]
        self.array, self.path = array, Path(path)
        self.shape, self.dtype = array.shape, array.dtype
        self.row_shape = array.shape[1:]
        self.chunk_rows, self.shard_rows = array.chunks[0], array.shards[0]
        self.per_shard = self.shard_rows // self.chunk_rows
        self.chunk_bytes = self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.compressor = next(
            (type(c).__name__ for c in sharding.codecs[1:-1]), None
        )  # BloscCodec, ZstdCodec or None
        self.where = describe(self.path)

    @staticmethod
    def supports(array: zarr.Array) -> bool:
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return False
        s = codecs[0]
        inner_ok = (
            len(s.codecs) in (2, 3)
            and isinstance(s.codecs[0], BytesCodec)
            and (s.codecs[0].endian is None or s.codecs[0].endian.value == "little")
            and all(isinstance(c, BloscCodec | ZstdCodec) for c in s.codecs[1:-1])
            and isinstance(s.codecs[-1], Crc32cCodec)
        )
        index_ok = (
            s.index_location == ShardingCodecIndexLocation.end
            and len(s.index_codecs) == 2
            and isinstance(s.index_codecs[0], BytesCodec)
            and isinstance(s.index_codecs[1], Crc32cCodec)
        )
        rows_only = array.shards is not None and tuple(array.shards[1:]) == tuple(array.shape[1:]) == tuple(
            array.chunks[1:]
        )
        key = getattr(array.metadata.chunk_key_encoding, "name", None) == "default"
        return inner_ok and index_ok and rows_only and key and np.dtype(array.dtype).byteorder in ("<", "=", "|")

    def _shard_file(self, s: int) -> Path:
        return self.path / self.array.metadata.encode_chunk_key((s,) + (0,) * len(self.row_shape))

    def _index(self, f, name: Path) -> np.ndarray:
        """[per_shard, 2] (offset, nbytes) of every chunk in the shard, crc32c checked."""
        n = 16 * self.per_shard + 4
        f.seek(0, os.SEEK_END)
        if f.tell() < n:
            raise CorruptShard(
                f"{self.where}: shard file {name}: {f.tell()} bytes, shorter than its {n}-byte index (truncated?); run"
                " `kvdistill store verify`"
            )
        f.seek(-n, os.SEEK_END)
        raw = f.read(n)
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise CorruptShard(
                f"{self.where}: shard file {name}: its chunk index fails its crc32c check (corrupt or truncated); run"
                " `kvdistill store verify`"
            )
        return np.frombuffer(raw[:-4], "<u8").reshape(self.per_shard, 2)

    def __getitem__(self, rows: slice) -> np.ndarray:
        """rows[a:b] == rows(a, b): the array's own slicing, for code that takes either."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"{self.path}: ShardedRows reads contiguous row ranges [a:b] only")
        a, b, _ = rows.indices(self.shape[0])
        return self(a, b)

    def __call__(self, start: int, stop: int, decode: Decode | None = None) -> np.ndarray:
        """Rows [start, stop) (clipped to the array like a zarr slice), as stored, or through
        `decode`: (stored rows x [n, ...], index of x's first row) -> decoded rows [n, ...] of one
        dtype and row shape, applied chunk by chunk on the pool right after decompression (while
        the chunk is in cache, on every core) instead of in a second pass over the whole range."""
        start, stop = max(0, start), min(stop, self.shape[0])
        if decode is None:
            out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
        else:  # the decoded dtype and row shape, from zero stored rows
            probe = decode(np.zeros((0, *self.row_shape), self.dtype), start)
            out = np.empty((max(0, stop - start), *probe.shape[1:]), probe.dtype)
        if stop <= start:
            return out
        # Every chunk is one job on the pool: read its bytes (pread releases the GIL), decompress,
        # decode; so reading one chunk overlaps decompressing another.
        futures = []
        with ExitStack() as files:
            try:
                for s in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
                    base = s * self.shard_rows
                    c0 = (max(start, base) - base) // self.chunk_rows
                    c1 = (min(stop, base + self.shard_rows) - 1 - base) // self.chunk_rows + 1
                    name = self._shard_file(s)
                    if not name.exists():  # ShardWriter writes every shard file: this one was lost
                        raise CorruptShard(
                            f"{self.where}: shard file {name} (rows {base}-{base + self.shard_rows - 1}) is missing"
                            " (deleted or lost); run `kvdistill store verify`"
                        )
                    f = files.enter_context(open(name, "rb"))
                    index, fd = self._index(f, name)[c0:c1], f.fileno()
                    for c, (off, nbytes) in zip(range(c0, c1), index, strict=True):
                        if off == _MISSING:  # every chunk is written (write_empty_chunks): this one was lost
                            raise CorruptShard(
                                f"{self.where}: chunk {base // self.chunk_rows + c} (rows from"
                                f" {base + c * self.chunk_rows}) is missing from shard file {name}; run `kvdistill"
                                " store verify`"
                            )
                        futures.append(
                            _pool().submit(
                                self._chunk,
                                base + c * self.chunk_rows,
                                (fd, int(off), int(nbytes)),
                                name,
                                start,
                                stop,
                                out,
                                decode,
                            )
                        )
                for future in futures:
                    future.result()
            finally:
                for future in futures:  # no job may outlive its file
                    future.cancel() or future.exception()
        return out

    def check(self) -> None:
        """Check every chunk's crc32c (and that none is missing) without decompressing: for the
        arrays of a shard a reader does not otherwise read, so damage anywhere is refused."""
        for s in range(-(-self.shape[0] // self.shard_rows)):
            name = self._shard_file(s)
            if not name.exists():
                raise CorruptShard(
                    f"{self.where}: shard file {name} is missing (deleted or lost); run `kvdistill store verify`"
                )
            rows = min(self.shape[0], (s + 1) * self.shard_rows) - s * self.shard_rows
            with open(name, "rb") as f:
                index = self._index(f, name)[: -(-rows // self.chunk_rows)]
                for c, (off, nbytes) in enumerate(index):
                    row0 = s * self.shard_rows + c * self.chunk_rows
                    if off == _MISSING:
                        raise CorruptShard(
                            f"{self.where}: chunk {row0 // self.chunk_rows} (rows from {row0}) is missing from shard"
                            f" file {name}; run `kvdistill store verify`"
                        )
                    self._checked(os.pread(f.fileno(), int(nbytes), int(off)), int(nbytes), name, row0)

    def _checked(self, data: bytes, nbytes: int, name: Path, row0: int) -> memoryview:
        """The chunk's body after its crc32c (the last 4 bytes) is checked."""
        chunk = f"chunk {row0 // self.chunk_rows} (rows from {row0}) in shard file {name}"
        if len(data) != nbytes or nbytes < 4:
            raise CorruptShard(
                f"{self.where}: {chunk} runs past the end of the file (truncated?); run `kvdistill store verify`"
            )
        if self.check_crc and google_crc32c.value(np.frombuffer(data, np.uint8)[:-4]) != int.from_bytes(
            data[-4:], "little"
        ):  # a view: no copy
            raise CorruptShard(
                f"{self.where}: {chunk} fails its crc32c check (corrupt on disk); run `kvdistill store verify`"
            )
        return memoryview(data)[:-4]

    def _chunk(
        self,
        row0: int,
        where: tuple[int, int, int],
        name: Path,
        start: int,
        stop: int,
        out: np.ndarray,
        decode: Decode | None,
    ) -> None:
        """The chunk starting at row row0, stored at `where` = (open file, offset, bytes), into
        its rows of out, after its crc32c (the last 4 bytes) is checked."""
        a, b = max(start, row0), min(stop, row0 + self.chunk_rows)  # the rows of this chunk we want
        direct = decode is None and a == row0 and b == row0 + self.chunk_rows  # decompress straight into out
        buf = out[a - start : b - start] if direct else np.empty((self.chunk_rows, *self.row_shape), self.dtype)
        fd, off, nbytes = where
        self._decompress(self._checked(os.pread(fd, nbytes, off), nbytes, name, row0), buf, name, row0)
        if not direct:
            rows = buf[a - row0 : b - row0]
            out[a - start : b - start] = rows if decode is None else decode(rows, a)

    def _decompress(self, data: memoryview, dest: np.ndarray, name: Path, row0: int) -> None:
        try:
            if self.compressor == "BloscCodec":
                nbytes = int.from_bytes(data[4:8], "little") if len(data) >= 16 else -1  # blosc header: decoded size
                if nbytes != self.chunk_bytes:
                    raise ValueError(f"blosc header says {nbytes} bytes, expected {self.chunk_bytes}")
                numcodecs.blosc.decompress(data, dest)
            elif self.compressor == "ZstdCodec":
                raw = numcodecs.zstd.decompress(data)
                if len(raw) != self.chunk_bytes:
                    raise ValueError(f"{len(raw)} bytes, expected {self.chunk_bytes}")
                dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
            elif len(data) == self.chunk_bytes:
                dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
            else:
                raise ValueError(f"{len(data)} bytes, expected {self.chunk_bytes}")
        except (RuntimeError, ValueError) as e:
            raise CorruptShard(
                f"{self.where}: chunk {row0 // self.chunk_rows} (rows from {row0}) in shard file {name} does not"
                f" decode ({e}); run `kvdistill store verify`"
            ) from e
