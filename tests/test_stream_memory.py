"""The training stream holds a bounded amount of memory: read spans in flight (the one consumed,
the one read ahead), those the shuffle buffer's samples still point into, and one batch,
whatever the size of the store. Measured with read spans of one zarr chunk (1 MiB per array
instead of the default 16), so that a 400 MiB store is several times the bound (with the
default spans the stream holds ~150 MiB per teacher, constant over a store)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvdistill.schemas import AlignSpec, DataSpec, KVGeometry, ModelSpec, StoreSpec, TeacherSpec
from kvdistill.store import ShardWriter, finalize, init_store, init_teacher

pytestmark = pytest.mark.slow  # streams a 400 MiB store in subprocesses

L, H, d = 4, 2, 64  # D = 128: a float32 K+V row is 4 KiB decoded

STREAM = textwrap.dedent("""
    import json, sys
    from torch.utils.data import DataLoader
    from kvdistill.train.stream import KVStream, collate

    import kvdistill.store.samples
    store, shuffle_buffer = sys.argv[1], int(sys.argv[2])
    kvdistill.store.samples.READ_SPAN_CHUNKS = 1
    def rss():  # anonymous resident bytes now: not ru_maxrss (it keeps the import's transient peak), not page cache
        return int(next(x for x in open("/proc/self/status") if x.startswith("RssAnon")).split()[1]) * 1024
    stream = KVStream(store, ["t"], shuffle_buffer=shuffle_buffer, kv_as_stored=False)
    loader = DataLoader(stream, batch_size=8, collate_fn=lambda s: collate(s, 0))
    base, peak, rows = rss(), 0, 0  # torch, zarr and the store's metadata loaded; nothing streamed yet
    for batch in loader:
        rows += int(batch["attention_mask"].sum())
        peak = max(peak, rss())
    print(json.dumps({"rows": rows, "growth": peak - base}))
    """)


def _store(path, samples: int, tokens: int) -> int:
    geom = KVGeometry(num_layers=L, num_kv_heads=H, head_dim=d)
    init_store(
        path,
        StoreSpec(
            student=ModelSpec("m"),
            geometry=geom,
            tokenizer_fingerprint="m",
            data=DataSpec(),
            data_fingerprint="m",
            num_shards=2,
        ),
    )
    eye = [[float(i == j) for j in range(L)] for i in range(L)]
    init_teacher(
        path,
        TeacherSpec(
            name="t",
            model=ModelSpec("m"),
            geometry=geom,
            align=AlignSpec(),
            time_map="identity",
            layer_map=eye,
            width=geom.width,
            fingerprint="m",
        ),
    )
    rng = np.random.default_rng(0)
    rows = 0
    for s in range(2):
        with ShardWriter(path, "t", s, num_layers=L, width=geom.width, compression_level=0) as w:
            for j in range(samples // 2):
                kv = rng.standard_normal((2, tokens, L, geom.width), dtype=np.float32).astype(np.float16)
                w.write(f"s{s}-{j}", kv[0], kv[1], np.zeros(tokens, np.int32), np.ones(tokens, np.bool_))
                rows += tokens
    finalize(path)
    return rows


def _stream(store, shuffle_buffer: int) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", STREAM, str(store), str(shuffle_buffer)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_store_several_times_the_memory_bound_streams_within_it(tmp_path):
    """Peak anonymous resident memory of the streaming process over every batch, above what it
    held before the first."""
    rows = _store(tmp_path / "big.zarr", samples=3200, tokens=64)  # 204,800 rows
    stored = rows * 2 * L * H * d * 2  # K and V as float16, as the stream holds them: 400 MiB
    bound = 96 * 2**20  # ~60 MiB of it is fixed: thread pools, codec contexts, the first collate
    assert stored >= 4 * bound
    got = _stream(tmp_path / "big.zarr", shuffle_buffer=64)
    assert got["rows"] == rows  # every sample streamed, none dropped
    assert got["growth"] < bound, got
    # The bound can fail: a shuffle buffer that holds every sample holds the whole store.
    assert _stream(tmp_path / "big.zarr", shuffle_buffer=100_000)["growth"] > stored / 2
