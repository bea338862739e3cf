"""The dump checks its whole input before it creates anything: a failed task leaves no store
behind (whose metadata would pin the wrong student or data and block the corrected rerun), and
a task that would write no sample is an error unless --allow-empty."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from transformers import AutoTokenizer

import kvdistill.dump.run as dump_run
from kvdistill.core.data import DataError
from kvdistill.core.prompts import encode
from kvdistill.dump.cli import FLAGS, add_parser
from kvdistill.dump.run import run_dump
from kvdistill.schemas import DEFAULT_TEMPLATE, DataSpec, DumpConfig, ModelSpec
from kvdistill.schemas.cli import config_from_args
from kvdistill.store import ShardReader
from kvdistill.store.errors import ShardComplete


def _cfg(tiny_store, tmp_path, **kw) -> DumpConfig:
    base = dict(
        teacher=tiny_store["teachers"][0],
        student=tiny_store["student"],
        store=str(tmp_path / "s.zarr"),
        data=tiny_store["data"],
        num_shards=6,
        batch_size=8,
        device="cpu",
        kv_dtype="float32",
    )  # 8 rows a shard
    return DumpConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def student_without_eos(tiny_store, tmp_path_factory) -> ModelSpec:
    """The tiny student's checkpoint with eos_token null in its tokenizer config (the Qwen2
    tokenizer class would otherwise default it to <|endoftext|>)."""
    path = tmp_path_factory.mktemp("no-eos") / "student"
    shutil.copytree(tiny_store["student"].name_or_path, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    return ModelSpec(name_or_path=str(path), name="student")


def test_a_student_tokenizer_without_eos_is_refused_by_name_and_leaves_no_store(
    tiny_store, tmp_path, student_without_eos
):
    store = tmp_path / "s.zarr"
    with pytest.raises(
        ValueError,
        match=rf"the student tokenizer \({student_without_eos.name_or_path}\) has no eos_token.*add_special_tokens",
    ):
        run_dump(_cfg(tiny_store, tmp_path, student=student_without_eos), progress=False)
    assert not store.exists()
    # The corrected rerun into the same path is not blocked by anything the failed one left.
    result = run_dump(_cfg(tiny_store, tmp_path), progress=False)
    assert (result.status, result.samples) == ("written", 8)
    assert len(ShardReader(store, "teacher-a", 0)) == 8


def test_a_teacher_tokenizer_without_eos_is_refused_naming_the_teacher(tiny_store, tmp_path, student_without_eos):
    teacher = ModelSpec(name_or_path=student_without_eos.name_or_path, name="no-eos")
    with pytest.raises(ValueError, match=r"the teacher tokenizer \(.*student\) has no eos_token"):
        run_dump(_cfg(tiny_store, tmp_path, teacher=teacher), progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_encode_without_eos_names_the_tokenizer_and_the_fix(student_without_eos, examples):
    tok = AutoTokenizer.from_pretrained(student_without_eos.name_or_path)
    with pytest.raises(
        ValueError,
        match=rf"tokenizer {student_without_eos.name_or_path} has no eos_token.*Add one .*or use another tokenizer",
    ):
        encode(tok, DEFAULT_TEMPLATE, examples[0])


def test_a_sample_over_max_len_fails_before_the_store_exists_and_the_rerun_succeeds(tiny_store, tmp_path):
    with pytest.raises(ValueError, match=r"sample synth-train-\d+ has \d+ teacher / \d+ student tokens > max_len 30"):
        run_dump(_cfg(tiny_store, tmp_path, max_len=30), progress=False)
    assert not (tmp_path / "s.zarr").exists()
    assert run_dump(_cfg(tiny_store, tmp_path), progress=False).samples == 8


def test_more_shards_than_rows_is_an_error_naming_the_counts_unless_allowed(tiny_store, tmp_path):
    data = DataSpec.from_dict({**tiny_store["data"].to_dict(), "limit": 1})  # shard 0 of 2 gets no row
    with pytest.raises(
        DataError,
        match=(
            r"teacher teacher-a shard 0: data synthetic has 1 rows for 2 shards.*use fewer shards \(at most 1\) or"
            r" --allow-empty"
        ),
    ):
        run_dump(_cfg(tiny_store, tmp_path, data=data, num_shards=2), progress=False)
    assert not (tmp_path / "s.zarr").exists()
    result = run_dump(_cfg(tiny_store, tmp_path, data=data, num_shards=2, allow_empty=True), progress=False)
    assert (result.status, result.samples) == ("written", 0)
    assert len(ShardReader(tmp_path / "s.zarr", "teacher-a", 0)) == 0


def test_a_shard_whose_every_sample_is_skipped_is_an_error_unless_allowed(tiny_store, tmp_path):
    with pytest.raises(
        DataError,
        match=r"shard 0: data synthetic has 48 rows, and all 8 of this shard are over max_len 5.*--allow-empty",
    ):
        run_dump(_cfg(tiny_store, tmp_path, max_len=5, on_too_long="skip"), progress=False)
    assert not (tmp_path / "s.zarr").exists()
    result = run_dump(_cfg(tiny_store, tmp_path, max_len=5, on_too_long="skip", allow_empty=True), progress=False)
    assert (result.samples, len(result.skipped)) == (0, 8)


def test_an_empty_data_file_is_refused_naming_it_before_the_store_exists(tiny_store, tmp_path):
    empty = tmp_path / "gsm8k.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"data file {empty} holds no rows"):
        run_dump(_cfg(tiny_store, tmp_path, data=DataSpec(source=str(empty))), progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_the_writer_gets_on_busy_and_a_shard_completed_while_waiting_is_a_no_op(tiny_store, tmp_path, monkeypatch):
    seen = {}

    def writer_finding_the_shard_complete(*args, on_busy, **kwargs):
        seen["on_busy"] = on_busy
        raise ShardComplete("teacher 'teacher-a' shard-00000 is complete already")

    monkeypatch.setattr(dump_run, "open_shard_writer", writer_finding_the_shard_complete)
    result = run_dump(_cfg(tiny_store, tmp_path, on_busy="wait"), progress=False)
    assert seen == {"on_busy": "wait"}
    assert (result.status, result.samples) == ("already complete", 0)
    assert "already complete, nothing to do" in result.summary()


def _parse(argv: list[str]) -> DumpConfig:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return config_from_args(DumpConfig, parser.parse_args(["dump", *argv]), FLAGS)


def test_the_cli_flags_set_on_busy_and_allow_empty(tmp_path):
    base = ["--teacher", "t", "--student", "s", "--store", str(tmp_path / "s.zarr")]
    default = _parse(base)
    assert (default.on_busy, default.allow_empty) == ("fail", False)
    cfg = _parse([*base, "--on-busy", "wait", "--allow-empty"])
    assert (cfg.on_busy, cfg.allow_empty) == ("wait", True)
    with pytest.raises(SystemExit):  # a Literal field's flag takes only its choices (argparse: exit 2)
        _parse([*base, "--on-busy", "later"])
