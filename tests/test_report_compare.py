"""Seeing a run (trackers, the HTML report), the shuffled-KV control, and the seeded compare."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
import torch

from kvdistill.cli import main
from kvdistill.compare import (
    bootstrap_paired,
    format_compare,
    holm,
    mean_ci,
    paired_stats,
    run_compare,
    steps_equivalent,
    t_cdf_two_sided,
    t_quantile,
)
from kvdistill.schemas import CompareConfig, ConfigError, DataSpec, ModelSpec, TrainConfig
from kvdistill.train import distiller, loop
from kvdistill.train.report import (
    read_metrics,
    resolve_trackers,
    run_report,
    tracker_config,
    tracker_values,
)
from kvdistill.train.stream import KVStream, collate, derangement, shuffle_kv


def _train_cfg(tiny_store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(out),
        batch_size=8,
        max_steps=3,
        warmup_steps=1,
        log_every=1,
        device="cpu",
        shuffle_buffer=16,
    )
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    "df, t975",  # two-sided 95% quantiles of Student's t (published tables, 15 digits)
    [
        (1, 12.706204736174707),
        (2, 4.302652729749464),
        (3, 3.182446305284263),
        (4, 2.7764451051977934),
        (29, 2.045229642132703),
    ],
)
def test_t_quantile_matches_the_published_table(df, t975):
    assert t_quantile(0.95, df) == pytest.approx(t975, rel=1e-10)
    assert t_cdf_two_sided(t975, df) == pytest.approx(0.95, abs=1e-12)


def test_t_cdf_closed_forms_for_one_and_two_degrees_of_freedom():
    for t in (0.1, 1.0, 3.7):
        assert t_cdf_two_sided(t, 1) == pytest.approx(2 / math.pi * math.atan(t), abs=1e-15)  # Cauchy
        assert t_cdf_two_sided(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), abs=1e-15)
    assert t_quantile(0.95, 200) == pytest.approx(1.971896224, rel=1e-9)  # long series: approaching 1.95996 (normal)


def test_mean_ci_on_hand_picked_numbers():
    s = mean_ci([1.0, 2.0, 3.0])  # mean 2, sample sd 1, n 3: half-width t(0.95, 2) / sqrt(3)
    assert s["mean"] == 2.0 and s["sd"] == 1.0 and s["n"] == 3
    assert s["ci"] == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
    s = mean_ci([0.5, 0.5])  # no spread: no width
    assert s["ci"] == 0.0
    with pytest.raises(ValueError, match=">= 2 values"):
        mean_ci([1.0])


def test_paired_t_test_on_hand_picked_numbers():
    s = paired_stats([0.1, 0.05, 0.2, 0.0, 0.15])  # mean 0.1, sd 0.0791, t = 2.8284 at 4 df
    assert s["t"] == pytest.approx(2.8284271247461903) and s["d_z"] == pytest.approx(0.1 / 0.07905694150420949)
    assert s["p"] == pytest.approx(0.04742065558, abs=1e-9)  # published: two-sided p of t = 2.8284, 4 df
    # MDE = (t(0.975, 4) + t(0.8 one-sided, 4) = 0.940965) x sd / sqrt(5)
    assert s["mde"] == pytest.approx((2.7764451051977934 + 0.9409645) * 0.07905694150420949 / math.sqrt(5), rel=1e-6)
    assert paired_stats([0.0, 0.0, 0.0])["p"] == 1.0 and paired_stats([0.1, 0.1])["p"] == 0.0


def test_minimum_detectable_effect_has_the_stated_power():
    """A true paired effect equal to the MDE (at the true sd) is found at p < 0.05 in ~80% of
    simulated 10-seed experiments; half of it in far fewer (so the formula can fail)."""
    rng = np.random.default_rng(0)
    n, sd = 10, 0.05
    z = rng.normal(0, 1, n)
    mde = paired_stats(list((z - z.mean()) / z.std(ddof=1) * sd))[
        "mde"
    ]  # at n seeds and an observed sd of exactly `sd`

    def power(effect):
        return np.mean([paired_stats(list(rng.normal(effect, sd, n)))["p"] < 0.05 for _ in range(1500)])

    assert 0.74 < power(mde) < 0.86
    assert power(mde / 2) < 0.4


def test_holm_adjusts_in_order_and_stays_monotone():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.5}) == {"a": 0.5} and holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_bootstrap_pairs_seeds_and_questions():
    rng = np.random.default_rng(1)
    ce = (rng.random((6, 300)) < 0.3).astype(float)
    same = bootstrap_paired(ce, ce, 300)
    assert (same["mean"], same["lo"], same["hi"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    better = np.maximum(ce, rng.random((6, 300)) < 0.1)  # ce plus ~7% more correct answers, paired by question
    b = bootstrap_paired(better, ce, 500)
    assert b["lo"] < b["mean"] < b["hi"] and b["lo"] > 0 and b["p"] < 0.01
    unpaired = bootstrap_paired(rng.permutation(better.ravel()).reshape(6, 300), ce, 500)
    assert unpaired["hi"] - unpaired["lo"] > 1.5 * (b["hi"] - b["lo"])  # pairing is what makes it tight
    with pytest.raises(ValueError, match="one shape"):
        bootstrap_paired(ce, ce[:, :10], 10)


def test_the_main_budget_is_a_curve_point_only_when_its_runs_cover_the_curve():
    from kvdistill.compare import main_covers_curve

    assert main_covers_curve(CompareConfig(seeds=5, curve_steps=[100]))  # ce, kv-fixed are core arms
    # Otherwise the budget is trained for the curve, not left out of it.
    assert not main_covers_curve(CompareConfig(seeds=5, arms=["ce", "kv-single"], curve_steps=[100, 300]))
    assert not main_covers_curve(CompareConfig(seeds=3, curve_seeds=5, curve_steps=[300]))


def test_steps_equivalent_interpolates_in_log_steps():
    curve = {100: 0.1, 300: 0.2, 1000: 0.3}
    assert steps_equivalent(curve, 0.2)["steps"] == pytest.approx(300)
    assert steps_equivalent(curve, 0.25)["steps"] == pytest.approx(math.sqrt(300 * 1000))
    assert steps_equivalent(curve, 0.05) == {"steps": None, "bound": "below", "at_most": 100}
    assert steps_equivalent(curve, 0.4) == {"steps": None, "bound": "above", "at_least": 1000}


# ----------------------------------------------------------------------------- shuffled-KV control


def _samples(lengths, L=2, D=3):
    """Sample i's K is a time ramp offset by 100 * i (V the negative), so the values name the
    source sample and linear resampling of a ramp is exact."""
    out = []
    for i, T in enumerate(lengths):
        ramp = np.arange(T, dtype=np.float32)[:, None, None] + 100 * i + np.zeros((T, L, D), np.float32)
        out.append(
            {
                "sample_id": f"s{i}",
                "shard": 0,
                "input_ids": np.arange(T) + 1,
                "loss_mask": np.arange(T) % 2 == 0,
                "kv": {"t": (ramp.astype(np.float16), -ramp)},
            }
        )
    return out


def test_derangement_has_no_fixed_point_and_refuses_a_single_item():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 16):
        for _ in range(20):
            p = derangement(n, rng)
            assert sorted(p) == list(range(n)) and not (p == np.arange(n)).any()
    with pytest.raises(ValueError, match="batch_size >= 2"):
        derangement(1, rng)


def test_shuffled_kv_gives_every_sample_another_samples_kv_resampled_to_its_own_length():
    lengths = [5, 9, 2, 7, 4]
    samples = _samples(lengths)
    out = shuffle_kv(samples, seed=0)
    assert [s["kv_from"] for s in shuffle_kv(samples, seed=0)] == [s["kv_from"] for s in out]  # deterministic
    for i, s in enumerate(out):
        j = int(s["kv_from"][1:])
        assert j != i  # nobody keeps its own K/V
        k, v = s["kv"]["t"]
        T_s, T_j = lengths[i], lengths[j]
        assert k.shape == v.shape == (T_s, 2, 3)
        # A ramp resampled linearly: student step n reads teacher position n (T_j - 1) / (T_s - 1).
        pos = np.arange(T_s) * (T_j - 1) / (T_s - 1)
        np.testing.assert_allclose(k[:, 0, 0], pos + 100 * j, rtol=0, atol=1e-4)
        np.testing.assert_allclose(v, -k, rtol=0, atol=0)
        np.testing.assert_array_equal(s["input_ids"], samples[i]["input_ids"])
    froms = [s["kv_from"] for s in out]
    assert sorted(froms) == sorted(s["sample_id"] for s in samples)  # a permutation: each K/V used once
    # Seeded: another seed gives another swap for at least one of a few batches.
    assert any([s["kv_from"] for s in shuffle_kv(_samples(lengths), seed)] != froms for seed in range(1, 6))
    # Collated, the token side and every mask are the unshuffled batch's.
    a, b = collate(samples, 0), collate(out, 0)
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(a[key], b[key])
    assert b["kv"]["t"][0].shape == a["kv"]["t"][0].shape
    assert not torch.equal(a["kv"]["t"][0], b["kv"]["t"][0])


def test_shuffled_control_on_a_real_store_uses_other_samples_kv(tiny_store):
    teachers = ["teacher-a", "teacher-b"]
    samples = list(KVStream(tiny_store["store"], teachers, shuffle_buffer=4))[:6]
    own = {s["sample_id"]: s for s in samples}
    for s in shuffle_kv(samples, seed=3):
        src = own[s["kv_from"]]
        assert s["kv_from"] != s["sample_id"]
        for t in teachers:
            k, _ = s["kv"][t]
            assert k.shape == (len(s["input_ids"]), *src["kv"][t][0].shape[1:])
            # First and last real tokens take the source's first and last K exactly (endpoints map).
            np.testing.assert_allclose(k[[0, -1]], src["kv"][t][0][[0, -1]].astype(np.float32), rtol=0, atol=0)


def test_training_with_the_shuffled_control_swaps_every_batch(tiny_store, tmp_path, monkeypatch):
    calls = []

    def spy(samples, seed):
        out = shuffle_kv(samples, seed)
        calls.append((len(samples), [s["kv_from"] != s["sample_id"] for s in out]))
        return out

    monkeypatch.setattr(distiller, "shuffle_kv", spy)  # cot_mode hands it to the loader
    summary = loop.train(_train_cfg(tiny_store, tmp_path / "ctl", kv_control="shuffled"), progress=False)
    assert summary["steps"] == 3 and math.isfinite(summary["mean_last_20_kv_k"])
    assert len(calls) >= 3 and all(n == 8 and all(moved) for n, moved in calls)
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        _train_cfg(tiny_store, tmp_path / "x", kv_control="shuffled", batch_size=1)
    with pytest.raises(ConfigError, match="kv_weight > 0"):
        _train_cfg(tiny_store, tmp_path / "x", kv_control="shuffled", kv_weight=0.0)


# ----------------------------------------------------------------------------- trackers


def test_report_to_resolves_names_and_refuses_unknown_or_missing_trackers(monkeypatch):
    import accelerate.tracking as tracking

    monkeypatch.setattr(tracking, "_available_trackers", [tracking.LoggerType.TENSORBOARD])
    assert resolve_trackers([]) == []
    assert resolve_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert resolve_trackers(["all"]) == resolve_trackers(["auto"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        resolve_trackers(["tensorbored"])
    with pytest.raises(ValueError, match="'wandb' is not installed; `pip install wandb`"):
        resolve_trackers(["wandb"])
    monkeypatch.setattr(tracking, "_available_trackers", [])
    assert resolve_trackers(["all"]) == []


def test_tracker_values_and_config_are_flat_scalars():
    row = {"step": 3, "epoch": 0, "ce": 1.5, "kv_k_layers": [0.1, 0.2], "route_k_a": 0.4}
    assert tracker_values(row) == {
        "epoch": 0.0,
        "ce": 1.5,
        "kv_k_layers/0": 0.1,
        "kv_k_layers/1": 0.2,
        "route_k_a": 0.4,
    }
    flat = tracker_config({"student": {"name_or_path": "x", "revision": None}, "lora_targets": ["q", "v"], "lr": 0.1})
    assert flat == {"student.name_or_path": "x", "student.revision": "null", "lora_targets": '["q", "v"]', "lr": 0.1}


def test_tensorboard_tracker_writes_the_same_scalars_as_metrics_jsonl(tiny_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    loop.train(_train_cfg(tiny_store, out, report_to=["tensorboard"]), progress=False)
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    rows = read_metrics(out)
    scalars = {}
    for ev in events:
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in scalars["ce"]] == [r["step"] for r in rows]
    np.testing.assert_allclose([v for _, v in scalars["kv_k"]], [r["kv_k"] for r in rows], rtol=1e-6)
    assert "kv_v_layers/1" in scalars


# ----------------------------------------------------------------------------- report


def _fake_run(path, rows, config=True):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (path / "train_config.yaml").write_text("store: s.zarr\nkv_weight: 1.0\n")
    return path


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_picks_up_every_term_layers_routes_and_eval(tmp_path):
    rows = [
        {
            "step": s,
            "epoch": 0,
            "tokens": 10 * s,
            "lr": 1e-3,
            "loss": 3.0 / s,
            "ce": 2.0 / s,
            "kv_k": 1.0 / s,
            "kv_v": 0.5 / s,
            "cka": 0.1 * s,
            "kv_k_layers": [1.0 / s, 2.0 / s],
            "kv_v_layers": [0.5, 0.25],
            "route_k_teacher-a": 0.7,
            "route_k_teacher-b": 0.3,
            "route_v_teacher-a": 0.6,
            "route_v_teacher-b": 0.4,
        }
        for s in range(1, 6)
    ]
    run = _fake_run(tmp_path / "run", rows)
    (run / "eval.json").write_text(
        json.dumps({"model": str(run), "n": 8, "accuracy": 0.625, "perplexity": 3.5, "predictions": []})
    )
    (run / "notes.json").write_text(json.dumps({"something": "else"}))
    page = run_report(run)
    imgs = _images(page)
    assert len(imgs) == 4 and all(i.startswith(b"\x89PNG") for i in imgs)  # curves, 2 heatmaps, routes
    results = page.split("<h2>Results</h2>")[1].split("<h2>")[0]
    for term in ("kv_k", "kv_v", "loss"):
        assert f"<td>{term}</td>" in results
    # term, first, final, lowest, at step: a falling term's lowest is its last, a rising one's its first
    assert "<tr><td>ce</td><td>2</td><td>0.4</td><td>0.4</td><td>5</td></tr>" in results
    assert "<tr><td>cka</td><td>0.1</td><td>0.5</td><td>0.1</td><td>1</td></tr>" in results
    assert "<td>lr</td>" not in results  # a schedule: drawn, not a result
    assert "kv_weight: 1.0" in page and "0.625" in results and "eval.json" in results and "notes.json" not in page
    after = page.split("<h2>Losses")[1]
    assert "missing" not in after.split("<h2>Validation")[0] + after.split("<h2>Per-layer loss")[1]
    assert "no validation logged: train with --eval-steps N" in after  # said, not left out unseen
    (run / "eval").mkdir()
    (run / "eval" / "killed.json").write_text('{"accuracy": 0.5, "perpl')  # an eval killed mid-write
    assert "left out, not readable as JSON" in run_report(run) and "eval/killed.json" in run_report(run)


def test_report_opens_on_the_results_and_folds_the_config_at_the_end(tmp_path):
    rows = [{"step": s, "epoch": 0, "tokens": 1000 * s, "lr": 1e-3, "ce": 4.0 - s, "loss": 5.0 - s} for s in (1, 2, 3)]
    rows[-1] |= {"val_ce": 1.5, "val_loss": 2.5}
    run = _fake_run(tmp_path / "run", rows, config=False)
    cfg = TrainConfig(
        store="teachers.zarr",
        student=ModelSpec(name_or_path="org/tiny-student"),
        out=str(run),
        teachers=["teacher-a", "teacher-b"],
        fusion="router",
        lora_r=4,
        max_steps=3,
        batch_size=8,
        gradient_accumulation_steps=2,
    )
    cfg.save(run / "train_config.yaml")
    (run / "final").mkdir()
    (run / "best").mkdir()
    (run / "best" / "best.json").write_text(json.dumps({"metric": "val_loss", "value": 2.5, "step": 3}))
    (run / "summary.json").write_text(json.dumps({"tokens": 3000, "seconds": 1.5, "peak_rss_mib": 2048.0}))
    (run / "eval.json").write_text(json.dumps({"n": 200, "accuracy": 0.5, "perplexity": 3.25}))
    page = run_report(run)
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings[0] == "Results" and headings[-1] == "Config" and headings.index("Losses") == 1
    results = page.split("<h2>Results</h2>")[1].split("<h2>")[0]
    for said in (
        "student org/tiny-student (LoRA r 4 on q_proj, k_proj, v_proj, o_proj), from teachers teacher-a, teacher-b",
        "mode cot: loss ce x 1 + kv x 1 + cka x 0.05; K/V mse after layer_std norm, adapter flat, fusion router",
        "3 optimizer steps of 3",
        "3,000 tokens",
        "effective batch 16 = 8 x 2 (accumulation) x 1 (processes); finished",
        "teachers.zarr",
        "2,000 tokens/s",
        "2,048 MiB resident",
        "val_loss 2.5 at step 3",
        "<tr><td>ce</td><td>3</td><td>1</td><td>1</td><td>3</td><td>1.5</td><td>1.5</td><td>3</td></tr>",
        "<tr><td>eval.json</td><td>200</td><td>0.500</td><td>3.25</td></tr>",
    ):
        assert said in results, said
    assert "<img" not in results and "fusion_temperature" not in results  # plots and the full config come after
    config = page.split("<h2>Config</h2>")[1]
    assert config.startswith("<details><summary>") and "fusion_temperature: 0.1" in config  # folded, all of it
    (run / "summary.json").unlink()
    assert "not recorded: no summary.json" in run_report(run)


def test_report_states_missing_pieces_and_refuses_a_dir_without_metrics(tmp_path):
    run = _fake_run(tmp_path / "ce", [{"step": 1, "epoch": 0, "ce": 2.0, "loss": 2.0}], config=False)
    page = run_report(run, compare=tmp_path / "nowhere")
    for said in (
        "no train_config.yaml",
        "no per-layer terms",
        "no routing weights",
        "no evaluation JSON",
        "no compare.json",
    ):
        assert said in page
    assert len(_images(page)) == 1
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        run_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 3  # bad input
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------- compare


def test_compare_config_round_trips_and_refuses_bad_plans(tiny_store, tmp_path):
    cfg = CompareConfig(
        out=str(tmp_path),
        seeds=2,
        arms=["ce", "kv-cos"],
        arm_overrides={"kv-cos": {"kv_loss": "cosine"}},
        steps=2,
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        eval_data=DataSpec(split="test", limit=2),
    )
    assert CompareConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert CompareConfig.load(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match="paired against the baseline .ce."):
        CompareConfig(arms=["kv-fixed"])
    with pytest.raises(ConfigError, match=">= 2 seeds"):
        CompareConfig(seeds=1)
    with pytest.raises(ConfigError, match="eval_data"):
        CompareConfig(store="s.zarr", student=tiny_store["student"])
    bad = CompareConfig.from_dict({**cfg.to_dict(), "arms": ["ce", "kv-nope"]})
    with pytest.raises(ConfigError, match="unknown arm"):
        run_compare(bad, progress=False)
    bad = CompareConfig.from_dict({**cfg.to_dict(), "arm_overrides": {"kv-cos": {"kv_loss": "l7"}}})
    with pytest.raises(ConfigError, match="arm 'kv-cos'.*kv_loss"):
        run_compare(bad, progress=False)
    bad = CompareConfig.from_dict({**cfg.to_dict(), "train": {"max_steps": 50}})
    with pytest.raises(ConfigError, match=r"\['max_steps'\] are set by compare itself"):
        run_compare(bad, progress=False)
    assert not (tmp_path / "runs").exists()  # refused before any run


def test_tiny_compare_pairs_arms_with_ce_by_seed_and_reuses_finished_runs(tiny_store, tmp_path, monkeypatch, capsys):
    data = DataSpec(split="test", limit=4, synthetic=tiny_store["data"].synthetic)
    cfg = CompareConfig(
        out=str(tmp_path / "cmp"),
        seeds=2,
        arms=["ce", "kv-shuffled"],
        steps=2,
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        eval_data=data,
        max_new_tokens=6,
        device="cpu",
        bootstrap=50,
        curve_steps=[1, 2],
        curve_arms=["ce", "kv-shuffled"],
        train={"batch_size": 8, "warmup_steps": 1, "shuffle_buffer": 16, "log_every": 1},
    )
    result = run_compare(cfg, progress=False)
    arms = result["arms"]
    assert list(arms) == ["ce", "kv-shuffled"] and result["t_quantile"] == pytest.approx(12.706204736174707)
    vs = arms["kv-shuffled"]["vs_baseline"]["accuracy"]
    assert (
        {"p", "p_holm", "d_z", "mde", "bootstrap"} <= set(vs)
        and vs["bootstrap"]["questions"] == 4
        and vs["bootstrap"]["seeds"] == 2
    )
    assert vs["p_holm"] == vs["p"]  # one test in the family
    curve = result["curve"]  # budget 2 is the main runs; budget 1 trained for the curve
    assert curve["steps"] == [1, 2] and set(curve["arms"]["ce"]) == {"1", "2"}
    assert curve["arms"]["ce"]["2"]["seeds"] == [r["accuracy"] for r in arms["ce"]["runs"]]
    assert (
        TrainConfig.load(tmp_path / "cmp" / "runs" / "ce" / "steps-1" / "seed-1" / "train_config.yaml").max_steps == 1
    )
    assert set(curve["baseline_steps_equivalent"]["kv-shuffled"]) == {"1", "2"}
    printed = format_compare(result)
    assert "p Holm" in printed and "sample efficiency" in printed
    for name, arm in arms.items():
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        for r in arm["runs"]:
            ev = json.loads((tmp_path / "cmp" / "runs" / name / f"seed-{r['seed']}" / "eval.json").read_text())
            assert (ev["accuracy"], ev["perplexity"], ev["n"]) == (r["accuracy"], r["perplexity"], 4)
        ppl = [r["perplexity"] for r in arm["runs"]]
        assert arm["perplexity"]["mean"] == pytest.approx(sum(ppl) / 2)
        assert arm["perplexity"]["ci"] == pytest.approx(
            12.706204736174707 * abs(ppl[0] - ppl[1]) / 2, rel=1e-9
        )  # s = |a-b|/sqrt2
    diffs = [
        a["perplexity"] - c["perplexity"] for a, c in zip(arms["kv-shuffled"]["runs"], arms["ce"]["runs"], strict=True)
    ]
    assert arms["kv-shuffled"]["vs_baseline"]["perplexity"]["values"] == pytest.approx(diffs)
    assert "vs_baseline" not in arms["ce"]
    assert (
        arms["ce"]["runs"][0]["mean_last_20_kv_k"] is None
        and arms["kv-shuffled"]["runs"][0]["mean_last_20_kv_k"] is not None
    )
    shuffled_cfg = TrainConfig.load(tmp_path / "cmp" / "runs" / "kv-shuffled" / "seed-1" / "train_config.yaml")
    assert (shuffled_cfg.kv_control, shuffled_cfg.seed, shuffled_cfg.max_steps) == ("shuffled", 1, 2)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["arms"].keys() == arms.keys()
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "kv-shuffled" in page and len(_images(page)) == 2 and "Sample efficiency" in page
    assert "kv-shuffled" in capsys.readouterr().out
    # A second compare with the same plan trains nothing and reports the same numbers.
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = run_compare(cfg, progress=False)
    assert again["arms"]["kv-shuffled"]["vs_baseline"] == arms["kv-shuffled"]["vs_baseline"]
    # The run report can carry the compare table.
    run = tmp_path / "cmp" / "runs" / "kv-shuffled" / "seed-0"
    assert "Δ perplexity vs ce" in run_report(run, compare=tmp_path / "cmp")


def test_default_arms_are_valid_train_configs_with_their_overrides(tiny_store, tmp_path):
    from kvdistill.compare import ARMS, arm_configs

    cfg = CompareConfig(out=str(tmp_path), seeds=2, steps=7)
    latent = ["latent-codi", "latent-kv", "latent-shuffled"]  # opt-in: they need a latent store
    assert cfg.arms == ["ce", "kv-single", "kv-fixed", "kv-shuffled"]  # the core arms; the rest are opt-in
    assert CompareConfig().seeds == 10 and set(cfg.arms) <= set(ARMS)
    cfg = CompareConfig(out=str(tmp_path), seeds=2, steps=7, arms=list(ARMS))
    plan = arm_configs(cfg, str(tiny_store["store"]), tiny_store["student"], {"lr": 3e-3}, latent_store="latent.zarr")
    assert list(plan) == list(ARMS) and all(list(seeds) == [0, 1] for seeds in plan.values())
    assert {plan[a][0].store for a in latent} == {"latent.zarr"} and plan["kv-fixed"][0].store == str(
        tiny_store["store"]
    )
    got = {name: seeds[1] for name, seeds in plan.items()}
    assert got["ce"].kv_weight == 0.0 and got["kv-fixed"].kv_weight == 1.0
    assert got["kv-single"].teachers == ["teacher-qwen2"]
    assert (got["kv-similarity"].fusion, got["kv-router"].fusion) == ("similarity", "router")
    assert got["kv-shuffled"].kv_control == "shuffled" and got["kv-fixed"].kv_control == "none"
    assert {got[a].mode for a in latent} == {"latent"} and (
        got["latent-codi"].kv_weight,
        got["latent-shuffled"].kv_control,
    ) == (0.0, "shuffled")
    assert all(c.seed == 1 and c.max_steps == 7 and c.lr == 3e-3 for c in got.values())
    assert len({c.out for c in got.values()}) == len(got)


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["compare", "--help"], ["--seeds", "--arms", "--steps", "--out", "--store", "--config"]),
        (["report", "--help"], ["RUN_DIR", "--out", "--compare"]),
    ],
)
def test_compare_and_report_help(argv, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in flags)


def test_importing_the_trainer_demo_and_calibration_leaves_a_users_matplotlib_backend_alone():
    import subprocess
    import sys

    code = (
        "import sys, matplotlib; before = matplotlib.rcParams['backend']\n"
        "import kvdistill.demo, kvdistill.train.report, kvdistill.dump.calibrate, kvdistill.store.stats\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams['backend'] == before, (before, matplotlib.rcParams['backend'])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MPLBACKEND": "pdf"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
