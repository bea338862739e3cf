"""The trainer's faults around the steps (issue 24): a full disk while saving a checkpoint or
the final model is one line and exit 5 with nothing half-written left; a divergence names the
step that failed (1-based, as metrics.jsonl counts); a signal while `kvdistill` starts is one
line and exit 143; one run writes a run directory at a time (exit 6 naming the owner)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from test_errors import one_line

import kvdistill.train.checkpoint as checkpoint
import kvdistill.train.loop as loop
from kvdistill.cli import ExitCode, main
from kvdistill.schemas import CompareConfig
from kvdistill.store.lock import FileLock


def _train(tiny_store, out, *extra: str) -> int:
    return main(
        [
            "train",
            "--store",
            str(tiny_store["store"]),
            "--student",
            tiny_store["student"].name_or_path,
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_exit_5_and_leaves_no_partial(
    tiny_store, tmp_path, monkeypatch, capsys
):
    def full(*args, **kw):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054"
        )  # torch.save's words for ENOSPC

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint, "_free", lambda path: 4096)
    assert _train(tiny_store, tmp_path / "run", "--save-every", "1") == ExitCode.ENVIRONMENT == 5
    line = one_line(capsys, "train")
    assert f"disk full at {tmp_path / 'run' / 'checkpoints' / 'step-0000001'}" in line and "free space there" in line
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the partial folder is gone: its space is back


def test_a_full_disk_while_saving_the_final_model_leaves_no_half_final(tiny_store, tmp_path, monkeypatch, capsys):
    real = loop.save_student

    def full(accelerator, model, cfg, tokenizer, out, save_extra):
        real(accelerator, model, cfg, tokenizer, out, save_extra)
        raise Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(loop, "save_student", full)
    assert _train(tiny_store, tmp_path / "run") == ExitCode.ENVIRONMENT
    assert f"disk full at {tmp_path / 'run' / 'final'}" in one_line(capsys, "train")
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / ".final.partial").exists()


def test_a_second_run_on_one_run_directory_is_busy_naming_the_first(tiny_store, tmp_path, capsys):
    out = tmp_path / "run"
    with FileLock(out / ".kvdistill.lock", "another run"):
        assert _train(tiny_store, out) == ExitCode.BUSY == 6
        line = one_line(capsys, "train")
        assert f"run directory {out} is being written by" in line and "pid" in line and "another --out" in line
    assert _train(tiny_store, out) == 0  # free again once the first is done
    assert not (out / ".kvdistill.lock").exists()


def test_a_second_compare_on_one_folder_is_busy(tmp_path):
    from kvdistill.compare import run_compare
    from kvdistill.store.errors import ShardBusy

    with (
        FileLock(tmp_path / "cmp" / ".kvdistill.lock", "another compare"),
        pytest.raises(ShardBusy, match="compare directory .* is being written by"),
    ):
        run_compare(CompareConfig(out=str(tmp_path / "cmp")), progress=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_while_kvdistill_starts_is_one_line_and_exit_143(tiny_store, tmp_path, sig):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvdistill",
            "train",
            "--store",
            str(tiny_store["store"]),
            "--student",
            tiny_store["student"].name_or_path,
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    time.sleep(0.6)  # python is up, the imports (torch, transformers: seconds) are not done
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert f"preempted ({sig.name}) while starting, before `kvdistill train` did any work: nothing was written" in err
