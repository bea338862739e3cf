"""Messages that say what is wrong, where, and whose (issue 24, items 8-13), through the real CLI:
a model path that does not exist names its role and the path (never "check your internet
connection"); a folder that holds no model says so (never "install sentencepiece"); `store plan`
refuses nonsense sizes naming the flag; `store show-alignment` prints the file it wrote and
refuses a bad --out before any work; a config file accepts a field's flag spellings; a range
message names the one field that is wrong and its value. Offline (conftest: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from kvdistill.cli import DEBUG_HINT, ExitCode, main
from kvdistill.schemas import (
    CalibrateConfig,
    ConfigError,
    DumpConfig,
    DumpTask,
    JobsConfig,
    ModelSpec,
    SyntheticSpec,
    TrainConfig,
)
from kvdistill.schemas.base import build
from kvdistill.store import ShardReader


def one_line(capsys, cmd: str) -> str:
    err = capsys.readouterr().err
    line = err.strip()
    assert "Traceback" not in err, err
    assert "\n" not in line, err
    assert line.startswith(f"kvdistill {cmd}: ") and line.endswith(DEBUG_HINT), err
    return line


HUB_NOISE = ("couldn't connect", "internet connection", "sentencepiece", "tiktoken")


def no_hub_noise(line: str) -> None:
    assert not any(n in line for n in HUB_NOISE), line


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Relative paths (models/teacher-nope) resolve in an empty folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- 8. a model path that does not exist: role and path, not the hub ------------------------------

OFFLINE = "no such folder, and not a hub id that can be fetched offline"


def test_dump_with_a_missing_teacher_names_the_teacher_and_its_path(tiny_store, in_tmp, capsys):
    rc = main(
        [
            "dump",
            "--teacher",
            "models/teacher-nope",
            "--student",
            tiny_store["student"].name_or_path,
            "--store",
            "s.zarr",
            "--device",
            "cpu",
            "--data.synthetic.n-train",
            "8",
            "--no-progress",
        ]
    )
    assert rc == ExitCode.BAD_INPUT
    line = one_line(capsys, "dump")
    assert f"teacher models/teacher-nope: {OFFLINE}" in line
    no_hub_noise(line)
    assert not (in_tmp / "s.zarr").exists()


def test_dump_with_a_missing_student_names_the_student(tiny_store, in_tmp, capsys):
    rc = main(
        [
            "dump",
            "--teacher",
            tiny_store["teachers"][0].name_or_path,
            "--student",
            "models/nope",
            "--store",
            "s.zarr",
            "--device",
            "cpu",
            "--data.synthetic.n-train",
            "8",
            "--no-progress",
        ]
    )
    assert rc == ExitCode.BAD_INPUT
    line = one_line(capsys, "dump")
    assert f"student models/nope: {OFFLINE}" in line
    no_hub_noise(line)


def test_eval_with_a_missing_model_names_it(in_tmp, capsys):
    assert main(["eval", "--model", "runs/nothere", "--device", "cpu", "--no-progress"]) == ExitCode.BAD_INPUT
    line = one_line(capsys, "eval")
    assert f"model runs/nothere: {OFFLINE}" in line
    no_hub_noise(line)


def test_store_plan_with_a_missing_teacher_names_the_teacher(tiny_store, in_tmp, capsys):
    rc = main(
        [
            "store",
            "plan",
            "--teacher",
            tiny_store["teachers"][1].name_or_path,
            "--teacher",
            "models/teacher-nope",
            "--student",
            tiny_store["student"].name_or_path,
            "--data",
            "synthetic",
            "--limit",
            "4",
        ]
    )
    assert rc == ExitCode.BAD_INPUT
    line = one_line(capsys, "store")
    assert f"teacher models/teacher-nope: {OFFLINE}" in line
    no_hub_noise(line)


def test_train_with_a_missing_student_names_the_student(tiny_store, in_tmp, capsys):
    rc = main(
        [
            "train",
            "--store",
            str(tiny_store["store"]),
            "--student",
            "models/nope",
            "--out",
            "run",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == ExitCode.BAD_INPUT
    line = one_line(capsys, "train")
    assert f"student models/nope: {OFFLINE}" in line
    no_hub_noise(line)


def test_jobs_local_names_the_missing_teacher_in_its_task_line(tiny_store, in_tmp, capsys):
    task = DumpTask(student=tiny_store["student"], store="s.zarr", data=tiny_store["data"], batch_size=8, device="cpu")
    teachers = [ModelSpec(name_or_path="models/teacher-nope")]
    config = JobsConfig(teachers=teachers, dump=task).save(in_tmp / "jobs.yaml")
    assert main(["jobs", "local", "--config", str(config), "--no-progress"]) == ExitCode.FAILED
    line = one_line(capsys, "jobs")
    assert f"teacher teacher-nope shard 0: FileNotFoundError: teacher models/teacher-nope: {OFFLINE}" in line
    no_hub_noise(line)


def test_a_missing_explicit_path_and_a_name_that_is_no_hub_id(in_tmp, capsys):
    assert main(["eval", "--model", "./runs/nothere", "--device", "cpu"]) == ExitCode.BAD_INPUT
    assert "model ./runs/nothere: no such folder; give an existing checkpoint folder" in one_line(capsys, "eval")
    assert main(["eval", "--model", "runs/a/b", "--device", "cpu"]) == ExitCode.BAD_INPUT
    assert "model runs/a/b: no such folder, and not a hub id (name or org/name)" in one_line(capsys, "eval")


def _raising(cause: BaseException):
    def from_pretrained(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause

    return from_pretrained


def test_online_the_message_says_what_the_hub_answered(in_tmp, monkeypatch):
    """Online (simulated: no test reaches the network): no such repo, or no connection."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    from kvdistill.core import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
    Exception.__init__(missing, "404 Client Error: Repository Not Found")
    monkeypatch.setattr(models.AutoConfig, "from_pretrained", _raising(missing))
    with pytest.raises(
        FileNotFoundError, match=r"^teacher org/teacher-nope: no such folder, and the hub has no repo org/teacher-nope"
    ):
        models.load_config(ModelSpec(name_or_path="org/teacher-nope"), role="teacher")
    monkeypatch.setattr(models.AutoConfig, "from_pretrained", _raising(LocalEntryNotFoundError("no connection")))
    with pytest.raises(
        FileNotFoundError,
        match=r"^student org/x: no such folder, and it could not be fetched from the hub \(no connection",
    ):
        models.load_config(ModelSpec(name_or_path="org/x"), role="student")


def test_the_message_names_the_role_the_caller_gives(in_tmp):
    from kvdistill.core.models import load_config

    cfg = DumpConfig(
        teacher=ModelSpec(name_or_path="models/t-nope"),
        student=ModelSpec(name_or_path="models/s-nope"),
        store="s.zarr",
    )
    for spec, role in ((cfg.teacher, "teacher"), (cfg.student, "student")):
        with pytest.raises(FileNotFoundError, match=f"^{role} {spec.name_or_path}: no such folder"):
            load_config(spec, role=role)
    with pytest.raises(FileNotFoundError, match="^model models/x: no such folder"):
        load_config(ModelSpec(name_or_path="models/x"))


# --- 9. a folder that holds no model ------------------------------------------------------------


def test_eval_on_an_empty_folder_says_it_holds_no_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--model", str(empty), "--device", "cpu"]) == ExitCode.BAD_INPUT
    line = one_line(capsys, "eval")
    assert f"model {empty}: the folder holds no model (no config.json, no tokenizer, no weights: it is empty)" in line
    no_hub_noise(line)


def test_eval_on_a_folder_with_a_stray_file_says_it_holds_no_model(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "random.txt").write_text("hello")
    assert main(["eval", "--model", str(folder), "--device", "cpu"]) == ExitCode.BAD_INPUT
    line = one_line(capsys, "eval")
    assert (
        f"model {folder}: the folder holds no model (no config.json, no tokenizer, no weights: it holds random.txt)"
        in line
    )
    no_hub_noise(line)


def test_eval_on_a_file_and_on_a_model_without_its_tokenizer(make_model, tmp_path, capsys):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    assert main(["eval", "--model", str(f), "--device", "cpu"]) == ExitCode.BAD_INPUT
    assert f"model {f}: a file, not a checkpoint folder" in one_line(capsys, "eval")
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1), bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert main(["eval", "--model", str(bare), "--device", "cpu"]) == ExitCode.BAD_INPUT
    line = one_line(capsys, "eval")
    assert f"model {bare}: the folder holds no tokenizer (no tokenizer.json or tokenizer_config.json" in line
    no_hub_noise(line)


# --- 10. store plan: sizes out of range ----------------------------------------------------------


PLAN_SIZES = [
    (["--num-shards", "-2"], "--num-shards -2: must be >= 1"),
    (["--num-shards", "0"], "--num-shards 0: must be >= 1"),
    (["--compression", "-1.5"], "--compression -1.5: must be a finite ratio > 0"),
    (["--compression", "0"], "--compression 0: must be a finite ratio > 0"),
    (["--target-shard-gib", "-1"], "--target-shard-gib -1: must be a finite size > 0 in GiB"),
    (["--target-shard-gib", "0"], "--target-shard-gib 0: must be a finite size > 0 in GiB"),
]


@pytest.mark.parametrize("flags, said", PLAN_SIZES, ids=[" ".join(f) for f, _ in PLAN_SIZES])
def test_store_plan_refuses_a_size_out_of_range_naming_the_flag(tiny_store, capsys, flags, said):
    argv = [
        "store",
        "plan",
        "--teacher",
        tiny_store["teachers"][0].name_or_path,
        "--student",
        tiny_store["student"].name_or_path,
        "--data",
        "synthetic",
        "--limit",
        "4",
        *flags,
    ]
    assert main(argv) == ExitCode.USAGE == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert line.startswith(f"kvdistill store: config error: {said}"), line
    assert "codec_bytes_per_value" not in line and "target_shard_bytes" not in line


def test_store_plan_uses_the_num_shards_given(tiny_store, capsys):
    argv = [
        "store",
        "plan",
        "--teacher",
        tiny_store["teachers"][0].name_or_path,
        "--student",
        tiny_store["student"].name_or_path,
        "--data",
        "synthetic",
        "--limit",
        "4",
        "--num-shards",
        "3",
        "--compression",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert " 3 shards of " in out and "  2.00 " in out


def test_plan_names_the_one_argument_out_of_range():
    from kvdistill.schemas import KVGeometry
    from kvdistill.store.plan import plan

    g = KVGeometry(num_layers=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match=r"^plan: num_shards must be >= 1 or None \(the suggestion\), got 0$"):
        plan(g, g, 10, 5.0, num_shards=0)
    with pytest.raises(ValueError, match=r"^plan: compression_ratio must be finite and > 0, got 0$"):
        plan(g, g, 10, 5.0, compression_ratio=0)
    with pytest.raises(ValueError, match=r"^plan: target_shard_bytes must be finite and > 0, got -1$"):
        plan(g, g, 10, 5.0, target_shard_bytes=-1)


# --- 11. store show-alignment --out --------------------------------------------------------------


def _show(tiny_store, out) -> list[str]:
    sid = ShardReader(tiny_store["store"], "teacher-a", 0).sample_ids[0]
    return [
        "store",
        "show-alignment",
        str(tiny_store["store"]),
        "--teacher",
        "teacher-a",
        "--sample",
        sid,
        "--out",
        str(out),
    ], sid


def test_show_alignment_prints_the_file_it_wrote(tiny_store, tmp_path, capsys):
    argv, sid = _show(tiny_store, tmp_path / "fig")
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'fig.png'}"
    assert (tmp_path / "fig.png").is_file() and not (tmp_path / "fig").exists()
    folder = tmp_path / "figs"
    folder.mkdir()
    argv, sid = _show(tiny_store, folder)
    assert main(argv) == 0
    written = folder / f"alignment-teacher-a-{sid}.png"
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {written}"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("where", ["in", "below"])
def test_show_alignment_under_a_regular_file_is_one_line_before_any_work(tiny_store, tmp_path, capsys, where):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker / "a.png" if where == "in" else blocker / "sub" / "a.png"
    argv, _ = _show(tiny_store, out)
    assert main(argv) == ExitCode.USAGE
    stdout = capsys.readouterr()
    assert stdout.out == ""  # refused before the summary line
    line = stdout.err.strip()
    assert "\n" not in line and "Traceback" not in stdout.err and "FileExistsError" not in line
    assert line.startswith(f"kvdistill store: config error: --out {out}: {blocker} is a file, not a folder")


def test_show_alignment_refuses_a_suffix_matplotlib_does_not_write(tiny_store, tmp_path, capsys):
    argv, _ = _show(tiny_store, tmp_path / "a.xyz")
    assert main(argv) == ExitCode.USAGE
    assert f"config error: --out {tmp_path / 'a.xyz'}: matplotlib writes no .xyz files; give a .png" in one_line(
        capsys, "store"
    )


# --- 12. a config file accepts the flag spellings of a field --------------------------------------


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


TRAIN = {"store": "s.zarr", "student": {"name_or_path": "x"}, "out": "o"}


def test_a_flag_alias_in_a_config_file_sets_its_field_and_saves_under_the_field_name(tmp_path):
    f = _yaml(
        tmp_path / "t.yaml",
        TRAIN | {"learning_rate": 0.002, "max-steps": 7, "student_template": "Q {question} R {reasoning} A {answer}"},
    )
    cfg = TrainConfig.load(f)
    assert (cfg.lr, cfg.max_steps, cfg.student.prompt_template) == (0.002, 7, "Q {question} R {reasoning} A {answer}")
    saved = yaml.safe_load(cfg.save(tmp_path / "saved.yaml").read_text())
    assert saved["lr"] == 0.002 and "learning_rate" not in saved and "max-steps" not in saved
    assert TrainConfig.load(tmp_path / "saved.yaml") == cfg
    # A flag still overrides the file, whatever name the file used.
    assert build(TrainConfig, f, {"lr": 0.5}).lr == 0.5
    # Nested aliases: --teacher-name, --latent-slots; in a jobs file, --store and --num-shards of dump.
    d = DumpConfig.from_dict(
        {
            "teacher": {"name_or_path": "t"},
            "teacher_name": "t1",
            "student": {"name_or_path": "s"},
            "store": "s.zarr",
            "latent-slots": 4,
        }
    )
    assert d.teacher.name == "t1" and d.latent is not None and d.latent.slots == 4
    j = JobsConfig.from_dict(
        {
            "teachers": [{"name_or_path": "t"}],
            "dump": {"student": {"name_or_path": "s"}},
            "store": "s.zarr",
            "num-shards": 3,
        }
    )
    assert (j.dump.store, j.dump.num_shards) == ("s.zarr", 3)


def test_read_config_spells_every_key_as_its_field_nested_records_too(tmp_path):
    """What reads a config file raw (jobs' `train:` settings, the recipe's mode) sees field names,
    so a flag given over an alias in the file replaces it instead of clashing with it."""
    from kvdistill.schemas.base import read_config

    f = _yaml(
        tmp_path / "jobs.yaml",
        {
            "teachers": [{"name_or_path": "t"}],
            "store": "s.zarr",
            "dump": {"student": {"name_or_path": "s"}},
            "train": TRAIN | {"learning-rate": 0.01},
        },
    )
    data = read_config(f, JobsConfig)
    assert data["dump"]["store"] == "s.zarr" and "store" not in data
    assert data["train"]["lr"] == 0.01 and "learning-rate" not in data["train"]
    assert build(JobsConfig, f, {"train.lr": 0.5}).train.lr == 0.5


def test_a_config_file_alias_through_the_cli(tmp_path, capsys):
    f = _yaml(tmp_path / "t.yaml", TRAIN | {"learning_rate": -1.0})
    assert main(["train", "--config", str(f)]) == ExitCode.USAGE
    assert f"config error: {f}: TrainConfig.lr: must be > 0, got -1.0" in one_line(capsys, "train")
    f = _yaml(tmp_path / "both.yaml", TRAIN | {"lr": 1e-3, "learning_rate": 2e-3})
    assert main(["train", "--config", str(f)]) == ExitCode.USAGE
    assert f"{f}: TrainConfig: 'learning_rate' and 'lr' both set lr; keep one" in one_line(
        capsys, "train"
    )  # file order
    f = _yaml(tmp_path / "typo.yaml", TRAIN | {"learnig_rate": 2e-3})
    assert main(["train", "--config", str(f)]) == ExitCode.USAGE
    line = one_line(capsys, "train")
    assert "unknown field(s) ['learnig_rate']" in line and line.endswith(
        f"; did you mean lr for 'learnig_rate'? {DEBUG_HINT}"
    )


# --- 13. a range message names the one field that is wrong, and its value ------------------------

_T = {"store": "s.zarr", "student": ModelSpec(name_or_path="x"), "out": "o"}
_C = {"teacher": ModelSpec(name_or_path="t"), "student": ModelSpec(name_or_path="s")}
ONE_FIELD = [
    (
        lambda: DumpTask(student=ModelSpec(name_or_path="s"), store="s", max_len=-3),
        "DumpTask.max_len: must be >= 1, got -3",
        "batch_size",
    ),
    (
        lambda: DumpTask(student=ModelSpec(name_or_path="s"), store="s", batch_size=0),
        "DumpTask.batch_size: must be >= 1, got 0",
        "max_len",
    ),
    (lambda: CalibrateConfig(**_C, top_k=0), "CalibrateConfig.top_k: must be >= 1, got 0", "samples"),
    (lambda: CalibrateConfig(**_C, samples=0), "CalibrateConfig.samples: must be >= 1, got 0", "top_k"),
    (lambda: TrainConfig(**_T, batch_size=0), "TrainConfig.batch_size: must be >= 1, got 0", "max_steps"),
    (lambda: TrainConfig(**_T, cot_weight=-0.5), "TrainConfig.cot_weight: must be >= 0, got -0.5", "codi_weight"),
    (lambda: TrainConfig(**_T, ce_weight=-1.0), "TrainConfig.ce_weight: must be >= 0, got -1.0", "kv_weight"),
    (
        lambda: TrainConfig(**_T, layer_anneal_steps=-2),
        "TrainConfig.layer_anneal_steps: must be >= 0, got -2",
        "kv_attn_warmup_steps",
    ),
    (
        lambda: TrainConfig(**_T, teacher_weights={"a": 1.0, "b": -0.5}),
        "TrainConfig.teacher_weights['b']: must be >= 0, got -0.5",
        "'a'",
    ),
    (
        lambda: TrainConfig(**_T, kv_control="shuffled", kv_weight=0.0),
        "needs kv_weight > 0, got kv_weight 0.0",
        "batch_size",
    ),
    (lambda: SyntheticSpec(n_test=0), "SyntheticSpec.n_test: must be >= 1, got 0", "n_train"),
    (lambda: SyntheticSpec(min_steps=0), "SyntheticSpec.min_steps: must be >= 1, got 0", "max_steps"),
    (
        lambda: SyntheticSpec(min_steps=3, max_steps=2),
        "SyntheticSpec.max_steps: must be >= min_steps (3), got 2",
        "<=",
    ),
]


@pytest.mark.parametrize("build_, said, not_said", ONE_FIELD, ids=[s for _, s, _ in ONE_FIELD])
def test_a_range_message_names_only_the_field_that_is_wrong(build_, said, not_said):
    with pytest.raises(ConfigError) as e:
        build_()
    assert said in str(e.value) and not_said not in str(e.value), str(e.value)


def test_a_range_error_on_the_command_line_names_the_flag_field_and_value(capsys):
    assert main(["dump", "--teacher", "t", "--student", "s", "--store", "s.zarr", "--max-len", "-3"]) == ExitCode.USAGE
    line = one_line(capsys, "dump")
    assert "config error: DumpConfig.max_len: must be >= 1, got -3" in line and "batch_size" not in line
