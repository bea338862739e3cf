"""K/V codecs of the store side by side, in one run, on the same teacher K/V rows:

  float16, bfloat16   lossless containers (bf16 as uint16 bit patterns)
  int8, int4          KIVI-style quantisation (keys per channel, values per token; store/codecs.py)

each written to zarr v3 arrays chunked like ShardWriter (~1 MiB chunks, shards of 16 chunks,
rows appended in whole shards) under each compressor: blosc-zstd (level 3) with byte or bit
shuffle, plain zstd, both blosc shuffles with the whole chunk as one blosc block ("/chunk":
byte or bit planes of the chunk, then one zstd frame), the same at zstd level 1 ("/chunk/l1":
the store's default, ShardWriter's byte-shuffle variant), blosc-lz4 / lz4hc as a read-speed
reference, and no compressor (zarr's own cost).

Per variant: stored bytes, compression ratio vs raw 16-bit K/V, write MB/s (encode + compress
+ write), read MB/s (read + decompress + decode, in the training stream's read spans:
whole samples, about one zarr shard of rows per read, `store.samples.read_spans`; page cache
dropped with posix_fadvise first, then warm), the raw read rate of the same files
(`open().read()`, cold and warm) and the relative Frobenius error of K and V. MB/s are
logical: float16 bytes of the K/V delivered, whatever the codec stores. read/raw compares the
two ways of getting the same stored bytes off the disk: raw read time / reader time (cold).
The reader is store/rows.py (ShardReader's K/V path); zarr/raw times zarr's own slicing of the
same arrays side by side, and the two must return the same bits. codes/raw times what the
training stream reads: K/V as stored (bfloat16 bit patterns, int8 / int4 codes and scales),
which the trainer makes float32 on its device (train/quant.py); "dequant" is that step timed
with torch on this CPU, and it must give the reader's float32 bit for bit.

    python bench/store.py --samples 600 --repeats 2     # numbers for BENCHMARKS.md (~6 min on 2 cores)

K/V come from a tiny Qwen2 teacher (6 layers, hidden 128, 4 q / 2 kv heads, head_dim 32) trained
--steps steps on the synthetic data (random-init K/V are not representative; --steps 0 uses them),
captured with `forward_kv` on --samples samples: the teacher's own layers, no layer map.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from transformers.utils import logging as hf_logging
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from kvdistill import tiny
from kvdistill.core.capture import forward_kv
from kvdistill.core.data import load_examples
from kvdistill.core.prompts import encode, pad_batch
from kvdistill.schemas import (
    DEFAULT_TEMPLATE,
    AlignSpec,
    DataSpec,
    KVGeometry,
    ModelSpec,
    StoreSpec,
    SyntheticSpec,
    TeacherSpec,
)
from kvdistill.store import ShardWriter, codecs, finalize, init_store, init_teacher, kv_rows
from kvdistill.store.rows import ShardedRows
from kvdistill.store.samples import READ_SPAN_CHUNKS, read_spans
from kvdistill.store.writer import CHUNK_BYTES, CHUNKS_PER_SHARD
from kvdistill.train.quant import collate_quant
from kvdistill.train.stream import KVStream

TEACHER = dict(layers=6, hidden=128, heads=4, kv_heads=2, head_dim=32)
# name -> compressor for a chunk of `nbytes` bytes. blosc's default block (`blocksize=0`, tens of
# KiB) splits a chunk; "/chunk" makes the whole chunk one block (one zstd frame over the shuffled
# chunk, i.e. byte planes + zstd), which sees the repeats across tokens further apart.
COMPRESSORS = {
    "blosc-shuffle": lambda nbytes: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle),
    "blosc-bitshuffle": lambda nbytes: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
    "zstd": lambda nbytes: ZstdCodec(level=3),
    "blosc-shuffle/chunk": lambda nbytes: BloscCodec(
        cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, blocksize=nbytes
    ),
    "blosc-bitshuffle/chunk": lambda nbytes: BloscCodec(
        cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle, blocksize=nbytes
    ),
    # zstd level 1, the store's default (StoreSpec.compression_level): ~4x faster to compress.
    "blosc-shuffle/chunk/l1": lambda nbytes: BloscCodec(
        cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle, blocksize=nbytes
    ),
    "blosc-bitshuffle/chunk/l1": lambda nbytes: BloscCodec(
        cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle, blocksize=nbytes
    ),
    "blosc-lz4/chunk": lambda nbytes: BloscCodec(
        cname="lz4", clevel=9, shuffle=BloscShuffle.shuffle, blocksize=nbytes
    ),
    "blosc-lz4hc/chunk": lambda nbytes: BloscCodec(
        cname="lz4hc", clevel=5, shuffle=BloscShuffle.shuffle, blocksize=nbytes
    ),
    "none": lambda nbytes: None,  # zarr's own read cost, without decompression
}
STORE_COMPRESSOR = "blosc-shuffle/chunk/l1"  # what ShardWriter writes by default


def teacher_kv(samples: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k, v: [N, L, D] float32 of `samples` samples concatenated; offsets [samples + 1]."""
    rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=max(samples, 2000), n_test=16, seed=seed)))
    tok = tiny.train_tokenizer(tiny.corpus(rows, DEFAULT_TEMPLATE))
    model = tiny.build_model("qwen2", tok, seed=seed, **TEACHER)
    if steps:
        losses = tiny.train_lm(
            model, tok, rows, DEFAULT_TEMPLATE, steps=steps, seed=seed, desc="train teacher", progress=False
        )
        print(f"teacher trained {steps} steps: CE {losses[0]:.2f} -> {np.mean(losses[-10:]):.2f}")
    enc = [encode(tok, DEFAULT_TEMPLATE, ex) for ex in rows[:samples]]
    ks, vs = [], []
    with torch.inference_mode():
        for i in range(0, len(enc), 32):
            ids, mask = pad_batch([e.input_ids for e in enc[i : i + 32]], tok.pad_token_id)
            k, v = forward_kv(model, ids, mask)  # [B, T, L, D]
            for j in range(len(ids)):
                n = int(mask[j].sum())
                ks.append(k[j, :n].numpy())  # right padding: the sample's rows come first
                vs.append(v[j, :n].numpy())
    offsets = np.cumsum([0] + [len(x) for x in ks])
    return np.concatenate(ks), np.concatenate(vs), offsets


def layout(codec: str, part: str, L: int, D: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per stored array: (shape of one stored row, chunk rows), chunked like ShardWriter: ~1 MiB
    chunks of the main array, a multiple of GROUP rows so key-scale groups never straddle one."""
    main_row = (L, D) if codec != "int4" else (L, -(-D // 2))
    itemsize = codecs.stored_dtype(codec).itemsize
    rows = max(codecs.GROUP, CHUNK_BYTES // (int(np.prod(main_row)) * itemsize) // codecs.GROUP * codecs.GROUP)
    out = {"": (main_row, rows)}
    for name in codecs.array_names(codec)[1:]:
        out[name] = ((L, D), rows // codecs.GROUP) if part == "k" else ((L, -(-D // codecs.GROUP)), rows)
    return out


def create(group, codec: str, part: str, L: int, D: int, compressor: str) -> dict[str, zarr.Array]:
    arrays = {}
    for name, (row, rows) in layout(codec, part, L, D).items():
        dtype = np.dtype(codecs.stored_dtype(codec) if name == "" else np.float16)
        arrays[name] = group.create_array(
            f"{part}_{name}" if name else part,
            shape=(0, *row),
            chunks=(rows, *row),
            shards=(rows * CHUNKS_PER_SHARD, *row),
            dtype=dtype,
            # As ShardWriter: every chunk written and crc32c-checked (the reader refuses others).
            compressors=[
                c
                for c in (COMPRESSORS[compressor](rows * int(np.prod(row)) * dtype.itemsize), Crc32cCodec())
                if c is not None
            ],
            config={"write_empty_chunks": True},
        )
        arrays[name].attrs["kvdistill_codec"] = codecs.describe(codec, part)
    return arrays


def write(path: Path, codec: str, compressor: str, kv: dict[str, np.ndarray]) -> float:
    """Encode and append whole shards of rows, as ShardWriter does; seconds."""
    t0 = time.perf_counter()
    group = zarr.open_group(path, mode="w")
    for part, x in kv.items():
        N, L, D = x.shape
        arrays = create(group, codec, part, L, D, compressor)
        shard_rows = layout(codec, part, L, D)[""][1] * CHUNKS_PER_SHARD
        for r0 in range(0, N, shard_rows):
            for name, arr in codecs.encode(codec, part, x[r0 : r0 + shard_rows]).items():
                arrays[name].append(arr)
    return time.perf_counter() - t0


def read(path: Path, codec: str, bounds: list[int], D: int, reader: str) -> tuple[dict[str, list], float]:
    """Rows [bounds[i], bounds[i + 1]) block by block with ShardReader's `kv_rows`, the arrays
    read by `reader`: "rows" (store/rows.py, what ShardReader uses), "rows-nocrc" (the same
    with its crc32c check of every chunk off: the check's cost) or "zarr" (zarr's own
    slicing), decoded (float16 stays float16, the others float32) on the CPU; or "codes":
    store/rows.py, left as stored (bfloat16 bits, int8 / int4 `QuantRows`: what the training
    stream hands the trainer to make float32 on its device).
    ({"k", "v": [block]}, seconds). The arrays are opened (their metadata read) before the clock
    starts, as the stream opens a store once: the time is the rows' alone."""
    group = zarr.open_group(path, mode="r")
    opened = {}
    for part in ("k", "v"):
        names = {name: f"{part}_{name}" if name else part for name in codecs.array_names(codec)}
        opened[part] = {
            name: ShardedRows(group[a], path / a) if reader != "zarr" else group[a] for name, a in names.items()
        }
        for r in opened[part].values():
            if isinstance(r, ShardedRows):
                r.check_crc = reader != "rows-nocrc"
    t0 = time.perf_counter()
    out = {}
    for part, arrays in opened.items():
        fast = arrays[""] if reader != "zarr" else None
        out[part] = [
            kv_rows(arrays, codec, part, r0, r1, D, fast, decode=reader != "codes")
            for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    return out, time.perf_counter() - t0  # the trainer takes blocks as they come: no concatenation timed


def to_float(blocks: dict[str, list], codec: str) -> tuple[dict[str, np.ndarray], float]:
    """The trainer's side of "codes": every block as stored made float32 by torch, here on the
    CPU (on a GPU this runs on the device): int8 / int4 as a one-sample QuantKV dequantised,
    bfloat16 bit patterns viewed as torch.bfloat16 and cast. ({"k", "v": float32 [N, L, D]}, seconds)."""

    def one(b):
        if isinstance(b, codecs.QuantRows):
            return collate_quant([b], len(b)).dequantise()[0]
        x = torch.from_numpy(b)
        return (x.view(torch.bfloat16) if codec == "bfloat16" else x).to(torch.float32)

    t0 = time.perf_counter()
    out = {part: [one(b) for b in bl] for part, bl in blocks.items()}
    seconds = time.perf_counter() - t0
    return {part: torch.cat(bl).numpy() for part, bl in out.items()}, seconds


def joined(blocks: dict[str, list]) -> dict[str, np.ndarray]:
    return {part: np.concatenate(bl) for part, bl in blocks.items()}


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> None:
    """Evict the files from the page cache (written back first), so the next read hits the disk."""
    for p in files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(path: Path) -> float:
    t0 = time.perf_counter()
    for p in files(path):
        with open(p, "rb") as f:
            f.read()
    return time.perf_counter() - t0


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def measure(
    root: Path, codec: str, compressor: str, kv: dict[str, np.ndarray], offsets: np.ndarray, repeats: int
) -> dict:
    path = root / f"{codec}-{compressor.replace('/', '-')}.zarr"
    logical = sum(x.size for x in kv.values()) * 2  # float16 bytes of K and V
    w = []
    for _ in range(repeats):
        shutil.rmtree(path, ignore_errors=True)
        w.append(write(path, codec, compressor, kv))
    stored = sum(p.stat().st_size for p in files(path))
    N, L, D = kv["k"].shape
    spans = list(read_spans(offsets, READ_SPAN_CHUNKS * layout(codec, "k", L, D)[""][1]))
    stream = [int(offsets[j0]) for j0, _ in spans] + [int(offsets[-1])]
    cold, warm, raw_cold, raw_warm, zarr_cold, codes_cold, deq, nocrc_cold = [], [], [], [], [], [], [], []
    for _ in range(repeats):
        drop_cache(path)
        raw_cold.append(raw_read(path))
        raw_warm.append(raw_read(path))
        drop_cache(path)
        blocks, s = read(path, codec, stream, D, "rows")
        cold.append(s)
        _, s = read(path, codec, stream, D, "rows")
        warm.append(s)
        drop_cache(path)
        _, s = read(path, codec, stream, D, "rows-nocrc")
        nocrc_cold.append(s)
        drop_cache(path)
        via_zarr, s = read(path, codec, stream, D, "zarr")
        zarr_cold.append(s)
        drop_cache(path)
        stored_blocks, s = read(path, codec, stream, D, "codes")
        codes_cold.append(s)
        via_codes, s = to_float(stored_blocks, codec)
        deq.append(s)
    got, via_zarr = joined(blocks), joined(via_zarr)
    assert all(np.array_equal(via_zarr[p], got[p]) for p in got), "store/rows.py and zarr disagree"
    assert all(np.array_equal(via_codes[p], got[p].astype(np.float32)) for p in got), (
        "dequantising on the trainer's side disagrees with the reader"
    )
    return {
        "codec": codec,
        "compressor": compressor,
        "stored": stored,
        "ratio": logical / stored,
        "write": logical / min(w) / 1e6,
        "read_cold": logical / min(cold) / 1e6,
        "read_warm": logical / min(warm) / 1e6,
        "read_vs_raw": min(raw_cold) / min(cold),  # same stored bytes: raw time / reader time
        "nocrc_vs_raw": min(raw_cold) / min(nocrc_cold),  # the same without the crc32c checks
        "zarr_vs_raw": min(raw_cold) / min(zarr_cold),
        "codes_vs_raw": min(raw_cold) / min(codes_cold),  # what the training stream reads
        "dequant": logical / min(deq) / 1e6,
        "raw_cold": stored / min(raw_cold) / 1e6,
        "raw_warm": stored / min(raw_warm) / 1e6,
        "err_k": rel_err(got["k"], kv["k"]),
        "err_v": rel_err(got["v"], kv["v"]),
    }


def stream_store(
    root: Path,
    codec: str,
    kv: dict[str, np.ndarray],
    offsets: np.ndarray,
    teachers: int,
    shards: int = 1,
    tile: int = 1,
) -> Path:
    """A real store (ShardWriter, the store's compressor) holding the K/V as `teachers` teachers,
    the samples `tile` times over (as distinct samples), split into `shards` contiguous shards."""
    path = root / f"stream-{codec}-{teachers}-{shards}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    N, L, D = kv["k"].shape
    geom = KVGeometry(num_layers=L, num_kv_heads=TEACHER["kv_heads"], head_dim=TEACHER["head_dim"])
    spec = StoreSpec(
        student=ModelSpec("bench"),
        geometry=geom,
        tokenizer_fingerprint="bench",
        data=DataSpec(),
        data_fingerprint="bench",
        num_shards=shards,
        kv_dtype=codec,
    )
    init_store(path, spec)
    ids, mask = np.zeros(N, np.int32), np.ones(N, np.bool_)
    eye = [[float(i == j) for j in range(L)] for i in range(L)]
    S = len(offsets) - 1
    bounds = np.linspace(0, S * tile, shards + 1).astype(int)  # samples per shard
    for t in range(teachers):
        name = f"teacher-{t}"
        init_teacher(
            path,
            TeacherSpec(
                name=name,
                model=ModelSpec("bench"),
                geometry=geom,
                align=AlignSpec(),
                time_map="identity",
                layer_map=eye,
                width=D,
                fingerprint="bench",
                kv_dtype=codec,
            ),
        )
        for i in range(shards):
            with ShardWriter(path, name, i, num_layers=L, width=D, codec=codec) as w:
                for j in range(bounds[i], bounds[i + 1]):
                    a, b = int(offsets[j % S]), int(offsets[j % S + 1])
                    w.write(f"s{j}", kv["k"][a:b], kv["v"][a:b], ids[a:b], mask[a:b])
    finalize(path)
    return path


def measure_stream(
    root: Path,
    codec: str,
    kv: dict[str, np.ndarray],
    offsets: np.ndarray,
    teachers: int,
    repeats: int,
    shards: int,
    spans: int,
) -> dict:
    """KVStream (what the trainer iterates: spans, concurrent K/V reads, read-ahead across
    shards) over a real store of at least `spans` read spans (the samples repeated as needed:
    with fewer, the first read, which nothing overlaps, is most of the time), cold, against
    open().read() of the same files."""
    N, L, D = kv["k"].shape
    tile = -(-spans * READ_SPAN_CHUNKS * layout(codec, "k", L, D)[""][1] // N)
    path = stream_store(root, codec, kv, offsets, teachers, shards, tile)
    names = [f"teacher-{t}" for t in range(teachers)]
    logical = sum(x.size for x in kv.values()) * 2 * teachers * tile
    stored = sum(p.stat().st_size for p in files(path))
    cold, raw, first = [], [], []
    for _ in range(repeats):
        drop_cache(path)
        raw.append(raw_read(path))
        drop_cache(path)
        t0 = time.perf_counter()
        it = iter(KVStream(path, names, shuffle_buffer=1))
        next(it)
        first.append(time.perf_counter() - t0)
        n = 1 + sum(1 for _ in it)
        cold.append(time.perf_counter() - t0)
    assert n == (len(offsets) - 1) * tile
    shutil.rmtree(path)
    return {
        "codec": codec,
        "teachers": teachers,
        "shards": shards,
        "samples": n,
        "stored": stored,
        "first": min(first),
        "read": logical / min(cold) / 1e6,
        "raw": stored / min(raw) / 1e6,
        "read_vs_raw": min(raw) / min(cold),
    }


HEADER = (
    f"{'codec':<9} {'compressor':<22} {'stored MB':>9} {'vs raw16':>8} {'vs bf16':>7} {'write':>6} {'read cold':>9}"
    f" {'warm':>6} {'raw cold':>8} {'warm':>6} {'read/raw':>8} {'no crc':>7} {'zarr/raw':>8} {'codes/raw':>9}"
    f" {'dequant':>7} {'err K':>7} {'err V':>7}"
)


def row(r: dict, bf16_stored: int) -> str:
    deq = f"{r['dequant']:>7.0f}"
    return (
        f"{r['codec']:<9} {r['compressor']:<22} {r['stored'] / 1e6:>9.2f} {r['ratio']:>7.2f}x"
        f" {bf16_stored / r['stored']:>6.2f}x {r['write']:>6.0f} {r['read_cold']:>9.0f} {r['read_warm']:>6.0f}"
        f" {r['raw_cold']:>8.0f} {r['raw_warm']:>6.0f} {r['read_vs_raw']:>7.0%} {r['nocrc_vs_raw']:>6.0%}"
        f" {r['zarr_vs_raw']:>7.0%} {r['codes_vs_raw']:>8.0%} {deq} {r['err_k']:>7.3%} {r['err_v']:>7.3%}"
    )


TARGETS = {  # codec: (min ratio vs raw 16-bit, max relative error)
    "bfloat16": (1.25, None),
    "int8": (1.9, 0.01),
    "int4": (3.5, 0.08),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=150, help="teacher training steps (0: random-init K/V)")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir, removed)")
    p.add_argument("--codecs", default=",".join(codecs.CODECS), help="comma-separated subset of the K/V codecs")
    p.add_argument(
        "--stream-shards",
        type=int,
        default=8,
        help="the stream is also timed over the samples split into this many shards",
    )
    p.add_argument(
        "--stream-spans",
        type=int,
        default=12,
        help=(
            "the stream's store holds the samples repeated to at least this many read spans (0: do not time the"
            " stream)"
        ),
    )
    p.add_argument(
        "--compressors", default=",".join(COMPRESSORS), help="comma-separated subset of " + ", ".join(COMPRESSORS)
    )
    args = p.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    k, v, offsets = teacher_kv(args.samples, args.steps, args.seed)
    kv = {"k": k, "v": v}
    N, L, D = k.shape
    print(
        f"K/V of a {'trained (' + str(args.steps) + ' steps)' if args.steps else 'RANDOM-INIT'} Qwen2 teacher"
        f" {TEACHER}: {args.samples} samples, N={N} rows, L={L}, D={D}; raw 16-bit K+V {N * L * D * 4 / 1e6:.2f} MB;"
        f" MB/s are float16 bytes delivered, best of {args.repeats}\n"
    )
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvdistill-bench-store-"))
    root.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in chosen if c not in codecs.CODECS] + [
        c for c in args.compressors.split(",") if c not in COMPRESSORS
    ]
    if unknown:
        p.error(
            f"unknown codec / compressor {unknown}; codecs: {list(codecs.CODECS)}, compressors: {list(COMPRESSORS)}"
        )
    results = []
    try:
        for codec in chosen:
            for compressor in args.compressors.split(","):
                results.append(measure(root, codec, compressor, kv, offsets, args.repeats))
        streams = [
            measure_stream(root, c, kv, offsets, t, args.repeats, n, args.stream_spans)
            for c in chosen
            for t in (1, 2)
            for n in (1, args.stream_shards)
            if args.stream_spans > 0
        ]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    best = {c: min((r for r in results if r["codec"] == c), key=lambda r: r["stored"]) for c in chosen}
    bf16 = best["bfloat16"]["stored"] if "bfloat16" in best else float("nan")
    print(HEADER)
    for r in results:
        print(row(r, bf16))
    print("\nbest (fewest bytes) compressor per codec")
    print(HEADER)
    for c in chosen:
        print(row(best[c], bf16))
    print(
        "\nvs raw16: logical 16-bit K+V bytes / stored bytes (raw float16 and raw bfloat16 are the same size); vs"
        " bf16: stored bytes of the best bfloat16 variant / stored bytes.\nMB/s: write = encode + compress + zarr"
        " append; read = store/rows.py read + decompress + decode chunk by chunk (ShardReader's kv_rows), logical"
        f" float16 MB/s, in the stream's read spans ({READ_SPAN_CHUNKS} chunks of whole samples), page cache dropped"
        " (cold) or not (warm); raw = open().read() of the same files, MB/s of stored bytes; read/raw = raw cold time"
        " / read cold time for the same stored bytes (read cold x stored / logical / raw cold); no crc = read/raw"
        " with store/rows.py's crc32c check of every chunk turned off (its cost, side by side); zarr/raw = the same"
        " with zarr's own slicing as the reader; codes/raw = the same for what the training stream reads: K/V as"
        " stored (bfloat16 bit patterns, int8 / int4 codes and scales; float16 as read/raw); dequant = torch making"
        " those float32 on this CPU (int8 / int4 dequantised, 16-bit floats cast), logical MB/s (the trainer's side:"
        " on a GPU it runs on the device)."
    )
    if streams:
        print(
            "\nthe training stream (KVStream over a real store written by ShardWriter, the samples repeated to >="
            f" {args.stream_spans} read spans, cold; raw = open().read() of its files; first = seconds to the first"
            " sample, included in read)"
        )
        print(
            f"{'codec':<9} {'teachers':>8} {'shards':>6} {'samples':>7} {'stored MB':>9} {'first s':>7}"
            f" {'read MB/s':>9} {'raw MB/s':>9} {'read/raw':>8}"
        )
    for r in streams:
        print(
            f"{r['codec']:<9} {r['teachers']:>8} {r['shards']:>6} {r['samples']:>7} {r['stored'] / 1e6:>9.2f}"
            f" {r['first']:>7.3f} {r['read']:>9.0f} {r['raw']:>9.0f} {r['read_vs_raw']:>7.0%}"
        )
    # Targets are judged on what a user gets: the store's own compressor (ShardWriter's: byte
    # shuffle, whole-chunk blocks, zstd level 1) when it was measured, else the smallest variant.
    store = {
        c: next((r for r in results if r["codec"] == c and r["compressor"] == STORE_COMPRESSOR), best[c])
        for c in chosen
    }
    print(f"\ntargets (on {STORE_COMPRESSOR}, the store's compressor, where measured)")
    for c, (ratio, err) in TARGETS.items():
        if c not in store:
            continue
        r = store[c]
        ok = r["ratio"] >= ratio and (err is None or max(r["err_k"], r["err_v"]) <= err)
        err_txt = f" at <= {err:.0%} error (K {r['err_k']:.2%}, V {r['err_v']:.2%})" if err else ""
        print(f"  {c:<9} {r['compressor']}: >= {ratio}x{err_txt}: {r['ratio']:.2f}x  {'met' if ok else 'MISSED'}")
    for c in chosen:
        r = store[c]
        logical = r["read_cold"] / r["raw_cold"]
        if c != "float16":  # the stream reads them as stored; the trainer makes them float32 on its device
            frac = r["codes_vs_raw"]
            how = (
                "the training stream's read: as stored, made float32 on the trainer's device; decoded to float32 on"
                f" this CPU: {r['read_vs_raw']:.0%}"
            )
        else:
            frac = r["read_vs_raw"]
            how = f"{logical:.0%} counting logical float16 MB/s against stored MB/s"
        print(
            f"  {c:<9} {r['compressor']}: read >= 50% of raw read rate: {frac:.0%} of the raw rate on the same stored"
            f" bytes ({how})  {'met' if frac >= 0.5 else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
