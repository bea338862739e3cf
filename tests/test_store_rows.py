"""store/rows.py, the K/V hot-loop reader: the same bits as zarr for every row range, layout and
codec; unwritten chunks read as the fill value; corrupt shard files raise, naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from kvdistill.store import ShardReader, ShardWriter, StoreError, codecs, read_kv, zarr_store
from kvdistill.store.errors import CorruptShard
from kvdistill.store.rows import ShardedRows

COMPRESSORS = {
    "blosc": lambda: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, blocksize=8 * 3 * 4 * 2),
    "zstd": lambda: ZstdCodec(level=1),
    "none": lambda: None,
}
N, CHUNK, SHARD = 203, 8, 32  # rows; the last zarr shard and its last chunk are partial


def sharded(path, compressor: str, dtype=np.float16, data=None) -> tuple[zarr.Array, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(N, 3, 4)).astype(dtype) if data is None else data
    a = zarr.open_group(path, mode="w").create_array(
        "k", shape=x.shape, chunks=(CHUNK, 3, 4), shards=(SHARD, 3, 4), dtype=x.dtype, compressors=COMPRESSORS[compressor]()
    )
    a[:] = x
    return a, x


@pytest.fixture(scope="module", params=sorted(COMPRESSORS))
def array(request, tmp_path_factory):
    return sharded(tmp_path_factory.mktemp(request.param) / "a.zarr", request.param)


@settings(max_examples=60, deadline=None)
@given(a=st.integers(-5, N + 5), n=st.integers(0, N + 10))
def test_any_row_range_reads_the_same_bits_as_zarr(array, a, n):
    arr, x = array
    rows = ShardedRows(arr, arr.store.root / "k")
    got = rows(a, a + n)
    want = arr[max(0, a) : max(0, a + n)]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_a_decode_applied_chunk_by_chunk_equals_decoding_the_whole_range(array):
    arr, x = array
    rows = ShardedRows(arr, arr.store.root / "k")
    calls = []

    def decode(q, r0):  # depends on the absolute row index, like the int8 / int4 scale groups
        calls.append((r0, len(q)))
        return q.astype(np.float32) * np.arange(r0, r0 + len(q), dtype=np.float32)[:, None, None]

    got = rows(5, 150, decode)
    assert np.array_equal(got, decode(x[5:150], 5))
    assert len(calls) > 3 and sum(n for r0, n in calls[1:-1]) == 145  # probe (0 rows), the chunks, the reference


def test_unwritten_chunks_and_shards_read_as_the_fill_value(tmp_path):
    x = np.random.default_rng(1).normal(size=(N, 3, 4)).astype(np.float16)
    x[8:16] = 0  # one whole chunk of fill values: zarr writes no bytes for it
    x[64:96] = 0  # one whole zarr shard: no file at all
    arr, _ = sharded(tmp_path / "z.zarr", "blosc", data=x)
    assert not (tmp_path / "z.zarr" / "k" / "c" / "2" / "0" / "0").exists()
    assert np.array_equal(ShardedRows(arr, tmp_path / "z.zarr" / "k")(0, N), x)


def test_other_layouts_are_not_claimed(tmp_path):
    g = zarr.open_group(tmp_path / "o.zarr", mode="w")
    plain = g.create_array("plain", shape=(64, 3, 4), chunks=(8, 3, 4), dtype=np.float16)
    both_axes = g.create_array("both", shape=(64, 4, 4), chunks=(8, 2, 4), shards=(32, 4, 4), dtype=np.float16)
    assert not ShardedRows.supports(plain) and not ShardedRows.supports(both_axes)
    with pytest.raises(ValueError, match="read it with zarr"):
        ShardedRows(plain, tmp_path / "o.zarr" / "plain")


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_shard_reader_decodes_every_codec_like_zarr_does(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(zarr_store, "CHUNK_BYTES", 2048)  # many chunks and zarr shards from a few samples
    rng = np.random.default_rng(2)
    L, D = 3, 40  # D not a multiple of 32: partial value-scale groups
    with ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=L, width=D, codec=codec) as w:
        for j in range(40):
            T = int(rng.integers(5, 60))
            k, v = rng.normal(size=(2, T, L, D)).astype(np.float32)
            w.write(f"s{j}", k, v, rng.integers(0, 500, T).astype(np.int32), rng.random(T) < 0.7, rng.integers(0, 3, T).astype(np.uint8))
    r = ShardReader(tmp_path / "s.zarr", "t", 0)
    assert {"k", "v", "input_ids", "loss_mask"} <= set(r.fast) and r.group["k"].shards[0] > r.group["k"].chunks[0]
    n = int(r.offsets[-1])
    for a, b in [(0, n), (3, 4), (31, 97), (n - 50, n), (500, 500)]:
        for name in ("input_ids", "loss_mask", "segment_ids"):  # the token arrays take the same path
            got = r.rows(a, b, (name,))[name]
            assert got.dtype == r.group[name].dtype and np.array_equal(got, r.group[name][a:b])
        for part in ("k", "v"):
            names = r.attrs["scales"][part] if codec in ("int8", "int4") else []
            arrays = {"": r.group[part], **{s: r.group[f"{part}_{s}"] for s in names}}
            want = read_kv(arrays, codec, part, a, b, D)  # zarr alone
            got = r.rows(a, b, (part,))[part]
            assert got.dtype == want.dtype and np.array_equal(got, want), (part, a, b)


def _shard_file(arr) -> tuple:
    return arr.store.root / "k" / "c" / "0" / "0" / "0"


def test_a_chunk_that_does_not_decode_raises_naming_the_shard_file(tmp_path):
    # (A flipped byte inside a zstd stream can decode to wrong values without an error, in zarr
    # too: the shard's crc32 record, checked by `kvdistill store verify`, is what catches those.)
    arr, _ = sharded(tmp_path / "f.zarr", "blosc")
    f = _shard_file(arr)
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0xFF  # the first chunk's blosc header: its decoded size
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptShard, match=r"c/0/0/0.*(does not decode|crc)") as e:
        ShardedRows(arr, tmp_path / "f.zarr" / "k")(0, 8)
    assert isinstance(e.value, StoreError) and "store verify" in str(e.value)


def test_a_truncated_or_index_corrupted_shard_file_raises(tmp_path):
    arr, _ = sharded(tmp_path / "t.zarr", "none")
    f = _shard_file(arr)
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 10])  # cuts into the index
    with pytest.raises(CorruptShard, match="crc32c"):
        ShardedRows(arr, tmp_path / "t.zarr" / "k")(0, 8)
    f.write_bytes(raw[:40])  # shorter than the 68-byte index of 4 chunks
    with pytest.raises(CorruptShard, match="shorter than its"):
        ShardedRows(arr, tmp_path / "t.zarr" / "k")(0, 8)


def _read_in_child(path, queue):
    arr = zarr.open_array(path / "k", mode="r")
    queue.put(ShardedRows(arr, path / "k")(0, N).tobytes())


def test_a_forked_worker_reads_after_the_parent_used_the_pool(tmp_path):
    # DataLoader workers are forked: an inherited thread pool has no threads in the child.
    import multiprocessing as mp

    arr, x = sharded(tmp_path / "p.zarr", "blosc")
    ShardedRows(arr, tmp_path / "p.zarr" / "k")(0, N)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(tmp_path / "p.zarr", queue))
    child.start()
    try:
        got = queue.get(timeout=30)  # without the at-fork reset the child waits forever
        child.join(timeout=30)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0 and got == x.tobytes()
