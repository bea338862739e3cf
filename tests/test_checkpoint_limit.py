"""--save-total-limit N keeps the last N checkpoints (RUN_DIR/best and final untouched), and a run
resumes bit for bit from the ones kept. A checkpoint of a student with tied embeddings saves
without accelerate's "Removed shared tensor" warning, and loads with the weights tied again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from torch import nn

from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.train.checkpoint import Position, checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from kvdistill.train.loop import train

WARNING = "Removed shared tensor"
COMMON = dict(
    batch_size=8,
    shuffle_buffer=16,
    max_steps=6,
    warmup_steps=1,
    log_every=1,
    device="cpu",
    save_every=1,
    eval_steps=2,
    val_shards=1,
    val_batches=1,
    metric_for_best_model="val_loss",
)


def _cfg(tiny_store, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{"store": str(tiny_store["store"]), "student": tiny_store["student"], "out": str(out), **COMMON, **kw}
    )


def _steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in checkpoints(run)]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    student = safetensors.torch.load_file(final / "model.safetensors")
    adapters = torch.load(final / "adapters.pt")
    return {**{f"student.{k}": v for k, v in student.items()}, **{f"adapters.{k}": v for k, v in adapters.items()}}


def test_save_total_limit_keeps_the_last_checkpoints_and_best_and_the_run_resumes_from_them(
    tiny_store, tmp_path, capfd, caplog
):
    caplog.set_level(logging.WARNING)
    reference = tmp_path / "all"
    train(_cfg(tiny_store, reference), progress=False)
    assert _steps(reference) == [1, 2, 3, 4, 5, 6]  # no limit: every checkpoint kept, as before

    run = tmp_path / "limited"
    train(_cfg(tiny_store, run, save_total_limit=2, stop_at_step=4), progress=False)
    assert _steps(run) == [3, 4]
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing half deleted
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] in (2, 4)  # RUN_DIR/best is its own folder: pruning never touches it

    summary = train(_cfg(tiny_store, run, save_total_limit=2, resume="auto"), progress=False)
    assert summary["steps"] == 6
    assert _steps(run) == [5, 6]
    assert (run / "best" / "best.json").is_file()
    a, b = _final_weights(reference), _final_weights(run)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # resumed from the kept step-4: bit for bit

    # a tied student (tiny.build_model ties its embeddings): no warning on any of those saves
    assert WARNING not in caplog.text
    assert WARNING not in "".join(capfd.readouterr())


def test_save_total_limit_must_keep_at_least_one(tiny_store, tmp_path):
    with pytest.raises(ConfigError, match="save_total_limit: keeps the last N >= 1 checkpoints, got 0"):
        _cfg(tiny_store, tmp_path / "r", save_total_limit=0)


class _Tied(nn.Module):
    """The shape of a tied student: the output head is the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


def test_a_tied_checkpoint_saves_quietly_and_loads_tied_and_the_filter_is_only_for_our_save(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(_Tied())
    saved = model.embed.weight.detach().clone()
    save_checkpoint(accelerator, tmp_path / "checkpoints" / "step-0000001", Position(step=1), False)
    assert WARNING not in caplog.text

    with torch.no_grad():
        model.embed.weight.add_(1.0)
    assert load_checkpoint(accelerator, tmp_path / "checkpoints" / "step-0000001") == Position(step=1)
    assert model.head.weight is model.embed.weight  # still one tensor
    assert torch.equal(model.head.weight, saved)

    accelerator.save_state(str(tmp_path / "theirs"))  # accelerate itself, outside our save: its warning stands
    assert WARNING in caplog.text


def test_pruning_keeps_the_newest_and_clears_what_a_kill_left_mid_delete(tmp_path):
    accelerator = Accelerator(cpu=True)
    run = tmp_path / "run"
    for step in (1, 2, 3, 5):
        (run / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:07d}" / "loader.json").write_text("{}")
    (run / "checkpoints" / ".step-0000000.deleting").mkdir()  # a kill in the middle of an earlier prune
    newest = run / "checkpoints" / "step-0000003"  # a resumed run saved step 3 again, below step 5
    gone = prune_checkpoints(accelerator, run, 2, newest)
    assert [p.name for p in gone] == ["step-0000001", "step-0000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003", "step-0000005"]
    assert prune_checkpoints(accelerator, run, 1, newest) == [run / "checkpoints" / "step-0000005"]
    assert _steps(run) == [3]  # the checkpoint just written is never pruned
