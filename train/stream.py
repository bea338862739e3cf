"""Streaming input for the trainer: shards of every teacher, zipped by sample, split across
ranks x dataloader workers, shuffled by seed per epoch (shard order + a shuffle buffer).

The store reads the shards (`store.shard_samples`: sequential blocks of whole samples, either
backend); this module decides which shards, in which order, and shuffles and batches them."""

from __future__ import annotations

import dataclasses
import itertools
import random
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kvdistill.align.time import linear_resample_time_map
from kvdistill.store import StoreError, open_specs, read_index, shard_samples
from kvdistill.store.codecs import QuantRows

from .quant import collate_quant

__all__ = ["KVStream", "collate", "train_loader", "derangement", "shuffle_kv", "shuffle_latent"]


class KVStream(IterableDataset):
    """Yields {"sample_id", "shard", "input_ids" [T], "loss_mask" [T], "kv": {teacher: (k, v)
    [T, L, D]}}: with kv_as_stored K and V as stored, to be made float32 on the trainer's device:
    float16 / float32 numpy arrays, bfloat16 as torch.bfloat16 tensors, int8 / int4 as
    `store.codecs.QuantRows` (`.decode()` gives float32); without, float16 / float32 as stored
    and the other codecs decoded to float32 numpy arrays here.

    With read_latent (KaVa latent mode) also "segment_ids" [T] and "latent": {teacher: {"k",
    "v": [M, L, D] float32, "mask": [M] bool, "hidden": [H] (only if stored)}}; every teacher
    must have been dumped with latent on (StoreError otherwise).

    `shards`: the shard indices this stream reads (e.g. all but those held out for validation);
    None reads every shard. Every (rank, worker) reads a disjoint set of them; shard i of every
    teacher holds the same samples in the same order (the dump guarantees it; checked anyway)."""

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
        shards: list[int] | None = None,
    ) -> None:
        self.store = Path(store)
        self.spec, known = open_specs(store)
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
        self.shards = None if shards is None else _check_shards(shards, self.spec.num_shards, store)
        self.epoch = 0
        self._resume: dict[str, Any] | None = None  # see `resume`
        self._shard_counts: dict[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, num_workers: int, epoch: int | None = None) -> list[int]:
        """This stream's shards (every shard, or `shards`), in `epoch`'s seeded order (default: the
        current epoch; the same on every rank and worker)."""
        readers = self.world_size * num_workers
        pool = self.shards if self.shards is not None else list(range(self.spec.num_shards))
        if len(pool) < readers:
            what, fix = (
                (f"store has {self.spec.num_shards} shards", f"Dump with --num-shards >= {readers}")
                if self.shards is None
                else (f"stream reads {len(pool)} of the store's {self.spec.num_shards} shards", "Hold out fewer shards, dump with more --num-shards")
            )
            raise ValueError(
                f"{what} but {self.world_size} ranks x {num_workers} workers = {readers} readers; some "
                f"would get no data. {fix} or use fewer processes / --num-workers"
            )
        epoch = self.epoch if epoch is None else epoch
        return [pool[int(i)] for i in np.random.default_rng([self.seed, epoch]).permutation(len(pool))]

    def shards_for(self, worker: int, num_workers: int, epoch: int | None = None) -> list[int]:
        """This (rank, worker)'s shards of the epoch order: every (world_size x num_workers)-th."""
        readers = self.world_size * num_workers
        # A webdataset store is split as its webdataset pipeline splits it (`store.wds_stream`: a
        # rank stage, then split_by_worker), a zarr store rank-major.
        reader = worker * self.world_size + self.rank if self.spec.backend == "webdataset" else self.rank * num_workers + worker
        return self.epoch_order(num_workers, epoch)[reader::readers]

    def resume(self, epoch: int, batches: int, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> None:
        """Start `epoch` after the first `batches` batches a DataLoader(batch_size, num_workers,
        drop_last) over this stream yields, without reading them: the shuffle buffer's draws
        depend only on sample counts (index.parquet), so each worker replays them on positions,
        then reads from the oldest sample its buffer still holds (at most a few buffer lengths
        back, whatever the step). DataLoader workers take turns, so the resumed loader's worker
        i plays the part of the worker whose turn it was. The samples that follow are exactly
        those of the uninterrupted epoch. Applies to `epoch` only."""
        W = max(1, num_workers)
        totals = self.epoch_batches(epoch, batch_size, num_workers, drop_last)
        if batches > sum(totals):
            raise StoreError(
                f"a checkpoint resumes after batch {batches} of epoch {epoch}, but the epoch has {sum(totals)} batches of "
                f"{batch_size} for rank {self.rank} here; resume with the store, batch size, number of processes and "
                "--num-workers of the run that wrote it"
            )
        taken, turn = [0] * W, 0
        for _ in range(batches):  # DataLoader's round robin, passing over exhausted workers
            while taken[turn] >= totals[turn]:
                turn = (turn + 1) % W
            taken[turn] += 1
            turn = (turn + 1) % W
        self._resume = {"epoch": epoch, "skip": [t * batch_size for t in taken], "turn": turn}

    def epoch_batches(self, epoch: int, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> list[int]:
        """Batches each DataLoader worker of this rank yields in `epoch` (index.parquet's counts)."""
        W = max(1, num_workers)
        counts = [sum(self._counts()[s] for s in self.shards_for(v, W, epoch)) for v in range(W)]
        return [c // batch_size if drop_last else -(-c // batch_size) for c in counts]

    def _counts(self) -> dict[int, int]:
        """Samples per shard (index.parquet)."""
        if self._shard_counts is None:
            index = read_index(self.store, self.teachers[:1])
            self._shard_counts = {s: len(index.get((self.teachers[0], s), ((), []))[1]) for s in range(self.spec.num_shards)}
        return self._shard_counts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        state = self._resume if self._resume and self._resume["epoch"] == self.epoch else None
        if state:  # the worker whose turn it was when the checkpoint was taken goes first
            worker = (worker + state["turn"]) % num_workers
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        shards = self.shards_for(worker, num_workers)
        skip = state["skip"][worker] if state else 0
        if not skip:
            yield from _shuffled(self._samples(shards), self.shuffle_buffer, rng)
            return
        n = sum(self._counts()[s] for s in shards)
        held, next_read, tail = buffer_state(n, self.shuffle_buffer, rng, skip)
        if tail is not None:  # past the end of reading: the final shuffle's order, replayed
            if tail:
                got = _at_positions(self._samples(shards, min(tail)), min(tail), set(tail))
                yield from (got[p] for p in tail)
            return
        start = min([*held, next_read])
        samples = self._samples(shards, start)
        got = _at_positions(itertools.islice(samples, next_read - start), start, set(held))
        yield from _shuffled(samples, self.shuffle_buffer, rng, [got[p] for p in held])

    def _samples(self, shards: list[int], start: int = 0) -> Iterator[dict[str, Any]]:
        # kv_as_stored: K/V stay as stored (16-bit floats, int8 / int4 codes + scales) until the
        # trainer's device, so the read, collate and the copy move stored-size bytes
        # (train/quant.py); else the store decodes them to float32 on its reader threads.
        samples = shard_samples(
            self.store, self.teachers, shards, read_kv=self.read_kv, read_latent=self.read_latent, decode=not self.kv_as_stored, start=start
        )
        for sample in samples:
            # A sample's K/V are views into its read span; its own copy lets the span go once the
            # span's samples are consumed, not once the last of them leaves the shuffle buffer
            # (which pinned several spans: tests/test_stream_memory.py).
            kv = {t: (_own(k), _own(v)) for t, (k, v) in sample["kv"].items()}
            sample["kv"] = {t: (_as_stored(k), _as_stored(v)) for t, (k, v) in kv.items()} if self.kv_as_stored else kv
            yield sample


def _shuffled(samples: Iterable[Any], size: int, rng: random.Random, buf: list[Any] | None = None) -> Iterator[Any]:
    """The stream's shuffle buffer: hold up to `size` samples, yield a random one per sample read,
    then the rest in random order. `buf`: what a resumed buffer holds already."""
    buf = [] if buf is None else buf
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def buffer_state(n: int, size: int, rng: random.Random, skip: int) -> tuple[list[int], int, list[int] | None]:
    """`_shuffled` over n samples after yielding `skip` of them, on positions only (no data):
    (positions it holds, in order; the next position to read; None), with `rng` left where
    the buffer's would be, or, when reading had ended (the final shuffle), ([], n, positions
    still to yield in order)."""
    buf: list[int] = []
    out = 0
    for p in range(n):
        if out == skip:
            return buf, p, None
        buf.append(p)
        if len(buf) >= size:
            buf.pop(rng.randrange(len(buf)))
            out += 1
    if out == skip:
        return buf, n, None
    rng.shuffle(buf)
    return [], n, buf[skip - out :]


def _at_positions(samples: Iterable[dict[str, Any]], start: int, keep: set[int]) -> dict[int, dict[str, Any]]:
    """{position: sample} of the positions in `keep`, the first sample being at `start`."""
    return {p: x for p, x in enumerate(samples, start) if p in keep}


def _check_shards(shards: list[int], num_shards: int, store: str | Path) -> list[int]:
    """`shards` sorted, each a shard of the store once (the epoch order depends on the set only)."""
    out = sorted(int(s) for s in shards)
    bad = [s for s in out if not 0 <= s < num_shards]
    if bad or len(set(out)) != len(out) or not out:
        raise ValueError(
            f"shards {list(shards)}: need distinct shard indices in 0..{num_shards - 1} of store {store} (at least one)"
        )
    return out


def _own(x: np.ndarray | QuantRows) -> np.ndarray | QuantRows:
    """x in memory of its own (a copy of a view)."""
    if isinstance(x, QuantRows):
        return dataclasses.replace(x, codes=x.codes.copy(), scale=x.scale.copy(), zero=None if x.zero is None else x.zero.copy())
    return x.copy() if x.base is not None else x


def _as_stored(x: np.ndarray | QuantRows) -> np.ndarray | torch.Tensor | QuantRows:
    """A sample's K or V as the stream yields it: bfloat16 bit patterns (the store's uint16) as a
    torch.bfloat16 tensor (numpy has no bfloat16), anything else as read."""
    return torch.from_numpy(x).view(torch.bfloat16) if isinstance(x, np.ndarray) and x.dtype == np.uint16 else x


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
