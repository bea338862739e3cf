"""What a resume costs: the training stream positioned after n batches of an epoch, by replaying
them (what the trainer did before `KVStream.resume`: read, decode and collate every batch up to
the checkpoint, then drop it) against `KVStream.resume` (the shuffle buffer replayed on sample
positions; reading starts at the oldest sample the buffer still holds). Both are timed to the
first batch after the checkpoint, which they must agree on, side by side in one run.

    python bench/resume.py                  # 2,000 samples, checkpoints at 10 / 50 / 90% of an epoch
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
from kvdistill.store import ShardWriter, finalize, init_store, init_teacher
from kvdistill.train.stream import KVStream, collate

LAYERS, HEADS, HEAD_DIM = 4, 2, 64  # D = 128 per layer: 2 KiB of float16 K+V per token


def build_store(path: Path, samples: int, shards: int, tokens: int, seed: int = 0) -> Path:
    """`samples` samples of about `tokens` tokens, random float16 K/V, one teacher."""
    geom = KVGeometry(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM)
    spec = StoreSpec(student=ModelSpec("bench"), geometry=geom, tokenizer_fingerprint="bench", data=DataSpec(), data_fingerprint="bench", num_shards=shards)
    init_store(path, spec)
    eye = [[float(i == j) for j in range(LAYERS)] for i in range(LAYERS)]
    init_teacher(path, TeacherSpec(name="t", model=ModelSpec("bench"), geometry=geom, align=AlignSpec(), time_map="identity", layer_map=eye, width=geom.width, fingerprint="bench"))
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


def first_batch(store: Path, n: int, batch_size: int, buffer: int, resume: bool) -> tuple[float, list[str]]:
    """Seconds from building the stream to holding batch n of epoch 0, and its sample ids."""
    t0 = time.perf_counter()
    stream = KVStream(store, ["t"], seed=1, shuffle_buffer=buffer, kv_as_stored=False)
    loader = DataLoader(stream, batch_size=batch_size, collate_fn=lambda s: collate(s, 0))
    if resume:
        stream.resume(0, n, batch_size)
        batch = next(iter(loader))
    else:
        it = iter(loader)
        for _ in range(n):  # replayed: read, decoded, collated, dropped
            next(it)
        batch = next(it)
    return time.perf_counter() - t0, batch["sample_ids"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="mean tokens per sample")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvdistill-resume-"))
    try:
        store = build_store(root / "s.zarr", args.samples, args.shards, args.tokens)
        size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        batches = args.samples // args.batch_size
        print(f"store: {args.samples:,} samples, {size / 2**20:.0f} MiB, {batches} batches of {args.batch_size} an epoch, shuffle buffer {args.shuffle_buffer}")
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
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
