"""What a real run needs from the trainer: gradient accumulation that equals one big batch,
gradient checkpointing that changes nothing but memory, validation on held-out shards with a
best checkpoint, epochs instead of steps, and a parameter hash only when asked."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from test_latent_train import _cfg as latent_cfg

from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.train.distiller import cot_mode
from kvdistill.train.loop import train
from kvdistill.train.report import run_report
from kvdistill.train.stream import KVStream, collate
from kvdistill.train.student import load_student


def _cfg(tiny_store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(out),
        batch_size=8,
        max_steps=3,
        warmup_steps=0,
        log_every=1,
        device="cpu",
        shuffle_buffer=1,
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


# KV terms on, as the defaults have them, except the two batch statistics that no split of a
# batch can reproduce: layer_std standardisation (mean / std over the batch's tokens) and CKA.
EXACT = dict(kv_norm="none", cka_weight=0.0, kv_weight=1.0)


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight(tiny_store, tmp_path):
    big = train(_cfg(tiny_store, tmp_path / "big", batch_size=8, **EXACT), progress=False)
    acc = train(
        _cfg(tiny_store, tmp_path / "acc", batch_size=2, gradient_accumulation_steps=4, **EXACT), progress=False
    )
    assert big["steps"] == acc["steps"] == 3 and big["effective_batch"] == acc["effective_batch"] == 8
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=k)
    # The logged terms are the window's, weighted as one batch: the same numbers.
    for r, s in zip(_rows(tmp_path / "big"), _rows(tmp_path / "acc"), strict=True):
        for term in ("loss", "ce", "kv_k", "kv_v"):
            assert r[term] == pytest.approx(s[term], rel=1e-5, abs=1e-6), (r["step"], term)
        assert r["tokens"] == s["tokens"]


def test_accumulation_without_the_share_weighting_would_differ(tiny_store, tmp_path):
    """The test above can fail: micro-batches hold different numbers of tokens, so a plain mean
    of micro-batch means is another update. Checked on the same window by hand."""
    tokenizer, student, spec, teachers = load_student(_cfg(tiny_store, tmp_path / "x", **EXACT))
    mode = cot_mode(_cfg(tiny_store, tmp_path / "x", **EXACT), student, spec, teachers)
    stream = KVStream(tiny_store["store"], list(teachers), shuffle_buffer=1)
    samples = [s for _, s in zip(range(8), stream, strict=False)]
    micro = [collate(samples[i : i + 2], 0) for i in range(0, 8, 2)]
    counts = [mode.counts(b)["tokens"] for b in micro]
    assert len(set(counts)) > 1, counts  # unequal windows: the weighting matters
    full = collate(samples, 0)

    def loss(batch, shares=None):
        return mode.step(mode.model, batch, torch.device("cpu"), 0, shares)

    whole = loss(full)["loss"].item()
    plain = sum(loss(b)["loss"].item() for b in micro) / 4
    totals = {u: sum(mode.counts(b)[u] for b in micro) for u in mode.counts(micro[0])}
    weighted = sum(loss(b, {u: mode.counts(b)[u] / totals[u] for u in totals})["loss"].item() for b in micro)
    assert weighted == pytest.approx(whole, rel=1e-6)
    assert abs(weighted - whole) < abs(plain - whole) / 20, (whole, weighted, plain)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_kv_capture_included(tiny_store, tmp_path):
    grads = {}
    for ckpt in (False, True):
        set_seed(0)
        cfg = _cfg(tiny_store, tmp_path / "g", gradient_checkpointing=ckpt, lora_r=4)  # LoRA too
        _, student, spec, teachers = load_student(cfg)
        mode = cot_mode(cfg, student, spec, teachers)
        mode.model.train()
        batch = collate(
            [
                s
                for _, s in zip(
                    range(4), KVStream(tiny_store["store"], list(teachers), shuffle_buffer=1), strict=False
                )
            ],
            0,
        )
        losses = mode.step(mode.model, batch, torch.device("cpu"), 0, None)
        losses["loss"].backward()
        grads[ckpt] = (
            {k: losses[k].item() for k in ("loss", "ce", "kv_k", "kv_v")},
            {n: p.grad.clone() for n, p in mode.model.named_parameters() if p.grad is not None},
        )
        base = student.get_base_model()  # peft
        on = (
            base.is_activation_checkpointing
            if hasattr(type(base), "is_activation_checkpointing")
            else base.is_gradient_checkpointing
        )
        assert on == ckpt
    (l0, g0), (l1, g1) = grads[False], grads[True]
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys() and any("lora" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_store, tmp_path):
    train(_cfg(tiny_store, tmp_path / "plain"), progress=False)
    train(_cfg(tiny_store, tmp_path / "ckpt", gradient_checkpointing=True), progress=False)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_validation_on_held_out_shards_is_logged_and_keeps_the_best_checkpoint(tiny_store, tmp_path):
    run = tmp_path / "val"
    summary = train(
        _cfg(tiny_store, run, batch_size=4, max_steps=6, eval_steps=2, val_shards=1, metric_for_best_model="val_loss"),
        progress=False,
    )
    rows = _rows(run)
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert all(
        {"val_ce", "val_kv_k", "val_kv_v"} <= set(r) and all(math.isfinite(r[k]) for k in r if k.startswith("val_"))
        for r in val
    )
    # The held-out shard is never trained on.
    rank = json.loads((run / "ranks" / "rank-0.json").read_text())
    assert rank["shards"] == [0] and "param_sha256" not in rank
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["metric"] == "val_loss" and best["value"] == min(r["val_loss"] for r in val)
    assert best["step"] == min(val, key=lambda r: r["val_loss"])["step"]
    assert (run / "best" / "model.safetensors").exists() and (run / "best" / "adapters.pt").exists()
    assert summary["best_step"] == best["step"] and summary["last_validation"]["val_loss"] == val[-1]["val_loss"]
    # The report draws validation next to training and tabulates the gap.
    page = run_report(run)
    assert "<h2>Validation</h2>" in page and "val kv_k" in page and "best checkpoint" in page
    assert page.count("%</td>") >= 3 * 4  # a gap per term per evaluation


def test_validation_is_deterministic_and_changes_no_training_step(tiny_store, tmp_path):
    train(_cfg(tiny_store, tmp_path / "a", max_steps=4, val_shards=1, eval_steps=2), progress=False)
    train(_cfg(tiny_store, tmp_path / "b", max_steps=4, val_shards=1), progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation draws no RNG and steps nothing
    ra = _rows(tmp_path / "a")
    assert [r["ce"] for r in ra] == [r["ce"] for r in _rows(tmp_path / "b")]
    assert {"val_loss", "val_ce"} <= set(ra[1])


@pytest.mark.parametrize("copy", [False, True], ids=["same-path", "copy"])
def test_a_val_store_holding_the_training_data_is_refused_naming_val_shards(tiny_store, tmp_path, copy):
    store = tiny_store["store"]
    if copy:
        shutil.copytree(store, tmp_path / "copy.zarr")
        store = tmp_path / "copy.zarr"
    with pytest.raises(ConfigError, match="--val-shards N instead"):
        train(_cfg(tiny_store, tmp_path / "v", max_steps=1, val_store=str(store), eval_steps=1), progress=False)


def test_num_train_epochs_sets_the_steps_from_the_store(tiny_store, tmp_path):
    # 48 samples, batch 8 x accumulation 2: 3 steps an epoch.
    summary = train(
        _cfg(tiny_store, tmp_path / "ep", num_train_epochs=2, gradient_accumulation_steps=2), progress=False
    )
    assert summary["steps"] == 6 and summary["epochs_started"] == 2
    half = train(_cfg(tiny_store, tmp_path / "half", num_train_epochs=0.5), progress=False)
    assert half["steps"] == 3  # 6 batches an epoch


def test_the_parameter_hash_is_opt_in(tiny_store, tmp_path):
    train(_cfg(tiny_store, tmp_path / "h", max_steps=1, hash_params=True), progress=False)
    rank = json.loads((tmp_path / "h" / "ranks" / "rank-0.json").read_text())
    assert len(rank["param_sha256"]) == 64


def test_the_effective_batch_is_printed_at_start(tiny_store, tmp_path, capsys):
    train(_cfg(tiny_store, tmp_path / "p", max_steps=1, batch_size=2, gradient_accumulation_steps=3), progress=True)
    assert "effective batch 2 x 3 (accumulation) x 1 (processes) = 6 samples" in capsys.readouterr().out


def test_latent_mode_accumulates_too(latent_store, tmp_path):
    # CODI is standardised by the batch's teacher hidden std, a batch statistic: off here.
    common = dict(max_steps=2, kv_norm="none", codi_weight=0.0, teachers=["teacher-a"], seed=1, shuffle_buffer=1)
    big = train(latent_cfg(latent_store, tmp_path / "big", batch_size=4, **common), progress=False)
    acc = train(
        latent_cfg(latent_store, tmp_path / "acc", batch_size=2, gradient_accumulation_steps=2, **common),
        progress=False,
    )
    assert big["steps"] == acc["steps"] == 2
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_an_unknown_best_model_metric_is_refused_before_any_step(tiny_store, tmp_path):
    from kvdistill.schemas import ConfigError

    with pytest.raises(ConfigError, match=r"validates val_loss and val_<term> for terms \['ce', 'kv_k'"):
        train(
            _cfg(tiny_store, tmp_path / "m", eval_steps=1, val_shards=1, metric_for_best_model="val_kvk"),
            progress=False,
        )
    assert not (tmp_path / "m" / "metrics.jsonl").exists()
