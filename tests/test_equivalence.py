"""One process: a batch of 8 and two accumulated micro-batches of 4 train exactly the same
model, in the default configuration (layer_std standardisation, CKA on): the same samples, the
same LR at every step, the same weights and logged terms. (tests/test_ddp.py: the same across
processes.)"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from kvdistill.schemas import TrainConfig
from kvdistill.train.loop import train

STEPS = 10  # 48 samples, global batch 8: 6 steps an epoch, so the run crosses an epoch


def _cfg(tiny_store, out: Path, **kw) -> TrainConfig:
    common = dict(max_steps=STEPS, warmup_steps=2, log_every=1, device="cpu", shuffle_buffer=16, record_samples=True)
    return TrainConfig(store=str(tiny_store["store"]), student=tiny_store["student"], out=str(out), **{**common, **kw})


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    adapters = torch.load(final / "adapters.pt")
    return {**safetensors.torch.load_file(final / "model.safetensors"), **{f"adapters.{k}": v for k, v in adapters.items()}}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def samples_by_step(run: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for path in sorted((run / "ranks").glob("samples-rank-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["sample_ids"])
    return {s: sorted(ids) for s, ids in out.items()}


def assert_same_run(a: Path, b: Path, rtol: float = 1e-5) -> None:
    """Same samples per step, the same LR at every step exactly, weights within rtol, logged terms to 1e-5."""
    assert samples_by_step(a) == samples_by_step(b)
    ma, mb = metrics(a), metrics(b)
    assert [r["lr"] for r in ma] == [r["lr"] for r in mb]
    assert [r["tokens"] for r in ma] == [r["tokens"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            torch.testing.assert_close(torch.tensor(v, dtype=torch.float64), torch.tensor(rb[k], dtype=torch.float64), rtol=1e-5, atol=1e-5, msg=f"step {ra['step']} {k}")
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=1e-6, msg=k)


def test_accumulation_trains_exactly_what_one_batch_trains_in_the_default_configuration(tiny_store, tmp_path):
    cfg = _cfg(tiny_store, tmp_path / "b8", batch_size=8)
    assert (cfg.kv_norm, cfg.cka_weight > 0) == ("layer_std", True)  # the defaults under test
    train(cfg, progress=False)
    train(_cfg(tiny_store, tmp_path / "b4x2", batch_size=4, gradient_accumulation_steps=2), progress=False)
    assert_same_run(tmp_path / "b8", tmp_path / "b4x2")
    lrs = [r["lr"] for r in metrics(tmp_path / "b8")]
    assert lrs[0] < lrs[1] == max(lrs) and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] < 0.05 * lrs[1]  # warm-up, then one decay
