"""The `kvdistill` console script, called in-process: dump -> store finalize / inspect, config
files with flags overriding them, config errors as exit code 2, and --help."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from kvdistill.cli import main
from kvdistill.store import ShardReader, shard_is_complete, shard_name


@pytest.fixture
def dump_yaml(tiny_store, tmp_path):
    """A dump config file for teacher-a of the session store (shard 0 in the file), into a new store."""
    teacher, student = tiny_store["teachers"][0], tiny_store["student"]
    cfg = {
        "teacher": teacher.to_dict(),
        "student": student.to_dict(),
        "store": str(tmp_path / "cli.zarr"),
        "data": tiny_store["data"].to_dict(),
        "shard": 0,
        "num_shards": 2,
        "batch_size": 8,
        "device": "cpu",
    }
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "cli.zarr"


def test_dump_shards_then_finalize_and_inspect_what_the_store_holds(dump_yaml, tiny_store, capsys):
    config, store = dump_yaml
    assert main(["dump", "--config", str(config), "--shard", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "teacher teacher-a shard 1: 24 samples" in out
    assert shard_is_complete(store, "teacher-a", 1)
    assert not shard_is_complete(store, "teacher-a", 0)  # the flag overrode the file's shard 0
    assert not (store / "teachers" / "teacher-a" / shard_name(0)).exists()

    assert main(["dump", "--config", str(config), "--shard", "0", "--no-progress"]) == 0
    assert "teacher teacher-a shard 0: 24 samples" in capsys.readouterr().out
    assert main(["dump", "--config", str(config), "--shard", "0", "--no-progress"]) == 0
    assert "teacher teacher-a shard 0: already complete, nothing to do" in capsys.readouterr().out

    assert main(["store", "finalize", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {store / 'index.parquet'}" in out
    assert (store / "index.parquet").exists()

    assert main(["store", "inspect", str(store)]) == 0
    table = capsys.readouterr().out
    assert "(finalized)" in table
    row = next(line.split() for line in table.splitlines() if line.startswith("teacher-a "))
    assert row[1:6] == ["identity", "float16", "64", "2/2", "48"]  # time map, codec, width, shards, samples

    assert main(["store", "inspect", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["teachers"]["teacher-a"]
    assert list(info["teachers"]) == ["teacher-a"] and info["finalized"] is True
    assert (t["shards_complete"], t["samples"], t["width"]) == (2, 48, 64)
    # The CLI wrote what the library wrote for the session store, token for token.
    want = ShardReader(tiny_store["store"], "teacher-a", 0)
    got = ShardReader(store, "teacher-a", 0)
    assert t["tokens"] == int(want.offsets[-1]) + int(ShardReader(tiny_store["store"], "teacher-a", 1).offsets[-1])
    assert got.sample_ids == want.sample_ids
    n = int(want.offsets[-1])
    np.testing.assert_array_equal(got.rows(0, n, ("k",))["k"], want.rows(0, n, ("k",))["k"])


def test_finalize_of_an_incomplete_store_is_an_error_message_not_a_traceback(tiny_store, tmp_path, capsys):
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store["store"], store)
    shutil.rmtree(store / "teachers" / "teacher-a" / shard_name(0))
    assert main(["store", "finalize", str(store)]) == 3  # bad input: the message names what is missing
    err = capsys.readouterr().err
    assert err.startswith("kvdistill store:")
    assert "teacher 'teacher-a' shard-00000: missing" in err


def test_a_bad_config_value_on_the_command_line_exits_2_naming_the_field(dump_yaml, capsys):
    config, store = dump_yaml
    assert main(["dump", "--config", str(config), "--on-too-long", "ignore"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvdistill dump: config error:")
    assert "DumpConfig.on_too_long: expected one of 'error' | 'skip', got 'ignore'" in err

    assert main(["dump", "--config", str(config), "--shard", "2"]) == 2
    assert "DumpConfig.shard: need 0 <= shard < num_shards, got 2 of 2" in capsys.readouterr().err
    assert not store.exists()  # refused before anything was written

    assert main(["train", "--store", "s.zarr", "--student", "x", "--out", "o", "--kv-norm", "l2"]) == 2
    assert "TrainConfig.kv_norm: expected one of 'layer_std' | 'none', got 'l2'" in capsys.readouterr().err

    assert main(["dump", "--teacher", "t", "--student", "s"]) == 2  # no --store, no config
    assert "DumpConfig: missing required field(s) ['store']" in capsys.readouterr().err


def test_a_bad_value_in_the_config_file_names_the_file_and_field(dump_yaml, capsys):
    config, _ = dump_yaml
    data = yaml.safe_load(config.read_text()) | {"batch_size": "eight"}
    config.write_text(yaml.safe_dump(data))
    assert main(["dump", "--config", str(config)]) == 2
    assert f"{config}: DumpConfig.batch_size: expected int, got str 'eight'" in capsys.readouterr().err
    # ...and a flag fixes it without editing the file.
    assert main(["dump", "--config", str(config), "--batch-size", "0"]) == 2
    assert "DumpConfig: batch_size and max_len must be >= 1" in capsys.readouterr().err


def test_a_flag_of_the_wrong_type_is_an_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dump", "--shard", "one"])
    assert e.value.code == 2
    assert "argument --shard: invalid int value: 'one'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["--help"], ["dump", "store", "train", "eval", "demo"]),
        (["dump", "--help"], ["--config", "--teacher", "--student", "--store", "--shard", "--num-shards", "--data"]),
        (["train", "--help"], ["--config", "--store", "--student", "--out", "--max-steps", "--kv-weight"]),
        (["store", "--help"], ["finalize", "inspect"]),
        (["demo", "--help"], ["--out", "--num-shards"]),
    ],
)
def test_help_exits_0_and_lists_the_flags(argv, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvdistill")
    for flag in flags:
        assert re.search(rf"(^|[\s{{,]){re.escape(flag)}([\s,}}]|$)", out), f"{flag} not in {argv} help"


def test_dump_help_shows_no_meaningless_none_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["dump", "--help"])
    assert "(default: None)" not in capsys.readouterr().out


def test_python_dash_m_kvdistill_help_works():
    proc = subprocess.run([sys.executable, "-m", "kvdistill", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: kvdistill")
    assert "dump" in proc.stdout and "train" in proc.stdout


def test_train_flags_reach_trackers_and_the_negative_control():
    import argparse

    from kvdistill.schemas import TrainConfig
    from kvdistill.schemas.cli import add_flags, config_from_args
    from kvdistill.train.cli import TRAIN_FLAGS

    p = argparse.ArgumentParser()
    add_flags(p, TRAIN_FLAGS, TrainConfig)
    args = p.parse_args(["--store", "s.zarr", "--student", "s", "--out", "o", "--report-to", "tensorboard,wandb", "--kv-control", "shuffled"])
    cfg = config_from_args(TrainConfig, args, TRAIN_FLAGS)
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.kv_control == "shuffled"
