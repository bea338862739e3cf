"""Errors are one line, never a traceback: every expected failure of `kvdistill <cmd>` is one
line on stderr (`kvdistill <cmd>: what, where, the fix (debug hint)`) and a documented exit
code; KVDISTILL_DEBUG=1 or --debug re-raise with the traceback; a real bug still tracebacks.
Out-of-range config values are refused naming the field; every --flag a message names exists."""

from __future__ import annotations

import argparse
import ast
import errno
import os
import re
import shutil
from pathlib import Path

import pytest

from kvdistill.cli import DEBUG_HINT, ExitCode, build_parser, main
from kvdistill.dump.run import Preempted
from kvdistill.schemas import (
    AlignSpec,
    CalibrateConfig,
    CompareConfig,
    ConfigError,
    DataSpec,
    DemoConfig,
    DumpTask,
    EvalConfig,
    JobsConfig,
    KVGeometry,
    LatentSpec,
    ModelSpec,
    SlurmSpec,
    StoreSpec,
    SyntheticSpec,
    TeacherSpec,
    TrainConfig,
)
from kvdistill.store import shard_name
from kvdistill.store.errors import CorruptShard, ShardBusy

ROOT = Path(__file__).resolve().parents[1]


def one_line(capsys, cmd: str) -> str:
    """The whole of stderr, asserted to be one `kvdistill <cmd>: ...` line without a traceback."""
    err = capsys.readouterr().err
    line = err.strip()
    assert "Traceback" not in err, err
    assert "\n" not in line, err
    assert line.startswith(f"kvdistill {cmd}: "), err
    assert line.endswith(DEBUG_HINT), err
    return line


@pytest.fixture
def no_weights(make_model, tmp_path) -> Path:
    """A model directory with config and tokenizer but no weights (a copy interrupted midway)."""
    model = tmp_path / "no-weights"
    shutil.copytree(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1), model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    return model


# --- the exit codes ----------------------------------------------------------------------------


def test_the_readme_table_lists_every_exit_code_with_its_number():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Exit codes") :]
    section = section[: section.find("\n## ", 1)]
    documented = {int(code) for code in re.findall(r"^\| *(\d+) *\|", section, re.M)}
    assert documented == {int(c) for c in ExitCode}
    assert "KVDISTILL_DEBUG=1" in section and "--debug" in section


# --- bad input: 3 --------------------------------------------------------------------------------


def test_a_model_directory_without_weights_exits_3_naming_the_directory(no_weights, tiny_store, tmp_path, capsys):
    rc = main(
        [
            "dump",
            "--teacher",
            str(no_weights),
            "--student",
            tiny_store["student"].name_or_path,
            "--store",
            str(tmp_path / "x.zarr"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == ExitCode.BAD_INPUT == 3
    line = one_line(capsys, "dump")
    assert str(no_weights) in line and "model.safetensors" in line
    assert "checkpoint is complete (config, tokenizer, weights)" in line


@pytest.mark.parametrize("which, cmd", [("root", "inspect"), ("shard", "finalize")])
def test_a_truncated_zarr_json_exits_4_naming_the_file(store_copy, capsys, which, cmd):
    f = (
        store_copy / "zarr.json"
        if which == "root"
        else store_copy / "teachers" / "teacher-a" / shard_name(0) / "zarr.json"
    )
    f.write_text(f.read_text()[:50])
    assert main(["store", cmd, str(store_copy)]) == ExitCode.INTEGRITY
    line = one_line(capsys, "store")
    assert f"data integrity: {f}: not valid JSON" in line


def test_invalid_json_from_a_reader_that_does_not_name_its_file_exits_3_in_one_line(tiny_store, monkeypatch, capsys):
    import json

    import kvdistill.store.summary as summary

    def truncated(path):
        return json.loads('{"attributes": {"kvdistill": ')

    monkeypatch.setattr(summary, "inspect", truncated)
    assert main(["store", "inspect", str(tiny_store["store"])]) == ExitCode.BAD_INPUT
    line = one_line(capsys, "store")
    assert "is not valid JSON (Expecting value at line 1 column 30): it is truncated or corrupt" in line


def test_a_missing_file_exits_3(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == ExitCode.BAD_INPUT
    assert "has no metrics.jsonl" in one_line(capsys, "report")


# --- the run failed: 1 ---------------------------------------------------------------------------


def test_jobs_local_with_a_failing_task_exits_1_listing_it(tiny_store, no_weights, tmp_path, capsys):
    teachers = [tiny_store["teachers"][1], ModelSpec(name_or_path=str(no_weights), name="broken")]
    task = DumpTask(
        student=tiny_store["student"],
        store=str(tmp_path / "s.zarr"),
        data=tiny_store["data"],
        batch_size=8,
        device="cpu",
    )
    config = JobsConfig(teachers=teachers, dump=task).save(tmp_path / "jobs.yaml")
    assert main(["jobs", "local", "--config", str(config), "--no-progress"]) == ExitCode.FAILED == 1
    line = one_line(capsys, "jobs")
    assert (
        "1 of 2 dump tasks failed" in line
        and "teacher broken shard 0: OSError: Error no file named model.safetensors" in line
    )
    assert "teacher teacher-b" not in line  # the task that worked is not listed


def test_a_non_finite_loss_exits_1_naming_term_and_samples(tiny_store, tmp_path, monkeypatch, capsys):
    import torch

    from kvdistill.train import distiller

    monkeypatch.setattr(distiller, "cka_from_sums", lambda s: torch.tensor(float("nan"), dtype=torch.float64))
    rc = main(
        [
            "train",
            "--store",
            str(tiny_store["store"]),
            "--student",
            tiny_store["student"].name_or_path,
            "--out",
            str(tmp_path / "run"),
            "--per-device-train-batch-size",
            "8",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == ExitCode.FAILED
    line = one_line(capsys, "train")
    assert "training diverged: step 1: loss term cka is nan" in line and "on samples [" in line


# --- data integrity: 4 ---------------------------------------------------------------------------


def test_store_verify_finding_problems_exits_4(store_copy, capsys):
    shutil.rmtree(store_copy / "teachers" / "teacher-a" / shard_name(0))
    assert main(["store", "verify", str(store_copy), "--no-progress"]) == ExitCode.INTEGRITY == 4
    out, err = capsys.readouterr()
    assert "teacher 'teacher-a' shard-00000: missing" in out  # the report, each problem with its fix
    assert err.strip().startswith("kvdistill store: verify found ") and f"problem(s) in {store_copy}" in err
    assert "\n" not in err.strip() and "Traceback" not in err


def test_a_chunk_failing_its_checksum_in_a_plain_zarr_read_exits_4(store_copy, capsys):
    k = store_copy / "teachers" / "teacher-a" / shard_name(0) / "k"
    chunk = next(p for p in sorted(k.rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main(["store", "stats", str(store_copy)]) == ExitCode.INTEGRITY
    line = one_line(capsys, "store")
    assert f"data integrity: store {store_copy}: a K/V chunk fails its crc32c check" in line
    assert f"run `kvdistill store verify {store_copy}` to find which" in line


def test_a_corrupt_shard_exits_4_naming_the_chunk(tiny_store, monkeypatch, capsys):
    import kvdistill.store.stats as stats

    chunk = f"{tiny_store['store']}/teachers/teacher-a/shard-00000/k/c/0/0"

    def corrupt(*a, **k):
        raise CorruptShard(
            f"{chunk}: chunk fails its crc32c check (corrupt or truncated); run `kvdistill store verify`"
        )

    monkeypatch.setattr(stats, "stats", corrupt)
    assert main(["store", "stats", str(tiny_store["store"])]) == ExitCode.INTEGRITY
    line = one_line(capsys, "store")
    assert line.startswith(f"kvdistill store: data integrity: {chunk}: chunk fails its crc32c check")


# --- environment: 5 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, said, fix",
    [
        (errno.ENOSPC, "disk full", "free space there or write elsewhere (--store / --out)"),
        (errno.EDQUOT, "disk quota exceeded", "free space in the quota or write elsewhere (--store / --out)"),
        (errno.EROFS, "read-only file system", "write to a writable file system (--store / --out)"),
        (errno.EACCES, "permission denied", "fix the permissions or write elsewhere (--store / --out)"),
    ],
    ids=["ENOSPC", "EDQUOT", "EROFS", "EACCES"],
)
def test_a_full_or_read_only_disk_at_finalize_exits_5_naming_the_path(
    tiny_store, monkeypatch, capsys, code, said, fix
):
    import kvdistill.store.index as store_index

    index = tiny_store["store"] / "index.parquet"

    def fail(path):
        raise OSError(code, os.strerror(code), str(index))

    monkeypatch.setattr(store_index, "finalize", fail)  # root ignores chmod, so the fault is simulated
    assert main(["store", "finalize", str(tiny_store["store"])]) == ExitCode.ENVIRONMENT == 5
    line = one_line(capsys, "store")
    assert line == f"kvdistill store: {said} at {index}: {fix} {DEBUG_HINT}"


def test_a_read_only_store_at_dump_exits_5_and_a_write_without_a_file_name_still_says_what(
    tiny_store, tmp_path, monkeypatch, capsys
):
    import kvdistill.dump.run as run

    def read_only(cfg, progress=True):
        raise OSError(errno.EROFS, "Read-only file system", cfg.store)

    monkeypatch.setattr(run, "run_dump", read_only)
    argv = ["dump", "--teacher", "t", "--student", "s", "--store", str(tmp_path / "ro.zarr")]
    assert main(argv) == ExitCode.ENVIRONMENT
    assert f"read-only file system at {tmp_path / 'ro.zarr'}: write to a writable file system" in one_line(
        capsys, "dump"
    )

    def full(cfg, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device")  # what file.write() raises: no file name

    monkeypatch.setattr(run, "run_dump", full)
    assert main(argv) == ExitCode.ENVIRONMENT
    assert "disk full (the error names no file): free space" in one_line(capsys, "dump")


def test_sbatch_refusing_a_job_exits_5_in_one_line(tmp_path, monkeypatch, capsys):
    import kvdistill.jobs.slurm as slurm

    def refuse(scripts, *, dry_run):
        raise RuntimeError(
            "`sbatch --parsable x.sbatch` failed (exit 1): sbatch: error: invalid partition specified: gpu\nalready"
            " submitted: nothing"
        )

    monkeypatch.setattr(slurm, "submit", refuse)
    config = JobsConfig(
        teachers=[ModelSpec(name_or_path="t")],
        dump=DumpTask(student=ModelSpec(name_or_path="s"), store="s.zarr"),
        jobs_dir=str(tmp_path / "jobs"),
    ).save(tmp_path / "jobs.yaml")
    assert main(["jobs", "slurm", "--config", str(config), "--submit"]) == ExitCode.ENVIRONMENT
    assert "invalid partition specified: gpu; already submitted: nothing" in one_line(capsys, "jobs")


# --- busy: 6, preempted: 143 ---------------------------------------------------------------------


def test_a_shard_owned_by_another_writer_exits_6(tmp_path, monkeypatch, capsys):
    import kvdistill.dump.run as run

    def busy(cfg, progress=True):
        raise ShardBusy(
            f"store {cfg.store}: teacher t shard 0 is being written by host n1 pid 4242 since 12:00; wait (--config"
            " on_busy: wait) or kill it"
        )

    monkeypatch.setattr(run, "run_dump", busy)
    assert (
        main(["dump", "--teacher", "t", "--student", "s", "--store", str(tmp_path / "s.zarr")]) == ExitCode.BUSY == 6
    )
    assert "busy: store" in one_line(capsys, "dump")


def test_sigterm_exits_143_with_one_line(tmp_path, monkeypatch, capsys):
    import kvdistill.dump.run as run

    def preempted(cfg, progress=True):
        raise Preempted(143)

    monkeypatch.setattr(run, "run_dump", preempted)
    assert (
        main(["dump", "--teacher", "t", "--student", "s", "--store", str(tmp_path / "s.zarr")])
        == ExitCode.PREEMPTED
        == 143
    )
    assert "preempted (SIGTERM): the partial shard was discarded" in one_line(capsys, "dump")


# --- the debug switch, and bugs ------------------------------------------------------------------


@pytest.fixture
def read_only_finalize(tiny_store, monkeypatch):
    import kvdistill.store.index as store_index

    def fail(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(store_index, "finalize", fail)
    return str(tiny_store["store"])


@pytest.mark.parametrize("how", ["env", "flag-first", "flag-last"])
def test_the_debug_switch_reraises_with_the_traceback(read_only_finalize, monkeypatch, how):
    argv = ["store", "finalize", read_only_finalize]
    if how == "env":
        monkeypatch.setenv("KVDISTILL_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if how == "flag-first" else [*argv, "--debug"]
    with pytest.raises(OSError) as e:
        main(argv)
    assert e.value.errno == errno.EROFS


def test_debug_off_by_default_and_with_0(read_only_finalize, monkeypatch, capsys):
    monkeypatch.setenv("KVDISTILL_DEBUG", "0")
    assert main(["store", "finalize", read_only_finalize]) == ExitCode.ENVIRONMENT
    one_line(capsys, "store")


def test_an_unexpected_exception_is_a_bug_and_keeps_its_traceback(tiny_store, monkeypatch):
    import kvdistill.store.index as store_index

    def bug(path):
        raise KeyError("teacher_spec")

    monkeypatch.setattr(store_index, "finalize", bug)
    with pytest.raises(KeyError):
        main(["store", "finalize", str(tiny_store["store"])])


# --- out-of-range config values: 2 ---------------------------------------------------------------


def test_a_negative_learning_rate_exits_2_naming_the_field(capsys):
    assert (
        main(["train", "--store", "s.zarr", "--student", "x", "--out", "o", "--learning-rate=-1e-3"])
        == ExitCode.USAGE
        == 2
    )
    assert "config error: TrainConfig.lr: must be > 0, got -0.001" in one_line(capsys, "train")


def _train(**kw) -> TrainConfig:
    return TrainConfig(store="s.zarr", student=ModelSpec(name_or_path="x"), out="o", **kw)


def _dump(**kw) -> DumpTask:
    return DumpTask(student=ModelSpec(name_or_path="x"), store="s.zarr", **kw)


def _store(**kw) -> StoreSpec:
    base = dict(
        student=ModelSpec(name_or_path="x"),
        geometry=KVGeometry(num_layers=2, num_kv_heads=1, head_dim=4),
        tokenizer_fingerprint="f",
        data=DataSpec(),
        data_fingerprint="f",
        num_shards=1,
    )
    return StoreSpec(**{**base, **kw})


def _teacher(**kw) -> TeacherSpec:
    base = dict(
        name="t",
        model=ModelSpec(name_or_path="t"),
        geometry=KVGeometry(num_layers=2, num_kv_heads=1, head_dim=4),
        align=AlignSpec(),
        time_map="identity",
        layer_map=[[1.0, 0.0], [0.0, 1.0]],
        width=4,
        fingerprint="f",
    )
    return TeacherSpec(**{**base, **kw})


OUT_OF_RANGE = [
    (lambda: _train(lr=0.0), "TrainConfig.lr: must be > 0, got 0.0"),
    (lambda: _train(adapter_lr=-1e-4), "TrainConfig.adapter_lr: must be > 0"),
    (lambda: _train(router_lr=0.0), "TrainConfig.router_lr: must be > 0"),
    (lambda: _train(lr=float("nan")), "TrainConfig.lr: must be > 0, got nan"),
    (lambda: _train(fusion_temperature=0.0), "TrainConfig.fusion_temperature: must be > 0"),
    (lambda: _train(kv_weight=-1.0), "TrainConfig.kv_weight: must be >= 0, got -1.0"),
    (lambda: _train(ce_weight=-1.0), "TrainConfig.ce_weight: must be >= 0, got -1.0"),
    (lambda: _train(cka_weight=-0.1), "TrainConfig.cka_weight: must be >= 0"),
    (lambda: _train(codi_weight=-1.0), "TrainConfig.codi_weight: must be >= 0, got -1.0"),
    (lambda: _train(weight_decay=-0.1), "TrainConfig.weight_decay: must be >= 0"),
    (lambda: _train(grad_clip=-1.0), "TrainConfig.grad_clip: must be >= 0"),
    (lambda: _train(warmup_steps=-1), "TrainConfig.warmup_steps: must be >= 0"),
    (lambda: _train(kv_attn_warmup_steps=-1), "TrainConfig.kv_attn_warmup_steps: must be >= 0, got -1"),
    (lambda: _train(batch_size=0), "TrainConfig.batch_size: must be >= 1, got 0"),
    (lambda: _train(max_steps=0), "TrainConfig.max_steps: must be >= 1, got 0"),
    (lambda: _train(lora_r=-1), "TrainConfig.lora_r: must be >= 0"),
    (lambda: _train(lora_alpha=0), "TrainConfig.lora_alpha: must be >= 1"),
    (lambda: _train(lora_dropout=1.0), "TrainConfig.lora_dropout: must lie in [0, 1), got 1.0"),
    (lambda: _train(lora_dropout=-0.1), "TrainConfig.lora_dropout: must lie in [0, 1)"),
    (lambda: _train(seed=-1), "TrainConfig.seed: must be >= 0"),
    (lambda: _train(shuffle_buffer=0), "TrainConfig.shuffle_buffer: must be >= 1"),
    (lambda: _train(num_workers=-1), "TrainConfig.num_workers: must be >= 0"),
    (lambda: _train(log_every=0), "TrainConfig.log_every: must be >= 1"),
    (lambda: _train(save_every=-5), "TrainConfig.save_every: must be >= 0"),
    (lambda: _train(stop_at_step=0), "TrainConfig.stop_at_step: must be >= 1"),
    (
        lambda: _train(teacher_weights={"a": 0.0, "b": 0.0}),
        "TrainConfig.teacher_weights: give some teacher a weight > 0",
    ),
    (lambda: EvalConfig(model="m", batch_size=0), "EvalConfig.batch_size: must be >= 1"),
    (lambda: EvalConfig(model="m", max_new_tokens=0), "EvalConfig.max_new_tokens: must be >= 1"),
    (lambda: _dump(batch_size=0), "DumpTask.batch_size: must be >= 1, got 0"),
    (lambda: _dump(max_len=-3), "DumpTask.max_len: must be >= 1, got -3"),
    (lambda: _dump(compression_level=10), "DumpTask.compression_level: blosc levels are 0 (none) to 9"),
    (lambda: LatentSpec(slots=0), "LatentSpec.slots: must be >= 1"),
    (lambda: LatentSpec(lam=1.5), "LatentSpec.lam: must lie in [0, 1]"),
    (lambda: SyntheticSpec(max_number=1), "SyntheticSpec.max_number: must be >= 2"),
    (lambda: DataSpec(limit=0), "DataSpec.limit: must be >= 1 or null"),
    (lambda: KVGeometry(num_layers=0, num_kv_heads=1, head_dim=4), "KVGeometry.num_layers: must be >= 1"),
    (lambda: _store(num_shards=0), "StoreSpec.num_shards: must be >= 1"),
    (lambda: _store(compression_level=-1), "StoreSpec.compression_level: blosc levels are 0 (none) to 9"),
    (lambda: _teacher(width=0), "TeacherSpec.width: must be >= 1"),
    (lambda: SlurmSpec(nodes=0), "SlurmSpec.nodes: must be >= 1"),
    (lambda: SlurmSpec(cpus=0), "SlurmSpec.cpus: must be >= 1"),
    (lambda: SlurmSpec(gpus=-1), "SlurmSpec.gpus: must be >= 0"),
    (lambda: SlurmSpec(max_parallel=0), "SlurmSpec.max_parallel: must be >= 1"),
    (
        lambda: JobsConfig(teachers=[ModelSpec(name_or_path="t")], dump=_dump(), workers=0),
        "JobsConfig.workers: must be >= 1",
    ),
    (
        lambda: CalibrateConfig(
            teacher=ModelSpec(name_or_path="t"), student=ModelSpec(name_or_path="s"), batch_size=0
        ),
        "CalibrateConfig.batch_size: must be >= 1",
    ),
    (lambda: DemoConfig(num_shards=0), "DemoConfig.num_shards: must be >= 1"),
    (lambda: DemoConfig(teacher_steps=0), "DemoConfig.teacher_steps: must be >= 1"),
    (lambda: DemoConfig(student_steps=0), "DemoConfig.student_steps: must be >= 1"),
    (lambda: DemoConfig(batch_size=0), "DemoConfig.batch_size: must be >= 1"),
    (lambda: DemoConfig(seed=-1), "DemoConfig.seed: must be >= 0"),
    (lambda: DemoConfig(kv_weight=-1.0), "DemoConfig.kv_weight: must be >= 0"),
    (lambda: DemoConfig(latent_slots=0), "DemoConfig.latent_slots: must be >= 1"),
    (lambda: DemoConfig(latent_iterations=0), "DemoConfig.latent_iterations: must be >= 1"),
    (lambda: CompareConfig(max_new_tokens=0), "CompareConfig.max_new_tokens: must be >= 1"),
]


@pytest.mark.parametrize("build, message", OUT_OF_RANGE, ids=[m for _, m in OUT_OF_RANGE])
def test_an_out_of_range_value_is_refused_naming_field_and_range(build, message):
    with pytest.raises(ConfigError) as e:
        build()
    assert message in str(e.value)


def test_the_defaults_and_the_edges_of_each_range_are_valid():
    _train(
        lora_r=0,
        lora_dropout=0.0,
        weight_decay=0.0,
        grad_clip=0.0,
        warmup_steps=0,
        seed=0,
        save_every=0,
        stop_at_step=1,
        teacher_weights={"a": 0.0, "b": 1.0},
        kv_weight=0.0,
        cka_weight=0.0,
    )
    SlurmSpec(gpus=0, max_parallel=None)
    DemoConfig(seed=0, kv_weight=0.0)
    _store(compression_level=0)
    _teacher()


# --- every --flag a message or help text names exists ---------------------------------------------

PACKAGE_DIRS = ["dump", "train", "store", "align", "schemas", "jobs", "kvdistill"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9]")  # nested fields: --teacher.name-or-path

# Flags of other tools that our messages and generated scripts name; each group with why.
EXTERNAL_FLAGS = {
    # sbatch: jobs/slurm.py writes #SBATCH lines and the sbatch command line; jobs status prints --array
    "--array",
    "--cpus-per-task",
    "--dependency",
    "--gres",
    "--job-name",
    "--mem",
    "--nodes",
    "--ntasks-per-node",
    "--open-mode",
    "--output",
    "--parsable",
    "--requeue",
    "--signal",
    "--time",
    # accelerate launch: the multi-node training script (its flags are spelled with underscores)
    "--machine_rank",
    "--main_process_ip",
    "--main_process_port",
    "--multi_gpu",
    "--num_machines",
    "--num_processes",
}


def _string_literals(path: Path) -> list[str]:
    return [
        n.value
        for n in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _help_texts(parser: argparse.ArgumentParser) -> list[str]:
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        texts.append(action.help or "")
        if isinstance(action, argparse._SubParsersAction):
            texts += [a.help or "" for a in action._choices_actions]
    return texts


def test_every_flag_named_in_a_message_or_help_text_exists():
    parsers = list(_parsers(build_parser()))
    options = {s for p in parsers for a in p._actions for s in a.option_strings}
    named: dict[str, set[str]] = {}
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for text in _string_literals(path):
                for flag in FLAG.findall(text):
                    named.setdefault(flag, set()).add(str(path.relative_to(ROOT)))
    for p in parsers:
        for text in _help_texts(p):
            for flag in FLAG.findall(text):
                named.setdefault(flag, set()).add(f"--help of {p.prog}")
    unknown = {flag: sorted(where) for flag, where in named.items() if flag not in options | EXTERNAL_FLAGS}
    assert not unknown, f"flags named in messages / help that no parser has: {unknown}"
    assert "--save-steps" in named and "--debug" in options  # the scan does find flags
