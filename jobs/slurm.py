"""SLURM job arrays for a store: one sbatch array per teacher (task id = shard), a CPU finalize
job that waits for all of them, and optionally the student's training job after finalize.

    scripts = write_scripts(cfg)            # jobs_dir/dump-<teacher>.sbatch, finalize.sbatch, ...
    submit(scripts, dry_run=True)           # the sbatch command lines, nothing submitted

The scripts run `sys.executable -m kvdistill ...` so a job uses the environment that wrote it;
a task whose shard is already complete exits at once, so resubmitting an array only redoes what
is missing (`kvdistill jobs status` prints the `--array=` to resubmit).

The training job trains what `kvdistill train` trains from the same settings: configs/train.yaml
holds only the TrainConfig fields the user set (`write_scripts(..., train=...)`), and the job runs
`kvdistill train --recipe R --config configs/train.yaml`, so the recipe of its mode (kava for
mode latent) sits under them, layered by `train_config` as on the command line."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvdistill.schemas import DumpConfig, JobsConfig, ModelSpec, SlurmSpec
from kvdistill.schemas.base import dump_yaml
from kvdistill.train.recipes import default_recipe, train_config

__all__ = ["write_scripts", "submit", "array_spec"]

# finalize only reads offsets and sample ids of every shard: one core, little memory.
FINALIZE_RESOURCES = {"cpus": 1, "mem": "4G", "time": "01:00:00"}
MAIN_PROCESS_PORT = 29500


def array_spec(task_ids: list[int], max_parallel: int | None = None) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> "0-3,7,9-10" (+ "%P": at most P tasks run at once)."""
    ids = sorted(set(task_ids))
    if not ids:
        raise ValueError("array_spec: no task ids; nothing to submit")
    if ids[0] < 0:
        raise ValueError(f"array_spec: task ids must be >= 0, got {ids[0]}")
    runs: list[list[int]] = []  # [first, last] of each run of consecutive ids
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    spec = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"{spec}%{max_parallel}" if max_parallel else spec


def _local_path(value: str) -> str:
    """Absolute path if `value` exists here (a local checkpoint or data file), else unchanged
    (a hub id): jobs may start in another working directory."""
    return str(Path(value).absolute()) if value and Path(value).exists() else value


def _absolute_model(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, name_or_path=_local_path(spec.name_or_path))


def _portable(task: DumpConfig, store: str) -> DumpConfig:
    """The task with absolute local paths (store, checkpoints, data, layer map, projection)."""
    align = task.align
    return dataclasses.replace(
        task,
        store=store,
        teacher=_absolute_model(task.teacher),
        student=_absolute_model(task.student),
        data=dataclasses.replace(task.data, source=_local_path(task.data.source)),
        align=dataclasses.replace(
            align,
            layer_map=align.layer_map if align.layer_map == "ratio" else _local_path(align.layer_map),
            projection=_local_path(align.projection) if align.projection else None,
        ),
        teacher_projection={t: _local_path(p) for t, p in task.teacher_projection.items()},
    )


def _sbatch_lines(res: SlurmSpec, *, job_name: str, output: Path, array: str | None = None) -> list[str]:
    opts = [f"--job-name={job_name}"]
    if array is not None:
        opts.append(f"--array={array}")
    opts.append(f"--output={output}")
    if res.requeue:
        opts.append("--requeue")
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            opts.append(f"--{key}={getattr(res, key)}")
    opts.append(f"--nodes={res.nodes}")
    if res.gpus > 0:
        opts.append(f"--gres=gpu:{res.gpus}")
    opts += [f"--cpus-per-task={res.cpus}", f"--mem={res.mem}", f"--time={res.time}", *res.extra]
    return [f"#SBATCH {o}" for o in opts]


def _script(header: list[str], sbatch: list[str], body: list[str]) -> str:
    # #SBATCH lines must precede the first command; comments may sit among them.
    return "\n".join(["#!/bin/bash", *(f"# {h}" for h in header), *sbatch, "", "set -euo pipefail", *body, ""])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def write_scripts(
    cfg: JobsConfig, config_path: str | None = None, *, train: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write jobs_dir/{dump-<teacher>.sbatch, finalize.sbatch[, train.sbatch]} and the configs
    they run (jobs_dir/configs/*.yaml); return {"dump-<teacher>": path, ..., "finalize": path,
    "train": path} in submission order.

    train: the TrainConfig fields the user set for the training job, a plain (nested) mapping, as
    `kvdistill jobs slurm` passes them (the jobs config's `train:` with the `--train.FIELD` flags
    over it); the job layers the recipe of their mode under them like `kvdistill train`. None:
    cfg.train whole, every field set (a TrainConfig built in Python is trained as it is)."""
    if train is not None and cfg.train is None:
        raise ValueError("write_scripts: train settings given but JobsConfig.train is None (no training job)")
    jobs = Path(cfg.jobs_dir).absolute()
    configs, logs = jobs / "configs", jobs / "logs"
    configs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    py = shlex.quote(sys.executable)
    store = str(Path(cfg.dump.store).absolute())
    origin = f"from {config_path}" if config_path else "from a JobsConfig"
    N = cfg.dump.num_shards
    scripts: dict[str, Path] = {}

    for teacher in cfg.teachers:
        name = teacher.short_name
        task = _portable(cfg.task(teacher, 0), store)
        yaml = task.save(configs / f"dump-{name}.yaml")
        header = [
            f"kvdistill dump array for teacher {name}: task i writes shard i of {N} into",
            f"{store}. Written by `kvdistill jobs slurm` {origin}.",
            "A task whose shard is complete exits at once; resubmit missing shards with",
            f"`sbatch --array=<ids> {jobs / f'dump-{name}.sbatch'}` (see `kvdistill jobs status`).",
        ]
        sbatch = _sbatch_lines(
            cfg.slurm,
            job_name=f"kvd-dump-{name}",
            array=array_spec(list(range(N)), cfg.slurm.max_parallel),
            output=logs / f"dump-{name}-%A_%a.out",  # %A job id, %a task id (= shard)
        )
        body = [
            'if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK; fi',
            (
                f"exec {py} -m kvdistill dump --config {shlex.quote(str(yaml))} --shard $SLURM_ARRAY_TASK_ID"
                " --no-progress"
            ),
        ]
        scripts[f"dump-{name}"] = _write(jobs / f"dump-{name}.sbatch", _script(header, sbatch, body))

    # Same partition / account / qos as the dumps, but CPU only and small; no extra options
    # (they usually name GPU constraints).
    fin = dataclasses.replace(
        cfg.slurm, nodes=1, gpus=0, requeue=False, max_parallel=None, extra=[], **FINALIZE_RESOURCES
    )
    sbatch = _sbatch_lines(fin, job_name="kvd-finalize", output=logs / "finalize-%j.out")
    header = [
        f"kvdistill finalize: check every shard of every teacher is complete and write {store}/index.parquet.",
        "Submitted with --dependency=afterok:<every dump array>, so it starts once all tasks succeeded.",
    ]
    body = [f"exec {py} -m kvdistill store finalize {shlex.quote(store)}"]
    scripts["finalize"] = _write(jobs / "finalize.sbatch", _script(header, sbatch, body))

    if cfg.train is not None:
        scripts["train"] = _write_train(cfg, jobs, py, store, cfg.train.to_dict() if train is None else train)
    return scripts


def _write_train(cfg: JobsConfig, jobs: Path, py: str, store: str, settings: Mapping[str, Any]) -> Path:
    # Absolute local paths: the job may start in another working directory.
    settings = dict(settings)
    for key in ("store", "out"):
        if isinstance(settings.get(key), str):
            settings[key] = str(Path(settings[key]).absolute())
    student = settings.get("student")
    if isinstance(student, Mapping) and isinstance(student.get("name_or_path"), str):
        settings["student"] = {**student, "name_or_path": _local_path(student["name_or_path"])}
    # The job runs `kvdistill train --recipe R --config <this file>`: build what it builds (its
    # --resume auto aside), the one code path of recipe < file < flags.
    recipe = default_recipe(settings.get("mode"))
    path = jobs / "configs" / "train.yaml"
    path.write_text(dump_yaml(settings))
    train = train_config(recipe=recipe, config=path)
    if train.store != store:
        raise ValueError(
            f"JobsConfig.train.store {train.store} is not the store the dump arrays write "
            f"({store}); set train.store to dump.store"
        )
    if train.resume not in (None, "auto"):
        raise ValueError(
            f"JobsConfig.train.resume is {train.resume!r}, but train.sbatch resumes with --resume auto from train.out "
            f"({train.out}), so a requeued job continues its own checkpoints; drop train.resume, or set train.out to "
            "the run directory to continue"
        )
    yaml = shlex.quote(str(path))
    res = cfg.train_slurm
    G = res.gpus
    single = G == 0 or res.nodes * G == 1
    sbatch = _sbatch_lines(res, job_name="kvd-train", output=jobs / "logs" / "train-%j.out")
    # A requeued job keeps its job id, so its log file: append, do not truncate the earlier attempts.
    sbatch.append("#SBATCH --open-mode=append")
    if res.signal_seconds:
        # B: the batch shell, which `exec` makes the trainer; multi-process: every step's
        # processes, where the trainers (ranks) take it and the launchers ignore it.
        sbatch.append(f"#SBATCH --signal={'B:' if single else ''}USR1@{res.signal_seconds}")
    header = [
        f"kvdistill train from {store} into {train.out}.",
        (
            f"Its TrainConfig, as `kvdistill train` builds it: recipe {recipe} (train/recipes/{recipe}.yaml) <"
            f" {path.name}"
        ),
        "(the fields set for this job) < the flags below.",
        "Submitted with --dependency=afterok:<finalize>.",
        "SIGUSR1 (the time limit's warning) or SIGTERM (preemption): the trainer finishes its step, saves a",
        "checkpoint and exits 143"
        + (
            "; on SIGUSR1 it requeues this job, which resumes there (--resume auto)."
            if res.requeue
            else "; resubmit to resume (--resume auto)."
        ),
    ]
    args = (
        f"--recipe {recipe} --config {yaml} --resume auto{' --requeue-on-usr1' if res.requeue else ''} --no-progress"
    )
    if single:
        body = [f"exec {py} -m kvdistill train {args}"]
    else:
        sbatch.insert(sbatch.index(f"#SBATCH --nodes={res.nodes}") + 1, "#SBATCH --ntasks-per-node=1")
        launch = (
            'trap "" USR1; '  # the launcher ignores it (it would die of it); its ranks set their own handler
            f"exec {py} -m accelerate.commands.launch --multi_gpu --num_machines $SLURM_NNODES "
            f"--num_processes $((SLURM_NNODES * {G})) --machine_rank $SLURM_NODEID "
            f"--main_process_ip $MASTER_ADDR --main_process_port {MAIN_PROCESS_PORT} "
            f"-m kvdistill train {args}"
        )
        body = [
            f"# one accelerate launcher per node ({res.nodes} nodes x {G} GPUs); node 0 hosts the rendezvous",
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            "trap '' USR1  # this shell too, should a SIGUSR1 meant for the trainers reach it",
            "# single quotes: each node expands its own $SLURM_NODEID inside srun, not the batch shell",
            f"srun bash -c {shlex.quote(launch)}",
        ]
    return _write(jobs / "train.sbatch", _script(header, sbatch, body))


def _job_id(stdout: str) -> str | None:
    """`sbatch --parsable` prints "123" or "123;cluster"."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    m = re.fullmatch(r"(\d+)(?:;\S+)?", lines[-1]) if lines else None
    return m.group(1) if m else None


def submit(scripts: dict[str, Path], *, dry_run: bool) -> list[tuple[str, list[str], str | None]]:
    """sbatch every dump array, then finalize after all of them (afterok), then train after
    finalize. Returns (name, sbatch argv, job id or None when dry_run) per job; in a dry run
    the dependency ids are placeholders like <dump-teacher-a>."""
    unknown = [n for n in scripts if not n.startswith("dump-") and n not in ("finalize", "train")]
    if unknown:
        raise ValueError(f"submit: unknown script name(s) {unknown}; expected dump-<teacher>, finalize, train")
    order = [n for n in scripts if n.startswith("dump-")] + [n for n in ("finalize", "train") if n in scripts]
    ids: dict[str, str] = {}
    out = []
    for name in order:
        if name == "finalize":
            after = [ids[n] for n in order if n.startswith("dump-")]
        elif name == "train":
            after = [ids["finalize"]] if "finalize" in ids else []
        else:
            after = []
        argv = ["sbatch", "--parsable"]
        if after:
            argv.append("--dependency=afterok:" + ":".join(after))
        argv.append(str(scripts[name]))
        if dry_run:
            ids[name] = f"<{name}>"
            out.append((name, argv, None))
            continue
        done = ", ".join(f"{n} = job {ids[n]}" for n in ids) or "nothing"
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError as e:
            raise RuntimeError(
                f"`{shlex.join(argv)}`: sbatch not found; run on a SLURM login node, or use "
                "`kvdistill jobs local` / a dry run"
            ) from e
        job = _job_id(proc.stdout) if proc.returncode == 0 else None
        if job is None:
            raise RuntimeError(
                f"`{shlex.join(argv)}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip() or 'no output'}\n"
                f"already submitted: {done}"
            )
        ids[name] = job
        out.append((name, argv, job))
    return out
