"""What the global sample order costs in reads, side by side in one run:

1. a resume: the training stream positioned after n samples of an epoch, by replaying them
   (read, decode and collate every batch up to the checkpoint, then drop it) against starting
   there (`MicroBatches.set_epoch(epoch, start)`: the order is computed on positions, so only
   the samples after the checkpoint are read). Both are timed to the first batch after the
   checkpoint, which they must agree on.
2. read amplification per rank: each of N ranks reads only its part of every global batch;
   rows the store reads for it (runs of wanted samples, merged across gaps of less than one
   chunk) and rows of the chunks those reads decompress, over the rows the rank trains on.

    python bench/resume.py                  # 2,000 samples, 4 layers: chunks of ~20 samples
    python bench/resume.py --layers 24 --tokens 200 --samples 600   # a 0.5B-like student: chunks < 1 sample
    python bench/resume.py --samples 400    # quick

The store is written directly (random float16 K/V through ShardWriter), no model involved.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from kvdistill.schemas import AlignSpec, DataSpec, KVGeometry, ModelSpec, StoreSpec, TeacherSpec
from kvdistill.store import ShardReader, ShardWriter, finalize, init_store, init_teacher
from kvdistill.train.stream import KVStream, MicroBatches, collate

HEADS, HEAD_DIM = 2, 64  # D = 128 per layer (Qwen2.5-0.5B's K width)


def build_store(path: Path, samples: int, shards: int, tokens: int, layers: int = 4, seed: int = 0) -> Path:
    """`samples` samples of about `tokens` tokens, random float16 K/V, one teacher."""
    LAYERS = layers
    geom = KVGeometry(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM)
    spec = StoreSpec(
        student=ModelSpec("bench"),
        geometry=geom,
        tokenizer_fingerprint="bench",
        data=DataSpec(),
        data_fingerprint="bench",
        num_shards=shards,
    )
    init_store(path, spec)
    eye = [[float(i == j) for j in range(LAYERS)] for i in range(LAYERS)]
    init_teacher(
        path,
        TeacherSpec(
            name="t",
            model=ModelSpec("bench"),
            geometry=geom,
            align=AlignSpec(),
            time_map="identity",
            layer_map=eye,
            width=geom.width,
            fingerprint="bench",
        ),
    )
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, samples, shards + 1).astype(int)
    for s in range(shards):
        with ShardWriter(path, "t", s, num_layers=LAYERS, width=geom.width) as w:
            for j in range(bounds[s], bounds[s + 1]):
                T = int(rng.integers(tokens // 2, tokens * 3 // 2))
                kv = rng.standard_normal((2, T, LAYERS, geom.width), dtype=np.float32).astype(np.float16)
                w.write(f"s{j}", kv[0], kv[1], rng.integers(0, 1000, T, dtype=np.int32), np.ones(T, np.bool_))
    finalize(path)
    return path


def _batches(store: Path, batch_size: int, buffer: int, rank: int = 0, world: int = 1) -> MicroBatches:
    stream = KVStream(store, ["t"], seed=1, shuffle_buffer=buffer, kv_as_stored=False)
    return MicroBatches(stream, batch_size, lambda s: collate(s, 0), rank=rank, world_size=world)


def first_batch(store: Path, n: int, batch_size: int, buffer: int, resume: bool) -> tuple[float, list[str]]:
    """Seconds from building the stream to holding batch n of epoch 0, and its sample ids."""
    t0 = time.perf_counter()
    batches = _batches(store, batch_size, buffer)
    loader = DataLoader(batches, batch_size=None)
    if resume:
        batches.set_epoch(0, n * batch_size)
        batch = next(iter(loader))
    else:
        it = iter(loader)
        for _ in range(n):  # replayed: read, decoded, collated, dropped
            next(it)
        batch = next(it)
    return time.perf_counter() - t0, batch["sample_ids"]


def amplification(store: Path, batch_size: int, buffer: int, world: int) -> tuple[float, float]:
    """(rows read / rows used, chunk rows decompressed / rows used) over every rank of `world`
    for one epoch, each rank reading only its part of every global batch."""
    calls: list[tuple[str, int, int]] = []
    real = ShardReader.rows

    def counting(self, start, stop, names=("k", "v"), decode=True):
        if "k" in names:
            calls.append((str(self.dir), start, stop, self.array("k").chunks[0]))
        return real(self, start, stop, names, decode)

    used = 0
    ShardReader.rows = counting
    try:
        for r in range(world):
            for b in _batches(store, batch_size // world, buffer, r, world):
                used += int(b["attention_mask"].sum()) if b["weight"] else 0
    finally:
        ShardReader.rows = real
    read = sum(b - a for _, a, b, _ in calls)
    decoded = sum((-(-b // c) - a // c) * c for _, a, b, c in calls)
    return read / used, decoded / used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="mean tokens per sample")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4, help="student layers stored (row bytes = layers x 2 x 128 x 2)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvdistill-resume-"))
    try:
        store = build_store(root / "s.zarr", args.samples, args.shards, args.tokens, args.layers)
        size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        batches = args.samples // args.batch_size
        print(
            f"store: {args.samples:,} samples, {size / 2**20:.0f} MiB, {batches} batches of {args.batch_size} an"
            f" epoch, shuffle buffer {args.shuffle_buffer}"
        )
        print(f"{'checkpoint at':>14} {'replay s':>9} {'resume s':>9} {'speed-up':>9}")
        for frac in (0.1, 0.5, 0.9):
            n = int(frac * batches)
            replay, resume = [], []
            for _ in range(args.repeats):  # alternated, so load changes hit both alike
                t, ids_replay = first_batch(store, n, args.batch_size, args.shuffle_buffer, resume=False)
                replay.append(t)
                t, ids_resume = first_batch(store, n, args.batch_size, args.shuffle_buffer, resume=True)
                resume.append(t)
                assert ids_replay == ids_resume, (n, ids_replay, ids_resume)
            a, b = float(np.median(replay)), float(np.median(resume))
            print(f"{f'batch {n} ({frac:.0%})':>14} {a:9.2f} {b:9.2f} {a / b:8.1f}x")
        chunk = ShardReader(store, "t", 0).array("k").chunks[0]
        print(
            f"\nread amplification, one epoch, global batch {args.batch_size} split over N ranks (chunks of {chunk}"
            f" rows, ~{chunk / args.tokens:.1f} samples):"
        )
        print(f"{'ranks':>6} {'rows read / used':>17} {'chunk rows decoded / used':>26}")
        for world in (1, 2, 4, 8):
            if args.batch_size % world == 0:
                r, d = amplification(store, args.batch_size, args.shuffle_buffer, world)
                print(f"{world:>6} {r:17.2f} {d:26.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
