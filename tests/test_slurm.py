"""SLURM job arrays: the generated sbatch scripts (no SLURM needed), and the whole chain
dump arrays -> finalize (afterok) -> train (afterok) on a real single-node SLURM cluster that the
`slurm_cluster` fixture starts from tests/slurm/slurm.conf (skipped when slurm-wlm /
munge are not installed; `make test` installs them as root on Debian)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import _assert_bitwise_equal, _final_weights

from kvdistill.jobs.slurm import array_spec, submit, write_scripts
from kvdistill.schemas import ConfigError, DumpTask, JobsConfig, ModelSpec, SlurmSpec, TrainConfig
from kvdistill.store import shard_is_complete
from kvdistill.train.loop import train

# ---------------------------------------------------------------- generated scripts


@pytest.mark.parametrize(
    "ids, max_parallel, expected",
    [
        ([0], None, "0"),
        ([0, 1, 2, 3], None, "0-3"),
        ([0, 1, 2, 3, 7, 9, 10], None, "0-3,7,9-10"),
        ([10, 9, 3, 2, 2, 0], None, "0,2-3,9-10"),  # unsorted, duplicated
        ([1], 4, "1%4"),
        ([0, 1, 2, 5], 2, "0-2,5%2"),
    ],
)
def test_array_spec_compacts_ids_into_ranges(ids, max_parallel, expected):
    assert array_spec(ids, max_parallel) == expected


def test_array_spec_refuses_an_empty_array():
    with pytest.raises(ValueError, match="no task ids"):
        array_spec([], None)


def jobs_config(tmp_path: Path, **over) -> JobsConfig:
    student = ModelSpec(name_or_path="Qwen/Qwen2-0.5B")
    kw = dict(
        teachers=[
            ModelSpec(name_or_path="Qwen/Qwen2-7B", name="teacher-a"),
            ModelSpec(name_or_path="meta-llama/Llama-3.1-8B", name="teacher-b"),
        ],
        dump=DumpTask(student=student, store=str(tmp_path / "kv.zarr"), num_shards=4),
        slurm=SlurmSpec(
            partition="gpu",
            account="proj",
            qos="high",
            gpus=2,
            cpus=12,
            mem="80G",
            time="02:30:00",
            max_parallel=3,
            extra=["--constraint=a100", "--exclusive"],
        ),
        jobs_dir=str(tmp_path / "jobs"),
        train=TrainConfig(store=str(tmp_path / "kv.zarr"), student=student, out=str(tmp_path / "run")),
        train_slurm=SlurmSpec(nodes=2, gpus=4, cpus=32, mem="200G", time="1-00:00:00", requeue=False),
    )
    return JobsConfig(**{**kw, **over})


def sbatch_options(script: Path) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_scripts_are_valid_bash_with_the_configured_resources_and_dump_command(tmp_path):
    cfg = jobs_config(tmp_path)
    scripts = write_scripts(cfg, "jobs.yaml")
    jobs = tmp_path / "jobs"
    assert list(scripts) == ["dump-teacher-a", "dump-teacher-b", "finalize", "train"]
    for path in scripts.values():
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True).returncode == 0, (
            path.read_text()
        )
        assert path.read_text().startswith("#!/bin/bash\n") and "set -euo pipefail" in path.read_text()
    assert (jobs / "logs").is_dir()

    for t in ("teacher-a", "teacher-b"):
        script = scripts[f"dump-{t}"]
        assert script == jobs / f"dump-{t}.sbatch"
        assert sbatch_options(script) == [
            f"--job-name=kvd-dump-{t}",
            "--array=0-3%3",
            f"--output={jobs}/logs/dump-{t}-%A_%a.out",
            "--requeue",
            "--partition=gpu",
            "--account=proj",
            "--qos=high",
            "--nodes=1",
            "--gres=gpu:2",
            "--cpus-per-task=12",
            "--mem=80G",
            "--time=02:30:00",
            "--constraint=a100",
            "--exclusive",
        ]
        text = script.read_text()
        yaml = jobs / "configs" / f"dump-{t}.yaml"
        assert (
            f"exec {sys.executable} -m kvdistill dump --config {yaml} --shard $SLURM_ARRAY_TASK_ID --no-progress"
            in text
        )
        assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in text
        # The per-teacher config is the array's task 0 with an absolute store; --shard overrides.
        task = cfg.task(cfg.teachers[0 if t == "teacher-a" else 1], 0)
        from kvdistill.schemas import DumpConfig

        saved = DumpConfig.load(yaml)
        assert saved.store == str(tmp_path / "kv.zarr") and saved.teacher.short_name == t
        assert saved.to_dict() == {**task.to_dict(), "store": saved.store}

    fin = sbatch_options(scripts["finalize"])
    assert not any(o.startswith("--gres") for o in fin) and "--requeue" not in fin
    assert f"--output={jobs}/logs/finalize-%j.out" in fin and "--cpus-per-task=1" in fin
    assert "--partition=gpu" in fin and "--constraint=a100" not in fin
    assert f"-m kvdistill store finalize {tmp_path / 'kv.zarr'}" in scripts["finalize"].read_text()

    train = scripts["train"].read_text()
    opts = sbatch_options(scripts["train"])
    assert {"--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4", "--cpus-per-task=32", "--mem=200G"} <= set(opts)
    assert "--requeue" not in opts
    # multi-process: SIGUSR1 goes to every step's processes (no B:); the ranks take it, the shells and
    # launchers ignore it
    assert {"--signal=USR1@300", "--open-mode=append"} <= set(opts)
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in train
    assert "\ntrap '' USR1" in train
    assert (
        f'srun bash -c \'trap "" USR1; exec {sys.executable} -m accelerate.commands.launch --multi_gpu --num_machines'
        " $SLURM_NNODES "
        "--num_processes $((SLURM_NNODES * 4)) --machine_rank $SLURM_NODEID --main_process_ip $MASTER_ADDR "
        f"--main_process_port 29500 -m kvdistill train --recipe default --config {jobs}/configs/train.yaml --resume"
        " auto --no-progress'" in train
    )  # requeue: false, so no --requeue-on-usr1
    assert TrainConfig.load(jobs / "configs" / "train.yaml").store == str(tmp_path / "kv.zarr")


def test_cpu_only_dump_has_no_gres_and_single_process_training_runs_plain(tmp_path):
    cfg = jobs_config(
        tmp_path,
        slurm=SlurmSpec(gpus=0, cpus=2, mem="4G", time="00:10:00", requeue=False),
        train_slurm=SlurmSpec(gpus=1, cpus=4),
    )
    scripts = write_scripts(cfg)
    dump = sbatch_options(scripts["dump-teacher-a"])
    assert "--array=0-3" in dump and not any(
        o.startswith(("--gres", "--partition", "--account", "--qos")) for o in dump
    )
    assert "--requeue" not in dump
    train = scripts["train"].read_text()
    assert "srun" not in train and "accelerate" not in train and "--ntasks-per-node" not in train
    # exec: the trainer is the batch shell, so SIGUSR1 (B:, 300 s before the limit) reaches it, and it requeues the job
    assert (
        f"exec {sys.executable} -m kvdistill train --recipe default --config {tmp_path}/jobs/configs/train.yaml"
        " --resume auto --requeue-on-usr1 --no-progress" in train
    )
    assert {"--gres=gpu:1", "--requeue", "--signal=B:USR1@300", "--open-mode=append"} <= set(
        sbatch_options(scripts["train"])
    )


def test_train_script_signal_requeue_and_resume_follow_train_slurm(tmp_path):
    scripts = write_scripts(jobs_config(tmp_path, train_slurm=SlurmSpec(gpus=1, requeue=False, signal_seconds=0)))
    opts, text = sbatch_options(scripts["train"]), scripts["train"].read_text()
    assert not any(o.startswith(("--signal", "--requeue")) for o in opts) and "--open-mode=append" in opts
    assert "--config" in text and text.rstrip().endswith("--resume auto --no-progress")  # no --requeue-on-usr1
    assert "--signal=B:USR1@90" in sbatch_options(
        write_scripts(jobs_config(tmp_path, train_slurm=SlurmSpec(gpus=1, signal_seconds=90)))["train"]
    )


def test_a_train_signal_not_before_the_time_limit_or_a_foreign_resume_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"train_slurm.signal_seconds: 300 s is not before the time limit 00:05:00 \(300 s\); lower it",
    ):
        jobs_config(tmp_path, train_slurm=SlurmSpec(time="00:05:00"))
    jobs_config(
        tmp_path, train=None, slurm=SlurmSpec(time="00:05:00"), train_slurm=SlurmSpec(time="00:05:00")
    )  # no training job: fine
    with pytest.raises(ConfigError, match=r"SlurmSpec.signal_seconds: must lie in \[0, 65535\], got -1"):
        SlurmSpec(signal_seconds=-1)
    with pytest.raises(ConfigError, match=r"SlurmSpec.time: '4h' is not an sbatch time"):
        SlurmSpec(time="4h").time_seconds()
    cfg = jobs_config(tmp_path)
    cfg.train.resume = str(tmp_path / "old-run")
    with pytest.raises(
        ValueError,
        match=r"train.sbatch resumes with --resume auto from train.out .* set train.out to the run directory",
    ):
        write_scripts(cfg)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("02:30:00", 9000),
        ("1-12", 129600),
        ("1-00:30", 88200),
        ("1-00:00:05", 86405),
        ("UNLIMITED", None),
    ],
)
def test_slurm_time_limits_read_in_every_sbatch_format(text, seconds):
    assert SlurmSpec(time=text).time_seconds() == seconds


def test_no_train_config_writes_no_train_script(tmp_path):
    scripts = write_scripts(jobs_config(tmp_path, train=None))
    assert list(scripts) == ["dump-teacher-a", "dump-teacher-b", "finalize"]


def test_dry_run_submits_nothing_and_chains_dumps_to_finalize_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch reachable: a dry run must not need one
    scripts = write_scripts(jobs_config(tmp_path))
    plan = submit(scripts, dry_run=True)
    assert [(name, job) for name, _, job in plan] == [
        ("dump-teacher-a", None),
        ("dump-teacher-b", None),
        ("finalize", None),
        ("train", None),
    ]
    argv = {name: a for name, a, _ in plan}
    assert argv["dump-teacher-a"] == ["sbatch", "--parsable", str(scripts["dump-teacher-a"])]
    assert argv["finalize"] == [
        "sbatch",
        "--parsable",
        "--dependency=afterok:<dump-teacher-a>:<dump-teacher-b>",
        str(scripts["finalize"]),
    ]
    assert argv["train"] == ["sbatch", "--parsable", "--dependency=afterok:<finalize>", str(scripts["train"])]


def fake_sbatch(tmp_path: Path, body: str) -> None:
    """An `sbatch` on PATH that logs its argv and runs `body` (numbering jobs 100, 101, ...)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/argv.log\nn=$(wc -l < {tmp_path}/argv.log)\n{body}\n')
    sbatch.chmod(0o755)


def test_submit_passes_real_job_ids_down_the_dependency_chain(tmp_path, monkeypatch):
    fake_sbatch(tmp_path, 'echo "$((99 + n));cluster-x"')  # --parsable on a multi-cluster setup
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    scripts = write_scripts(jobs_config(tmp_path))
    done = submit(scripts, dry_run=False)
    assert [(name, job) for name, _, job in done] == [
        ("dump-teacher-a", "100"),
        ("dump-teacher-b", "101"),
        ("finalize", "102"),
        ("train", "103"),
    ]
    assert done[2][1][2] == "--dependency=afterok:100:101"
    assert done[3][1][2] == "--dependency=afterok:102"
    assert len((tmp_path / "argv.log").read_text().splitlines()) == 4


def test_sbatch_failure_raises_with_its_stderr_the_command_and_what_was_submitted(tmp_path, monkeypatch):
    fake_sbatch(
        tmp_path,
        'if [ "$n" = 2 ]; then echo "sbatch: error: invalid partition specified: gpu" >&2; exit 1; fi; echo $((99'
        " + n))",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    scripts = write_scripts(jobs_config(tmp_path))
    with pytest.raises(RuntimeError) as err:
        submit(scripts, dry_run=False)
    msg = str(err.value)
    assert "invalid partition specified: gpu" in msg
    assert f"sbatch --parsable {scripts['dump-teacher-b']}" in msg
    assert "already submitted: dump-teacher-a = job 100" in msg


# ---------------------------------------------------------------- a real single-node cluster

SLURM_CONF = Path(__file__).resolve().parent / "slurm" / "slurm.conf"  # a single-node config, kept in the repository
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol", "munge")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:  # a daemon reparented to an init that does not reap it stays a zombie: that is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


def _wait(predicate, timeout: float, step: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _tail(path: Path, n: int = 30) -> str:
    if not path.exists():
        return f"--- {path}: does not exist"
    return f"--- {path} (last {n} lines):\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _munge_works() -> bool:
    return (
        subprocess.run(f"{_which('munge')} -n | {_which('unmunge')}", shell=True, capture_output=True).returncode == 0
    )


def _start_munged(state: Path) -> int | None:
    """Start munged as the munge user unless one already answers; its pid if we started it."""
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    if _munge_works():
        return None
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    with open(state / "munged.start.log", "w") as log:
        subprocess.run(
            ["runuser", "-u", "munge", "--", _which("munged")], stdout=log, stderr=subprocess.STDOUT, check=False
        )
    if not _wait(_munge_works, 10):
        pytest.fail(
            "munged did not start:\n"
            + _tail(state / "munged.start.log")
            + "\n"
            + _tail(Path("/var/log/munge/munged.log"))
        )
    return int((run / "munged.pid").read_text())


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A private single-node SLURM cluster (slurmctld + slurmd on free ports, munged if none runs)
    for this module; SLURM_CONF points the clients at it. Teardown cancels leftover jobs and stops
    exactly the daemons started here."""
    missing = [n for n in DAEMONS + CLIENTS + ("unmunge", "mungekey", "runuser") if not _which(n)]
    if missing:
        pytest.skip(
            f"SLURM not installed (missing {', '.join(missing)}); `make test` installs slurm-wlm and munge as root"
        )
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM test runs slurmd / slurmctld as root (SlurmUser=root); run as root")

    state = tmp_path_factory.mktemp("slurm")
    (state / "state").mkdir()
    (state / "spool").mkdir()
    conf = SLURM_CONF.read_text().replace("STATE_DIR", str(state))
    # Own ports, so a cluster of a concurrent test run (or a real one) on this machine does not
    # answer; no more CPUs / memory than this machine has, or slurmd's node would be drained.
    conf = re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={_free_port()}", conf)
    conf = re.sub(r"(?m)^SlurmdPort=\d+", f"SlurmdPort={_free_port()}", conf)
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    conf = re.sub(r"CPUs=(\d+)", lambda m: f"CPUs={min(int(m[1]), os.cpu_count() or 1)}", conf)
    conf = re.sub(r"RealMemory=(\d+)", lambda m: f"RealMemory={min(int(m[1]), mem_mb - 1024)}", conf)
    conf_path = state / "slurm.conf"
    conf_path.write_text(conf)

    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(conf_path))
    mp.setenv("HF_HUB_OFFLINE", "1")  # sbatch exports this environment to the jobs
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    started: dict[str, int] = {}

    def stop() -> None:
        ids = subprocess.run([_which("squeue"), "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run([_which("scancel"), *sorted(set(ids))], capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):  # clients first, munge last
            if name in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started[name], 15)
        for name, pid in started.items():
            if not _wait(lambda pid=pid: not _alive(pid), 15):
                print(f"{name} (pid {pid}) did not stop within 15 s")
        mp.undo()

    try:
        munged = _start_munged(state)
        if munged is not None:
            started["munged"] = munged
        for name, argv in (
            ("slurmctld", [_which("slurmctld"), "-f", str(conf_path)]),
            ("slurmd", [_which("slurmd"), "-f", str(conf_path), "-N", "localhost"]),
        ):
            with open(state / f"{name}.start.log", "w") as log:  # daemons: a file, never a pipe we would wait on
                rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
            pid_file = state / f"{name}.pid"
            if rc != 0 or not _wait(lambda p=pid_file: p.exists() and p.read_text().strip(), 10):
                pytest.fail(
                    f"{name} did not start (exit {rc}):\n"
                    + _tail(state / f"{name}.start.log")
                    + "\n"
                    + _tail(state / f"{name}.log")
                )
            started[name] = int(pid_file.read_text())

        def idle() -> bool:
            out = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], capture_output=True, text=True).stdout
            return out.strip() == "idle"

        if not _wait(idle, 60, 0.5):
            info = subprocess.run([_which("sinfo"), "-N", "-l"], capture_output=True, text=True)
            pytest.fail(
                f"the node is not idle after 60 s:\n{info.stdout}{info.stderr}\n"
                + _tail(state / "slurmctld.log")
                + "\n"
                + _tail(state / "slurmd.log")
            )
    except BaseException:
        stop()
        raise
    yield state
    stop()


def _scontrol_job(job: str) -> list[dict[str, str]]:
    """`scontrol show job` of a job (every task of an array) as key=value dicts."""
    out = subprocess.run([_which("scontrol"), "-o", "show", "job", job], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


@pytest.mark.slow  # a real single-node SLURM cluster
def test_dump_arrays_finalize_and_train_run_as_a_real_slurm_dependency_chain(
    slurm_cluster, make_model, tiny_data, tmp_path
):
    state = slurm_cluster
    teachers = [
        ModelSpec(
            name_or_path=str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32)),
            name="teacher-a",
        ),
        ModelSpec(
            name_or_path=str(make_model("llama", layers=2, hidden=64, heads=4, kv_heads=1, head_dim=16)),
            name="teacher-b",
        ),
    ]
    student = ModelSpec(
        name_or_path=str(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)),
        name="student",
    )
    store = tmp_path / "kv.zarr"
    cfg = JobsConfig(
        teachers=teachers,
        dump=DumpTask(student=student, store=str(store), data=tiny_data, num_shards=2, batch_size=8, device="cpu"),
        slurm=SlurmSpec(partition="debug", gpus=0, cpus=1, mem="1G", time="00:10:00", max_parallel=2),
        jobs_dir=str(tmp_path / "jobs"),
        train=TrainConfig(
            store=str(store),
            student=student,
            out=str(tmp_path / "run"),
            max_steps=2,
            warmup_steps=0,
            batch_size=8,
            log_every=1,
            device="cpu",
        ),
        train_slurm=SlurmSpec(partition="debug", gpus=0, cpus=1, mem="2G", time="00:10:00", requeue=False),
    )
    t0 = time.monotonic()
    scripts = write_scripts(cfg)
    jobs = {name: job for name, _, job in submit(scripts, dry_run=False)}
    assert all(job and job.isdigit() for job in jobs.values()), jobs

    def drained() -> bool:
        # A failed job leaves its dependants pending forever (DependencyNeverSatisfied): stop there.
        queue = subprocess.run([_which("squeue"), "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout
        return not queue.strip() or "DependencyNeverSatisfied" in queue

    logs = tmp_path / "jobs" / "logs"
    if not _wait(drained, 240, 1.0):
        queue = subprocess.run([_which("squeue"), "-l"], capture_output=True, text=True).stdout
        pytest.fail(
            f"jobs still queued after 240 s:\n{queue}\n"
            + "\n".join(_tail(p, 10) for p in sorted(logs.glob("*.out")))
            + "\n"
            + _tail(state / "slurmctld.log")
        )
    elapsed = time.monotonic() - t0

    records = {name: _scontrol_job(job) for name, job in jobs.items()}
    failed = {
        name: [(r["JobId"], r["JobState"], r.get("ExitCode")) for r in recs if r["JobState"] != "COMPLETED"]
        for name, recs in records.items()
    }
    assert not any(failed.values()), f"{failed}\n" + "\n".join(_tail(p, 15) for p in sorted(logs.glob("*.out")))

    # Every array ran one task per shard, each into its own log.
    for t in ("teacher-a", "teacher-b"):
        assert sorted(int(r["ArrayTaskId"]) for r in records[f"dump-{t}"]) == [0, 1]
        for i in (0, 1):
            log = logs / f"dump-{t}-{jobs[f'dump-{t}']}_{i}.out"
            assert f"teacher {t} shard {i}:" in log.read_text(), _tail(log)
            assert shard_is_complete(store, t, i)

    # finalize waited for both arrays (afterok) and wrote the index; train waited for finalize.
    def started(name):
        return min(r["StartTime"] for r in records[name])

    def ended(name):
        return max(r["EndTime"] for r in records[name])

    assert started("finalize") >= max(ended("dump-teacher-a"), ended("dump-teacher-b"))
    assert started("train") >= ended("finalize")
    fin_log = logs / f"finalize-{jobs['finalize']}.out"
    assert f"wrote {store / 'index.parquet'}" in fin_log.read_text()
    assert (store / "index.parquet").exists()
    assert (logs / f"train-{jobs['train']}.out").exists()
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    print(f"real SLURM chain (4 dump tasks, finalize, train) finished in {elapsed:.0f} s")


@pytest.mark.slow  # a real single-node SLURM cluster
def test_a_training_job_sent_usr1_requeues_itself_resumes_and_ends_as_an_uninterrupted_run(
    slurm_cluster, tiny_store, tmp_path
):
    """`scancel --signal=USR1 --batch` is what `#SBATCH --signal=B:USR1@300` sends 300 s before the
    time limit. The trainer (the batch shell, by exec) finishes its step, saves a checkpoint,
    runs `scontrol requeue` and exits; the job comes back under the same id and `--resume auto`
    finishes the run. SLURM holds a requeued job ~2 min (BeginTime); the test releases it."""
    state = slurm_cluster
    common = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        max_steps=40,
        batch_size=4,
        shuffle_buffer=16,
        warmup_steps=1,
        log_every=1,
        device="cpu",
    )
    run = tmp_path / "run"
    cfg = JobsConfig(
        teachers=tiny_store["teachers"],
        dump=DumpTask(
            student=tiny_store["student"], store=str(tiny_store["store"]), data=tiny_store["data"], num_shards=2
        ),
        jobs_dir=str(tmp_path / "jobs"),
        train=TrainConfig(out=str(run), **common),
        train_slurm=SlurmSpec(partition="debug", gpus=0, cpus=1, mem="2G", time="00:10:00"),
    )
    script = write_scripts(cfg)["train"]
    t0 = time.monotonic()
    job = submit({"train": script}, dry_run=False)[0][2]
    log = tmp_path / "jobs" / "logs" / f"train-{job}.out"
    timeline = {}

    def step_logged(n: int) -> bool:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        return any(json.loads(r)["step"] >= n for r in rows if r.endswith("}"))

    def record(name: str) -> dict[str, str]:
        r = _scontrol_job(job)[0]
        timeline[name] = round(time.monotonic() - t0, 1)
        return r

    if not _wait(lambda: step_logged(2), 90, 0.05):
        pytest.fail(
            "the training job did not reach step 2 in 90 s:"
            f" {_scontrol_job(job)}\n{_tail(log)}\n{_tail(state / 'slurmctld.log')}"
        )
    record("step 2 logged")
    subprocess.run([_which("scancel"), "--signal=USR1", "--batch", job], check=True)
    record("USR1 sent")
    if not _wait(lambda: (r := _scontrol_job(job)[0])["JobState"] == "PENDING" and int(r["Restarts"]) >= 1, 60, 0.1):
        pytest.fail(f"the job was not requeued: {_scontrol_job(job)}\n{_tail(log)}")
    record("requeued (pending)")
    subprocess.run(
        [_which("scontrol"), "update", f"JobId={job}", "StartTime=now"], check=True
    )  # skip the ~120 s BeginTime hold
    if not _wait(lambda: _scontrol_job(job)[0]["JobState"] == "COMPLETED", 120, 0.2):
        pytest.fail(f"the requeued job did not complete: {_scontrol_job(job)}\n{_tail(log, 40)}")
    rec = record("completed")
    assert rec["Restarts"] == "1" and rec["ExitCode"] == "0:0"

    text = log.read_text()  # --open-mode=append: both attempts
    step = int(re.search(r"kvdistill train: SIGUSR1 after step (\d+): saving checkpoint", text)[1])
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    assert f"kvdistill train: SIGUSR1 after step {step}: saving checkpoint {ckpt}" in text
    assert f"kvdistill train: preempted (SIGUSR1) after step {step}: checkpoint {ckpt} is complete" in text
    assert f"SLURM job {job} requeued (`scontrol requeue {job}`)" in text
    assert f"resuming from {ckpt} at step {step}" in text
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 41)
    )

    train(TrainConfig(out=str(tmp_path / "straight"), **common), progress=False)
    _assert_bitwise_equal(_final_weights(run), _final_weights(tmp_path / "straight"))
    print(
        f"SLURM USR1 -> requeue -> resume timeline (s): {timeline}; stopped after step {step}\n--- {log.name}:\n{text}"
    )
