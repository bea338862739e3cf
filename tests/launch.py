"""Helpers for the tests that launch real multi-process runs of `kvdistill train` (accelerate /
torchrun): the environment, free ports, the process tree of a launcher (torch elastic starts
its workers in sessions of their own, so killing the launcher's group leaves them running),
and the final weights of a run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # as the generated train.sbatch runs it


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: one thread a process (the machine is small and
    shared), no hub, and no SLURM_* of our own (a test suite running inside a SLURM job must not
    make the trainer requeue that job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tiny_store, out: Path, steps: int, *extra: str) -> list[str]:
    """`-m kvdistill train ...` on the tiny store: batch 4 a process, a metrics row every step."""
    return [
        "-m",
        "kvdistill",
        "train",
        "--store",
        str(tiny_store["store"]),
        "--student",
        tiny_store["student"].name_or_path,
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--per-device-train-batch-size",
        "4",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Popen with stdout and stderr into `log` (a pipe nobody reads could fill and stall it)."""
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher that is still running and every process below it (a reaped one's pid
    may belong to someone else by now: it is left alone)."""
    if proc.poll() is not None:
        return
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> dict[str, int]:
    """Every launcher's exit code; past `timeout` seconds in all, every process tree is killed
    and the test fails with the logs' tails (a hang is the failure, not a slow pass)."""
    deadline = time.monotonic() + timeout
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                kill_tree(p)
            tails = "\n".join(f"--- {n} ---\n{logs[n].read_text()[-2000:]}" for n in procs)
            pytest.fail(f"{name} still running after {timeout:.0f} s (hung?); killed every process\n{tails}")
    return codes


def run(cmd: list[str], log: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a launcher to its end; it must exit 0. Returns its output."""
    code = wait_all({"run": start(cmd, log, env)}, {"run": log}, timeout)["run"]
    text = log.read_text()
    assert code == 0, f"exit {code}: {' '.join(cmd)}\n{text[-3000:]}"
    return text


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # a row may be half-written while the run goes on: only whole lines
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def wait_for_step(
    run_dir: Path, step: int, procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float = 180
) -> int:
    """Wait until metrics.jsonl has a row for `step` or later; returns the last logged step.
    Fails (killing the runs) when a launcher ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        rows = metrics(run_dir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        ended = {n: p.poll() for n, p in procs.items() if p.poll() is not None}
        if ended or time.monotonic() > deadline:
            for p in procs.values():
                kill_tree(p)
            tails = "\n".join(f"--- {n} ---\n{logs[n].read_text()[-2000:]}" for n in procs)
            pytest.fail(
                f"no metrics row for step {step} ({'ended: ' + str(ended) if ended else 'timed out'})\n{tails}"
            )
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run saved in RUN/final: the student (*.safetensors) and what the mode adds
    (*.pt: adapters, router, ...), keyed by file and name."""
    final = run_dir / "final"
    out: dict[str, torch.Tensor] = {}
    for path in sorted(final.glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in safetensors.torch.load_file(path).items()})
    for path in sorted(final.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        out.update({f"{path.name}:{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    assert any(k.startswith("model.safetensors:") for k in out), f"no model.safetensors in {final}"
    return out


def compare_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, rtol: float, atol: float
) -> tuple[float, bool]:
    """assert_close on every tensor of two runs (same names); returns (the largest absolute
    difference, whether they are equal bit for bit) to report."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        if a[k].numel():
            worst = max(worst, float((a[k].double() - b[k].double()).abs().max()))
    return worst, all(torch.equal(a[k], b[k]) for k in a)
