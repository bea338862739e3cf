"""`kvdistill compare`: is the KV signal worth anything, honestly? Every arm is trained and
evaluated once per seed on the same store, data and steps; each arm is reported as the mean
over seeds with a 95% Student t confidence interval, plus its paired difference to the CE-only
arm (same seed, so the shuffle order and adapter init cancel), or against another `baseline`.

    kvdistill compare --out compare-out                 # the core arms, 10 seeds, 1,000 test questions
    kvdistill compare --seeds 2 --arms ce,kv-fixed,kv-shuffled --steps 100
    kvdistill compare --curve-steps 100,1000           # + accuracy against steps for ce and kv-fixed

Per arm against the baseline (default `ce`): the paired difference over seeds with its CI, a paired t-test (p, and
Holm-adjusted over the arms), the effect size d_z (mean / sd of the paired differences), the
minimum detectable effect of a paired t-test with this many seeds (two-sided alpha 0.05,
power 0.8, at the observed sd), and for accuracy a bootstrap over seeds and questions
(resampled paired: the same seeds and questions for the arm and the baseline).

Arms are data: a name -> TrainConfig overrides (`ARMS`, extended or replaced by
CompareConfig.arm_overrides). Default store: the embedded demo's (its teachers cached as the
demo caches them). A run whose train config and eval settings are unchanged is reused, so an
interrupted compare continues where it stopped. Writes OUT/compare.json and OUT/compare.html.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

from kvdistill.schemas import (
    CompareConfig,
    ConfigError,
    DataSpec,
    EvalConfig,
    ModelSpec,
    TrainConfig,
)
from kvdistill.store.lock import FileLock
from kvdistill.train.recipes import train_config

__all__ = [
    "ARMS",
    "CONFIDENCE",
    "ALPHA",
    "POWER",
    "t_cdf_two_sided",
    "t_quantile",
    "mean_ci",
    "paired_stats",
    "holm",
    "bootstrap_paired",
    "steps_equivalent",
    "arm_configs",
    "demo_base",
    "run_compare",
    "format_compare",
]

ARMS: dict[str, dict[str, Any]] = {
    "ce": {"kv_weight": 0.0},  # the baseline every difference is paired against
    "kv-single": {"teachers": ["teacher-qwen2"]},  # the demo's deeper teacher alone
    "kv-fixed": {"fusion": "fixed"},  # every teacher, equal fixed weights
    "kv-headwise": {"fusion": "fixed", "adapter": "headwise"},  # kv-fixed with structured adapters (A/B)
    "kv-attn-kl": {
        "fusion": "fixed",
        "attn_kl_weight": 0.2,
        "attn_kl_warmup_steps": 100,
    },  # + attention KL; demo, weight 1: |grad| 0.58 at step 100 vs kv_k 0.125
    "kv-similarity": {"fusion": "similarity"},
    "kv-router": {"fusion": "router"},
    "kv-shuffled": {"kv_control": "shuffled"},  # negative control: another sample's K/V
    "kv-z": {"fusion": "fixed", "z_dim": 32, "z_loss": "cca"},  # fusion and loss in a common Z space (train/zspace.py)
    # KaVa latent mode (the store needs R-KV compressed K/V, `dump --latent-slots`; the demo's
    # is built when one of these arms is asked for). Not in the default arm list: a latent step
    # costs T + 1 forwards. They train the recipe `kvdistill train --mode latent` trains: kava
    # (train/recipes/kava.yaml) under the overrides.
    "latent-codi": {"mode": "latent", "kv_weight": 0.0},  # CODI, no KV loss
    "latent-kv": {"mode": "latent"},
    "latent-shuffled": {"mode": "latent", "kv_control": "shuffled"},  # control
}
CONFIDENCE = 0.95
ALPHA, POWER = 0.05, 0.8  # significance level of every test; power of the minimum detectable effect


# ----------------------------------------------------------------------------- statistics


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1, in closed form (Abramowitz & Stegun
    26.7.3 / 26.7.4): a finite series in cos(theta), theta = atan(t / sqrt(df))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin(theta) (c + 2/3 c^3 + ... ))
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    total, term = 0.0, 1.0  # even: sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """t with P(|T| <= t) = confidence (e.g. 0.95, df 2 -> 4.3027), by bisection on the CDF."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < confidence:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """{"mean", "ci" (half-width: t * s / sqrt(n), s with n - 1), "sd", "n", "values"}."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs >= 2 values, got {n}; run more seeds")
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    return {
        "mean": mean,
        "ci": t_quantile(confidence, n - 1) * sd / math.sqrt(n),
        "sd": sd,
        "n": n,
        "values": list(values),
    }


def paired_stats(diffs: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """mean_ci of paired differences (arm - baseline, one per seed) plus a two-sided paired t-test
    ("t", "p"), the effect size "d_z" = mean / sd, and "mde": the smallest true mean
    difference a paired t-test with this many seeds detects with probability POWER at level
    ALPHA, at the observed sd: (t_{1 - alpha/2} + t_{power}) sd / sqrt(n), n - 1 df."""
    out = mean_ci(diffs, confidence)
    n, mean, sd = out["n"], out["mean"], out["sd"]
    se = sd / math.sqrt(n)
    if se > 0:
        t = mean / se
        p = 1.0 - t_cdf_two_sided(t, n - 1)
    else:  # every seed gave the same difference
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t_power = t_quantile(2 * POWER - 1, n - 1)  # one-sided quantile POWER as a two-sided one
    out.update(
        t=t, p=max(p, 0.0), d_z=mean / sd if sd > 0 else None, mde=(t_quantile(1 - ALPHA, n - 1) + t_power) * se
    )
    return out


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values for a family of tests (here: every arm against the baseline)."""
    order = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        out[name] = running
    return out


def bootstrap_paired(arm: Any, ce: Any, draws: int, confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Two-level paired bootstrap of mean(arm) - mean(ce) for per-question scores [seeds, questions]
    (rows paired by seed, columns by question): each draw resamples seeds, then questions, with
    replacement, the same indices for both arms. Returns the observed difference, the
    percentile CI and a two-sided p (twice the smaller tail share of draws at or beyond 0)."""
    import numpy as np

    a, b = np.asarray(arm, dtype=np.float64), np.asarray(ce, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"bootstrap_paired: need two [seeds, questions] arrays of one shape, got {a.shape} and {b.shape}"
        )
    d = a - b
    rng = np.random.default_rng(seed)
    s, q = d.shape
    stats = np.empty(draws)
    for i in range(draws):
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, q, q)
        stats[i] = d[rows][:, cols].mean()
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    p = min(1.0, 2 * min((stats <= 0).mean(), (stats >= 0).mean()))
    return {
        "mean": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "p": float(p),
        "draws": draws,
        "seeds": s,
        "questions": q,
    }


def steps_equivalent(ce_curve: dict[int, float], accuracy: float) -> dict[str, Any]:
    """The CE steps that reach `accuracy` on the CE curve (step budget -> mean accuracy),
    interpolated linearly in log(steps) between measured budgets. {"steps": value or None,
    "bound": "within" | "below" (accuracy <= CE's at the smallest budget) | "above" (more than CE
    reaches at any budget measured)}. The curve is taken as measured: where it is not
    monotone the first crossing counts."""
    pts = sorted(ce_curve.items())
    if accuracy <= pts[0][1]:
        return {"steps": None, "bound": "below", "at_most": pts[0][0]}
    for (s0, a0), (s1, a1) in itertools.pairwise(pts):
        if a0 < accuracy <= a1:
            f = (accuracy - a0) / (a1 - a0)
            return {"steps": math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0))), "bound": "within"}
    return {"steps": None, "bound": "above", "at_least": pts[-1][0]}


# ----------------------------------------------------------------------------- runs


def latent_arms(cfg: CompareConfig) -> list[str]:
    arms = {**ARMS, **cfg.arm_overrides}
    return [a for a in cfg.arms if arms.get(a, {}).get("mode") == "latent"]


def arm_configs(
    cfg: CompareConfig,
    store: str,
    student: ModelSpec,
    base: dict[str, Any],
    latent_store: str | None = None,
    steps: int | None = None,
) -> dict[str, dict[int, TrainConfig]]:
    """arm -> seed -> TrainConfig; every config is built (and validated) before anything runs,
    as `kvdistill train` builds it: the recipe of its mode (train/recipes) < `base` < cfg.train
    < the arm < what compare sets. Latent-mode arms train from `latent_store` (default: `store`).
    steps (a curve budget other than cfg.steps): cfg.curve_arms x cfg.curve_seeds at that
    budget, in runs/<arm>/steps-<steps>/seed-<n>."""
    arms = {**ARMS, **cfg.arm_overrides}
    unknown = [a for a in [*cfg.arms, *cfg.curve_arms] if a not in arms]
    if unknown:
        raise ConfigError(
            f"CompareConfig.arms / curve_arms: unknown arm(s) {unknown}; known: {sorted(arms)} (define more in"
            " arm_overrides)"
        )
    managed = {"store", "student", "out", "seed", "max_steps", "device"}  # set per run by compare
    for where, overrides in [("train", cfg.train), *((f"arm {a!r}", arms[a]) for a in cfg.arms)]:
        clash = sorted(managed & set(overrides) - ({"store"} if where.startswith("arm") else set()))
        if clash:
            raise ConfigError(
                f"CompareConfig {where}: {clash} are set by compare itself (store/student, out, seeds, steps, device);"
                " drop them"
            )
    for name in {*cfg.arms, *cfg.curve_arms}:
        if "store" in arms[name]:
            _check_same_data(name, arms[name]["store"], store)
    names, seeds, budget, where = cfg.arms, cfg.seeds, cfg.steps, ""
    if steps is not None:
        names, seeds, budget, where = cfg.curve_arms, cfg.curve_seeds or cfg.seeds, steps, f"steps-{steps}"
    out: dict[str, dict[int, TrainConfig]] = {}
    for name in names:
        out[name] = {}
        for seed in range(seeds):
            arm_store = (latent_store or store) if arms[name].get("mode") == "latent" else store
            arm_store = arms[name].get("store", arm_store)  # e.g. the same data stored compactly
            fields = {
                **base,
                **cfg.train,
                **arms[name],
                "store": arm_store,
                "student": student.to_dict(),
                "max_steps": budget,
                "seed": seed,
                "device": cfg.device,
                "out": str(Path(cfg.out) / "runs" / name / where / f"seed-{seed}"),
            }
            try:
                out[name][seed] = train_config(fields)
            except ConfigError as e:
                raise ConfigError(f"compare arm {name!r} (overrides {arms[name]}): {e}") from e
    return out


def _check_same_data(arm: str, arm_store: str, store: str) -> None:
    """An arm may train from its own store (e.g. the same samples stored through a projection or
    another codec) only if it holds the same data for the same student tokenizer: else the
    paired difference would compare other samples, not other storage."""
    from kvdistill.store import open_specs

    ours, theirs = open_specs(store)[0], open_specs(arm_store)[0]
    for field in ("data_fingerprint", "tokenizer_fingerprint"):
        if getattr(ours, field) != getattr(theirs, field):
            raise ConfigError(
                f"compare arm {arm!r}: its store {arm_store} has another {field} than {store}; an arm's own store must"
                " hold the same data for the same student (dump it with the same --data and --student)"
            )


def _demo_store(cfg: CompareConfig, progress: bool) -> tuple[str, ModelSpec, DataSpec]:
    """The embedded default: run `kvdistill demo` (teachers cached), or reuse a finished one."""
    from kvdistill.demo import run_demo

    out = Path(cfg.demo.out)
    summary = out / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["config"] == cfg.demo.to_dict():
        print(f"[compare] reusing the demo in {out} (its summary.json has this demo config)", flush=True)
        store = json.loads(summary.read_text())["store"]["path"]
    else:
        store = run_demo(cfg.demo, progress=progress)["store"]["path"]
    # The student the store was dumped for, as the demo's own CE run recorded it.
    student = TrainConfig.load(out / "runs" / "student-ce" / "train_config.yaml").student
    test = DataSpec.from_dict({**cfg.demo.data.to_dict(), "split": "test", "limit": None})
    return store, student, test


def demo_base(cfg: CompareConfig) -> dict[str, Any]:
    """TrainConfig fields every arm gets on the embedded default: the demo's student settings.
    Its student starts from random weights, so every arm trains all of them (lora_r 0): LoRA
    over a random base (the kava recipe's lora_r 128) cannot learn the task (latent arms stayed
    at answer CE 4.9, from 5.9, for 300 steps)."""
    return {"lr": 3e-3, "batch_size": cfg.demo.batch_size, "lora_r": 0}


def _run_one(tcfg: TrainConfig, ecfg: EvalConfig, progress: bool) -> dict[str, Any]:
    from kvdistill.train.eval import evaluate
    from kvdistill.train.loop import train

    run = Path(tcfg.out)
    record = run / "compare_run.json"
    if record.exists() and (run / "train_config.yaml").exists():
        done = json.loads(record.read_text())
        if TrainConfig.load(run / "train_config.yaml") == tcfg and done["eval_config"] == ecfg.to_dict():
            print(f"[compare] {run}: done before with this config, reusing it", flush=True)
            return done
    summary = train(tcfg, progress=progress)
    result = evaluate(ecfg, progress=progress)
    done = {"train": summary, "eval": result, "eval_config": ecfg.to_dict()}
    record.write_text(json.dumps(done, indent=1))
    return done


def _correct(ecfg: EvalConfig) -> dict[str, float]:
    """question id -> 1.0 / 0.0, from the eval JSON `evaluate` wrote for a run."""
    preds = json.loads(Path(ecfg.out).read_text())["predictions"]
    return {str(p["id"]): float(p["correct"]) for p in preds}


def _train_and_eval(
    plan: dict[str, dict[int, TrainConfig]], cfg: CompareConfig, eval_data: DataSpec, progress: bool, label: str = ""
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, seeds in plan.items():
        runs[name] = []
        for seed, tcfg in seeds.items():
            ecfg = EvalConfig(
                model=tcfg.out,
                data=eval_data,
                max_new_tokens=cfg.max_new_tokens,
                out=str(Path(tcfg.out) / "eval.json"),
                device=cfg.device,
                mode=tcfg.mode,
            )
            done = _run_one(tcfg, ecfg, progress)
            ev, tr = done["eval"], done["train"]
            runs[name].append(
                {
                    "seed": seed,
                    "run": tcfg.out,
                    "accuracy": ev["accuracy"],
                    "perplexity": ev["perplexity"],
                    "n_eval": ev["n"],
                    "correct": _correct(ecfg),
                    **{
                        f"mean_last_20_{t}": tr.get(f"mean_last_20_{t}", tr.get(f"final_{t}"))
                        for t in ("ce", "kv_k", "kv_v")
                    },
                }
            )  # final_*: runs of older versions
            print(
                f"[compare] {name}{label} seed {seed}: accuracy {ev['accuracy']:.3f}, perplexity"
                f" {ev['perplexity']:.3f}",
                flush=True,
            )
    return runs


def _matrix(rs: list[dict[str, Any]], ids: list[str]) -> list[list[float]]:
    return [[r["correct"][i] for i in ids] for r in rs]


def _arm_stats(
    runs: dict[str, list[dict[str, Any]]], overrides: dict[str, Any], bootstrap: int, baseline: str
) -> dict[str, Any]:
    """Per arm: mean_ci of accuracy / perplexity; against the baseline (paired by seed):
    paired_stats per metric, Holm-adjusted p, and (bootstrap > 0) the accuracy bootstrap over
    seeds x questions."""
    base = {r["seed"]: r for r in runs[baseline]}
    ids = sorted(runs[baseline][0]["correct"])
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        arm = {
            "overrides": overrides.get(name, {}),
            "runs": [{k: v for k, v in r.items() if k != "correct"} for r in rs],
        }
        for metric in ("accuracy", "perplexity"):
            arm[metric] = mean_ci([r[metric] for r in rs])
        if name != baseline:
            arm["vs_baseline"] = {
                m: paired_stats([r[m] - base[r["seed"]][m] for r in rs]) for m in ("accuracy", "perplexity")
            }
            if bootstrap:
                for r in rs:
                    if sorted(r["correct"]) != ids:
                        raise ConfigError(
                            f"compare: run {r['run']} was evaluated on other questions than {baseline}'s; delete its"
                            " eval.json and re-run"
                        )
                arm["vs_baseline"]["accuracy"]["bootstrap"] = bootstrap_paired(
                    _matrix(rs, ids), _matrix([base[r["seed"]] for r in rs], ids), bootstrap
                )
        out[name] = arm
    for metric in ("accuracy", "perplexity"):
        adjusted = holm({n: a["vs_baseline"][metric]["p"] for n, a in out.items() if n != baseline})
        for n, p in adjusted.items():
            out[n]["vs_baseline"][metric]["p_holm"] = p
    return out


def main_covers_curve(cfg: CompareConfig) -> bool:
    """Whether the main runs (cfg.steps) are the curve's point at that budget: they train every
    curve arm with at least the curve's seeds. Otherwise that budget is trained for the curve."""
    return all(a in cfg.arms for a in cfg.curve_arms) and (cfg.curve_seeds or cfg.seeds) <= cfg.seeds


def _curve(
    cfg: CompareConfig, main: dict[str, list[dict[str, Any]]], extra: dict[int, dict[str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """Accuracy against the step budget for cfg.curve_arms (the main runs are the cfg.steps
    point when `main_covers_curve`, their first curve_seeds seeds), paired differences to the baseline per budget, and
    the baseline's steps each other arm's mean accuracy is worth (`steps_equivalent`)."""
    n_seeds = cfg.curve_seeds or cfg.seeds
    budgets = {**extra}
    if main_covers_curve(cfg):
        budgets[cfg.steps] = {a: main[a][:n_seeds] for a in cfg.curve_arms}
    points: dict[str, dict[str, Any]] = {a: {} for a in cfg.curve_arms}
    for steps in sorted(budgets):
        runs = budgets[steps]
        base = {r["seed"]: r for r in runs[cfg.baseline]}
        for a in cfg.curve_arms:
            rs = runs[a]
            points[a][str(steps)] = {
                "accuracy": mean_ci([r["accuracy"] for r in rs]),
                "perplexity": mean_ci([r["perplexity"] for r in rs]),
                "seeds": [r["accuracy"] for r in rs],
            }
            if a != cfg.baseline:
                points[a][str(steps)]["vs_baseline"] = paired_stats(
                    [r["accuracy"] - base[r["seed"]]["accuracy"] for r in rs]
                )
    base_curve = {int(s): p["accuracy"]["mean"] for s, p in points[cfg.baseline].items()}
    worth = {
        a: {s: steps_equivalent(base_curve, p["accuracy"]["mean"]) for s, p in points[a].items()}
        for a in cfg.curve_arms
        if a != cfg.baseline
    }
    return {
        "steps": sorted(budgets),
        "seeds": n_seeds,
        "baseline": cfg.baseline,
        "arms": points,
        "baseline_steps_equivalent": worth,
    }


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """The comparison (module docstring), one process per --out at a time: a second compare on
    the same folder stops with ShardBusy (exit 6) naming the first."""
    with FileLock(
        Path(cfg.out) / ".kvdistill.lock",
        f"compare directory {cfg.out}",
        fix="wait for that compare to finish, or use another --out",
    ):
        return _run_compare(cfg, progress)


def _run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    from kvdistill.train.report import compare_report

    t0 = time.perf_counter()
    if cfg.store is not None:
        store, student, eval_data, base = cfg.store, cfg.student, cfg.eval_data, {}
    else:
        store, student, eval_data = _demo_store(cfg, progress)
        base = demo_base(cfg)
    latent_store = None
    if latent_arms(cfg) and cfg.store is None:  # the demo's teachers, dumped with R-KV compression
        from kvdistill.demo import demo_models, dump_latent_store

        demo_student, teachers, _, _ = demo_models(cfg.demo, Path(cfg.demo.out), progress)
        latent_store = str(dump_latent_store(cfg.demo, Path(cfg.demo.out), demo_student, teachers, progress))
    plan = arm_configs(cfg, store, student, base, latent_store)
    curve_plans = {
        n: arm_configs(cfg, store, student, base, latent_store, steps=n)
        for n in cfg.curve_steps
        if n != cfg.steps or not main_covers_curve(cfg)
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "compare_config.yaml")
    runs = _train_and_eval(plan, cfg, eval_data, progress)
    curve_runs = {
        n: _train_and_eval(p, cfg, eval_data, progress, label=f" ({n} steps)") for n, p in curve_plans.items()
    }
    result = {
        "config": cfg.to_dict(),
        "store": str(store),
        "seeds": cfg.seeds,
        "baseline": cfg.baseline,
        "n_eval": runs[cfg.baseline][0]["n_eval"],
        "confidence": CONFIDENCE,
        "alpha": ALPHA,
        "power": POWER,
        "t_quantile": t_quantile(CONFIDENCE, cfg.seeds - 1),
        "arms": _arm_stats(runs, {**ARMS, **cfg.arm_overrides}, cfg.bootstrap, cfg.baseline),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if cfg.curve_steps:
        result["curve"] = _curve(cfg, runs, curve_runs)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.html").write_text(compare_report(result))
    print(format_compare(result), flush=True)
    return result


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_compare(result: dict[str, Any]) -> str:
    """The table `compare` prints: per arm mean ± CI, and against the baseline the paired difference,
    its p (paired t; Holm-adjusted over the arms; bootstrap), d_z and the minimum detectable
    effect, with the significant ones (Holm p < alpha) marked *."""
    conf, alpha = round(100 * result["confidence"]), result.get("alpha", ALPHA)

    def ci(s: dict[str, Any] | None, sign: str = "") -> str:
        return f"{s['mean']:{sign}.3f} ± {s['ci']:.3f}" if s else "-"

    rows = [
        [
            "arm",
            "accuracy",
            "Δ accuracy",
            "p (t)",
            "p Holm",
            "p boot",
            "d_z",
            "MDE",
            "perplexity",
            "Δ perplexity",
            "p Holm",
        ]
    ]
    for name, a in result["arms"].items():
        vs = a.get("vs_baseline") or {}
        acc, ppl = vs.get("accuracy"), vs.get("perplexity")
        if acc is None:
            rows.append([name, ci(a["accuracy"]), "-", "-", "-", "-", "-", "-", ci(a["perplexity"]), "-", "-"])
            continue
        boot = acc.get("bootstrap")
        star = lambda s: " *" if s["p_holm"] < alpha else ""  # noqa: E731
        rows.append(
            [
                name,
                ci(a["accuracy"]),
                ci(acc, "+") + star(acc),
                _p(acc["p"]),
                _p(acc["p_holm"]),
                _p(boot["p"]) if boot else "-",
                f"{acc['d_z']:+.2f}" if acc["d_z"] is not None else "-",
                f"{acc['mde']:.3f}",
                ci(a["perplexity"]),
                ci(ppl, "+") + star(ppl),
                _p(ppl["p_holm"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "",
        (
            f"{result['seeds']} seeds per arm, {result.get('n_eval', '?')} test questions; mean ± {conf}% CI (Student"
            f" t, t = {result['t_quantile']:.3f}); Δ: paired difference to {result.get('baseline', 'ce')}; *"
            f" significant (Holm-adjusted paired t, p < {alpha}); MDE: smallest Δ accuracy a paired t-test with these"
            f" seeds detects with power {result.get('power', POWER)}"
        ),
    ]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]))
    curve = result.get("curve")
    if curve:
        lines.append("")
        lines.append(
            f"sample efficiency ({curve['seeds']} seeds per budget): accuracy mean ± {conf}% CI by optimizer steps"
        )
        for a, pts in curve["arms"].items():
            cells = [f"{s}: {ci(p['accuracy'])}" for s, p in pts.items()]
            lines.append(f"  {a}: " + ", ".join(cells))
        base = curve["baseline"]
        for a, worth in curve["baseline_steps_equivalent"].items():
            said = []
            for s, w in worth.items():
                if w["bound"] == "within":
                    said.append(f"{a} at {s} steps = {base} at {w['steps']:.0f} steps ({w['steps'] / int(s):.2f}x)")
                elif w["bound"] == "above":
                    said.append(f"{a} at {s} steps > {base} at any budget measured (<= {w['at_least']})")
                else:
                    said.append(f"{a} at {s} steps <= {base} at {w['at_most']} steps")
            lines.append("  " + "; ".join(said))
    lines.append(f"wall time {result['seconds']:.0f}s")
    return "\n".join(lines)
