"""Streaming input for the trainer: shards of every teacher, zipped by sample, in ONE global
sample order per epoch fixed by the seed and the store (shard order + a shuffle buffer, on
positions), whatever the number of processes and DataLoader workers; each optimizer step's
global batch is split across ranks (`windows`), so N processes train exactly what one does,
and a checkpoint (samples consumed) resumes on any number of them.

The store reads the shards (`store.shard_samples`: whole samples, only those asked for); this
module decides which, in which order, and batches them."""

from __future__ import annotations

import collections
import dataclasses
import random
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kvdistill.align.time import linear_resample_time_map
from kvdistill.store import StoreError, codecs, open_specs, read_index, shard_samples
from kvdistill.store.codecs import QuantRows

from .quant import collate_quant

__all__ = [
    "KVStream",
    "MicroBatches",
    "Window",
    "windows",
    "collate",
    "train_loader",
    "derangement",
    "shuffle_kv",
    "shuffle_latent",
]


class KVStream(IterableDataset):
    """One global sample order per epoch, fixed by the seed and the store alone (never by the
    number of processes or DataLoader workers): the stream's shards (every shard, or `shards`)
    in a seeded order, concatenated, through a seeded shuffle buffer of `buffer_size` samples:
    `shuffle_buffer`, or fewer where `shuffle_buffer_bytes` binds (`buffer_size`). The order is
    computed on positions (index.parquet's counts), so any part of it can be read without reading
    what comes before: `samples(epoch, outputs)` reads exactly the samples a rank's micro-batches
    need (`MicroBatches` splits each global batch across ranks).

    Iterating the stream yields the current epoch's samples in that order (tools and tests; the
    trainer iterates `MicroBatches`). Each sample: {"sample_id", "shard", "input_ids" [T],
    "loss_mask" [T], "kv": {teacher: (k, v) [T, L, D]}}: with kv_as_stored K and V as stored, to
    be made float32 on the trainer's device: float16 / float32 numpy arrays, bfloat16 as
    torch.bfloat16 tensors, int8 / int4 as `store.codecs.QuantRows` (`.decode()` gives float32);
    without, float16 / float32 as stored and the other codecs decoded to float32 numpy arrays.
    With read_logits also "logits": {teacher: (ids [T, K] int32, lp [T, K] float16)} for every
    teacher that stores them (`dump --logits-top-k`).

    With read_latent (KaVa latent mode) also "segment_ids" [T] and "latent": {teacher: {"k",
    "v": [M, L, D] float32, "mask": [M] bool, "hidden": [H] (only if stored)}}; every teacher
    must have been dumped with latent on (StoreError otherwise). Shard i of every teacher holds
    the same samples in the same order (the dump guarantees it; checked anyway)."""

    def __init__(
        self,
        store: str | Path,
        teachers: list[str],
        *,
        seed: int = 0,
        shuffle_buffer: int = 256,
        read_kv: bool = True,
        read_latent: bool = False,
        read_logits: bool = False,
        kv_as_stored: bool = True,
        shards: list[int] | None = None,
        shuffle_buffer_bytes: int | None = None,
    ) -> None:
        self.store = Path(store)
        self.spec, known = open_specs(store)
        missing = [t for t in teachers if t not in known]
        if missing:
            raise StoreError(f"store {store} has no teacher(s) {missing}; it holds {sorted(known)}")
        self.teachers = list(teachers)
        self._specs = {t: known[t] for t in self.teachers}
        self.seed, self.shuffle_buffer, self.shuffle_buffer_bytes = seed, shuffle_buffer, shuffle_buffer_bytes
        self.read_kv = read_kv
        self.kv_as_stored = kv_as_stored
        self.read_latent, self.read_logits = read_latent, read_logits
        if read_latent:
            plain = [t for t in teachers if known[t].latent is None]
            if plain:
                raise StoreError(
                    f"store {store}: teacher(s) {plain} were dumped without latent mode; re-dump them with "
                    "`kvdistill dump --latent-slots M` (or `latent:` in the dump config) to train latent tokens"
                )
        self.shards = None if shards is None else _check_shards(shards, self.spec.num_shards, store)
        self.epoch = 0
        self._shard_counts: dict[int, int] | None = None
        self._shard_rows: dict[int, int] = {}
        self._orders: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """This stream's shards (every shard, or `shards`) in `epoch`'s seeded order (default:
        the current epoch)."""
        pool = self.shards if self.shards is not None else list(range(self.spec.num_shards))
        epoch = self.epoch if epoch is None else epoch
        return [pool[int(i)] for i in np.random.default_rng([self.seed, epoch]).permutation(len(pool))]

    def __len__(self) -> int:
        """Samples per epoch (index.parquet)."""
        return sum(self._counts()[s] for s in self.epoch_order(0))

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global order: order[j] = the position, in the concatenation of
        `epoch_order(epoch)`'s shards, of the j-th sample trained on."""
        if epoch not in self._orders:
            rng = random.Random(f"{self.seed}-{epoch}")
            self._orders = {
                epoch: np.fromiter(_shuffled(range(len(self)), self.buffer_size, rng), dtype=np.int64, count=len(self))
            }
        return self._orders[epoch]

    @property
    def sample_bytes(self) -> float:
        """Bytes of a mean sample of this stream's shards as stored, every teacher read: K and V
        rows (index.parquet's rows / samples x each teacher's codec bytes per row at its stored
        width). The store's alone: the same on any number of processes and workers, whatever
        is read (read_kv) and however it is held (kv_as_stored; float32 decoded on the CPU takes
        up to 2x this for float16 and 8x for int4)."""
        pool = self.shards if self.shards is not None else list(range(self.spec.num_shards))
        n = sum(self._counts()[s] for s in pool)
        rows = sum(self._shard_rows[s] for s in pool)
        per_row = sum(_bytes_per_row(x.kv_dtype, len(x.layer_map), x.width) for x in self._specs.values())
        per_row += sum(6 * x.logits_top_k for x in self._specs.values()) if self.read_logits else 0  # int32 + float16
        return rows * per_row / n if n else 0.0

    @property
    def buffer_size(self) -> int:
        """The shuffle buffer in samples: shuffle_buffer, or fewer where shuffle_buffer_bytes
        binds: min(shuffle_buffer, max(1, floor(shuffle_buffer_bytes / sample_bytes)))."""
        if self.shuffle_buffer_bytes is None:
            return self.shuffle_buffer
        mean = self.sample_bytes
        return (
            self.shuffle_buffer
            if mean <= 0
            else min(self.shuffle_buffer, max(1, int(self.shuffle_buffer_bytes // mean)))
        )

    def samples(self, epoch: int, outputs: list[int]) -> Iterator[dict[str, Any]]:
        """The samples at indices `outputs` of the epoch's global order, in that order. Reads only
        them (in store order, `store.shard_samples(keep=...)`) and holds each one read ahead of
        its turn: with a shuffle buffer of B samples (`buffer_size`), about B x (the share of
        samples wanted)."""
        wanted = self.order(epoch)[np.asarray(outputs, dtype=np.int64)]
        keep = np.unique(wanted)
        got = self._samples(self.epoch_order(epoch), keep)
        held: dict[int, dict[str, Any]] = {}
        uses = collections.Counter(wanted.tolist())  # a position wanted twice (a weightless stand-in) is yielded twice
        for p in wanted.tolist():
            while p not in held:
                nxt = next(got, None)
                if nxt is None:
                    raise StoreError(
                        f"store {self.store}: the shards ended before sample {p} of the epoch's order; run `kvdistill"
                        " store verify` and `finalize` again"
                    )
                held[nxt[0]] = nxt[1]
            uses[p] -= 1
            yield held[p] if uses[p] else held.pop(p)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.samples(self.epoch, list(range(len(self))))

    def _counts(self) -> dict[int, int]:
        """Samples per shard (index.parquet); rows per shard in _shard_rows."""
        if self._shard_counts is None:
            index = read_index(self.store, self.teachers[:1])
            got = {
                s: index.get((self.teachers[0], s), (np.zeros(1, np.int64), [])) for s in range(self.spec.num_shards)
            }
            self._shard_rows = {s: int(offsets[-1] - offsets[0]) for s, (offsets, _) in got.items()}
            self._shard_counts = {s: len(ids) for s, (_, ids) in got.items()}
        return self._shard_counts

    def _samples(self, shards: list[int], keep: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, sample) for the sorted positions `keep` of the concatenation of `shards`."""
        # kv_as_stored: K/V stay as stored (16-bit floats, int8 / int4 codes + scales) until the
        # trainer's device, so the read, collate and the copy move stored-size bytes
        # (train/quant.py); else the store decodes them to float32 on its reader threads.
        samples = shard_samples(
            self.store,
            self.teachers,
            shards,
            read_kv=self.read_kv,
            read_latent=self.read_latent,
            read_logits=self.read_logits,
            decode=not self.kv_as_stored,
            keep=keep,
        )
        for p, sample in zip(keep.tolist(), samples, strict=False):
            # A sample's K/V are views into its read span; its own copy lets the span go once the
            # span's samples are consumed, not once the last of them leaves the holding dict
            # (which pinned several spans: tests/test_stream_memory.py).
            kv = {t: (_own(k), _own(v)) for t, (k, v) in sample["kv"].items()}
            sample["kv"] = {t: (_as_stored(k), _as_stored(v)) for t, (k, v) in kv.items()} if self.kv_as_stored else kv
            yield p, sample


@dataclasses.dataclass(frozen=True)
class Window:
    """One optimizer step's samples: indices [start, start + size) of the epoch's global order,
    cut into `micros` micro-batches per rank; slices[m][r] = the [a, b) of rank r's micro-batch
    m (a == b: the rank has no sample left in this window and runs a weightless stand-in)."""

    start: int
    size: int
    micros: int
    slices: tuple[tuple[tuple[int, int], ...], ...]


def windows(
    n: int, start: int, batch_size: int, accumulation: int, world: int, drop_short: bool = False
) -> list[Window]:
    """The optimizer steps of an epoch of n samples, from sample `start` on (a resumed epoch):
    global batches of batch_size x accumulation x world consecutive samples of the global order,
    each split into micro-batch m of rank r = its (m x world + r)-th batch_size samples. So
    N processes x batch b train on exactly the samples 1 process x batch N*b (or batch b x N
    accumulation steps) trains on. The epoch's last, short window is spread as evenly as
    possible over as few micro-batches per rank as hold it (sizes differ by at most one);
    drop_short drops it instead (the shuffled-KV control needs every micro-batch whole)."""
    G = batch_size * accumulation * world
    out = []
    for w0 in range(start, n, G):
        k = min(G, n - w0)
        if k < G and drop_short:
            break
        micros = -(-k // (batch_size * world))
        slots = micros * world
        sizes = [k // slots + (s < k % slots) for s in range(slots)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]) + w0
        slices = tuple(
            tuple((int(bounds[m * world + r]), int(bounds[m * world + r + 1])) for r in range(world))
            for m in range(micros)
        )
        out.append(Window(w0, k, micros, slices))
    return out


class MicroBatches(IterableDataset):
    """The trainer's input on one rank: its micro-batches of the epoch's `windows`, collated, in
    step order, each with "window" (its optimizer step of the epoch), "micro" / "micros" (its
    place among the rank's micro-batches of that step), "window_size" (the step's samples over
    every rank), "last" (the epoch's last step) and "weight" (0.0 for a weightless stand-in, a
    copy of the window's first sample, that keeps a rank with no sample in the collective
    forward / backward). DataLoader workers take turns by micro-batch, so the DataLoader yields
    them in order. `start`: the epoch's samples already trained (a resumed checkpoint)."""

    def __init__(
        self,
        stream: KVStream,
        batch_size: int,
        collate_fn,
        *,
        accumulation: int = 1,
        rank: int = 0,
        world_size: int = 1,
        drop_short: bool = False,
    ) -> None:
        self.stream, self.batch_size, self.collate_fn = stream, batch_size, collate_fn
        self.accumulation, self.rank, self.world_size, self.drop_short = accumulation, rank, world_size, drop_short
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def windows(self, epoch: int | None = None, start: int | None = None) -> list[Window]:
        n = len(self.stream)
        start = self.start if start is None else start
        if not 0 <= start <= n:
            raise StoreError(
                f"a checkpoint resumes after sample {start} of an epoch, but an epoch of store {self.stream.store} has"
                f" {n} samples; resume with the store (and --val-shards) of the run that wrote it"
            )
        return windows(n, start, self.batch_size, self.accumulation, self.world_size, self.drop_short)

    def plan(self) -> list[dict[str, Any]]:
        """This rank's micro-batches, in order: their meta data and global-order indices."""
        wins = self.windows()
        out = []
        for i, w in enumerate(wins):
            for m, per_rank in enumerate(w.slices):
                a, b = per_rank[self.rank]
                meta = {"window": i, "micro": m, "micros": w.micros, "window_size": w.size, "last": i == len(wins) - 1}
                out.append({**meta, "outputs": list(range(a, b)) or [w.start], "weight": 1.0 if b > a else 0.0})
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.plan()[worker::num_workers]
        samples = self.stream.samples(self.epoch, [j for mb in mine for j in mb["outputs"]])
        for mb in mine:
            batch = self.collate_fn([next(samples) for _ in mb["outputs"]])
            batch.update({k: v for k, v in mb.items() if k != "outputs"})
            yield batch


def _shuffled(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """The stream's shuffle buffer: hold up to `size` samples, yield a random one per sample read,
    then the rest in random order."""
    buf: list[Any] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def _bytes_per_row(codec: str, L: int, D: int) -> float:
    """K and V bytes of one token row as stored (float32: the webdataset backend's, or zarr's)."""
    return 8.0 * L * D if codec == "float32" else codecs.bytes_per_row(codec, L, D)


def _check_shards(shards: list[int], num_shards: int, store: str | Path) -> list[int]:
    """`shards` sorted, each a shard of the store once (the epoch order depends on the set only)."""
    out = sorted(int(s) for s in shards)
    bad = [s for s in out if not 0 <= s < num_shards]
    if bad or len(set(out)) != len(out) or not out:
        raise ValueError(
            f"shards {list(shards)}: need distinct shard indices in 0..{num_shards - 1} of store {store} (at least"
            " one)"
        )
    return out


def _own(x: np.ndarray | QuantRows) -> np.ndarray | QuantRows:
    """x in memory of its own (a copy of a view)."""
    if isinstance(x, QuantRows):
        return dataclasses.replace(
            x, codes=x.codes.copy(), scale=x.scale.copy(), zero=None if x.zero is None else x.zero.copy()
        )
    return x.copy() if x.base is not None else x


def _as_stored(x: np.ndarray | QuantRows) -> np.ndarray | torch.Tensor | QuantRows:
    """A sample's K or V as the stream yields it: bfloat16 bit patterns (the store's uint16) as a
    torch.bfloat16 tensor (numpy has no bfloat16), anything else as read."""
    return torch.from_numpy(x).view(torch.bfloat16) if isinstance(x, np.ndarray) and x.dtype == np.uint16 else x


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample; masks mark real tokens. Never truncates. "kv": {teacher:
    (k, v)} [B, T, L, D] as stored (float16, bfloat16 or float32 tensors; int8 / int4 as
    `train.quant.QuantKV`); `kv_to_device` moves them and makes them float32 there. Samples read
    with read_logits give "logits": {teacher: (ids [B, T, K] long, lp [B, T, K] float32)}; with
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
        dtype = (
            k0.dtype if isinstance(k0, torch.Tensor) else torch.from_numpy(k0[:0]).dtype
        )  # as stored: cast on the device
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
    batch = {
        "sample_ids": [s["sample_id"] for s in samples],
        "shards": sorted({s["shard"] for s in samples}),
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "kv": kv,
    }
    if "logits" in samples[0]:  # {teacher: (ids, lp) [B, T, K]}: padding rows 0, outside every loss mask
        batch["logits"] = {}
        for t, (ids0, _) in samples[0]["logits"].items():
            ids_t = torch.zeros((B, T, ids0.shape[1]), dtype=torch.long)
            lp_t = torch.zeros((B, T, ids0.shape[1]), dtype=torch.float32)
            for i, s in enumerate(samples):
                n = len(s["input_ids"])
                ids_t[i, :n] = torch.from_numpy(s["logits"][t][0].astype(np.int64))
                lp_t[i, :n] = torch.from_numpy(s["logits"][t][1].astype(np.float32))
            batch["logits"][t] = (ids_t, lp_t)
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
                "hidden": (
                    torch.from_numpy(np.stack([r["hidden"] for r in rows]).astype(np.float32))
                    if "hidden" in x0
                    else None
                ),
            }
    return batch


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling:
    about e tries on average)."""
    if n < 2:
        raise ValueError(
            f"cannot derange {n} item(s): every sample needs another one to take K/V from; use batch_size >= 2"
        )
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
        latent = {
            t: {**x, **{n: samples[j]["latent"][t][n] for n in ("k", "v", "mask")}} for t, x in s["latent"].items()
        }
        out.append({**s, "latent": latent, "kv_from": samples[j]["sample_id"]})
    return out


def train_loader(
    stream: KVStream,
    cfg,
    pad_id: int,
    control=shuffle_kv,
    *,
    rank: int = 0,
    world_size: int = 1,
    accumulation: int | None = None,
) -> DataLoader:
    """The trainer's DataLoader over `stream` (TrainConfig cfg) on rank `rank` of `world_size`:
    this rank's padded micro-batches (`MicroBatches`), and with kv_control "shuffled" the
    negative control `control` (shuffle_kv, or shuffle_latent in latent mode) applied before
    padding; the epoch's short last step is then dropped (a micro-batch of one sample has no
    other sample to swap with). `loader.dataset.set_epoch(epoch, start)` picks the epoch."""

    def collate_fn(samples):
        return collate(control(samples, cfg.seed) if cfg.kv_control == "shuffled" else samples, pad_id)

    accumulation = cfg.gradient_accumulation_steps if accumulation is None else accumulation
    batches = MicroBatches(
        stream,
        cfg.batch_size,
        collate_fn,
        accumulation=accumulation,
        rank=rank,
        world_size=world_size,
        drop_short=cfg.kv_control == "shuffled",
    )
    # Its own generator: each epoch's iterator draws a seed from it, and from the global RNG a
    # checkpoint restores that draw would shift every dropout mask after a mid-epoch resume.
    # (The stream orders samples with its own seeded RNGs, so this seed changes no sample.)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(batches, batch_size=None, num_workers=cfg.num_workers, generator=generator)
