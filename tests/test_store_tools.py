"""`store verify | stats | plan`: every corruption verify must catch, statistics that agree
with numpy, and size estimates that agree with a hand computation.

Everything that mutates works on a copy of the session store (`store_copy`); `tiny_store`
itself is shared by other test files and only ever read here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from transformers import LlamaConfig, Qwen2Config

from kvdistill.cli import main
from kvdistill.core.capture import kv_geometry
from kvdistill.core.data import load_examples
from kvdistill.core.models import load_tokenizer
from kvdistill.core.prompts import encode
from kvdistill.schemas import DataSpec, ModelSpec
from kvdistill.store import ShardReader, ShardWriter, finalize, inspect, shard_name
from kvdistill.store.layout import INDEX, KEY
from kvdistill.store.plan import TOKEN_BYTES, plan
from kvdistill.store.stats import format_stats, plot_stats, stats
from kvdistill.store.verify import Problem, format_problems, verify

TEACHERS = ("teacher-a", "teacher-b")
NUM_SHARDS = 2


def shard_dir(store: Path, teacher: str, shard: int) -> Path:
    return store / "teachers" / teacher / shard_name(shard)


def chunk_file(store: Path, teacher: str, shard: int, array: str) -> Path:
    files = sorted(p for p in (shard_dir(store, teacher, shard) / array / "c").rglob("*") if p.is_file())
    assert files, f"no chunk files under {array}"
    return files[0]


def problems_at(problems: list[Problem], teacher: str | None, shard: int | None) -> list[str]:
    return [p.what for p in problems if p.teacher == teacher and p.shard == shard]


def set_shard_attr(store: Path, teacher: str, shard: int, **kv) -> None:
    group = zarr.open_group(shard_dir(store, teacher, shard), mode="r+")
    group.attrs[KEY] = {**group.attrs[KEY], **kv}


def requantise(store: Path, teacher: str, codec: str) -> None:
    """Rewrite every shard of `teacher` with another K/V codec (same samples, same attrs) and
    record the codec in its spec, as a dump with --kv-dtype would have."""
    for i in range(NUM_SHARDS):
        r = ShardReader(store, teacher, i)
        rows = r.rows(0, int(r.offsets[-1]))
        attrs = r.attrs
        shutil.rmtree(r.dir)
        k = rows["k"]  # [N, L_s, D]
        w = ShardWriter(store, teacher, i, num_layers=k.shape[1], width=k.shape[2], codec=codec)
        for sid, a, b in zip(r.sample_ids, r.offsets[:-1], r.offsets[1:], strict=True):
            w.write(
                sid,
                k[a:b].astype(np.float32),
                rows["v"][a:b].astype(np.float32),
                rows["input_ids"][a:b],
                rows["loss_mask"][a:b],
            )
        w.close(
            extra_attrs={key: attrs[key] for key in ("skipped", "fingerprint", "data_fingerprint") if key in attrs}
        )
    group = zarr.open_group(store / "teachers" / teacher, mode="r+")
    meta = group.attrs[KEY]
    group.attrs[KEY] = {**meta, "teacher_spec": {**meta["teacher_spec"], "kv_dtype": codec}}
    finalize(store)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- verify: a sound store ---------------------------------------------------------------------


def test_verify_finds_no_problem_in_a_sound_finalized_store(store_copy):
    assert verify(store_copy) == []


def test_verify_cli_prints_ok_with_teachers_shards_and_rows_and_exits_0(store_copy, capsys):
    rows = sum(t["tokens"] for t in inspect(store_copy)["teachers"].values())
    assert main(["store", "verify", str(store_copy), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: 2 teachers x 2 shards, {rows:,} rows verified"


@pytest.mark.parametrize("codec", ["bfloat16", "int8", "int4"])
def test_verify_passes_a_store_with_quantised_kv_and_its_scale_arrays(store_copy, codec):
    requantise(store_copy, "teacher-a", codec)
    assert zarr.open_group(shard_dir(store_copy, "teacher-a", 0), mode="r")["k"].dtype != np.float16
    assert verify(store_copy) == []


# --- verify: corrupt data ----------------------------------------------------------------------


def test_a_flipped_byte_inside_a_k_chunk_file_is_caught_naming_teacher_and_shard(store_copy):
    flip_middle_byte(chunk_file(store_copy, "teacher-a", 0, "k"))
    problems = verify(store_copy)
    assert problems and all((p.teacher, p.shard) == ("teacher-a", 0) for p in problems)
    found = problems_at(problems, "teacher-a", 0)
    assert any(w.startswith("k: chunk ") and "fails its crc32c check" in w for w in found), found
    text = format_problems(problems)
    assert "teacher-a" in text and "shard-00000" in text


def test_a_truncated_k_chunk_file_is_reported_not_raised(store_copy):
    f = chunk_file(store_copy, "teacher-a", 0, "k")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    found = problems_at(verify(store_copy), "teacher-a", 0)
    assert any(w.startswith("array k: shard file") and "its chunk index is truncated" in w for w in found), found


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_a_flipped_byte_in_a_key_scale_chunk_is_caught(store_copy, codec):
    requantise(store_copy, "teacher-a", codec)
    flip_middle_byte(chunk_file(store_copy, "teacher-a", 1, "k_scale"))
    found = problems_at(verify(store_copy), "teacher-a", 1)
    assert any("k_scale" in w for w in found), found


def test_an_input_id_changed_through_zarr_is_a_crc_mismatch_naming_the_array(store_copy):
    ids = zarr.open_array(shard_dir(store_copy, "teacher-b", 1) / "input_ids", mode="r+")
    ids[3] = ids[3] + 1
    (what,) = problems_at(verify(store_copy), "teacher-b", 1)
    assert what.startswith("crc32 mismatch in input_ids")


def test_nan_written_into_k_is_reported_non_finite_with_its_row(store_copy):
    k = zarr.open_array(shard_dir(store_copy, "teacher-a", 1) / "k", mode="r+")
    k[5, 1, 7] = np.nan
    found = problems_at(verify(store_copy), "teacher-a", 1)
    assert "k holds 1 non-finite value(s) (NaN / Inf), the first in row 5" in found
    assert any(w.startswith("crc32 mismatch in k") for w in found)


# --- verify: inconsistent layout ----------------------------------------------------------------


def test_offsets_made_non_monotone_are_reported(store_copy):
    offsets = zarr.open_array(shard_dir(store_copy, "teacher-b", 0) / "offsets", mode="r+")
    o = offsets[:]
    offsets[2] = o[3] + 1
    found = problems_at(verify(store_copy), "teacher-b", 0)
    assert f"offsets decrease at sample 2: {o[3] + 1} -> {o[3]}" in found


def test_a_deleted_shard_is_reported_missing_with_the_task_to_rerun(store_copy):
    shutil.rmtree(shard_dir(store_copy, "teacher-b", 1))
    problems = verify(store_copy)
    assert [(p.teacher, p.shard, p.what) for p in problems] == [("teacher-b", 1, "missing")]
    assert problems[0].fix.startswith("Re-run its dump task (`kvdistill dump --teacher-name teacher-b --shard 1 ...`)")


def test_a_store_without_index_parquet_is_not_finalized(store_copy):
    (store_copy / INDEX).unlink()
    problems = verify(store_copy)
    assert [(p.teacher, p.shard) for p in problems] == [(None, None)]
    assert problems[0].what.startswith("not finalized")
    assert "kvdistill store finalize" in problems[0].fix


def test_an_index_row_changed_is_a_disagreement_naming_teacher_shard_and_column(store_copy):
    table = pq.read_table(store_copy / INDEX).to_pydict()
    j = next(
        j for j, (t, s) in enumerate(zip(table["teacher"], table["shard"], strict=True)) if (t, s) == ("teacher-a", 1)
    )
    table["row_stop"][j + 4] += 1
    pq.write_table(pa.table(table), store_copy / INDEX)
    problems = verify(store_copy)
    assert [(p.teacher, p.shard) for p in problems] == [("teacher-a", 1)]
    assert problems[0].what.startswith(
        "index.parquet disagrees with the shard on row_stop at 1 sample(s), first sample 4"
    )


def test_a_shard_written_by_another_teacher_setup_is_stale(store_copy):
    set_shard_attr(store_copy, "teacher-a", 1, fingerprint="0" * 16)
    problems = verify(store_copy)
    assert [(p.teacher, p.shard) for p in problems] == [("teacher-a", 1)]
    assert problems[0].what.startswith("stale: written by another teacher setup")
    assert problems[0].fix.startswith(
        "delete the shard (shard-00001 of teacher 'teacher-a'), re-run its dump task (`kvdistill dump"
    )


def test_a_shard_holding_other_sample_ids_than_the_first_teacher_is_reported(store_copy):
    ids = zarr.open_array(shard_dir(store_copy, "teacher-b", 0) / "sample_ids", mode="r+")
    ids[0] = "someone-else"
    found = problems_at(verify(store_copy), "teacher-b", 0)
    assert any(w.startswith("holds other sample ids than teacher 'teacher-a'") for w in found), found
    assert any(w.startswith("index.parquet disagrees with the shard on sample_id") for w in found), found


def test_verify_cli_exits_4_and_prints_each_problem_with_its_fix(store_copy, capsys):
    shutil.rmtree(shard_dir(store_copy, "teacher-a", 0))
    assert main(["store", "verify", str(store_copy), "--no-progress"]) == 4  # data integrity
    out = capsys.readouterr().out
    assert "teacher 'teacher-a' shard-00000: missing" in out
    assert "fix: Re-run its dump task (`kvdistill dump --teacher-name teacher-a --shard 0 ...`)" in out


# --- stats --------------------------------------------------------------------------------------


def numpy_stats(store: Path, teacher: str) -> dict[str, dict[str, np.ndarray]]:
    readers = [ShardReader(store, teacher, i) for i in range(NUM_SHARDS)]
    out = {}
    for a in ("k", "v"):
        x = np.concatenate([r.rows(0, int(r.offsets[-1]), (a,))[a] for r in readers]).astype(np.float64)  # [N, L_s, D]
        out[a] = {"mean": x.mean((0, 2)), "std": x.std((0, 2)), "absmax": np.abs(x).max((0, 2))}
    return out


def assert_stats_match_numpy(info, store: Path, teacher: str) -> None:
    want = numpy_stats(store, teacher)
    for a in ("k", "v"):
        for s in ("mean", "std", "absmax"):
            np.testing.assert_allclose(
                info["teachers"][teacher][a][s], want[a][s], rtol=1e-3, atol=1e-6, err_msg=f"{teacher} {a} {s}"
            )


def test_stats_per_layer_mean_std_absmax_agree_with_numpy_on_the_shard_rows(tiny_store):
    info = stats(tiny_store["store"])
    assert sorted(info["teachers"]) == list(TEACHERS) and info["skipped"] == {}
    for name in TEACHERS:
        assert len(info["teachers"][name]["k"]["std"]) == 2  # student layers
        assert_stats_match_numpy(info, tiny_store["store"], name)
    table = format_stats(info)
    assert all(f"{name:<20} {a:<3} {layer:>5}" in table for name in TEACHERS for a in "KV" for layer in (0, 1))


@pytest.mark.parametrize("codec", ["bfloat16", "int8", "int4"])
def test_stats_dequantise_quantised_kv_as_the_shard_reader_does(store_copy, codec):
    requantise(store_copy, "teacher-a", codec)
    info = stats(store_copy, teachers=["teacher-a"])
    assert list(info["teachers"]) == ["teacher-a"] and info["teachers"]["teacher-a"]["codec"] == codec
    assert_stats_match_numpy(info, store_copy, "teacher-a")


def test_stats_plot_and_cli_write_a_png_and_print_every_teacher(tiny_store, tmp_path, capsys):
    png = plot_stats(stats(tiny_store["store"]), tmp_path / "direct.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["store", "stats", str(tiny_store["store"]), "--png", str(tmp_path / "cli.png")]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TEACHERS) and f"wrote {tmp_path / 'cli.png'}" in out
    assert (tmp_path / "cli.png").stat().st_size > 1000


def test_stats_of_an_unknown_teacher_is_an_error_listing_the_teachers(tiny_store, capsys):
    assert main(["store", "stats", str(tiny_store["store"]), "--teacher", "nobody"]) == 3  # bad input
    assert "['teacher-a', 'teacher-b']" in capsys.readouterr().err


# --- plan ---------------------------------------------------------------------------------------

TEACHER = kv_geometry(
    Qwen2Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
)
STUDENT = kv_geometry(Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2))


def test_plan_float16_matches_a_hand_computation():
    p = plan(TEACHER, STUDENT, num_samples=1000, mean_tokens=50.5, target_shard_bytes=2**20)
    assert p["rows"] == 50_500  # tokens on the student grid
    assert (
        p["raw_bytes_per_token"] == 2 * 2 * 2 * 32 * 2 + TOKEN_BYTES
    )  # K+V x L_s x H_kv_t x d_t x float16 = 512, + tokens
    assert p["raw_bytes"] == 50_500 * 518
    assert p["compression_ratio"] == 1.3
    assert p["disk_bytes"] == pytest.approx(50_500 * 518 / 1.3)  # 19.2 MiB
    assert p["suggested_num_shards"] == p["num_shards"] == 20
    assert p["rows_per_shard"] == 2525  # ceil(50500 / 20)


def test_plan_int8_halves_the_bytes_and_takes_no_compression_by_default():
    p = plan(TEACHER, STUDENT, 1000, 50.5, codec_bytes_per_value=1.0, target_shard_bytes=2**20)
    assert (p["raw_bytes_per_token"], p["compression_ratio"], p["disk_bytes"]) == (
        256 + TOKEN_BYTES,
        1.0,
        50_500 * 262,
    )
    assert p["suggested_num_shards"] == 13  # ceil(12.33 MiB / 1 MiB)


def test_plan_with_given_shards_keeps_the_suggestion_and_splits_rows_evenly():
    mqa = kv_geometry(
        LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    )
    p = plan(mqa, STUDENT, 1000, 50.5, num_shards=4, target_shard_bytes=2**20, compression_ratio=2.0)
    assert p["raw_bytes_per_token"] == 2 * 2 * 1 * 16 * 2 + TOKEN_BYTES  # MQA: one kv head
    assert (p["num_shards"], p["rows_per_shard"], p["suggested_num_shards"]) == (4, 12_625, 4)
    assert p["disk_bytes_per_shard"] == pytest.approx(50_500 * 134 / 2.0 / 4)


def test_plan_cli_tokenizes_the_data_with_the_student_and_prints_rows_gib_and_shards(tiny_store, capsys):
    student = tiny_store["student"].name_or_path
    teachers = [t.name_or_path for t in tiny_store["teachers"]]
    tok = load_tokenizer(ModelSpec(name_or_path=student))
    rows = sum(
        len(encode(tok, ModelSpec(name_or_path=student).prompt_template, ex))
        for ex in load_examples(DataSpec(limit=12))
    )
    argv = ["store", "plan", "--student", student, "--data", "synthetic", "--limit", "12", "--num-shards", "3"]
    assert main(argv + [x for t in teachers for x in ("--teacher", t)]) == 0
    out = capsys.readouterr().out
    assert f"12 samples x {rows / 12:.1f} student tokens = {rows:,} rows per teacher" in out
    assert "3 shards of" in out and "suggested --num-shards 1" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    a, b = (ModelSpec(name_or_path=t).short_name for t in teachers)
    assert (
        lines[a].split()[6] == "518" and lines[b].split()[6] == "134"
    )  # raw bytes per token (K/V + 6 B of token arrays)
