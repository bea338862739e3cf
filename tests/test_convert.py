"""`kvdistill store convert` keeps what the source stores: the codec where the target backend
holds it (bit for bit), a quantised teacher into webdataset only when the user chooses the
decoded dtype, and never a half-made store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from kvdistill.cli import ExitCode, main
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import DumpConfig
from kvdistill.store import ShardReader, finalize, read_store_spec, read_teacher_specs, wds_samples
from kvdistill.store.verify import verify


@pytest.fixture(scope="module")
def int8_store(tiny_store, tmp_path_factory):
    """teacher-a dumped as int8 (codes + float16 scales), 2 shards, finalized."""
    store = tmp_path_factory.mktemp("convert") / "int8.zarr"
    base = DumpConfig(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
        kv_dtype="int8",
    )
    run_local(dump_tasks(base, tiny_store["teachers"][:1]), progress=False)
    finalize(store)
    return store


def _stored(store, teacher: str, shard: int) -> dict[str, np.ndarray]:
    """Every array of a zarr shard as stored (codes, scales, tokens, offsets, ids)."""
    group = zarr.open_group(store / "teachers" / teacher / f"shard-{shard:05d}", mode="r")
    return {name: a[...] for name, a in group.arrays()}


def _assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_an_int8_teacher_is_refused_into_webdataset_without_kv_dtype_and_nothing_is_made(int8_store, tmp_path, capsys):
    dst = tmp_path / "out.wds"
    assert main(["store", "convert", str(int8_store), str(dst)]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "teacher 'teacher-a' is stored as int8, which webdataset tars cannot hold; pass --kv-dtype float16 or float32"
        in err
    )
    assert not dst.exists()
    assert (
        main(["store", "convert", str(int8_store), str(dst), "--kv-dtype", "int8"]) == ExitCode.BAD_INPUT
    )  # tars cannot hold int8 either
    assert "webdataset tars hold float16 or float32" in capsys.readouterr().err
    assert not dst.exists()


def test_int8_into_webdataset_as_float16_holds_the_decoded_int8_values(int8_store, tmp_path):
    dst = tmp_path / "out.wds"
    assert main(["store", "convert", str(int8_store), str(dst), "--kv-dtype", "float16"]) == 0
    assert verify(dst) == []
    assert read_teacher_specs(dst)["teacher-a"].kv_dtype == "float16" and read_store_spec(dst).kv_dtype == "float16"
    for shard in range(2):
        r = ShardReader(int8_store, "teacher-a", shard)
        got = list(wds_samples(dst, ["teacher-a"], shard))
        assert [s["sample_id"] for s in got] == r.sample_ids
        for j, s in enumerate(got):
            want = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), ("k", "v"))  # int8 decoded, float32
            for part, x in zip(("k", "v"), s["kv"]["teacher-a"], strict=True):
                assert x.dtype == np.float16
                assert np.array_equal(x, want[part].astype(np.float16))  # the decoded values, rounded once to float16
                np.testing.assert_allclose(x.astype(np.float32), want[part], rtol=2**-11, atol=0)


def test_int8_zarr_into_zarr_keeps_the_int8_codes_and_scales_bit_for_bit(int8_store, tmp_path):
    dst = tmp_path / "copy.zarr"
    assert main(["store", "convert", str(int8_store), str(dst), "--to", "zarr"]) == 0
    assert verify(dst) == []
    assert read_teacher_specs(dst)["teacher-a"].kv_dtype == "int8"
    for shard in range(2):
        src_arrays, dst_arrays = _stored(int8_store, "teacher-a", shard), _stored(dst, "teacher-a", shard)
        assert src_arrays["k"].dtype == np.int8 and "k_scale" in src_arrays
        _assert_same_arrays(src_arrays, dst_arrays)
        attrs = ShardReader(dst, "teacher-a", shard).attrs
        assert (
            attrs["codec"] == "int8"
            and attrs["fingerprint"] == ShardReader(int8_store, "teacher-a", shard).attrs["fingerprint"]
        )


def test_a_teachers_stored_projection_arrays_are_carried_over(int8_store, tmp_path):
    src = shutil.copytree(int8_store, tmp_path / "src.zarr")
    components = np.arange(12, dtype=np.float32).reshape(3, 4)
    zarr.open_group(src / "teachers" / "teacher-a", mode="a").require_group("projection").create_array(
        "k_components", data=components
    )
    assert main(["store", "convert", str(src), str(tmp_path / "w.wds"), "--kv-dtype", "float32"]) == 0
    got = zarr.open_group(tmp_path / "w.wds" / "teachers" / "teacher-a" / "projection", mode="r")["k_components"][...]
    assert np.array_equal(got, components)


def test_float16_zarr_into_webdataset_and_back_is_bit_for_bit(tiny_store, tmp_path):
    src = tiny_store["store"]
    assert main(["store", "convert", str(src), str(tmp_path / "w.wds")]) == 0
    assert main(["store", "convert", str(tmp_path / "w.wds"), str(tmp_path / "back.zarr")]) == 0
    assert verify(tmp_path / "back.zarr") == []
    for teacher in ("teacher-a", "teacher-b"):
        assert (
            read_teacher_specs(tmp_path / "back.zarr")[teacher].kv_dtype
            == read_teacher_specs(src)[teacher].kv_dtype
            == "float16"
        )
        for shard in range(2):
            _assert_same_arrays(_stored(src, teacher, shard), _stored(tmp_path / "back.zarr", teacher, shard))


def test_webdataset_into_zarr_takes_another_codec_when_asked(tiny_store, tmp_path):
    assert main(["store", "convert", str(tiny_store["store"]), str(tmp_path / "w.wds")]) == 0
    assert main(["store", "convert", str(tmp_path / "w.wds"), str(tmp_path / "q.zarr"), "--kv-dtype", "int8"]) == 0
    assert verify(tmp_path / "q.zarr") == []
    assert {t.kv_dtype for t in read_teacher_specs(tmp_path / "q.zarr").values()} == {"int8"}
    assert _stored(tmp_path / "q.zarr", "teacher-a", 0)["k"].dtype == np.int8


def test_a_conversion_that_fails_half_way_leaves_no_store(int8_store, tmp_path, capsys):
    src = shutil.copytree(int8_store, tmp_path / "src.zarr")
    chunk = next(p for p in sorted((src / "teachers" / "teacher-a" / "shard-00001" / "k").rglob("*")) if p.is_file())
    chunk.unlink()  # shard 0 converts, shard 1 is damaged
    dst = tmp_path / "out.wds"
    assert main(["store", "convert", str(src), str(dst), "--kv-dtype", "float32"]) == ExitCode.INTEGRITY
    assert "missing" in capsys.readouterr().err
    assert not dst.exists()


def test_converting_into_an_existing_store_is_refused(int8_store, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "something").write_text("x")
    assert main(["store", "convert", str(int8_store), str(dst), "--to", "zarr"]) == ExitCode.BAD_INPUT
    assert "exists; convert writes a new store" in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == ["something"]


@pytest.fixture(scope="module")
def int4_store(tiny_store, tmp_path_factory):
    """teacher-a dumped as int4 (packed codes + float16 scales and zeros), 2 shards, finalized."""
    store = tmp_path_factory.mktemp("convert") / "int4.zarr"
    base = DumpConfig(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(store),
        data=tiny_store["data"],
        num_shards=2,
        batch_size=8,
        device="cpu",
        kv_dtype="int4",
    )
    run_local(dump_tasks(base, tiny_store["teachers"][:1]), progress=False)
    finalize(store)
    return store


def _never(*args, **kwargs):
    raise AssertionError("a teacher whose codec stays is copied as stored, never decoded or encoded again")


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_a_quantised_zarr_store_into_zarr_at_another_compression_level_is_copied_as_stored(
    codec, request, tmp_path, monkeypatch
):
    from kvdistill.store import codecs

    src = request.getfixturevalue(f"{codec}_store")
    dst = tmp_path / "copy.zarr"
    monkeypatch.setattr(codecs, "encode", _never)  # re-quantising could move codes and scales; the copy never does
    monkeypatch.setattr(codecs, "decode", _never)
    assert (
        main(
            [
                "store",
                "convert",
                str(src),
                str(dst),
                "--to",
                "zarr",
                "--compression-level",
                "6",
                "--blosc-shuffle",
                "bit",
            ]
        )
        == 0
    )
    monkeypatch.undo()
    assert main(["store", "verify", str(dst), "--no-progress"]) == 0
    assert verify(dst) == []
    spec = read_store_spec(dst)
    assert (spec.backend, spec.compression_level, spec.blosc_shuffle) == ("zarr", 6, "bit")
    assert read_teacher_specs(dst)["teacher-a"].kv_dtype == codec
    parts = {"int8": ("", "_scale"), "int4": ("", "_scale", "_zero")}[codec]
    for shard in range(2):
        src_arrays, dst_arrays = _stored(src, "teacher-a", shard), _stored(dst, "teacher-a", shard)
        assert {f"{p}{s}" for p in "kv" for s in parts} <= set(src_arrays)
        assert (
            src_arrays["k"].dtype == (np.int8 if codec == "int8" else np.uint8)
            and src_arrays["k_scale"].dtype == np.float16
        )
        _assert_same_arrays(src_arrays, dst_arrays)  # codes, scales, zeros, tokens, ids: raw, bit for bit
        a, b = ShardReader(src, "teacher-a", shard), ShardReader(dst, "teacher-a", shard)
        assert a.attrs == b.attrs  # the completion record (codec, crc32, fingerprints) as it was
        assert "k" in b.fast  # the row-sharded layout the fast reader reads
        rows = int(a.offsets[-1])
        got, want = b.rows(0, rows, ("k", "v")), a.rows(0, rows, ("k", "v"))
        for part in ("k", "v"):
            assert got[part].dtype == np.float32 and np.array_equal(got[part], want[part])  # the same decoded floats
        group = zarr.open_group(dst / "teachers" / "teacher-a" / f"shard-{shard:05d}", mode="r")
        blosc = [c for c in group["k"].compressors if type(c).__name__ == "BloscCodec"]
        assert [(c.clevel, c.shuffle.value) for c in blosc] == [(6, "bitshuffle")]


def test_a_quantised_zarr_copy_reads_one_zarr_shard_of_rows_at_a_time(int4_store, tmp_path, monkeypatch):
    """Streaming: an array of many zarr shards is copied a zarr shard at a time, never whole."""
    from kvdistill.store import rows as rows_module
    from kvdistill.store import writer

    small = tmp_path / "small.zarr"  # int8 at 4 KiB chunks (32 rows): several zarr shards per array
    monkeypatch.setattr(writer, "CHUNK_BYTES", 4096)
    assert main(["store", "convert", str(int4_store), str(small), "--to", "zarr", "--kv-dtype", "int8"]) == 0
    monkeypatch.undo()
    k = zarr.open_group(small / "teachers" / "teacher-a" / "shard-00000", mode="r")["k"]
    assert k.shards[0] == 16 * 32 and k.shape[0] > 2 * k.shards[0]
    reads: list[tuple[str, int]] = []
    call = rows_module.ShardedRows.__call__

    def spy(self, start, stop, decode=None):
        reads.append((self.path.name, min(stop, self.shape[0]) - start))
        return call(self, start, stop, decode)

    monkeypatch.setattr(rows_module.ShardedRows, "__call__", spy)
    assert (
        main(["store", "convert", str(small), str(tmp_path / "copy.zarr"), "--to", "zarr", "--compression-level", "3"])
        == 0
    )
    monkeypatch.undo()
    k_reads = [n for name, n in reads if name == "k"]
    assert len(k_reads) > 2 * 2 and max(k_reads) <= k.shards[0]  # both shards, a zarr shard per read
    assert verify(tmp_path / "copy.zarr") == []
    for shard in range(2):
        _assert_same_arrays(_stored(small, "teacher-a", shard), _stored(tmp_path / "copy.zarr", "teacher-a", shard))


def test_int4_into_int8_zarr_is_decoded_and_quantised_again(int4_store, tmp_path):
    dst = tmp_path / "q8.zarr"
    assert main(["store", "convert", str(int4_store), str(dst), "--to", "zarr", "--kv-dtype", "int8"]) == 0
    assert verify(dst) == []
    assert (
        read_teacher_specs(dst)["teacher-a"].kv_dtype == "int8" and _stored(dst, "teacher-a", 0)["k"].dtype == np.int8
    )
    a, b = ShardReader(int4_store, "teacher-a", 0), ShardReader(dst, "teacher-a", 0)
    rows = int(a.offsets[-1])
    want, got = a.rows(0, rows, ("k",))["k"], b.rows(0, rows, ("k",))["k"]
    assert np.linalg.norm(got - want) <= 0.02 * np.linalg.norm(want)  # the int4 values, quantised once more to int8


def test_int4_into_webdataset_is_refused_without_kv_dtype_and_compression_flags_are_zarr_only(
    int4_store, tmp_path, capsys
):
    dst = tmp_path / "out.wds"
    assert main(["store", "convert", str(int4_store), str(dst)]) == ExitCode.BAD_INPUT
    assert (
        "teacher 'teacher-a' is stored as int4, which webdataset tars cannot hold; pass --kv-dtype float16 or float32"
        in capsys.readouterr().err
    )
    assert (
        main(["store", "convert", str(int4_store), str(dst), "--kv-dtype", "float16", "--compression-level", "5"])
        == ExitCode.BAD_INPUT
    )
    assert "webdataset tars store K/V uncompressed" in capsys.readouterr().err
    assert not dst.exists()
