"""Resume is exact from every checkpoint, epoch boundaries included: a run resumed from any
step's checkpoint ends with the uninterrupted run's weights, bit for bit.

48 samples / batch 16 = 3 batches an epoch, so steps 3 and 6 end epochs 0 and 1: their
checkpoints resume at the start of the next epoch, (epoch + 1, batch 0). Checkpoints written
before that fix say (epoch, batch = batches in the epoch); resume accepts them too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_latent_train import _cfg as _latent_cfg

from kvdistill.schemas import TrainConfig
from kvdistill.store import StoreError
from kvdistill.train.loop import train

STEPS, PER_EPOCH = 7, 3  # 2 epochs + 1 step
COMMON = dict(batch_size=16, shuffle_buffer=16, max_steps=STEPS, warmup_steps=1, log_every=1, device="cpu")


def _cfg(tiny_store, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{"store": str(tiny_store["store"]), "student": tiny_store["student"], "out": str(out), **COMMON, **kw}
    )


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every trained parameter a run saved: the student and the KV adapters."""
    final = run / "final"
    student = safetensors.torch.load_file(final / "model.safetensors")
    adapters = torch.load(final / "adapters.pt")
    return {**{f"student.{k}": v for k, v in student.items()}, **{f"adapters.{k}": v for k, v in adapters.items()}}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _old_form(ckpt: Path, dest: Path) -> Path:
    """A copy of an epoch-end checkpoint with its position in the other form it can take:
    (epoch N, every sample of epoch N consumed) instead of (epoch N + 1, sample 0)."""
    shutil.copytree(ckpt, dest)
    pos = json.loads((dest / "loader.json").read_text())
    assert pos["samples_in_epoch"] == 0
    pos.update(epoch=pos["epoch"] - 1, samples_in_epoch=PER_EPOCH * COMMON["batch_size"])
    (dest / "loader.json").write_text(json.dumps(pos))
    return dest


@pytest.fixture(scope="module")
def straight(tiny_store, tmp_path_factory):
    """The uninterrupted run, checkpointing every step: the reference and every checkpoint."""
    out = tmp_path_factory.mktemp("resume") / "straight"
    train(_cfg(tiny_store, out, save_every=1), progress=False)
    return out


def test_an_epoch_end_checkpoint_is_saved_as_the_next_epochs_start(straight):
    pos = {
        s: json.loads((straight / "checkpoints" / f"step-{s:07d}" / "loader.json").read_text())
        for s in range(1, STEPS + 1)
    }
    assert [(p["epoch"], p["samples_in_epoch"]) for p in pos.values()] == [
        (0, 16),
        (0, 32),
        (1, 0),
        (1, 16),
        (1, 32),
        (2, 0),
        (2, 16),
    ]


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_resuming_from_any_steps_checkpoint_ends_bitwise_identical_to_the_uninterrupted_run(
    tiny_store, straight, tmp_path, step
):
    ckpt = straight / "checkpoints" / f"step-{step:07d}"
    train(_cfg(tiny_store, tmp_path / "resumed", resume=str(ckpt)), progress=False)
    _assert_bitwise_equal(_final_weights(tmp_path / "resumed"), _final_weights(straight))


def test_an_epoch_end_checkpoint_in_the_old_form_still_resumes_bitwise(tiny_store, straight, tmp_path):
    ckpt = _old_form(straight / "checkpoints" / f"step-{PER_EPOCH:07d}", tmp_path / "old")
    train(_cfg(tiny_store, tmp_path / "resumed", resume=str(ckpt)), progress=False)
    _assert_bitwise_equal(_final_weights(tmp_path / "resumed"), _final_weights(straight))


def test_a_checkpoint_position_past_the_epochs_end_is_refused(tiny_store, straight, tmp_path):
    """A position the stream cannot reach (another batch size, number of ranks or workers than
    the checkpoint's run) must stop with the fix, not skip into the next epoch."""
    ckpt = tmp_path / "bad"
    shutil.copytree(straight / "checkpoints" / "step-0000002", ckpt)
    pos = json.loads((ckpt / "loader.json").read_text())
    (ckpt / "loader.json").write_text(json.dumps({**pos, "samples_in_epoch": 80}))
    with pytest.raises(
        StoreError, match=r"resumes after sample 80 of an epoch, but an epoch of store .* has 48 samples"
    ):
        train(_cfg(tiny_store, tmp_path / "resumed", resume=str(ckpt)), progress=False)


def test_a_checkpoint_of_the_per_rank_order_is_refused_before_anything_loads(tiny_store, straight, tmp_path):
    ckpt = tmp_path / "old"
    shutil.copytree(straight / "checkpoints" / "step-0000002", ckpt)
    (ckpt / "loader.json").write_text(json.dumps({"step": 2, "epoch": 0, "tokens": 100, "batches_in_epoch": 2}))
    with pytest.raises(
        ValueError, match="written by an earlier kvdistill whose sample order depended on the number of processes"
    ):
        train(_cfg(tiny_store, tmp_path / "resumed", resume=str(ckpt)), progress=False)


def test_a_mid_epoch_resume_keeps_dropout_bitwise(tiny_store, tmp_path):
    """With dropout the global RNG matters: the checkpoint restores it, and starting the resumed
    epoch's loader must not draw from it (the straight run drew once, at the epoch's start)."""
    common = dict(max_steps=PER_EPOCH + 1, lora_r=2, lora_dropout=0.5)
    train(_cfg(tiny_store, tmp_path / "straight", save_every=1, **common), progress=False)
    train(
        _cfg(
            tiny_store,
            tmp_path / "resumed",
            resume=str(tmp_path / "straight" / "checkpoints" / "step-0000001"),
            **common,
        ),
        progress=False,
    )
    a, b = (
        safetensors.torch.load_file(tmp_path / r / "final" / "model.safetensors") for r in ("straight", "resumed")
    )  # LoRA merged
    _assert_bitwise_equal(a, b)


def _latent_final(run: Path) -> dict[str, torch.Tensor]:
    """The student and every latent-mode part (slot head, KV adapters, CODI maps)."""
    final = run / "final"
    out = {f"student.{k}": v for k, v in safetensors.torch.load_file(final / "model.safetensors").items()}
    state = torch.load(final / "latent.pt")
    for part in ("head", "adapters", "codi"):
        out.update({f"{part}.{k}": v for k, v in state[part].items()})
    return out


def test_latent_mode_resumes_bitwise_from_an_epoch_end_checkpoint_new_and_old_form(latent_store, tmp_path):
    common = {**COMMON, "max_steps": PER_EPOCH + 1}
    train(_latent_cfg(latent_store, tmp_path / "straight", save_every=PER_EPOCH, **common), progress=False)
    ckpt = tmp_path / "straight" / "checkpoints" / f"step-{PER_EPOCH:07d}"
    pos = json.loads((ckpt / "loader.json").read_text())
    assert (pos["epoch"], pos["samples_in_epoch"]) == (1, 0)
    reference = _latent_final(tmp_path / "straight")
    for name, resume_from in (("new", ckpt), ("old", _old_form(ckpt, tmp_path / "old"))):
        train(_latent_cfg(latent_store, tmp_path / name, resume=str(resume_from), **common), progress=False)
        _assert_bitwise_equal(_latent_final(tmp_path / name), reference)
