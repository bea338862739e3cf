"""The multi-node path of the generated train.sbatch, on this machine: 2 "nodes" x 1 process.

Each node runs what `srun bash -c '...'` runs there (taken from the generated script, with
SLURM_NNODES / SLURM_NODEID / MASTER_ADDR set as SLURM sets them and a free port): an accelerate
launcher per node, the rendezvous on node 0 (torch's static rendezvous, over TCP on localhost).

The stop signal: the script asks SLURM for `--signal=USR1@N` without `B:`, i.e. SIGUSR1 to the
processes of the job step on every node, not to the batch shell; the batch shell and each
launcher ignore it (`trap "" USR1` before `exec`), and the ranks take it. The launcher does not
forward it (torch elastic handles SIGTERM, SIGINT, SIGHUP and SIGQUIT only): a SIGUSR1 that
reaches only a launcher changes nothing, so the ranks must get it themselves, which SLURM's
process tracking does (proctrack/cgroup or linuxproc; the workers run in sessions of their own,
so a process-group delivery, proctrack/pgid, would miss them). Here one node's rank gets it, the
other node learns it through the per-step all-reduce."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
from launch import (
    ACCELERATE,
    children,
    compare_weights,
    final_weights,
    free_port,
    kill_tree,
    launch_env,
    metrics,
    run,
    start,
    wait_all,
    wait_for_step,
)

from kvdistill.jobs.slurm import write_scripts
from kvdistill.schemas import DumpTask, JobsConfig, SlurmSpec, TrainConfig

pytestmark = pytest.mark.slow  # 2-process runs through accelerate launch


def _node_command(tiny_store, tmp_path: Path, out: Path, max_steps: int) -> str:
    """The command the generated train.sbatch has srun run on every node (2 nodes x 1 GPU) for
    a run of `max_steps` into `out` (no periodic checkpoints), the port made a free one."""
    cfg = JobsConfig(
        teachers=tiny_store["teachers"],
        dump=DumpTask(
            student=tiny_store["student"],
            store=str(tiny_store["store"]),
            data=tiny_store["data"],
            num_shards=2,
            device="cpu",
        ),
        jobs_dir=str(tmp_path / "jobs"),
        train=TrainConfig(
            store=str(tiny_store["store"]),
            student=tiny_store["student"],
            out=str(out),
            max_steps=max_steps,
            batch_size=4,
            log_every=1,
            save_every=0,
            device="cpu",
        ),
        train_slurm=SlurmSpec(nodes=2, gpus=1, cpus=1, mem="2G", time="00:10:00", signal_seconds=60, requeue=True),
    )
    sbatch = write_scripts(cfg)["train"].read_text()
    # What the signal test assumes of the script: SIGUSR1 to every step's processes, not the
    # batch shell (B:); the batch shell and the launchers ignore it.
    assert "#SBATCH --signal=USR1@60" in sbatch.splitlines(), sbatch
    srun = [line for line in sbatch.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1, f"expected one `srun bash -c '...'` line in train.sbatch:\n{sbatch}"
    argv = shlex.split(srun[0])
    assert argv[-3:-1] == ["bash", "-c"], srun[0]
    launch = argv[-1]
    assert launch.startswith('trap "" USR1; exec '), launch
    launch, n = re.subn(r"--main_process_port \S+", f"--main_process_port {free_port()}", launch)
    assert n == 1, launch
    return launch


def _node_env(node: int) -> dict[str, str]:
    return launch_env(
        SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID=str(node),
        SLURM_PROCID=str(node),
        SLURM_LOCALID="0",
        MASTER_ADDR="127.0.0.1",
    )


def _start_nodes(launch: str, tmp_path: Path, name: str):
    logs = {f"node{i}": tmp_path / f"{name}-node{i}.log" for i in range(2)}
    procs = {f"node{i}": start(["bash", "-c", launch], logs[f"node{i}"], _node_env(i)) for i in range(2)}
    return procs, logs


def _trainer_args(launch: str) -> list[str]:
    """`-m kvdistill train ...` of the node command (no shell variables in it)."""
    i = launch.index(" -m kvdistill ")
    return shlex.split(launch[i:])


def test_two_nodes_of_one_process_end_with_the_weights_of_two_processes_on_one_node(tiny_store, tmp_path):
    steps = 3
    nodes_out, one_out = tmp_path / "nodes", tmp_path / "one-node"
    launch = _node_command(tiny_store, tmp_path, nodes_out, steps)
    t0 = time.monotonic()
    procs, logs = _start_nodes(launch, tmp_path, "nodes")
    codes = wait_all(procs, logs, timeout=300)
    assert codes == {"node0": 0, "node1": 0}, "\n".join(
        f"--- {n} ---\n{p.read_text()[-3000:]}" for n, p in logs.items()
    )
    t1 = time.monotonic()
    run(
        [
            *ACCELERATE,
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            *_trainer_args(launch),
            "--out",
            str(one_out),
        ],
        tmp_path / "one-node.log",
        launch_env(),
    )
    t2 = time.monotonic()
    for out in (nodes_out, one_out):
        ranks = [json.loads((out / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
        assert [(r["process_index"], r["num_processes"]) for r in ranks] == [(0, 2), (1, 2)]
        assert metrics(out)[-1]["step"] == steps
    worst, bitwise = compare_weights(final_weights(nodes_out), final_weights(one_out), rtol=1e-5, atol=1e-6)
    print(
        f"2 nodes x 1 vs 1 node x 2: max |diff| {worst:.3g} (bit for bit: {bitwise}); 2 nodes {t1 - t0:.1f} s, one"
        f" node {t2 - t1:.1f} s"
    )


def test_sigusr1_reaching_one_node_stops_both_after_the_same_step_with_one_checkpoint(tiny_store, tmp_path):
    out = tmp_path / "run"
    launch = _node_command(
        tiny_store, tmp_path, out, max_steps=2000
    )  # minutes of steps: the run is mid-way when signalled
    t0 = time.monotonic()
    procs, logs = _start_nodes(launch, tmp_path, "run")
    try:
        _signal_one_node(out, procs, logs, t0)
    finally:  # a failed assertion must not leave minutes of training running
        for p in procs.values():
            kill_tree(p)


def _signal_one_node(out: Path, procs, logs, t0: float) -> None:
    first = wait_for_step(out, 1, procs, logs)

    # 1. SIGUSR1 to node 0's launcher alone: ignored, not forwarded; both nodes train on.
    launcher = procs["node0"].pid  # `bash -c 'trap "" USR1; exec python -m accelerate.commands.launch ...'`
    assert b"accelerate.commands.launch" in Path(f"/proc/{launcher}/cmdline").read_bytes()
    procs["node0"].send_signal(signal.SIGUSR1)
    later = wait_for_step(out, first + 3, procs, logs)
    assert all(p.poll() is None for p in procs.values())
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    # 2. SIGUSR1 to node 1's rank (what SLURM's --signal=USR1@N reaches on that node): both
    #    nodes stop after the same step, one checkpoint.
    workers = [
        pid
        for pid in children(procs["node1"].pid)
        if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    ]
    assert len(workers) == 1, workers
    t_signal = time.monotonic()
    os.kill(workers[0], signal.SIGUSR1)
    codes = wait_all(procs, logs, timeout=120)
    seconds = time.monotonic() - t_signal
    text = {n: p.read_text() for n, p in logs.items()}
    tails = "\n".join(f"--- {n} ---\n{t[-3000:]}" for n, t in text.items())

    stopped = {
        n: [int(s) for s in re.findall(r"kvdistill train: preempted \(SIGUSR1\) after step (\d+)", t)]
        for n, t in text.items()
    }
    assert [len(s) for s in stopped.values()] == [1, 1], tails  # each node's rank says it once
    step = stopped["node0"][0]
    assert stopped["node1"] == [step] and later <= step < 2000, (stopped, later)
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    assert f"kvdistill train: SIGUSR1 after step {step}: saving checkpoint {ckpt}" in text["node0"], (
        tails
    )  # the main process, on node 0
    assert (
        "not under SLURM (no SLURM_JOB_ID), so not requeued" in text["node0"]
    )  # node 0's main process took the requeue path
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name]  # exactly one, complete (no .partial left)
    assert json.loads((ckpt / "loader.json").read_text())["step"] == step
    assert {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}
    assert metrics(out)[-1]["step"] == step
    assert not (out / "final").exists()

    # Each rank exits 143; its launcher (torch elastic) reports that as a failed worker and
    # exits 1, which is what srun, and so the job, ends with.
    assert codes == {"node0": 1, "node1": 1}, (codes, tails)
    for n, t in text.items():
        assert re.search(r"exitcode\s*: 143 ", t), (
            f"{n}: no worker exit code 143 in the launcher's report\n{t[-3000:]}"
        )
    print(
        f"SIGUSR1 to node 1's rank after step >= {later}: both nodes stopped after step {step}, "
        f"launchers exited 1 (ranks 143) {seconds:.1f} s after the signal; {time.monotonic() - t0:.1f} s in all"
    )
