"""Preemption-safe training: SIGTERM or SIGUSR1 lets the running step finish, saves a complete
checkpoint of it and raises Preempted (exit code 143); `--resume auto` continues from the latest
complete checkpoint bit for bit; a half-written checkpoint is never picked; metrics.jsonl is
appended without the steps replayed after a resume.

In-process runs get the signal from inside optimizer step k (the scheduler's step sends it to
this process), so the step it stops after is exact; two tests send it from outside: to the
`kvdistill train` process, and to one rank of a 2-process DDP run.
48 samples / batch 16 = 3 batches an epoch: step 2 is mid-epoch, step 3 ends epoch 0."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_latent_train import _cfg as _latent_cfg
from test_resume import _assert_bitwise_equal, _final_weights, _latent_final

from kvdistill.errors import Preempted
from kvdistill.schemas import TrainConfig
from kvdistill.train.loop import train

STEPS, PER_EPOCH = 7, 3
COMMON = dict(batch_size=16, shuffle_buffer=16, max_steps=STEPS, warmup_steps=1, log_every=1, device="cpu")
ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_store, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{"store": str(tiny_store["store"]), "student": tiny_store["student"], "out": str(out), **COMMON, **kw}
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _signal_in_step(monkeypatch, step: int, signum: int) -> None:
    """The next recipe run sends `signum` to this process inside optimizer step `step`."""

    class AdamW(torch.optim.AdamW):
        calls = 0

        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            AdamW.calls += 1
            if AdamW.calls == step:
                signal.raise_signal(signum)
            return out

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)


@pytest.fixture
def untaken_signals():
    """SIGTERM / SIGUSR1 handlers that fail the test if the trainer leaves a signal to them
    (instead of killing pytest); they must be back in place after the run."""

    def untaken(signum, _frame):
        raise AssertionError(f"the trainer did not take {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, untaken) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield untaken
    for s, h in previous.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def straight(tiny_store, tmp_path_factory):
    """The uninterrupted run, a checkpoint every step: the reference, and checkpoints to copy."""
    out = tmp_path_factory.mktemp("preempt") / "straight"
    train(_cfg(tiny_store, out, save_every=1), progress=False)
    return out


def _assert_only_complete_checkpoints(run: Path) -> None:
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert all(n.startswith("step-") for n in names), names  # no .partial / .old left behind
    assert all((run / "checkpoints" / n / "loader.json").is_file() for n in names)


@pytest.mark.parametrize(
    "signum, at, position",
    [(signal.SIGUSR1, 2, (0, 32)), (signal.SIGTERM, PER_EPOCH, (1, 0)), (signal.SIGUSR1, PER_EPOCH, (1, 0))],
    ids=["SIGUSR1-mid-epoch", "SIGTERM-epoch-end", "SIGUSR1-epoch-end"],
)
def test_a_signalled_run_saves_its_step_exits_143_and_resume_auto_ends_bitwise_identical(
    tiny_store, straight, tmp_path, monkeypatch, untaken_signals, signum, at, position
):
    out = tmp_path / "run"
    _signal_in_step(monkeypatch, at, signum)
    with pytest.raises(Preempted) as stopped:
        train(_cfg(tiny_store, out), progress=False)  # no --save-steps: the signal alone writes a checkpoint
    assert stopped.value.code == 143
    ckpt = out / "checkpoints" / f"step-{at:07d}"
    assert stopped.value.message.startswith(
        f"preempted ({signum.name}) after step {at}: checkpoint {ckpt} is complete"
    )
    pos = json.loads((ckpt / "loader.json").read_text())
    assert (pos["step"], pos["epoch"], pos["samples_in_epoch"]) == (
        at,
        *position,
    )  # an epoch's end resumes at the next one
    assert not (out / "final").exists()
    assert [r["step"] for r in _metrics(out)] == list(range(1, at + 1))
    _assert_only_complete_checkpoints(out)
    assert signal.getsignal(signal.SIGUSR1) is untaken_signals and signal.getsignal(signal.SIGTERM) is untaken_signals

    monkeypatch.undo()
    train(_cfg(tiny_store, out, resume="auto"), progress=False)
    _assert_bitwise_equal(_final_weights(out), _final_weights(straight))
    assert _metrics(out) == _metrics(straight)  # appended: every step once, with the same values


def test_a_signal_on_a_save_steps_step_writes_that_checkpoint_once(
    tiny_store, tmp_path, monkeypatch, untaken_signals, capsys
):
    _signal_in_step(monkeypatch, 2, signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        train(_cfg(tiny_store, tmp_path / "run", save_every=2), progress=False)
    assert "after step 2:" in stopped.value.message
    assert stopped.value.message.endswith(
        "continue with the same command and --resume auto (--requeue-on-usr1: a SLURM job requeues itself)"
    )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]
    assert (
        f"kvdistill train: SIGUSR1 after step 2: saving checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-0000002'}"
        in capsys.readouterr().out
    )


def test_resume_auto_skips_half_written_checkpoints_and_a_new_save_replaces_them(
    tiny_store, straight, tmp_path, capsys
):
    """A checkpoint being written lives in .step-N.partial until it is complete (here: step 5,
    complete but for the rename); a step-N without loader.json (step 6) is one an older
    version was killed writing. Neither is picked: the run resumes from step 4."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    for s in range(1, 5):
        shutil.copytree(straight / "checkpoints" / f"step-{s:07d}", ckpts / f"step-{s:07d}")
    shutil.copytree(straight / "checkpoints" / "step-0000005", ckpts / ".step-0000005.partial")
    shutil.copytree(straight / "checkpoints" / "step-0000006", ckpts / "step-0000006")
    (ckpts / "step-0000006" / "loader.json").unlink()

    train(_cfg(tiny_store, out, resume="auto", save_every=1), progress=False)
    assert f"resuming from {ckpts / 'step-0000004'} at step 4" in capsys.readouterr().out
    _assert_bitwise_equal(_final_weights(out), _final_weights(straight))
    _assert_only_complete_checkpoints(out)  # the stale .partial was cleared, the broken step-6 replaced
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{s:07d}" for s in range(1, STEPS + 1)]


def test_a_checkpoint_killed_mid_write_never_appears_and_resume_auto_takes_the_one_before(
    tiny_store, straight, tmp_path, monkeypatch
):
    """The process dies inside the save of step 4 (simulated: save_state writes, then fails);
    no step-4 checkpoint exists, and --resume auto continues from step 2."""
    real = Accelerator.save_state

    def dies_at_step_4(self, output_dir, *args, **kwargs):
        real(self, output_dir, *args, **kwargs)
        if "0000004" in str(output_dir):
            raise SystemExit("killed mid-write (simulated: no Python cleanup runs, as after kill -9)")

    monkeypatch.setattr(Accelerator, "save_state", dies_at_step_4)
    with pytest.raises(SystemExit, match="simulated"):
        train(_cfg(tiny_store, tmp_path / "run", save_every=2), progress=False)
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-0000004.partial", "step-0000002"]
    train(_cfg(tiny_store, tmp_path / "run", save_every=2, resume="auto"), progress=False)
    _assert_bitwise_equal(_final_weights(tmp_path / "run"), _final_weights(straight))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004", "step-0000006"]


def test_metrics_after_a_resume_hold_every_step_once_and_drop_a_cut_off_row(tiny_store, straight, tmp_path):
    """The run stops at step 5 with its last checkpoint at 4, so the resume replays step 5: it
    is not logged twice (before the fix: 1 2 3 4 5 5 6 7). A row cut off by a kill is dropped."""
    out = tmp_path / "run"
    train(_cfg(tiny_store, out, save_every=2, stop_at_step=5), progress=False)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "epoch": 1, "lr": 0.00')
    train(_cfg(tiny_store, out, save_every=2, resume="auto"), progress=False)
    assert _metrics(out) == _metrics(straight)
    _assert_bitwise_equal(_final_weights(out), _final_weights(straight))


def test_latent_mode_stops_on_a_signal_and_resume_auto_ends_bitwise_identical(
    latent_store, tmp_path, monkeypatch, untaken_signals
):
    common = dict(max_steps=4, batch_size=4, shuffle_buffer=8)
    train(_latent_cfg(latent_store, tmp_path / "straight", **common), progress=False)
    _signal_in_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        train(_latent_cfg(latent_store, tmp_path / "run", **common), progress=False)
    assert stopped.value.message.startswith(
        f"preempted (SIGTERM) after step 2: checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-0000002'} is complete"
    )
    monkeypatch.undo()
    train(_latent_cfg(latent_store, tmp_path / "run", resume="auto", **common), progress=False)
    _assert_bitwise_equal(_latent_final(tmp_path / "run"), _latent_final(tmp_path / "straight"))
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3, 4]


# ------------------------------------------------------------------ signals from outside


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl holds `step` (the run is under way), or fail with the process's output."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if any(json.loads(r)["step"] >= step for r in rows if r.endswith("}")):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"the run did not reach step {step} (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SLURM_JOB_ID", None)
    return env


def test_kvdistill_train_sent_sigusr1_saves_exits_143_with_one_line_and_resume_auto_ends_bitwise(tiny_store, tmp_path):
    """The real process, signalled from outside while it trains; the resumed run (in this
    process) ends with the uninterrupted run's weights."""
    cfg = _cfg(
        tiny_store, tmp_path / "run", batch_size=4, max_steps=40
    )  # ~1 s of steps left after step 2 to signal in
    cfg.save(tmp_path / "train.yaml")
    cmd = [
        sys.executable,
        "-m",
        "kvdistill",
        "train",
        "--config",
        str(tmp_path / "train.yaml"),
        "--resume",
        "auto",
        "--requeue-on-usr1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path / "run", 2, proc)
    t_signal = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    seconds = time.monotonic() - t_signal
    assert proc.returncode == 143, f"exit {proc.returncode} (0: the run ended before the signal)\n{err[-3000:]}"
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{step:07d}"
    assert f"--resume auto: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting at step 0" in out
    assert f"kvdistill train: SIGUSR1 after step {step}: saving checkpoint {ckpt}" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"kvdistill train: preempted (SIGUSR1) after step {step}: checkpoint {ckpt} is complete (saved in "
    ), err[-2000:]
    assert "not under SLURM (no SLURM_JOB_ID), so not requeued: re-run with --resume auto to continue" in last
    assert json.loads((ckpt / "loader.json").read_text())["step"] == step < 40
    _assert_only_complete_checkpoints(tmp_path / "run")
    print(f"SIGUSR1 at step {step}: kvdistill train exited 143 {seconds:.2f} s after the signal")

    resumed = TrainConfig.load(tmp_path / "train.yaml")
    resumed.resume = "auto"
    train(resumed, progress=False)
    train(_cfg(tiny_store, tmp_path / "straight", batch_size=4, max_steps=40), progress=False)
    _assert_bitwise_equal(_final_weights(tmp_path / "run"), _final_weights(tmp_path / "straight"))
    assert [r["step"] for r in _metrics(tmp_path / "run")] == list(range(1, 41))


def test_ddp_ranks_agree_on_the_step_when_only_one_rank_is_signalled(tiny_store, tmp_path):
    """SIGUSR1 to rank 1 alone: rank 0 stops after the same step (one all-reduce per step), the
    checkpoint holds both ranks' states, nobody hangs in a collective, both exit 143."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed beside this python")
    out = tmp_path / "ddp"
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
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
        "400",
        "--per-device-train-batch-size",
        "4",
        "--logging-steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 2, proc)
    ranks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if ppid == proc.pid and "RANK" in env:
            ranks[int(env["RANK"])] = int(pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGUSR1)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, *ranks.values()):  # the ranks run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail("the DDP run hung after one rank was signalled:\n" + proc.communicate()[1][-3000:])
    assert proc.returncode != 0  # the launcher reports its workers' exit 143
    # Both ranks say it (their stderr writes may land on one line: count the messages, not lines).
    found = re.findall(r"kvdistill train: preempted \(SIGUSR1\) after step (\d+)", err)
    steps = {int(x) for x in found}
    assert len(found) == 2 and len(steps) == 1, err[-3000:]
    step = steps.pop()
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    assert json.loads((ckpt / "loader.json").read_text())["step"] == step
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}
    _assert_only_complete_checkpoints(out)
