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
    base = DumpConfig(teacher=tiny_store["teachers"][0], student=tiny_store["student"], store=str(store), data=tiny_store["data"],
                      num_shards=2, batch_size=8, device="cpu", kv_dtype="int8")
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
    assert "teacher 'teacher-a' is stored as int8, which webdataset tars cannot hold; pass --kv-dtype float16 or float32" in err
    assert not dst.exists()
    assert main(["store", "convert", str(int8_store), str(dst), "--kv-dtype", "int8"]) == ExitCode.BAD_INPUT  # tars cannot hold int8 either
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
        assert attrs["codec"] == "int8" and attrs["fingerprint"] == ShardReader(int8_store, "teacher-a", shard).attrs["fingerprint"]


def test_a_teachers_stored_projection_arrays_are_carried_over(int8_store, tmp_path):
    src = shutil.copytree(int8_store, tmp_path / "src.zarr")
    components = np.arange(12, dtype=np.float32).reshape(3, 4)
    zarr.open_group(src / "teachers" / "teacher-a", mode="a").require_group("projection").create_array("k_components", data=components)
    assert main(["store", "convert", str(src), str(tmp_path / "w.wds"), "--kv-dtype", "float32"]) == 0
    got = zarr.open_group(tmp_path / "w.wds" / "teachers" / "teacher-a" / "projection", mode="r")["k_components"][...]
    assert np.array_equal(got, components)


def test_float16_zarr_into_webdataset_and_back_is_bit_for_bit(tiny_store, tmp_path):
    src = tiny_store["store"]
    assert main(["store", "convert", str(src), str(tmp_path / "w.wds")]) == 0
    assert main(["store", "convert", str(tmp_path / "w.wds"), str(tmp_path / "back.zarr")]) == 0
    assert verify(tmp_path / "back.zarr") == []
    for teacher in ("teacher-a", "teacher-b"):
        assert read_teacher_specs(tmp_path / "back.zarr")[teacher].kv_dtype == read_teacher_specs(src)[teacher].kv_dtype == "float16"
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
