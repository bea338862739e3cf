"""Read layer 2 of 3, one shard: a zarr shard's rows by name (ShardReader), K/V rows decoded
(kv_rows), and the store-wide metadata a reader opens once (open_root: consolidated metadata;
read_index: index.parquet). Below it store/rows.py (layer 1, checked byte reads of one array);
above it store/samples.py (layer 3, whole samples for the trainer)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from . import codecs
from .errors import CorruptShard, StoreError
from .layout import INDEX, KEY, shard_attrs, shard_name, teacher_dir
from .rows import ShardedRows, ZarrRows, checked_reader

LOGITS = ("logits_ids", "logits_lp")  # a teacher's top-K next tokens [rows, K] int32 and log-probs float16

__all__ = [
    "LOGITS",
    "ShardReader",
    "kv_rows",
    "read_index",
    "index_damage",
    "index_error",
    "read_index_table",
    "open_root",
]


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
                    f"{self.dir}: index.parquet lists {len(self.sample_ids)} samples / {int(self.offsets[-1])} rows,"
                    f" the shard holds {attrs['samples']} / {attrs['rows']}; run `kvdistill store finalize {path}`"
                    " again"
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
                    raise StoreError(
                        f"{self.dir}: its offsets differ from index.parquet; run `kvdistill store verify`, then"
                        " `kvdistill store finalize` again"
                    )
                if name == "sample_ids" and [str(x) for x in got] != self.sample_ids:
                    raise StoreError(
                        f"{self.dir}: its sample ids differ from index.parquet; run `kvdistill store verify`, then"
                        " `kvdistill store finalize` again"
                    )

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

    def rows(
        self, start: int, stop: int, names: tuple[str, ...] = ("k", "v", "input_ids", "loss_mask"), decode: bool = True
    ) -> dict[str, np.ndarray | codecs.QuantRows]:
        """Token rows [start, stop) of the given arrays (one read per stored array); K and V
        come back decoded: float16 / float32 as stored, the other codecs as float32; decode=False
        leaves them as stored (bfloat16 bit patterns as uint16, int8 / int4 as `codecs.QuantRows`)."""
        if "segment_ids" in names and "segment_ids" not in self._arrays:
            raise StoreError(
                f"{self.dir} has no segment_ids (written before kvdistill stored them); re-dump this "
                "teacher into a new --store to use latent mode"
            )
        if any(n in LOGITS for n in names) and not self.logits_top_k:
            raise StoreError(
                f"{self.dir} holds no teacher logits; re-dump this teacher with `kvdistill dump --logits-top-k K` "
                "(its tokenizer must be the student's) into a new --store or under another --teacher-name"
            )
        return {n: self._kv(n, start, stop, decode) if n in ("k", "v") else self.reader(n)[start:stop] for n in names}

    def examples(self, j0: int = 0, j1: int | None = None) -> list[dict[str, str]] | None:
        """The texts of samples [j0, j1): {"question", "reasoning", "answer"} each; None if the
        shard was written before kvdistill recorded them."""
        if "examples" not in self._arrays:
            return None
        return [json.loads(str(x)) for x in self.reader("examples")[j0:j1]]

    @property
    def logits_top_k(self) -> int:
        """K of the stored top-K teacher log-probs (logits_ids int32, logits_lp float16 [rows, K],
        read with `rows(..., LOGITS)`); 0: none."""
        return (self.attrs.get("logits") or {}).get("top_k", 0)

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
                x = codecs.decode(info["codec"], part, {"": x.reshape(-1, *x.shape[2:])}, 0, x.shape[-1]).reshape(
                    x.shape
                )
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
        return kv_rows(arrays, codec, part, start, stop, self.attrs["width"], self.fast.get(part), decode)


def kv_rows(
    arrays: dict[str, zarr.Array | ShardedRows],
    codec: str,
    part: str,
    start: int,
    stop: int,
    width: int,
    fast: ShardedRows | None = None,
    decode: bool = True,
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
        return codecs.QuantRows(
            codec, part, width, start, fast(start, stop) if fast else arrays[""][start:stop], **scales
        )

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
    try:
        t = read_index_table(f, ["teacher", "shard", "sample_id", "sample_index", "row_start", "row_stop"])
        t = t.filter(pc.is_in(t["teacher"], value_set=pa.array(list(teachers), pa.string())))
        t = t.sort_by([("teacher", "ascending"), ("shard", "ascending"), ("sample_index", "ascending")])
        teacher, shard = t["teacher"].to_numpy(zero_copy_only=False), t["shard"].to_numpy()
        ids, start, stop = t["sample_id"].to_pylist(), t["row_start"].to_numpy(), t["row_stop"].to_numpy()
    except OSError as e:
        if e.errno is not None:  # the machine's failure (permissions, I/O), not the file's content
            raise
        raise index_error(f, e) from e
    except Exception as e:  # any decoding error of a corrupt file (pyarrow's, a non-UTF-8 id, ...) is damage
        raise index_error(f, e) from e
    cuts = (
        np.flatnonzero((teacher[1:] != teacher[:-1]) | (shard[1:] != shard[:-1])) + 1
    )  # a loop per shard, not per row
    bounds = [0, *cuts.tolist(), len(ids)] if len(ids) else []
    return {
        (str(teacher[a]), int(shard[a])): (np.append(start[a:b], stop[b - 1]).astype(np.int64), ids[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    }


def read_index_table(f: Path, columns: list[str] | None = None) -> pa.Table:
    """index.parquet (or its `columns`) as a table, through the plain Parquet file reader: pyarrow's
    dataset reader (`read_table(..., filters=...)`) hangs on some corrupt files (pyarrow 26: a flipped
    byte in a page header) where this one raises."""
    return pq.ParquetFile(pa.BufferReader(f.read_bytes())).read(columns=columns)


def index_damage(f: Path, e: Exception) -> str:
    """What is wrong with an index.parquet that does not decode (`e`: the reader's error), one line."""
    why = " ".join(str(e).encode("ascii", "backslashreplace").decode().split())  # one line, no control bytes
    return f"{f} does not decode ({type(e).__name__}: {why}): index.parquet is corrupt"


def index_error(f: Path, e: Exception) -> CorruptShard:
    """index.parquet does not decode: the integrity error naming it, and the fix."""
    return CorruptShard(
        f"{index_damage(f, e)}; run `kvdistill store finalize {f.parent}` again to rewrite it from the shards"
    )


def open_root(path: str | Path) -> zarr.Group:
    """The store's root group with the metadata `finalize` consolidated: child groups and arrays
    then open without reading their metadata from disk (a shard's ~10 metadata reads cost more
    than reading a small shard's data)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "consolidated metadata is not yet part of the v3 spec"
            root = zarr.open_group(path, mode="r", use_consolidated=True)
    except ValueError as e:
        raise StoreError(
            f"store {path} has no consolidated metadata ({e}); run `kvdistill store finalize {path}`"
        ) from e
    return root
