"""store/rows.py, the K/V hot-loop reader: the same bits as zarr for every row range, layout and
codec; a missing chunk or shard file and every corrupt byte raise, naming the file."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from kvdistill.store import ShardReader, ShardWriter, StoreError, codecs, kv_rows, writer
from kvdistill.store.errors import CorruptShard
from kvdistill.store.rows import ShardedRows, missing_chunks

COMPRESSORS = {
    "blosc": lambda: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, blocksize=8 * 3 * 4 * 2),
    "zstd": lambda: ZstdCodec(level=1),
    "none": lambda: None,
}
WRITE_ALL = {"write_empty_chunks": True}
N, CHUNK, SHARD = 203, 8, 32  # rows; the last zarr shard and its last chunk are partial


def sharded(path, compressor: str, dtype=np.float16, data=None) -> tuple[zarr.Array, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(N, 3, 4)).astype(dtype) if data is None else data
    a = zarr.open_group(path, mode="w").create_array(
        "k",
        shape=x.shape,
        chunks=(CHUNK, 3, 4),
        shards=(SHARD, 3, 4),
        dtype=x.dtype,
        compressors=[c for c in (COMPRESSORS[compressor](), Crc32cCodec()) if c is not None],
        config=WRITE_ALL,
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


def test_chunks_of_fill_values_are_written_so_a_missing_chunk_or_shard_file_is_refused(tmp_path):
    x = np.random.default_rng(1).normal(size=(N, 3, 4)).astype(np.float16)
    x[8:16] = 0  # one whole chunk of fill values: written all the same (write_empty_chunks)
    x[64:96] = 0  # one whole zarr shard of them: its file exists
    arr, _ = sharded(tmp_path / "z.zarr", "blosc", data=x)
    shard2 = tmp_path / "z.zarr" / "k" / "c" / "2" / "0" / "0"
    assert shard2.exists() and missing_chunks(arr, tmp_path / "z.zarr" / "k") == []
    rows = ShardedRows(arr, tmp_path / "z.zarr" / "k")
    assert np.array_equal(rows(0, N), x)
    shard2.unlink()  # zarr would now read rows 64-95 as zeros
    assert np.array_equal(arr[64:96], np.zeros((32, 3, 4), np.float16))
    with pytest.raises(CorruptShard, match=r"shard file .*c/2/0/0 \(rows 64-95\) is missing"):
        rows(60, 70)
    assert rows(0, 64).shape == (64, 3, 4)  # the other shards still read
    assert missing_chunks(arr, tmp_path / "z.zarr" / "k") == [f"chunk file {shard2} is missing (deleted or lost)"]

    f = _shard_file(arr)  # shard 0: mark its chunk 1 "not written" in the index (and re-seal the index crc)
    raw = bytearray(f.read_bytes())
    index = np.frombuffer(bytes(raw[-68:-4]), "<u8").copy().reshape(4, 2)
    index[1] = 2**64 - 1
    raw[-68:-4] = index.tobytes()
    raw[-4:] = google_crc32c.value(bytes(raw[-68:-4])).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptShard, match=r"chunk 1 \(rows from 8\) is missing from shard file .*c/0/0/0"):
        rows(0, 20)
    assert "chunk 1 is missing from shard file" in missing_chunks(arr, tmp_path / "z.zarr" / "k")[0]


def test_other_layouts_are_not_claimed(tmp_path):
    g = zarr.open_group(tmp_path / "o.zarr", mode="w")
    plain = g.create_array("plain", shape=(64, 3, 4), chunks=(8, 3, 4), dtype=np.float16)
    both_axes = g.create_array("both", shape=(64, 4, 4), chunks=(8, 2, 4), shards=(32, 4, 4), dtype=np.float16)
    no_crc = g.create_array(
        "no_crc", shape=(64, 4, 4), chunks=(8, 4, 4), shards=(32, 4, 4), dtype=np.float16
    )  # unchecked chunks
    assert not ShardedRows.supports(plain) and not ShardedRows.supports(both_axes) and not ShardedRows.supports(no_crc)
    with pytest.raises(ValueError, match="read it with zarr"):
        ShardedRows(plain, tmp_path / "o.zarr" / "plain")


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_shard_reader_decodes_every_codec_like_zarr_does(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(writer, "CHUNK_BYTES", 2048)  # many chunks and zarr shards from a few samples
    rng = np.random.default_rng(2)
    L, D = 3, 40  # D not a multiple of 32: partial value-scale groups
    with ShardWriter(tmp_path / "s.zarr", "t", 0, num_layers=L, width=D, codec=codec) as w:
        for j in range(40):
            T = int(rng.integers(5, 60))
            k, v = rng.normal(size=(2, T, L, D)).astype(np.float32)
            w.write(
                f"s{j}",
                k,
                v,
                rng.integers(0, 500, T).astype(np.int32),
                rng.random(T) < 0.7,
                rng.integers(0, 3, T).astype(np.uint8),
            )
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
            want = kv_rows(arrays, codec, part, a, b, D)  # zarr alone
            got = r.rows(a, b, (part,))[part]
            assert got.dtype == want.dtype and np.array_equal(got, want), (part, a, b)


def _shard_file(arr) -> tuple:
    return arr.store.root / "k" / "c" / "0" / "0" / "0"


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_a_flipped_byte_anywhere_in_a_chunk_fails_its_crc32c_naming_the_chunk_and_file(tmp_path, compressor):
    arr, x = sharded(tmp_path / "f.zarr", compressor)
    f = _shard_file(arr)
    raw = f.read_bytes()
    rows = ShardedRows(arr, tmp_path / "f.zarr" / "k")
    first = int(np.frombuffer(raw[-68:-4], "<u8")[1])  # bytes of chunk 0 (body + its 4-byte crc)
    for at in (0, 5, first // 2, first - 5, first - 1):  # header, body, the stored crc itself
        bad = bytearray(raw)
        bad[at] ^= 0x10
        f.write_bytes(bytes(bad))
        with pytest.raises(
            CorruptShard, match=r"array .*k: chunk 0 \(rows from 0\) in shard file .*c/0/0/0 fails its crc32c check"
        ) as e:
            rows(0, 8)
        assert isinstance(e.value, StoreError) and "store verify" in str(e.value)
        with pytest.raises(ValueError, match="checksum"):  # plain zarr refuses it too
            arr[0:8]
    f.write_bytes(raw)
    assert np.array_equal(rows(0, N), x)


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
