"""The `kvdistill` console script, called in-process: dump -> store finalize / inspect, config
files with flags overriding them, config errors as exit code 2, and --help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import types
import typing
from typing import Any, Literal

import numpy as np
import pytest
import yaml

from kvdistill import cli as top_cli
from kvdistill.cli import build_parser, main
from kvdistill.dump import cli as dump_cli
from kvdistill.errors import ExitCode
from kvdistill.jobs import cli as jobs_cli
from kvdistill.schemas import (
    CalibrateConfig,
    CompareConfig,
    DemoConfig,
    DiagnoseConfig,
    DumpConfig,
    DumpTask,
    EvalConfig,
    JobsLocalConfig,
    JobsSlurmConfig,
    JobsStatusConfig,
    ModelSpec,
    PlanConfig,
    Record,
    ReportConfig,
    ShowAlignmentConfig,
    StoreConvertConfig,
    StoreFinalizeConfig,
    StoreInspectConfig,
    StoreStatsConfig,
    StoreVerifyConfig,
    TrainConfig,
)
from kvdistill.schemas.cli import config_from_args, flags_of
from kvdistill.store import ShardReader, shard_is_complete, shard_name
from kvdistill.train import cli as train_cli
from kvdistill.train.recipes import load_recipe, recipe_names, train_config


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


def test_finalize_of_an_incomplete_store_is_an_error_message_not_a_traceback(store_copy, capsys):
    shutil.rmtree(store_copy / "teachers" / "teacher-a" / shard_name(0))
    assert main(["store", "finalize", str(store_copy)]) == 3  # bad input: the message names what is missing
    err = capsys.readouterr().err
    assert err.startswith("kvdistill store:")
    assert "teacher 'teacher-a' shard-00000: missing" in err


def test_a_bad_config_value_on_the_command_line_exits_2_naming_the_field(dump_yaml, capsys):
    config, store = dump_yaml
    assert main(["dump", "--config", str(config), "--shard", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvdistill dump: config error:")
    assert "DumpConfig.shard: need 0 <= shard < num_shards, got 2 of 2" in err
    assert not store.exists()  # refused before anything was written

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
    assert "DumpConfig.batch_size: must be >= 1, got 0" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    "command",
    [
        ["dump"],
        ["align", "calibrate"],
        ["train"],
        ["train", "diagnose"],
        ["eval"],
        ["demo"],
        ["compare"],
        ["jobs", "slurm"],
    ],
)
def test_help_shows_no_meaningless_none_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "default: [" not in out and "default: {" not in out


def test_python_dash_m_kvdistill_help_works():
    proc = subprocess.run([sys.executable, "-m", "kvdistill", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: kvdistill")
    assert "dump" in proc.stdout and "train" in proc.stdout


def test_train_flags_reach_trackers_and_the_negative_control():
    cfg = _config(
        [
            "train",
            "--store",
            "s.zarr",
            "--student",
            "s",
            "--out",
            "o",
            "--report-to",
            "tensorboard,wandb",
            "--kv-control",
            "shuffled",
        ]
    )
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.kv_control == "shuffled"


# --- the flags come from the records -------------------------------------------------------------

# Every subcommand built from a config record.
COMMANDS = {
    "dump": DumpConfig,
    "align calibrate": CalibrateConfig,
    "train": TrainConfig,
    "train diagnose": TrainConfig,
    "eval": EvalConfig,
    "demo": DemoConfig,
    "compare": CompareConfig,
    "jobs local": JobsLocalConfig,
    "jobs slurm": JobsSlurmConfig,
    "store plan": PlanConfig,
}
# The tools: a few flags each, no --config (add_flags(config=False)); a positional field is a bare argument.
TOOLS = {
    "store finalize": StoreFinalizeConfig,
    "store inspect": StoreInspectConfig,
    "store convert": StoreConvertConfig,
    "store verify": StoreVerifyConfig,
    "store stats": StoreStatsConfig,
    "store show-alignment": ShowAlignmentConfig,
    "report": ReportConfig,
    "train diagnose": DiagnoseConfig,  # beside train's flags (COMMANDS), which build what it diagnoses
    "jobs status": JobsStatusConfig,
}
RECORD_OF = {
    dump_cli.main: DumpConfig,
    dump_cli.calibrate_main: CalibrateConfig,
    train_cli.eval_main: EvalConfig,
    top_cli.demo_main: DemoConfig,
    top_cli.compare_main: CompareConfig,
    jobs_cli.local_main: JobsLocalConfig,
    jobs_cli.slurm_main: JobsSlurmConfig,
    dump_cli.plan_main: PlanConfig,
}


def _config(argv: list[str]) -> Record:
    """The config a command line builds, without running the stage."""
    args = build_parser().parse_args(argv)
    if args.func in (train_cli.train_main, train_cli.diagnose_main):
        return train_cli.config_of(args)
    return config_from_args(RECORD_OF[args.func], args)


def _arms(tp: Any) -> list[Any]:
    return (
        [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType)
        else [tp]
    )


def _leaves(cls: type[Record], prefix: str = ""):
    """(dotted key, owner class, field, annotation) of every leaf field, nested records walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        arms = _arms(hints[f.name])
        if len(arms) == 1 and isinstance(arms[0], type) and issubclass(arms[0], Record):
            yield from _leaves(arms[0], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, cls, f, hints[f.name]


# Values the generic rule below would make invalid together (validation stays the record's).
SAMPLE = {
    "ModelSpec.prompt_template": "Q: {question} R: {reasoning} A: {answer}",
    "AlignSpec.layer_map": "map.json",
    "CalibrateConfig.pca_layer_map": "map.json",
    "SlurmSpec.time": "1:00:00",
    "DumpTask.backend": "zarr",
    "DumpConfig.backend": "zarr",  # webdataset refuses a compression level
    "PlanConfig.backend": "zarr",
    "TrainConfig.mode": "cot",  # latent mode refuses the cot-only fusion / adapter settings
    "TrainConfig.router_groups": 3,
    "TrainConfig.z_dim": (
        0
    ),  # Z space on refuses the adapter / attention settings sampled here (its own flags still round-trip)
    "TrainConfig.val_shards": 0,  # with val_store: one source of validation data
    "TrainConfig.metric_for_best_model": "val_ce",
    "CompareConfig.arms": ["ce", "kv-fixed"],
    "CompareConfig.baseline": "kv-fixed",
    "CompareConfig.curve_arms": ["kv-fixed", "ce"],  # holds the baseline
}


def _sample(owner: type, f: dataclasses.Field, tp: Any) -> Any:
    """A valid value other than the default, where the field allows one."""
    if f"{owner.__name__}.{f.name}" in SAMPLE:
        return SAMPLE[f"{owner.__name__}.{f.name}"]
    default = f.default if f.default is not dataclasses.MISSING else None
    arms = _arms(tp)
    if len(arms) > 1:  # cka_layers: "middle" | "last" | list[int]
        return [0, 3]
    (tp,) = arms
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return next((c for c in args if c != default), args[0])
    if tp is bool:
        return not default
    if tp is int:
        return 2 if default is None else default + 1
    if tp is float:
        return 0.5 if default is None else default / 2 + 0.125
    if tp is str:
        return f"x-{f.name}"
    if origin is list:
        if typing.get_origin(args[0]) is Literal:
            return list(typing.get_args(args[0]))
        if isinstance(args[0], type) and issubclass(args[0], Record):
            return [{"name_or_path": "t1", "name": "t-one"}, {"name_or_path": "t2"}]
        return [100, 1000] if args[0] is int else ["a", "b"]
    if origin is dict:
        if args[1] is Any:
            return {"kv_loss": "cosine", "lr": 0.003}
        if typing.get_origin(args[1]) is dict:  # arm_overrides
            return {"kv-cos": {"kv_loss": "cosine", "lr": 0.01}}
        value = (
            typing.get_args(args[1])[-1]
            if typing.get_origin(args[1]) is Literal
            else {str: "x", float: 0.75, int: 3}[args[1]]
        )
        return {"a": value, "b": value}
    raise AssertionError(f"no sample for {owner.__name__}.{f.name}: {tp}")


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_flow(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_flow(v)}" for k, v in value.items())
    return str(value)


def _flow(value: Any) -> str:
    """A YAML flow mapping: a list item that is a record, a mapping's value that is a mapping."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}" if isinstance(value, dict) else str(value)


def _set(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


@pytest.mark.parametrize(
    "command, cls",
    [*COMMANDS.items(), *TOOLS.items()],
    ids=[f"{c}: {r.__name__}" for c, r in [*COMMANDS.items(), *TOOLS.items()]],
)
def test_every_field_of_every_config_record_is_one_flag_of_its_name_and_round_trips(command, cls):
    """flag value -> config -> YAML -> config, for every leaf field at once: `--field-name` for
    field_name, `--parent.field-name` for a nested record's, a bare argument for a positional one."""
    bare, argv, expected = [], [], {}
    for key, owner, f, tp in _leaves(cls):
        value = _sample(owner, f, tp)
        _set(expected, key, value)
        flag = "--" + key.replace("_", "-")
        if f.metadata.get("positional"):
            bare.append(_text(value))
        else:
            argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, _text(value)]
    argv = [*command.split(), *bare, *argv]
    if cls in TOOLS.values():
        cfg = config_from_args(cls, build_parser().parse_args(argv), config=False)
    else:
        cfg = _config(argv)
    assert cfg == cls.from_dict(expected)
    assert type(cfg).from_yaml(cfg.to_yaml()) == cfg
    parser_dests = {a.dest for p in _parsers(build_parser()) if p.prog == f"kvdistill {command}" for a in p._actions}
    assert {key for key, *_ in _leaves(cls)} <= parser_dests


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _literal_flags():
    for command, cls in [*COMMANDS.items(), *TOOLS.items()]:
        for key, _, _, tp in _leaves(cls):
            inner = _arms(tp)
            inner = typing.get_args(inner[0]) if typing.get_origin(inner[0]) is list else inner
            if len(inner) == 1 and typing.get_origin(inner[0]) is Literal:
                yield command, "--" + key.replace("_", "-")


@pytest.mark.parametrize("command, flag", list(_literal_flags()))
def test_a_literal_field_refuses_a_value_outside_its_choices_with_exit_2(command, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), flag, "no-such-choice"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "invalid choice: 'no-such-choice'" in err


def test_every_flag_of_every_command_is_a_field_of_its_record():
    """No hand-written flags: besides -h, --config, --no-progress, --debug and train's --recipe
    (the layer under --config), a command's every argument is a field of its record(s)."""
    records: dict[str, list[type[Record]]] = {}
    for command, cls in [*COMMANDS.items(), *TOOLS.items()]:
        records.setdefault(command, []).append(cls)
    machinery = {"help", "config", "no_progress", "debug", "recipe"}
    for p in _parsers(build_parser()):
        keys = {f.key for cls in records.get(p.prog.removeprefix("kvdistill").strip(), []) for f in flags_of(cls)}
        stray = {a.dest for a in p._actions if not isinstance(a, argparse._SubParsersAction)} - keys - machinery
        assert not stray, f"{p.prog}: arguments of no record: {sorted(stray)}"


def _actions(prog: str) -> dict[str, argparse.Action]:
    (parser,) = [p for p in _parsers(build_parser()) if p.prog == prog]
    return {a.dest: a for a in parser._actions}


def test_store_plan_has_every_flag_of_dump_under_the_same_names_and_help():
    dump, plan = _actions("kvdistill dump"), _actions("kvdistill store plan")
    own = {"store", "num_shards"}  # plan's own: it sizes a store not yet written and suggests the shard count
    for f in flags_of(DumpTask):
        if f.key not in own:
            assert (plan[f.key].option_strings, plan[f.key].help) == (dump[f.key].option_strings, dump[f.key].help)
    assert plan["teachers"].option_strings == ["--teachers", "--teacher"]  # README: --teacher, repeated


def test_store_plan_sizes_what_dumps_flags_change_per_teacher(make_model, tmp_path, capsys):
    """A dump's command line sizes as is: --teacher-kv-dtype, --teacher-projection (the file's
    D), --teacher-logits-top-k, --backend change the plan; a flag that changes no stored byte
    (--batch-size) changes nothing."""
    from kvdistill.store.plan import codec_bytes_per_value

    teacher = make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32)  # D_t = 64
    student = make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)  # L_s = 2
    pca = tmp_path / "a-pca8.npz"
    np.savez(pca, k_components=np.zeros((2, 64, 8), np.float32))  # [L_s, D_t, D]
    argv = ["store", "plan", "--student", str(student), "--data", "synthetic", "--limit", "6", "--json"]
    argv += [
        "--teacher",
        f"{{name_or_path: {teacher}, name: a}}",
        "--teacher",
        f"{{name_or_path: {teacher}, name: b}}",
    ]

    def plan(*flags: str) -> dict:
        assert main([*argv, *flags]) == 0
        return json.loads(capsys.readouterr().out)

    got = plan(
        "--kv-dtype",
        "int8",
        "--teacher-kv-dtype",
        "b=float16",
        "--teacher-projection",
        f"a={pca}",
        "--teacher-logits-top-k",
        "b=32",
    )
    a, b = got["teachers"]["a"], got["teachers"]["b"]
    assert (a["stored_width"], b["stored_width"]) == (8, 64)
    assert (a["logits_bytes_per_token"], b["logits_bytes_per_token"]) == (0, 32 * (4 + 2))
    assert (a["bytes_per_value"], b["bytes_per_value"]) == (codec_bytes_per_value("int8", 2, 8), 2.0)
    assert (a["compression_ratio"], b["compression_ratio"]) == (1.0, 1.3)  # quantised codes, float16
    assert got["kv_dtype"] == "int8" and got["teacher_kv_dtype"] == {"b": "float16"}
    assert "pca8-int4" in {o["name"] for o in got["options"]}  # the file's D among the options
    wds = plan("--backend", "webdataset")
    assert {t["compression_ratio"] for t in wds["teachers"].values()} == {1.0}  # tars hold K/V uncompressed
    assert plan("--batch-size", "3", "--device", "cpu", "--store", "x.zarr") == plan()


def test_a_tool_needs_its_required_flag_and_takes_no_config_file(capsys):
    for argv, said in [
        (["jobs", "status"], "the following arguments are required: --store"),
        (["store", "inspect"], "the following arguments are required: STORE"),
        (["store", "inspect", "s.zarr", "--config", "x.yaml"], "unrecognized arguments: --config"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_tool_refuses_a_number_out_of_range_naming_the_field_with_exit_2(capsys):
    assert main(["store", "convert", "a.zarr", "b.zarr", "--compression-level", "12"]) == ExitCode.USAGE
    assert "StoreConvertConfig.compression_level: blosc levels are 0 (none) to 9, got 12" in capsys.readouterr().err
    assert main(["train", "diagnose", "--batches", "0"]) == ExitCode.USAGE
    assert "DiagnoseConfig.batches: must be >= 1, got 0" in capsys.readouterr().err


def test_a_list_of_literals_names_the_bad_item_and_a_mapping_needs_name_value_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--extra-teachers", "dual-prompt,tri-prompt"])
    assert e.value.code == 2 and "invalid choice: 'tri-prompt'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--teacher-weights", "a:0.5"])
    assert e.value.code == 2 and "expected name=value,name=value, got 'a:0.5'" in capsys.readouterr().err


TEMPLATE = "Think: {question}\n{reasoning}\n= {answer}"
BASE = {
    "dump": ["--teacher", "t", "--student", "s", "--store", "s.zarr"],
    "align calibrate": ["--teacher", "t", "--student", "s"],
    "train": ["--store", "s.zarr", "--student", "s", "--out", "o"],
    "eval": ["--model", "m"],
    "compare": ["--store", "s.zarr", "--student", "s", "--eval-data.source", "synthetic"],
    "jobs local": ["--teachers", "t", "--dump.student.name-or-path", "s", "--dump.store", "s.zarr"],
}
# (command, the old flag, its value, the field it sets): every name a user command may hold.
OLD_NAMES = [
    ("train", "--learning-rate", "0.01", "lr"),
    ("train", "--adapter-learning-rate", "0.02", "adapter_lr"),
    ("train", "--router-learning-rate", "0.03", "router_lr"),
    ("train", "--per-device-train-batch-size", "4", "batch_size"),
    ("train", "--max-grad-norm", "0.5", "grad_clip"),
    ("train", "--logging-steps", "5", "log_every"),
    ("train", "--save-steps", "50", "save_every"),
    ("train", "--student", "s2", "student.name_or_path"),
    ("dump", "--teacher", "t2", "teacher.name_or_path"),
    ("dump", "--teacher-name", "tn", "teacher.name"),
    ("dump", "--teacher-revision", "main", "teacher.revision"),
    ("dump", "--teacher-dtype", "bfloat16", "teacher.dtype"),
    ("dump", "--teacher-template", TEMPLATE, "teacher.prompt_template"),
    ("dump", "--student", "s2", "student.name_or_path"),
    ("dump", "--student-template", TEMPLATE, "student.prompt_template"),
    ("dump", "--layer-map", "m.json", "align.layer_map"),
    ("dump", "--time-map", "segment_linear", "align.time_map"),
    ("dump", "--projection", "p.npz", "align.projection"),
    ("dump", "--data", "gsm8k.jsonl", "data.source"),
    ("dump", "--split", "test", "data.split"),
    ("dump", "--data-config", "main", "data.config_name"),
    ("dump", "--limit", "7", "data.limit"),
    ("dump", "--latent-slots", "8", "latent.slots"),
    ("dump", "--latent-lambda", "0.3", "latent.lam"),
    ("align calibrate", "--teacher-template", TEMPLATE, "teacher.prompt_template"),
    ("align calibrate", "--student-template", TEMPLATE, "student.prompt_template"),
    ("align calibrate", "--data", "gsm8k.jsonl", "data.source"),
    ("eval", "--data", "gsm8k.jsonl", "data.source"),
    ("eval", "--split", "validation", "data.split"),
    ("eval", "--data-config", "main", "data.config_name"),
    ("eval", "--limit", "3", "data.limit"),
    ("compare", "--demo-out", "d", "demo.out"),
    ("compare", "--student", "s2", "student.name_or_path"),
    ("jobs local", "--store", "j.zarr", "dump.store"),
    ("jobs local", "--num-shards", "4", "dump.num_shards"),
]


def _get(cfg: Record, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("command, old, text, key", OLD_NAMES, ids=[f"{c}{o}" for c, o, _, _ in OLD_NAMES])
def test_the_old_flag_names_still_work_as_aliases_of_the_field_flags(command, old, text, key):
    base = [*command.split(), *BASE.get(command, [])]
    cfg = _config([*base, old, text])
    assert cfg == _config([*base, "--" + key.replace("_", "-"), text])
    assert str(_get(cfg, key)) == text


def test_an_old_boolean_alias_has_its_no_form_too():
    base = ["dump", *BASE["dump"]]
    assert _config([*base, "--no-latent-codi-hidden"]).latent.codi_hidden is False
    assert _config([*base, "--latent.codi-hidden"]).latent.codi_hidden is True
    assert _config(base).latent is None  # no latent flag: latent mode stays off


def test_list_and_mapping_flags_take_comma_lists_yaml_and_repeats():
    cfg = _config(
        [
            "train",
            *BASE["train"],
            "--teachers",
            "a",
            "--teachers",
            "b,c",
            "--teacher-weights",
            "a=0.5,b=0.25",
            "--teacher-weights",
            "c=0.25",
            "--cka-layers",
            "0,3",
            "--lora-targets",
            "q_proj,v_proj",
        ]
    )
    assert cfg.teachers == ["a", "b", "c"] and cfg.teacher_weights == {"a": 0.5, "b": 0.25, "c": 0.25}
    assert cfg.cka_layers == [0, 3] and cfg.lora_targets == ["q_proj", "v_proj"]
    assert _config(["train", *BASE["train"], "--cka-layers", "last"]).cka_layers == "last"
    jobs = _config(
        [
            "jobs",
            "local",
            "--teachers",
            "{name_or_path: Qwen/Qwen2-7B, name: q7, revision: main},llama",
            "--store",
            "s.zarr",
            "--dump.student.name-or-path",
            "s",
            "--train.store",
            "s.zarr",
            "--train.student.name-or-path",
            "s",
            "--train.out",
            "o",
        ]
    )
    assert [(t.name_or_path, t.short_name, t.revision) for t in jobs.teachers] == [
        ("Qwen/Qwen2-7B", "q7", "main"),
        ("llama", "llama", None),
    ]
    assert jobs.train.store == "s.zarr" and jobs.train.student.name_or_path == "s"
    cmp = _config(
        ["compare", "--arm-overrides", "kv-cos={kv_loss: cosine, lr: 0.01}", "--train", "batch_size=8,kv_norm=none"]
    )
    assert cmp.arm_overrides == {"kv-cos": {"kv_loss": "cosine", "lr": 0.01}} and cmp.train == {
        "batch_size": 8,
        "kv_norm": "none",
    }


def test_train_help_is_grouped_in_order_and_shows_the_records_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    headings = re.findall(r"^(\S[^:\n]*):$", out, flags=re.M)
    assert headings == [
        "positional arguments",
        "options",
        "data",
        "models",
        "optimisation",
        "KV loss",
        "fusion",
        "Z space",
        "latent",
        "checkpointing",
        "validation",
        "logging",
    ]
    assert re.search(r"--lr LR, --learning-rate LR\s+student learning rate \(default: 0\.001\)", out)
    assert re.search(
        r"--lora-targets LORA_TARGETS,...\s+modules LoRA adapts \(default:\s+q_proj,k_proj,v_proj,o_proj\)", out
    )
    assert "--recipe {" + ",".join(recipe_names()) + "}" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert re.search(
        r"--data.split SPLIT, --split SPLIT\s+data set split \(default: test\)", capsys.readouterr().out
    )  # EvalConfig's own default


# --- recipes: recipe < --config file < flags -----------------------------------------------------


def test_every_shipped_recipe_is_a_valid_partial_train_config():
    assert {"default", "kava"} <= set(recipe_names())
    for name in recipe_names():
        cfg = train_config({"store": "s.zarr", "student": {"name_or_path": "s"}, "out": "o"}, recipe=name)
        assert {k: getattr(cfg, k) for k in load_recipe(name)} == load_recipe(name)
    assert load_recipe("default") == {}
    with pytest.raises(Exception, match="recipe 'nope' does not exist; the recipes are"):
        load_recipe("nope")


def test_a_recipe_sits_under_the_config_file_which_sits_under_the_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("weight_decay: 0.0\nlora_r: 16\nwarmup_steps: 3\n")
    cfg = _config(["train", *BASE["train"], "--recipe", "kava", "--config", str(tmp_path / "c.yaml"), "--lora-r", "8"])
    kava = load_recipe("kava")
    assert cfg.lora_r == 8  # the flag over the file over the recipe
    assert cfg.weight_decay == 0.0 and kava["weight_decay"] == 0.1  # the file over the recipe
    assert (cfg.mode, cfg.grad_clip, cfg.lora_alpha, cfg.lora_dropout) == ("latent", 2.0, 32, 0.1)  # the recipe
    assert (cfg.warmup_steps, cfg.warmup_ratio, cfg.warmup_over(cfg.max_steps)) == (
        3,
        None,
        3,
    )  # a warmup_steps set drops the recipe's warmup_ratio
    # The Python API builds the same config from the same layers.
    assert (
        train_config(
            {"store": "s.zarr", "student.name_or_path": "s", "out": "o", "lora_r": 8},
            recipe="kava",
            config=tmp_path / "c.yaml",
        )
        == cfg
    )


def test_mode_latent_takes_the_kava_recipe_unless_another_is_named():
    latent = _config(["train", *BASE["train"], "--mode", "latent", "--max-steps", "300"])
    assert (latent.lora_r, latent.weight_decay, latent.grad_clip, latent.warmup_over(300)) == (128, 0.1, 2.0, 15)  # 5%
    assert _config(["train", *BASE["train"], "--recipe", "kava"]) == latent.__class__.from_dict(
        {**latent.to_dict(), "max_steps": 200}
    )
    plain = _config(["train", *BASE["train"], "--mode", "latent", "--recipe", "default"])
    assert (plain.mode, plain.lora_r, plain.weight_decay) == ("latent", 0, 0.0)
    cot = _config(["train", *BASE["train"]])
    assert cot == TrainConfig(
        store="s.zarr", student={"name_or_path": "s"}, out="o"
    )  # mode cot: TrainConfig's defaults


def test_compare_trains_its_latent_arms_with_the_recipe_of_kvdistill_train(tmp_path):
    from kvdistill.compare import arm_configs

    cfg = CompareConfig(out=str(tmp_path), seeds=2, steps=40, arms=["ce", "latent-kv"], device="cpu")
    plan = arm_configs(cfg, "s.zarr", ModelSpec(name_or_path="s"), {"lr": 3e-3}, latent_store="l.zarr")
    run = plan["latent-kv"][1]
    same = _config(
        [
            "train",
            "--store",
            "l.zarr",
            "--student",
            "s",
            "--out",
            run.out,
            "--mode",
            "latent",
            "--lr",
            "0.003",
            "--max-steps",
            "40",
            "--seed",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert run == same and run.lora_r == load_recipe("kava")["lora_r"]
    assert plan["ce"][1].lora_r == 0  # mode cot: the default recipe
    # On the embedded default the student is random-init: every arm trains all its weights.
    from kvdistill.compare import demo_base

    plan = arm_configs(cfg, "s.zarr", ModelSpec(name_or_path="s"), demo_base(cfg), latent_store="l.zarr")
    assert plan["latent-kv"][0].lora_r == 0 and plan["latent-kv"][0].codi_weight == load_recipe("kava")["codi_weight"]


# --- `train diagnose` keeps what `train` parsed before it -----------------------------------------


def test_diagnose_keeps_the_config_and_flags_given_before_it(tmp_path, monkeypatch, capsys):
    import kvdistill.train.diagnose as diag

    seen = []
    monkeypatch.setattr(diag, "diagnose", lambda cfg, batches, checkpoint=None: seen.append((cfg, batches)) or {})
    monkeypatch.setattr(diag, "format_table", lambda result: "table")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"store": "s.zarr", "student": {"name_or_path": "s"}, "out": "o", "max_steps": 7, "kv_weight": 0.5}
        )
    )
    assert main(["train", "--config", str(config), "diagnose"]) == 0
    assert main(["train", "--config", str(config), "--max-steps", "9", "diagnose", "--batches", "2"]) == 0
    assert main(["train", "--max-steps", "9", "diagnose", "--config", str(config), "--kv-weight", "2"]) == 0
    assert [(c.max_steps, c.kv_weight, b) for c, b in seen] == [(7, 0.5, 4), (9, 0.5, 2), (9, 2.0, 4)]
