"""KV weight over training (issue 26): --kv-weight-schedule linear | cosine decays the weight of
every K/V term from kv_weight to kv_weight_final over the planned steps, a function of the step
alone (logged as `kv_weight`, exact on resume); constant leaves the run as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from kvdistill.cli import build_parser
from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.train import cli as train_cli
from kvdistill.train.loop import train

STEPS = 4


def _cfg(tiny_store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(out),
        batch_size=8,
        max_steps=STEPS,
        warmup_steps=1,
        log_every=1,
        device="cpu",
        shuffle_buffer=16,
    )
    return TrainConfig(**{**base, **kw})


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def _check_loss(row: dict, weight: float, cka_weight: float) -> None:
    """The logged loss is CE + weight x (kv_k + kv_v) + cka_weight x CKA: the weight was applied, not only logged."""
    expected = row["ce"] + weight * (row["kv_k"] + row["kv_v"]) + cka_weight * row.get("cka", 0.0)
    assert row["loss"] == pytest.approx(expected, abs=1e-5), (row, weight)


@pytest.fixture(scope="module")
def cosine_run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-schedule") / "cosine"
    train(_cfg(tiny_store, out, kv_weight=2.0, kv_weight_schedule="cosine", kv_weight_final=0.5), progress=False)
    return out


def test_the_formula_linear_and_cosine_start_midpoint_end():
    cfg = dict(store="s", student={"name_or_path": "s"}, out="o", kv_weight=2.0, kv_weight_final=0.5)
    lin, cos = (TrainConfig.from_dict({**cfg, "kv_weight_schedule": k}) for k in ("linear", "cosine"))
    assert lin.kv_weight_at(0, 100) == cos.kv_weight_at(0, 100) == 2.0  # the first step: kv_weight
    assert lin.kv_weight_at(50, 100) == cos.kv_weight_at(50, 100) == pytest.approx(1.25)  # halfway
    assert lin.kv_weight_at(99, 100) == pytest.approx(0.5 + 1.5 / 100)  # the last step: 1/N above the floor
    assert cos.kv_weight_at(99, 100) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi * 0.99)) / 2)
    assert lin.kv_weight_at(100, 100) == cos.kv_weight_at(100, 100) == 0.5  # the floor, as the planned steps end
    assert cos.kv_weight_at(25, 100) > lin.kv_weight_at(25, 100) and cos.kv_weight_at(75, 100) < lin.kv_weight_at(
        75, 100
    )
    const = TrainConfig.from_dict({**cfg, "kv_weight_final": 0.0})
    assert all(const.kv_weight_at(s, 100) == 2.0 for s in (0, 50, 99))
    # the floor 0 (the default) is never a step's weight
    zero = TrainConfig.from_dict({**cfg, "kv_weight_schedule": "cosine", "kv_weight_final": 0.0})
    assert all(zero.kv_weight_at(s, 1000) > 0 for s in range(1000))


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"kv_weight": 0.0, "kv_weight_schedule": "cosine"},
            "kv_weight 0 .* has nothing to decay; set kv_weight > 0 .* or kv_weight_schedule constant",
        ),
        ({"kv_weight_schedule": "linear", "kv_weight_final": -0.1}, "TrainConfig.kv_weight_final: must be >= 0"),
        (
            {"kv_weight_final": 0.1},
            "kv_weight_final 0.1: applies to a decaying KV weight only; set kv_weight_schedule linear or cosine",
        ),
    ],
)
def test_a_schedule_with_nothing_to_decay_or_a_negative_floor_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"store": "s", "student": {"name_or_path": "s"}, "out": "o", **kw})


def test_the_cli_flags():
    argv = [
        "train",
        "--store",
        "s.zarr",
        "--student",
        "s",
        "--out",
        "o",
        "--kv-weight-schedule",
        "cosine",
        "--kv-weight-final",
        "0.1",
    ]
    cfg = train_cli.config_of(build_parser().parse_args(argv))
    assert (cfg.kv_weight_schedule, cfg.kv_weight_final, cfg.kv_weight) == ("cosine", 0.1, 1.0)
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    plain = train_cli.config_of(build_parser().parse_args(argv[:7]))
    assert (plain.kv_weight_schedule, plain.kv_weight_final) == ("constant", 0.0)


def test_the_logged_weight_follows_the_formula_every_step_and_weights_the_loss(cosine_run):
    """Cosine, the default exact layer_std K/V terms (computed from the step's summed statistics)."""
    rows = _rows(cosine_run)
    cfg = TrainConfig.from_yaml((cosine_run / "train_config.yaml").read_text())
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["kv_weight"] for r in rows] == [cfg.kv_weight_at(r["step"] - 1, STEPS) for r in rows]
    assert rows[0]["kv_weight"] == 2.0 and rows[2]["kv_weight"] == pytest.approx(1.25)  # step 3 of 4: halfway
    assert rows[-1]["kv_weight"] == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    for r in rows:
        _check_loss(r, r["kv_weight"], cfg.cka_weight)


def test_linear_per_micro_batch_terms_under_accumulation(tiny_store, tmp_path):
    """kv_norm none: the K/V terms of each micro-batch (not the window's); two micro-batches a step."""
    out = tmp_path / "linear"
    cfg = _cfg(
        tiny_store,
        out,
        batch_size=4,
        gradient_accumulation_steps=2,
        kv_norm="none",
        cka_weight=0.0,
        kv_weight_schedule="linear",
    )
    train(cfg, progress=False)
    rows = _rows(out)
    assert [r["kv_weight"] for r in rows] == [1.0, 0.75, 0.5, 0.25]  # 1 - s / 4, to the floor 0
    for r in rows:
        _check_loss(r, r["kv_weight"], 0.0)


def test_a_resumed_run_logs_the_same_weights_and_losses_as_an_uninterrupted_one(tiny_store, cosine_run, tmp_path):
    out = tmp_path / "cut"
    common = dict(kv_weight=2.0, kv_weight_schedule="cosine", kv_weight_final=0.5, save_every=2)
    train(_cfg(tiny_store, out, stop_at_step=3, **common), progress=False)
    train(_cfg(tiny_store, out, resume="auto", **common), progress=False)  # from step 2's checkpoint
    assert _rows(out) == _rows(cosine_run)


def test_constant_is_unchanged_and_a_flat_schedule_trains_the_same_bits(tiny_store, tmp_path):
    """The default logs no kv_weight and leaves the model's weight alone; a linear schedule from
    kv_weight to itself (every step at exactly kv_weight) ends bit for bit where constant does."""
    train(_cfg(tiny_store, tmp_path / "constant"), progress=False)
    train(_cfg(tiny_store, tmp_path / "flat", kv_weight_schedule="linear", kv_weight_final=1.0), progress=False)
    const, flat = _rows(tmp_path / "constant"), _rows(tmp_path / "flat")
    assert all("kv_weight" not in r for r in const) and [r.pop("kv_weight") for r in flat] == [1.0] * STEPS
    assert const == flat
    a, b = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / r / "final").state_dict()
        for r in ("constant", "flat")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
