"""Read layer 3 of 3, samples: a zarr store's samples in the trainer's format, every teacher
zipped, read through store/reader.py (layer 2, one shard's rows) and store/rows.py (layer 1, one
array's checked bytes). backend.shard_samples reads either backend through here or store/wds_reader.py.

Reads are sequential blocks of whole samples (one read per array per span of about one zarr
shard of rows), never a random access per sample, and run one step ahead in background
threads."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import codecs
from .errors import StoreError
from .layout import shard_name
from .reader import LOGITS, ShardReader, open_root, read_index

__all__ = [
    "READ_SPAN_CHUNKS",
    "read_spans",
    "kept_per_shard",
    "zarr_samples",
    "contract_latent",
    "check_latent_sample",
]

READ_SPAN_CHUNKS = 16  # rows per K/V read: this many zarr chunks (one zarr shard), whole samples


def read_spans(offsets: np.ndarray, span: int) -> Iterator[tuple[int, int]]:
    """Samples [j0, j1) per read: whole samples, about `span` rows each (at least one sample)."""
    n, j0 = len(offsets) - 1, 0
    while j0 < n:
        j1 = min(max(j0 + 1, int(np.searchsorted(offsets, offsets[j0] + span, side="left"))), n)
        yield j0, j1
        j0 = j1


def zarr_samples(
    store: str | Path,
    teachers: list[str],
    shards: list[int],
    *,
    read_kv: bool = True,
    read_latent: bool = False,
    decode: bool = True,
    keep: np.ndarray | None = None,
    read_logits: bool = False,
) -> Iterator[dict[str, Any]]:
    """The samples of `shards`, in this order (backend.shard_samples documents the format). Reads
    run one step ahead in a background thread, across shard boundaries too: while the caller
    consumes a span, the next span (or the next shard's opening, token arrays and first span) is
    read, and every teacher's K and V of a span are read concurrently (the K/V reader
    decompresses outside the GIL). keep: only the samples at these sorted positions of the
    sequence (`read_units` decides what is read for them).

    read_logits: each sample also gets "logits": {teacher: (ids [T, K] int32, lp [T, K] float16)}
    for every teacher that stores them (`dump --logits-top-k K`; the teacher spec's logits_top_k
    says which do): row t is the teacher's next-token distribution at student position t, i.e. it
    predicts input_ids[t + 1]. StoreError if none of `teachers` stores logits."""
    return _ZarrShards(Path(store), list(teachers), read_kv, read_latent, decode, read_logits).samples(
        list(shards), keep
    )


def read_units(off: np.ndarray, wanted: np.ndarray, span: int, gap: int) -> Iterator[tuple[int, int]]:
    """Reads [j0, j1) of samples (offsets `off`) that cover the sorted sample indices `wanted`:
    runs of wanted samples, a run extended over unwanted ones when the rows between are fewer
    than `gap` (one chunk: reading them costs no chunk decode that the two reads would not
    each do anyway), never more than `span` rows unless one sample is longer."""
    if not len(wanted):
        return
    j0 = prev = int(wanted[0])
    for j in wanted[1:].tolist():
        if int(off[j]) - int(off[prev + 1]) >= gap or int(off[j + 1]) - int(off[j0]) > span:
            yield j0, prev + 1
            j0 = j
        prev = j
    yield j0, prev + 1


class _ZarrShards:
    def __init__(
        self, store: Path, teachers: list[str], read_kv: bool, read_latent: bool, decode: bool, read_logits: bool
    ) -> None:
        self.store, self.teachers = store, teachers
        self.read_kv, self.read_latent, self.decode, self.read_logits = read_kv, read_latent, decode, read_logits

    def open(self, root: zarr.Group, index: dict, shard: int) -> dict[str, Any]:
        """One shard, ready to read: every teacher's reader, the token arrays, the read spans."""
        empty = (np.zeros(1, np.int64), [])
        readers = [
            ShardReader(
                self.store,
                t,
                shard,
                group=root[f"teachers/{t}/{shard_name(shard)}"],
                index=index.get((t, shard), empty),
            )
            for t in self.teachers
        ]
        first = readers[0]
        for t, r in zip(self.teachers[1:], readers[1:], strict=True):
            if r.sample_ids != first.sample_ids or not np.array_equal(r.offsets, first.offsets):
                raise StoreError(
                    f"{shard_name(shard)}: teacher {t!r} holds other samples than {self.teachers[0]!r}; "
                    "was every teacher dumped from the same data and num_shards?"
                )
        # Token ids and masks are a few bytes per token: read them for the whole shard once
        # (their chunks span far more rows than a K/V read span).
        token_names = ("input_ids", "loss_mask", "segment_ids") if self.read_latent else ("input_ids", "loss_mask")
        # What this run does not read is still checked (crc32c only, no decoding), so damage
        # anywhere in a shard is refused; K/V a run never uses (CE only) are left alone.
        logits = [t for t, r in zip(self.teachers, readers, strict=True) if r.logits_top_k] if self.read_logits else []
        if self.read_logits and not logits:
            raise StoreError(
                f"{shard_name(shard)}: none of teachers {self.teachers} stores logits; re-dump a teacher with the "
                "student's tokenizer with `kvdistill dump --logits-top-k K`"
            )
        for j, r in enumerate(readers):
            kv = {n for n in r.names if n in ("k", "v") or n.startswith(("k_", "v_"))}
            latent = {n for n in r.names if n.startswith(("latent_", "codi_"))} if self.read_latent else set()
            read = set(LOGITS) if self.teachers[j] in logits else set()  # read (and checked) below
            r.check_unread(
                (set(token_names) if j == 0 else set()) | kv | latent | read
            )  # tokens come from the first teacher's shard
        off = first.offsets
        # Read spans of about one zarr shard (READ_SPAN_CHUNKS chunks): each read has a fixed
        # cost, and a chunk straddling two spans is the only one decompressed twice
        # (bench/store.py measures the policy).
        span = READ_SPAN_CHUNKS * first.array("k").chunks[0] if self.read_kv else int(off[-1]) + 1  # rows per read
        return {
            "shard": shard,
            "readers": readers,
            "ids": first.sample_ids,
            "off": off,
            "tokens": first.rows(0, int(off[-1]), token_names),
            "spans": list(read_spans(off, span)),
            "span": span,
            "gap": first.array("k").chunks[0] if self.read_kv else span,
            "logits": logits,
        }

    def samples(self, shards: list[int], keep: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
        n_parts = 2 * len(self.teachers) if self.read_kv else 0
        workers = max(1, n_parts + len(self.teachers) * (self.read_latent + self.read_logits))
        with (
            ThreadPoolExecutor(1, thread_name_prefix="kvdistill-ahead") as ahead,
            ThreadPoolExecutor(workers, thread_name_prefix="kvdistill-arrays") as arrays,
        ):

            def read(
                sh: dict[str, Any], j0: int, j1: int
            ) -> tuple[list[np.ndarray | codecs.QuantRows], list[dict[str, np.ndarray]], dict[str, dict]]:
                r0, r1 = int(sh["off"][j0]), int(sh["off"][j1])
                parts = [(r, p) for r in sh["readers"] for p in ("k", "v")] if self.read_kv else []
                # decode=False: K/V stay as stored (16-bit floats, int8 / int4 codes + scales), so
                # the read, the trainer's collate and its device copy move stored-size bytes.
                kv = [arrays.submit(r.rows, r0, r1, (p,), self.decode) for r, p in parts]
                latent = [arrays.submit(r.latent, j0, j1) for r in sh["readers"]] if self.read_latent else []
                logits = {
                    t: arrays.submit(r.rows, r0, r1, LOGITS)
                    for t, r in zip(self.teachers, sh["readers"], strict=True)
                    if t in sh["logits"]
                }
                return (
                    [f.result()[p] for f, (_, p) in zip(kv, parts, strict=True)],
                    [f.result() for f in latent],
                    {t: f.result() for t, f in logits.items()},
                )

            # Consolidated metadata and index.parquet, read once: opening a shard then reads no
            # metadata, offsets or sample ids from disk (a few ms a shard and teacher otherwise).
            root, index = open_root(self.store), read_index(self.store, self.teachers)
            wanted = kept_per_shard(shards, keep, index, self.teachers[0])
            units = (
                (sh, j0, j1, want)
                for shard, want in wanted
                for sh in (self.open(root, index, shard),)
                for j0, j1 in (sh["spans"] if want is None else read_units(sh["off"], want, sh["span"], sh["gap"]))
            )

            def fetch():  # only ever runs on `ahead`, one at a time: `units` advances there
                unit = next(units, None)
                return None if unit is None else (unit, read(*unit[:3]))

            pending = ahead.submit(fetch)
            while (got := pending.result()) is not None:
                pending = ahead.submit(fetch)
                (sh, j0, j1, want), (blocks, latent, logits) = got
                yield from self.span_samples(sh, j0, j1, blocks, latent, want, logits)

    def span_samples(
        self,
        sh: dict[str, Any],
        j0: int,
        j1: int,
        blocks: list,
        latent: list[dict[str, np.ndarray]],
        want: np.ndarray | None = None,
        logits: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        off, tokens = sh["off"], sh["tokens"]
        r0 = int(off[j0])
        js = range(j0, j1) if want is None else want[(want >= j0) & (want < j1)].tolist()
        for j in js:
            a, b = int(off[j]) - r0, int(off[j + 1]) - r0
            sample = {
                "sample_id": sh["ids"][j],
                "shard": sh["shard"],
                "input_ids": tokens["input_ids"][r0 + a : r0 + b],
                "loss_mask": tokens["loss_mask"][r0 + a : r0 + b],
                "kv": (
                    {t: (blocks[2 * n][a:b], blocks[2 * n + 1][a:b]) for n, t in enumerate(self.teachers)}
                    if self.read_kv
                    else {}
                ),
            }
            if self.read_logits:
                sample["logits"] = {t: (x["logits_ids"][a:b], x["logits_lp"][a:b]) for t, x in logits.items()}
            if self.read_latent:
                sample["segment_ids"] = tokens["segment_ids"][r0 + a : r0 + b]
                sample["latent"] = {
                    t: contract_latent({k: x[j - j0] for k, x in lat.items()})
                    for t, lat in zip(self.teachers, latent, strict=True)
                }
            yield sample


def kept_per_shard(
    shards: list[int], keep: np.ndarray | None, index: dict, teacher: str
) -> list[tuple[int, np.ndarray | None]]:
    """[(shard, its sample indices to yield, None: all)] for the sorted positions `keep` of the
    sequence of `shards` (their sample counts: `teacher`'s in the store's index, (teacher, shard) ->
    (.., offsets)); a shard holding none of them is left out (never opened). Both backends' readers."""
    if keep is None:
        return [(s, None) for s in shards]
    counts = [len(index.get((teacher, s), ((), []))[1]) for s in shards]
    ends = np.cumsum(counts)
    out = []
    for s, end, n in zip(shards, ends.tolist(), counts, strict=True):
        lo, hi = np.searchsorted(keep, [end - n, end])
        if hi > lo:
            out.append((s, keep[lo:hi] - (end - n)))
    return out


def contract_latent(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One teacher's latent record as the trainer sees it (the kept positions stay in the store)."""
    out = {"k": x["k"].astype(np.float32), "v": x["v"].astype(np.float32), "mask": x["mask"].astype(np.bool_)}
    if "hidden" in x:
        out["hidden"] = x["hidden"].astype(np.float32)
    return out


def check_latent_sample(sample: dict[str, Any], teachers: list[str], shard: int) -> None:
    """A webdataset sample read in latent mode holds segment ids and every teacher's latent K/V."""
    if "segment_ids" not in sample:
        raise StoreError(
            f"{shard_name(shard)}: sample {sample['sample_id']} has no segment_ids (written before kvdistill stored "
            "them); re-dump into a new --store to use latent mode"
        )
    missing = [t for t in teachers if t not in sample.get("latent", {})]
    if missing:
        raise StoreError(
            f"{shard_name(shard)}: teacher(s) {missing} hold no latent K/V; re-dump them with --latent-slots M"
        )
