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
    return {
        **safetensors.torch.load_file(final / "model.safetensors"),
        **{f"adapters.{k}": v for k, v in adapters.items()},
    }


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
            torch.testing.assert_close(
                torch.tensor(v, dtype=torch.float64),
                torch.tensor(rb[k], dtype=torch.float64),
                rtol=1e-5,
                atol=1e-5,
                msg=f"step {ra['step']} {k}",
            )
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
    assert (
        lrs[0] < lrs[1] == max(lrs) and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] < 0.05 * lrs[1]
    )  # warm-up, then one decay


def test_the_closed_form_standardised_mse_is_the_batch_standardised_mse_and_splits_add_up():
    """`_mse_from_sums(_mse_sums(...))` = layer_std on the whole batch then the masked MSE, value
    and gradient (fixed and router weights), and the sums of any split of the tokens give it too."""
    from kvdistill.train.distiller import _mse_from_sums, _mse_sums
    from kvdistill.train.losses import layer_moments, layer_std_norm, masked_kv_loss

    def sums(s, a, w, mask):
        x, t = s[mask], torch.stack([y[mask] for y in a])
        own = torch.stack([layer_moments(x), *(layer_moments(y) for y in t)])
        return _mse_sums("k", x, t, own, w.expand(w.shape[0], *mask.shape, w.shape[-1])[:, mask])

    torch.manual_seed(0)
    B, T, L, D = 3, 7, 4, 5
    mask = torch.rand(B, T) > 0.3
    s = (torch.randn(B, T, L, D) * 2 + 1).double().requires_grad_()
    a = [(torch.randn(B, T, L, D) * 3 - 1).double().requires_grad_() for _ in range(2)]
    for w in (
        torch.tensor([0.3, 0.7]).double().view(-1, 1, 1, 1),
        torch.rand(2, B, 1, L).double().softmax(0).requires_grad_(),
    ):
        target = (w[..., None] * torch.stack([layer_std_norm(x, mask) for x in a])).sum(0)
        _, want = masked_kv_loss(layer_std_norm(s, mask), target, mask)
        got = _mse_from_sums({k.rsplit(".", 1)[1]: v for k, v in sums(s, a, w, mask).items()})
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for x, y in zip(
            torch.autograd.grad(got.sum(), [s, *a]), torch.autograd.grad(want.sum(), [s, *a]), strict=True
        ):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        first, rest = mask.clone(), mask.clone()
        first[1:], rest[:1] = False, False
        parts = [sums(s, a, w, m) for m in (first, rest)]
        split = _mse_from_sums({k.rsplit(".", 1)[1]: parts[0][k] + parts[1][k] for k in parts[0]})
        torch.testing.assert_close(split, got, rtol=1e-12, atol=1e-12)


def test_cka_from_summed_statistics_is_the_debiased_cka_of_all_rows():
    from kvdistill.train.losses import cka_from_sums, cka_sums, debiased_cka

    torch.manual_seed(1)
    x = torch.randn(37, 5, dtype=torch.float64) * 3 + 1
    y = x @ torch.randn(5, 4, dtype=torch.float64) + 0.5 * torch.randn(37, 4, dtype=torch.float64)
    halves = [cka_sums(x[:20], y[:20]), cka_sums(x[20:], y[20:])]
    torch.testing.assert_close(
        cka_from_sums({k: halves[0][k] + halves[1][k] for k in halves[0]}), debiased_cka(x, y), rtol=1e-12, atol=1e-12
    )
