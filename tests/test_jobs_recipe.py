"""`kvdistill jobs slurm` trains what `kvdistill train` trains (issue 23, item 8): the training
job's config resolves through the same layers, recipe < `--config` file < flags, so a `mode:
latent` job gets kava's LoRA r 128 / weight decay 0.1 / clip 2.0 / 5% warm-up as the command line
does, and a field the user set (in jobs.yaml's `train:` or as a `--train.FIELD` flag) wins over
the recipe in both. No SLURM needed: the generated train.sbatch's command line is parsed with the
real `kvdistill train` parser."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from kvdistill.cli import build_parser
from kvdistill.jobs.slurm import write_scripts
from kvdistill.schemas import DumpTask, JobsConfig, ModelSpec, SlurmSpec, TrainConfig
from kvdistill.schemas.base import dump_yaml, load_yaml
from kvdistill.train import cli as train_cli

STUDENT = "Qwen/Qwen2-0.5B"
SINGLE = {"gpus": 1, "cpus": 4}
MULTI = {"nodes": 2, "gpus": 4, "cpus": 32, "requeue": False}


def _train_argv(script: Path) -> list[str]:
    """The arguments after `-m kvdistill` of the line in `script` that runs `kvdistill train`
    (inside `srun bash -c '...'` for a multi-node job)."""
    found = []
    for line in script.read_text().splitlines():
        if line.startswith("#") or "kvdistill train" not in line:
            continue
        tokens = shlex.split(line)
        if tokens[:2] == ["srun", "bash"]:
            tokens = shlex.split(tokens[-1].split("; ", 1)[1])  # after `trap "" USR1; `
        assert tokens[0] == "exec", line
        i = tokens.index("kvdistill")
        assert tokens[i - 1] == "-m" and tokens[i + 1] == "train", line
        found.append(tokens[i + 1 :])
    assert len(found) == 1, script.read_text()
    return found[0]


def _resolve(argv: list[str]) -> TrainConfig:
    """What `kvdistill train ARGV` trains (the real parser and `train_config` layering)."""
    args = build_parser().parse_args(argv)
    assert args.func is train_cli.train_main
    return train_cli.config_of(args)


def _jobs_slurm(tmp_path: Path, train: dict, flags: list[str], train_slurm: dict, capsys) -> Path:
    """Run `kvdistill jobs slurm --config jobs.yaml FLAGS` (a dry run); the train.sbatch it wrote."""
    jobs_yaml = tmp_path / "jobs.yaml"
    jobs_yaml.write_text(
        dump_yaml(
            {
                "teachers": [{"name_or_path": "Qwen/Qwen2-7B", "name": "teacher-a"}],
                "dump": {"student": {"name_or_path": STUDENT}, "store": str(tmp_path / "kv.zarr"), "num_shards": 2},
                "jobs_dir": str(tmp_path / "jobs"),
                "train": train,
                "train_slurm": train_slurm,
            }
        )
    )
    args = build_parser().parse_args(["jobs", "slurm", "--config", str(jobs_yaml), *flags])
    assert args.func(args) == 0
    assert "nothing submitted" in capsys.readouterr().out
    return tmp_path / "jobs" / "train.sbatch"


# (the `train:` mapping of jobs.yaml beyond store / student / out, the `--train.FIELD` flags, train_slurm)
CASES = {
    "default recipe, cot": ({}, ["--train.lr", "3e-4"], SINGLE),
    "kava recipe, latent": ({"mode": "latent"}, ["--train.lr", "3e-4"], SINGLE),
    "kava recipe, latent, multi-node": ({"mode": "latent", "max_steps": 500}, ["--train.lr", "3e-4"], MULTI),
    # A recipe field set to TrainConfig's own default stays set; --warmup-steps drops kava's warmup_ratio.
    "kava recipe, overridden": (
        {"mode": "latent", "weight_decay": 0.0, "lora_r": 16},
        ["--train.warmup-steps", "10"],
        SINGLE,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_slurm_training_job_resolves_to_what_kvdistill_train_builds_from_the_same_settings(case, tmp_path, capsys):
    extra, flags, train_slurm = CASES[case]
    store, out = str(tmp_path / "kv.zarr"), str(tmp_path / "run")
    train = {"store": store, "student": {"name_or_path": STUDENT}, "out": out, **extra}
    script = _jobs_slurm(tmp_path, train, flags, train_slurm, capsys)
    job = _resolve(_train_argv(script))

    # The same settings on the command line: the `train:` mapping as a --config file, the flags as flags,
    # and what train.sbatch adds (--resume auto: it continues its own checkpoints; --requeue-on-usr1).
    cli_yaml = tmp_path / "cli-train.yaml"
    cli_yaml.write_text(dump_yaml(train))
    own = [f.removeprefix("--train.") for f in flags[::2]]
    cli_flags = [x for name, value in zip(own, flags[1::2], strict=True) for x in (f"--{name}", value)]
    requeue = ["--requeue-on-usr1"] if train_slurm.get("requeue", True) else []
    expected = _resolve(
        ["train", "--config", str(cli_yaml), *cli_flags, "--resume", "auto", *requeue, "--no-progress"]
    )
    assert job == expected

    # ... and it is the recipe's TrainConfig, not TrainConfig's plain defaults.
    if extra.get("mode") == "latent":
        assert job.mode == "latent" and job.lora_alpha == 32 and job.grad_clip == 2.0
        assert job.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"] and job.codi_weight == 10.0
        if case == "kava recipe, overridden":
            assert (job.lora_r, job.weight_decay, job.warmup_steps, job.warmup_ratio) == (16, 0.0, 10, None)
        else:
            assert (job.lora_r, job.weight_decay, job.warmup_ratio, job.lr) == (128, 0.1, 0.05, 3e-4)
    else:
        assert (job.mode, job.lora_r, job.weight_decay, job.grad_clip, job.lr) == ("cot", 0, 0.0, 1.0, 3e-4)
    assert job.store == store and job.out == out and job.resume == "auto"

    # configs/train.yaml holds what the user set, not an expanded TrainConfig that would hide the recipe.
    written = load_yaml((tmp_path / "jobs" / "configs" / "train.yaml").read_text())
    assert set(written) == set(train) | {name.replace("-", "_") for name in own}


def test_a_train_config_object_given_in_python_is_trained_as_it_is(tmp_path):
    """A TrainConfig built in Python is a whole config (as `train(cfg)` takes it): the job trains it
    field for field, whatever the recipe of its mode would set."""
    student = ModelSpec(name_or_path=STUDENT)
    for mode in ("cot", "latent"):
        train = TrainConfig(
            store=str(tmp_path / "kv.zarr"), student=student, out=str(tmp_path / f"run-{mode}"), mode=mode, lr=3e-4
        )
        cfg = JobsConfig(
            teachers=[ModelSpec(name_or_path="Qwen/Qwen2-7B", name="teacher-a")],
            dump=DumpTask(student=student, store=str(tmp_path / "kv.zarr"), num_shards=2),
            jobs_dir=str(tmp_path / f"jobs-{mode}"),
            train=train,
            train_slurm=SlurmSpec(gpus=1),
        )
        job = _resolve(_train_argv(write_scripts(cfg)["train"]))
        assert job.to_dict() == {**train.to_dict(), "resume": "auto", "requeue_on_usr1": True}
        assert job.lora_r == 0


def test_the_train_script_names_its_recipe(tmp_path, capsys):
    store = str(tmp_path / "kv.zarr")
    train = {"store": store, "student": {"name_or_path": STUDENT}, "out": str(tmp_path / "run"), "mode": "latent"}
    argv = _train_argv(_jobs_slurm(tmp_path, train, [], SINGLE, capsys))
    assert "--recipe" in argv and argv[argv.index("--recipe") + 1] == "kava"
