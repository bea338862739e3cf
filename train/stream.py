"""Streaming input for the trainer: shards of every teacher, zipped by sample, split across
ranks x dataloader workers, shuffled by seed per epoch (shard order + a shuffle buffer).

Reads are sequential blocks of whole samples (one zarr read per array per block), never a
random access per sample."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kvdistill.align.time import linear_resample_time_map
from kvdistill.store import (
    ShardReader,
    StoreError,
    is_wds_store,
    open_root,
    open_specs,
    read_index,
    shard_name,
    wds_stream,
)
from kvdistill.store.codecs import QuantRows

from .quant import collate_quant

__all__ = ["KVStream", "collate", "train_loader", "derangement", "shuffle_kv", "shuffle_latent", "READ_SPAN_CHUNKS", "read_spans"]

READ_SPAN_CHUNKS = 16  # rows per K/V read: this many zarr chunks (one zarr shard), whole samples


def read_spans(offsets: np.ndarray, span: int) -> Iterator[tuple[int, int]]:
    """Samples [j0, j1) per read: whole samples, about `span` rows each (at least one sample)."""
    n, j0 = len(offsets) - 1, 0
    while j0 < n:
        j1 = min(max(j0 + 1, int(np.searchsorted(offsets, offsets[j0] + span, side="left"))), n)
        yield j0, j1
        j0 = j1


class KVStream(IterableDataset):
    """Yields {"sample_id", "input_ids" [T], "loss_mask" [T], "kv": {teacher: (k, v) [T, L, D]}}:
    with kv_as_stored K and V as stored, to be made float32 on the trainer's device: float16 /
    float32 numpy arrays, bfloat16 as torch.bfloat16 tensors, int8 / int4 as
    `store.codecs.QuantRows` (`.decode()` gives float32); without, float16 / float32 as stored
    and the other codecs decoded to float32 numpy arrays here.

    With read_latent (KaVa latent mode) also "segment_ids" [T] and "latent": {teacher: {"k",
    "v": [M, L, D] float32, "mask": [M] bool, "hidden": [H] (only if stored)}}; every teacher
    must have been dumped with latent on (StoreError otherwise).

    Every (rank, worker) reads a disjoint set of shards; shard i of every teacher holds the same
    samples in the same order (the dump guarantees it; checked here anyway)."""

    def __init__(
        self,
        store: str | Path,
        teachers: list[str],
        *,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        read_kv: bool = True,
        read_latent: bool = False,
        kv_as_stored: bool = True,
    ) -> None:
        self.store = Path(store)
        self.spec, known = open_specs(store)
        self.wds = is_wds_store(store)
        missing = [t for t in teachers if t not in known]
        if missing:
            raise StoreError(f"store {store} has no teacher(s) {missing}; it holds {sorted(known)}")
        self.teachers = list(teachers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.read_kv = read_kv
        self.kv_as_stored = kv_as_stored
        self.read_latent = read_latent
        if read_latent:
            plain = [t for t in teachers if known[t].latent is None]
            if plain:
                raise StoreError(
                    f"store {store}: teacher(s) {plain} were dumped without latent mode; re-dump them with "
                    "`kvdistill dump --latent-slots M` (or `latent:` in the dump config) to train latent tokens"
                )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, num_workers: int) -> list[int]:
        """Every shard, in this epoch's seeded order (the same on every rank and worker)."""
        readers = self.world_size * num_workers
        if self.spec.num_shards < readers:
            raise ValueError(
                f"store has {self.spec.num_shards} shards but {self.world_size} ranks x {num_workers} "
                f"workers = {readers} readers; some would get no data. Dump with --num-shards >= "
                f"{readers} or use fewer processes / --num-workers"
            )
        return [int(s) for s in np.random.default_rng([self.seed, self.epoch]).permutation(self.spec.num_shards)]

    def shards_for(self, worker: int, num_workers: int) -> list[int]:
        """This (rank, worker)'s shards of a zarr store (a webdataset store is split by its
        pipeline: `store.wds_stream`)."""
        readers = self.world_size * num_workers
        return self.epoch_order(num_workers)[self.rank * num_workers + worker :: readers]

    def _open(self, root, index, shard: int) -> dict[str, Any]:
        """One shard, ready to read: every teacher's reader, the token arrays, the read spans."""
        empty = (np.zeros(1, np.int64), [])
        readers = [
            ShardReader(self.store, t, shard, group=root[f"teachers/{t}/{shard_name(shard)}"], index=index.get((t, shard), empty))
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
        for j, r in enumerate(readers):
            kv = {n for n in r.names if n in ("k", "v") or n.startswith(("k_", "v_"))}
            latent = {n for n in r.names if n.startswith(("latent_", "codi_"))} if self.read_latent else set()
            r.check_unread((set(token_names) if j == 0 else set()) | kv | latent)  # tokens come from the first teacher's shard
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
        }

    def _zarr_samples(self, shards: list[int]) -> Iterator[dict[str, Any]]:
        """The samples of `shards` in order. Reads run one step ahead in a background thread,
        across shard boundaries too: while the trainer consumes a span, the next span (or the
        next shard's opening, token arrays and first span) is read, and every teacher's K and V
        of a span are read concurrently (the K/V reader decompresses outside the GIL)."""
        n_parts = 2 * len(self.teachers) if self.read_kv else 0
        workers = max(1, n_parts + (len(self.teachers) if self.read_latent else 0))
        with ThreadPoolExecutor(1, thread_name_prefix="kvdistill-ahead") as ahead, ThreadPoolExecutor(workers, thread_name_prefix="kvdistill-arrays") as arrays:

            def read(sh: dict[str, Any], j0: int, j1: int) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
                r0, r1 = int(sh["off"][j0]), int(sh["off"][j1])
                parts = [(r, p) for r in sh["readers"] for p in ("k", "v")] if self.read_kv else []
                # kv_as_stored: K/V stay as stored (16-bit floats, int8 / int4 codes + scales) until
                # the trainer's device, so the read, collate and the copy move stored-size bytes
                # (train/quant.py); else they are decoded to float32 here, on the reader threads.
                kv = [arrays.submit(r.rows, r0, r1, (p,), not self.kv_as_stored) for r, p in parts]
                latent = [arrays.submit(r.latent, j0, j1) for r in sh["readers"]] if self.read_latent else []
                blocks = [f.result()[p] for f, (_, p) in zip(kv, parts, strict=True)]
                if self.kv_as_stored:
                    blocks = [_as_stored(x, r.attrs.get("codec", "float16")) for x, (r, _) in zip(blocks, parts, strict=True)]
                return blocks, [f.result() for f in latent]

            # Consolidated metadata and index.parquet, read once: opening a shard then reads no
            # metadata, offsets or sample ids from disk (a few ms a shard and teacher otherwise).
            root, index = open_root(self.store), read_index(self.store, self.teachers)
            units = ((sh, j0, j1) for shard in shards for sh in (self._open(root, index, shard),) for j0, j1 in sh["spans"])

            def fetch():  # only ever runs on `ahead`, one at a time: `units` advances there
                unit = next(units, None)
                return None if unit is None else (unit, read(*unit))

            pending = ahead.submit(fetch)
            while (got := pending.result()) is not None:
                pending = ahead.submit(fetch)
                (sh, j0, j1), (blocks, latent) = got
                yield from self._span_samples(sh, j0, j1, blocks, latent)

    def _span_samples(self, sh: dict[str, Any], j0: int, j1: int, blocks: list[np.ndarray], latent: list[dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
        off, tokens = sh["off"], sh["tokens"]
        r0 = int(off[j0])
        for j in range(j0, j1):
            a, b = int(off[j]) - r0, int(off[j + 1]) - r0
            sample = {
                "sample_id": sh["ids"][j],
                "shard": sh["shard"],
                "input_ids": tokens["input_ids"][r0 + a : r0 + b],
                "loss_mask": tokens["loss_mask"][r0 + a : r0 + b],
                "kv": {t: (blocks[2 * n][a:b], blocks[2 * n + 1][a:b]) for n, t in enumerate(self.teachers)} if self.read_kv else {},
            }
            if self.read_latent:
                sample["segment_ids"] = tokens["segment_ids"][r0 + a : r0 + b]
                sample["latent"] = {t: _contract({k: x[j - j0] for k, x in lat.items()}) for t, lat in zip(self.teachers, latent, strict=True)}
            yield sample

    def _wds_view(self, sample: dict[str, Any]) -> dict[str, Any]:
        """A webdataset sample as the zarr path gives it: latent records only with read_latent."""
        if self.read_latent:
            _check_latent_sample(sample, self.teachers, sample["shard"])
            sample["latent"] = {t: _contract(x) for t, x in sample["latent"].items()}
        else:
            sample.pop("latent", None)
            sample.pop("segment_ids", None)
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        buf: list[dict[str, Any]] = []
        if self.wds:  # webdataset pipelines: sequential tar records, split by rank and worker
            samples = map(self._wds_view, wds_stream(self.store, self.teachers, self.epoch_order(num_workers), rank=self.rank, world_size=self.world_size))
        else:
            samples = self._zarr_samples(self.shards_for(worker, num_workers))
        for sample in samples:
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf


def _as_stored(x: np.ndarray | QuantRows, codec: str) -> np.ndarray | torch.Tensor | QuantRows:
    """A read block as the stream yields it: bfloat16 bit patterns as a torch.bfloat16 tensor
    (numpy has no bfloat16), anything else as read."""
    return torch.from_numpy(x).view(torch.bfloat16) if codec == "bfloat16" else x


def _contract(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One teacher's latent record as the trainer sees it (the kept positions stay in the store)."""
    out = {"k": x["k"].astype(np.float32), "v": x["v"].astype(np.float32), "mask": x["mask"].astype(np.bool_)}
    if "hidden" in x:
        out["hidden"] = x["hidden"].astype(np.float32)
    return out


def _check_latent_sample(sample: dict[str, Any], teachers: list[str], shard: int) -> None:
    if "segment_ids" not in sample:
        raise StoreError(
            f"{shard_name(shard)}: sample {sample['sample_id']} has no segment_ids (written before kvdistill stored "
            "them); re-dump into a new --store to use latent mode"
        )
    missing = [t for t in teachers if t not in sample.get("latent", {})]
    if missing:
        raise StoreError(f"{shard_name(shard)}: teacher(s) {missing} hold no latent K/V; re-dump them with --latent-slots M")


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample; masks mark real tokens. Never truncates. "kv": {teacher:
    (k, v)} [B, T, L, D] as stored (float16, bfloat16 or float32 tensors; int8 / int4 as
    `train.quant.QuantKV`); `kv_to_device` moves them and makes them float32 there. Samples read with
    read_latent also give "segment_ids" [B, T] long (padding -1) and "latent": {teacher: {"k",
    "v" [B, M, L, D] float32, "mask" [B, M] bool, "hidden" [B, H] float32 or None}}."""
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t, (k0, _) in samples[0]["kv"].items():
        if isinstance(k0, QuantRows):  # int8 / int4 as stored: dequantised on the trainer's device
            kv[t] = tuple(collate_quant([s["kv"][t][p] for s in samples], T) for p in (0, 1))
            continue
        shape = (B, T, *k0.shape[1:])
        dtype = k0.dtype if isinstance(k0, torch.Tensor) else torch.from_numpy(k0[:0]).dtype  # as stored: cast on the device
        kv[t] = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.from_numpy(s["input_ids"].astype(np.int64))
        attn[i, :n] = 1
        loss_mask[i, :n] = torch.from_numpy(s["loss_mask"])
        for t, (k, v) in s["kv"].items():
            if isinstance(k, QuantRows):
                continue
            kv[t][0][i, :n] = torch.as_tensor(k)
            kv[t][1][i, :n] = torch.as_tensor(v)
    batch = {"sample_ids": [s["sample_id"] for s in samples], "shards": sorted({s["shard"] for s in samples}), "input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "kv": kv}
    if "latent" in samples[0]:
        seg = torch.full((B, T), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            seg[i, : len(s["segment_ids"])] = torch.from_numpy(s["segment_ids"].astype(np.int64))
        batch["segment_ids"] = seg
        batch["latent"] = {}
        for t, x0 in samples[0]["latent"].items():
            rows = [s["latent"][t] for s in samples]
            batch["latent"][t] = {
                "k": torch.from_numpy(np.stack([r["k"] for r in rows]).astype(np.float32)),
                "v": torch.from_numpy(np.stack([r["v"] for r in rows]).astype(np.float32)),
                "mask": torch.from_numpy(np.stack([r["mask"] for r in rows])),
                "hidden": torch.from_numpy(np.stack([r["hidden"] for r in rows]).astype(np.float32)) if "hidden" in x0 else None,
            }
    return batch


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling:
    about e tries on average)."""
    if n < 2:
        raise ValueError(f"cannot derange {n} item(s): every sample needs another one to take K/V from; use batch_size >= 2")
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def shuffle_kv(samples: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The shuffled-KV negative control: sample i keeps its tokens but takes the teacher K/V of
    sample perm[i] != i of the same batch, linearly resampled in time onto its own length, so
    every real token still has a target. perm is a derangement seeded by `seed` and the batch's
    sample ids (the same batch gets the same swap in any worker and on resume)."""
    perm = _batch_derangement(samples, seed)
    out = []
    for s, j in zip(samples, perm, strict=True):
        T_s = len(s["input_ids"])
        kv = {}
        for t, (k, v) in samples[j]["kv"].items():  # [T_j, L, D]
            tm = linear_resample_time_map(len(k), T_s)
            kv[t] = tuple(tm.apply(torch.from_numpy(_floats(x))).numpy() for x in (k, v))  # [T_s, L, D]
        out.append({**s, "kv": kv, "kv_from": samples[j]["sample_id"]})
    return out


def _floats(x: np.ndarray | torch.Tensor | QuantRows) -> np.ndarray:
    """One sample's K or V as float32 rows (int8 / int4 dequantised here)."""
    if isinstance(x, QuantRows):
        return x.decode()
    return x.float().numpy() if isinstance(x, torch.Tensor) else x.astype(np.float32)


def _batch_derangement(samples: list[dict[str, Any]], seed: int) -> np.ndarray:
    """The control's swap: a derangement seeded by `seed` and the batch's sample ids."""
    ids = "\0".join(str(s["sample_id"]) for s in samples)
    return derangement(len(samples), np.random.default_rng([seed, zlib.crc32(ids.encode())]))


def shuffle_latent(samples: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The shuffled-KV control of latent mode: sample i keeps its tokens and its CODI hidden
    state but takes the compressed teacher K/V (k, v and slot mask, per teacher) of sample
    perm[i] != i of the same batch (M slots: no resampling needed); same seeding as shuffle_kv."""
    perm = _batch_derangement(samples, seed)
    out = []
    for s, j in zip(samples, perm, strict=True):
        latent = {t: {**x, **{n: samples[j]["latent"][t][n] for n in ("k", "v", "mask")}} for t, x in s["latent"].items()}
        out.append({**s, "latent": latent, "kv_from": samples[j]["sample_id"]})
    return out


def train_loader(stream: KVStream, cfg, pad_id: int, control=shuffle_kv) -> DataLoader:
    """The trainer's DataLoader over `stream` (TrainConfig cfg): padded batches, and with
    kv_control "shuffled" the negative control `control` (shuffle_kv, or shuffle_latent in
    latent mode) applied before padding; a short last batch is then dropped (a one-sample batch
    has no other sample to swap with). The stream splits shards by rank itself."""

    def collate_fn(samples):
        return collate(control(samples, cfg.seed) if cfg.kv_control == "shuffled" else samples, pad_id)

    # Its own generator: each epoch's iterator draws a seed from it, and from the global RNG a
    # checkpoint restores that draw would shift every dropout mask after a mid-epoch resume.
    # (The stream shuffles with its own seeded RNGs, so this seed changes no sample.)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        stream, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_fn, drop_last=cfg.kv_control == "shuffled", generator=generator
    )
