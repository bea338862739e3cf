"""`kvdistill compare`: is the KV signal worth anything, honestly? Every arm is trained and
evaluated once per seed on the same store, data and steps; each arm is reported as the mean
over seeds with a 95% Student t confidence interval, plus its paired difference to the CE-only
arm (same seed, so the shuffle order and adapter init cancel).

    kvdistill compare --seeds 3 --out compare-out
    kvdistill compare --seeds 2 --arms ce,kv-fixed,kv-shuffled --steps 100

Arms are data: a name -> TrainConfig overrides (`ARMS`, extended or replaced by
CompareConfig.arm_overrides). Default store: the embedded demo's (its teachers cached as the
demo caches them). A run whose train config and eval settings are unchanged is reused, so an
interrupted compare continues where it stopped. Writes OUT/compare.json and OUT/compare.html.
"""

from __future__ import annotations

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
from kvdistill.train.recipes import train_config

__all__ = ["ARMS", "CONFIDENCE", "t_cdf_two_sided", "t_quantile", "mean_ci", "arm_configs", "run_compare", "format_compare"]

ARMS: dict[str, dict[str, Any]] = {
    "ce": {"kv_weight": 0.0},  # the baseline every difference is paired against
    "kv-single": {"teachers": ["teacher-qwen2"]},  # the demo's deeper teacher alone
    "kv-fixed": {"fusion": "fixed"},  # every teacher, equal fixed weights
    "kv-headwise": {"fusion": "fixed", "adapter": "headwise"},  # kv-fixed with structured adapters (A/B)
    "kv-similarity": {"fusion": "similarity"},
    "kv-router": {"fusion": "router"},
    "kv-shuffled": {"kv_control": "shuffled"},  # negative control: another sample's K/V
    # KaVa latent mode (the store needs R-KV compressed K/V, `dump --latent-slots`; the demo's
    # is built when one of these arms is asked for). Not in the default arm list: a latent step
    # costs T + 1 forwards. They train the recipe `kvdistill train --mode latent` trains: kava
    # (train/recipes/kava.yaml) under the overrides.
    "latent-codi": {"mode": "latent", "kv_weight": 0.0},  # CODI, no KV loss
    "latent-kv": {"mode": "latent"},
    "latent-shuffled": {"mode": "latent", "kv_control": "shuffled"},  # control
}
CONFIDENCE = 0.95


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
    return {"mean": mean, "ci": t_quantile(confidence, n - 1) * sd / math.sqrt(n), "sd": sd, "n": n, "values": list(values)}


# ----------------------------------------------------------------------------- runs


def latent_arms(cfg: CompareConfig) -> list[str]:
    arms = {**ARMS, **cfg.arm_overrides}
    return [a for a in cfg.arms if arms.get(a, {}).get("mode") == "latent"]


def arm_configs(
    cfg: CompareConfig, store: str, student: ModelSpec, base: dict[str, Any], latent_store: str | None = None
) -> dict[str, dict[int, TrainConfig]]:
    """arm -> seed -> TrainConfig; every config is built (and validated) before anything runs,
    as `kvdistill train` builds it: the recipe of its mode (train/recipes) < `base` < cfg.train
    < the arm < what compare sets. Latent-mode arms train from `latent_store` (default: `store`)."""
    arms = {**ARMS, **cfg.arm_overrides}
    unknown = [a for a in cfg.arms if a not in arms]
    if unknown:
        raise ConfigError(f"CompareConfig.arms: unknown arm(s) {unknown}; known: {sorted(arms)} (define more in arm_overrides)")
    managed = {"store", "student", "out", "seed", "max_steps", "device"}  # set per run by compare
    for where, overrides in [("train", cfg.train), *((f"arm {a!r}", arms[a]) for a in cfg.arms)]:
        clash = sorted(managed & set(overrides))
        if clash:
            raise ConfigError(f"CompareConfig {where}: {clash} are set by compare itself (store/student, out, seeds, steps, device); drop them")
    out: dict[str, dict[int, TrainConfig]] = {}
    for name in cfg.arms:
        out[name] = {}
        for seed in range(cfg.seeds):
            arm_store = (latent_store or store) if arms[name].get("mode") == "latent" else store
            fields = {**base, **cfg.train, **arms[name], "store": arm_store, "student": student.to_dict(), "max_steps": cfg.steps,
                      "seed": seed, "device": cfg.device, "out": str(Path(cfg.out) / "runs" / name / f"seed-{seed}")}
            try:
                out[name][seed] = train_config(fields)
            except ConfigError as e:
                raise ConfigError(f"compare arm {name!r} (overrides {arms[name]}): {e}") from e
    return out


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


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    from kvdistill.train.report import compare_report

    t0 = time.perf_counter()
    if cfg.store is not None:
        store, student, eval_data, base = cfg.store, cfg.student, cfg.eval_data, {}
    else:
        store, student, eval_data = _demo_store(cfg, progress)
        base = {"lr": 3e-3, "batch_size": cfg.demo.batch_size}  # the demo's student settings
    latent_store = None
    if latent_arms(cfg) and cfg.store is None:  # the demo's teachers, dumped with R-KV compression
        from kvdistill.demo import demo_models, dump_latent_store

        demo_student, teachers, _, _ = demo_models(cfg.demo, Path(cfg.demo.out), progress)
        latent_store = str(dump_latent_store(cfg.demo, Path(cfg.demo.out), demo_student, teachers, progress))
    plan = arm_configs(cfg, store, student, base, latent_store)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "compare_config.yaml")
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, seeds in plan.items():
        runs[name] = []
        for seed, tcfg in seeds.items():
            ecfg = EvalConfig(model=tcfg.out, data=eval_data, max_new_tokens=cfg.max_new_tokens, out=str(Path(tcfg.out) / "eval.json"), device=cfg.device, mode=tcfg.mode)
            done = _run_one(tcfg, ecfg, progress)
            ev, tr = done["eval"], done["train"]
            runs[name].append({"seed": seed, "run": tcfg.out, "accuracy": ev["accuracy"], "perplexity": ev["perplexity"], "n_eval": ev["n"],
                               **{f"mean_last_20_{t}": tr.get(f"mean_last_20_{t}", tr.get(f"final_{t}")) for t in ("ce", "kv_k", "kv_v")}})  # final_*: runs of older versions
            print(f"[compare] {name} seed {seed}: accuracy {ev['accuracy']:.3f}, perplexity {ev['perplexity']:.3f}", flush=True)
    arms_out: dict[str, Any] = {}
    base_runs = {r["seed"]: r for r in runs["ce"]}
    for name, rs in runs.items():
        arm = {"overrides": {**ARMS, **cfg.arm_overrides}[name], "runs": rs}
        for metric in ("accuracy", "perplexity"):
            arm[metric] = mean_ci([r[metric] for r in rs])
        if name != "ce":  # paired: the same seed's CE-only run
            arm["vs_ce"] = {m: mean_ci([r[m] - base_runs[r["seed"]][m] for r in rs]) for m in ("accuracy", "perplexity")}
        arms_out[name] = arm
    result = {
        "config": cfg.to_dict(),
        "store": str(store),
        "seeds": cfg.seeds,
        "confidence": CONFIDENCE,
        "t_quantile": t_quantile(CONFIDENCE, cfg.seeds - 1),
        "arms": arms_out,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.html").write_text(compare_report(result))
    print(format_compare(result), flush=True)
    return result


def format_compare(result: dict[str, Any]) -> str:
    conf = round(100 * result["confidence"])

    def ci(s: dict[str, Any] | None, sign: str = "") -> str:
        return f"{s['mean']:{sign}.3f} ± {s['ci']:.3f}" if s else "-"

    rows = [["arm", "accuracy", "Δ accuracy", "perplexity", "Δ perplexity"]]
    for name, a in result["arms"].items():
        vs = a.get("vs_ce") or {}
        rows.append([name, ci(a["accuracy"]), ci(vs.get("accuracy"), "+"), ci(a["perplexity"]), ci(vs.get("perplexity"), "+")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", f"{result['seeds']} seeds per arm; mean ± {conf}% CI (Student t, t = {result['t_quantile']:.3f}); Δ: paired difference to ce"]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]))
    lines.append(f"wall time {result['seconds']:.0f}s")
    return "\n".join(lines)
