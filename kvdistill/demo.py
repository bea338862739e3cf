"""`kvdistill demo`: the whole pipeline on one CPU machine, no network.

synthetic arithmetic data -> a BPE tokenizer trained on it -> two tiny teachers of other
geometries (Qwen2 with GQA, Llama), briefly trained and cached -> both dumped over N shards by
the local array executor into DIR/store.zarr -> finalize -> a student trained from the store
(CE + KV) and a CE-only baseline with the same seed and steps -> evaluation of all four ->
a table, DIR/summary.json and DIR/training.png.

`--mode latent` (KaVa): the same tokenizer, teachers and student, dumped with R-KV latent
compression (DumpTask.latent, `latent_slots` slots) into DIR/store-latent.zarr -> a latent
student with the KV loss (CODI + KV), one without it (CODI only) and a CoT student (CE + KV on
the written chain) from that store -> eval of all three: accuracy, perplexity, forward passes
and generated tokens per question -> a table and DIR/summary-latent.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from kvdistill import tiny
from kvdistill.core.data import data_fingerprint, load_examples
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import DemoConfig, DumpConfig, EvalConfig, LatentSpec, ModelSpec, TrainConfig
from kvdistill.store import finalize, format_inspect, inspect
from kvdistill.train.eval import evaluate
from kvdistill.train.loop import train

__all__ = ["TEACHERS", "STUDENT", "demo_models", "run_demo", "run_latent_demo"]

# Teachers differ from the student in depth, heads and head_dim; teacher-llama's KV width
# equals the student's (identity adapter), teacher-qwen2's does not (linear adapter).
TEACHERS = {
    "teacher-qwen2": dict(arch="qwen2", layers=6, hidden=128, heads=4, kv_heads=2, head_dim=32),
    "teacher-llama": dict(arch="llama", layers=4, hidden=128, heads=8, kv_heads=2, head_dim=16),
}
STUDENT = dict(arch="qwen2", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16)
# Optional: a teacher with its own tokenizer (another vocabulary size) ...
CROSS_TOKENIZER = dict(arch="llama", layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32)
CROSS_VOCAB = 512
# ... and teacher-qwen2 read under another prompt (a dual-prompt pair with teacher-qwen2).
THINK_TEMPLATE = "Think step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\n#### {answer}"


def _cached(path: Path, recipe: dict[str, Any]) -> bool:
    marker = path / "kvdistill_recipe.json"
    return marker.exists() and json.loads(marker.read_text()) == recipe


def _mark(path: Path, recipe: dict[str, Any]) -> None:
    (path / "kvdistill_recipe.json").write_text(json.dumps(recipe, indent=1))


def _plot(runs: dict[str, Path], out: Path) -> Path:
    rows = {name: [json.loads(line) for line in (p / "metrics.jsonl").open()] for name, p in runs.items()}
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for name, r in rows.items():
        axes[0].plot([x["step"] for x in r], [x["ce"] for x in r], label=name)
    axes[0].set(title="CE on reasoning + answer", xlabel="step", yscale="log")
    axes[0].legend()
    kv = next((r for r in rows.values() if "kv_k" in r[0]), None)
    if kv:
        axes[1].plot([x["step"] for x in kv], [x["kv_k"] for x in kv], label="K")
        axes[1].plot([x["step"] for x in kv], [x["kv_v"] for x in kv], label="V")
        axes[1].set(title="KV loss (layer-std normalised MSE)", xlabel="step")
        axes[1].legend()
        grid = torch.tensor([x["kv_k_layers"] for x in kv]).T  # [L, logged steps]
        im = axes[2].imshow(
            grid, aspect="auto", origin="lower", extent=(kv[0]["step"], kv[-1]["step"], -0.5, grid.shape[0] - 0.5)
        )
        axes[2].set(title="K loss per student layer", xlabel="step", ylabel="layer")
        fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=100)
    return path


def demo_models(cfg: DemoConfig, out: Path, progress: bool) -> tuple[ModelSpec, list[ModelSpec], dict[str, Any], Any]:
    """The tokenizer, the teachers (briefly trained) and the student's initial weights, each
    cached under DIR/models by its recipe. Returns (student, teachers, recipes, test data)."""
    train_rows = load_examples(cfg.data)
    test_data = type(cfg.data).from_dict({**cfg.data.to_dict(), "split": "test", "limit": None})
    models = out / "models"
    template = ModelSpec(name_or_path="x").prompt_template
    base = {"data": data_fingerprint(train_rows), "seed": cfg.seed, "template": template}

    tok_dir = models / "tokenizer"
    if not _cached(tok_dir, base):
        tok = tiny.train_tokenizer(tiny.corpus(train_rows, template))
        tok.save_pretrained(tok_dir)
        _mark(tok_dir, base)
    tok = AutoTokenizer.from_pretrained(tok_dir)

    tokenizers = {name: tok_dir for name in TEACHERS}
    recipes = dict(TEACHERS)
    if "cross-tokenizer" in cfg.extra_teachers:
        xtok_dir = models / "tokenizer-xtok"
        if not _cached(xtok_dir, {**base, "vocab": CROSS_VOCAB}):
            tiny.train_tokenizer(tiny.corpus(train_rows, template), vocab_size=CROSS_VOCAB).save_pretrained(xtok_dir)
            _mark(xtok_dir, {**base, "vocab": CROSS_VOCAB})
        tokenizers["teacher-xtok"] = xtok_dir
        recipes["teacher-xtok"] = CROSS_TOKENIZER
    for name, geo in recipes.items():
        path = models / name
        recipe = {
            **base,
            **geo,
            "steps": cfg.teacher_steps,
            "batch_size": cfg.batch_size,
            "tokenizer": str(tokenizers[name]),
        }
        if _cached(path, recipe):
            print(f"[demo] {name}: trained copy found in {path}, reusing it")
            continue
        t_tok = AutoTokenizer.from_pretrained(tokenizers[name])
        model = tiny.build_model(tokenizer=t_tok, seed=cfg.seed, **geo)
        tiny.train_lm(
            model,
            t_tok,
            train_rows,
            template,
            steps=cfg.teacher_steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            desc=f"train {name}",
            progress=progress,
        )
        tiny.save(model, t_tok, path)
        _mark(path, recipe)
    student_init = models / "student-init"
    recipe = {**base, **STUDENT}
    if not _cached(student_init, recipe):
        tiny.save(tiny.build_model(tokenizer=tok, seed=cfg.seed + 1, **STUDENT), tok, student_init)
        _mark(student_init, recipe)
    student = ModelSpec(name_or_path=str(student_init), name="student")
    teachers = [ModelSpec(name_or_path=str(models / n), name=n) for n in recipes]
    if "dual-prompt" in cfg.extra_teachers:
        teachers.append(
            ModelSpec(
                name_or_path=str(models / "teacher-qwen2"), name="teacher-qwen2-think", prompt_template=THINK_TEMPLATE
            )
        )
    return student, teachers, recipes, test_data


class _Laps:
    """Wall time per demo stage, printed as each one ends."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, stage: str) -> None:
        self.times[stage] = round(time.perf_counter() - self.t, 1)
        print(f"[demo] {stage}: {self.times[stage]:.1f}s", flush=True)
        self.t = time.perf_counter()


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars; ours show the stages
    if cfg.mode == "latent":
        return run_latent_demo(cfg, progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "demo_config.yaml")
    lap = _Laps()
    times = lap.times
    student, teachers, _, test_data = demo_models(cfg, out, progress)
    lap("teachers")

    store = out / "store.zarr"
    dump_base = DumpConfig(
        teacher=teachers[0],
        student=student,
        store=str(store),
        data=cfg.data,
        num_shards=cfg.num_shards,
        batch_size=64,
        device="cpu",
    )
    run_local(dump_tasks(dump_base, teachers), progress=progress)
    lap("dump")
    finalize(store)
    store_info = inspect(store)
    print(format_inspect(store_info))
    lap("finalize")

    runs = {"student-kv": cfg.kv_weight, "student-ce": 0.0}
    train_summaries = {}
    for name, kv_weight in runs.items():
        tcfg = TrainConfig(
            store=str(store),
            student=student,
            out=str(out / "runs" / name),
            kv_weight=kv_weight,
            max_steps=cfg.student_steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            lr=3e-3,
            device="cpu",
        )
        train_summaries[name] = train(tcfg, progress=progress)
        lap(f"train {name}")

    evals = {}
    for spec in teachers:
        evals[spec.name] = evaluate(
            EvalConfig(
                model=spec.name_or_path,
                data=test_data,
                prompt_template=spec.prompt_template,
                out=str(out / "eval" / f"{spec.name}.json"),
                device="cpu",
            ),
            progress=progress,
        )
    for name in runs:
        evals[name] = evaluate(
            EvalConfig(
                model=str(out / "runs" / name), data=test_data, out=str(out / "eval" / f"{name}.json"), device="cpu"
            ),
            progress=progress,
        )
    lap("eval")
    plot = _plot({n: out / "runs" / n for n in runs}, out)

    table = []
    for name, ev in evals.items():
        ts = train_summaries.get(name, {})
        table.append(
            {
                "model": name,
                "accuracy": ev["accuracy"],
                "perplexity": ev["perplexity"],
                "kv_loss_mean_last_20": (
                    (ts["mean_last_20_kv_k"] + ts["mean_last_20_kv_v"]) / 2
                    if ts.get("mean_last_20_kv_k") is not None
                    else None
                ),
            }
        )
    summary = {
        "config": cfg.to_dict(),
        "results": table,
        "train": train_summaries,
        "store": {
            "path": str(store),
            "bytes": store_info["bytes"],
            "bytes_per_token": store_info["bytes_per_token"],
            "teachers": store_info["teachers"],
        },
        "seconds": times,
        "total_seconds": round(sum(times.values()), 1),
        "plot": str(plot),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_summary(summary))
    return summary


def dump_latent_store(
    cfg: DemoConfig, out: Path, student: ModelSpec, teachers: list[ModelSpec], progress: bool = True
) -> Path:
    """DIR/store-latent.zarr: the demo's teachers dumped with R-KV compression to
    cfg.latent_slots slots (and the full K/V), finalized. Complete shards of an earlier run are
    skipped; a store dumped with other settings is refused by the store's fingerprints."""
    store = out / "store-latent.zarr"
    latent = LatentSpec(slots=cfg.latent_slots)
    dump_base = DumpConfig(
        teacher=teachers[0],
        student=student,
        store=str(store),
        data=cfg.data,
        num_shards=cfg.num_shards,
        batch_size=64,
        latent=latent,
        device="cpu",
    )
    run_local(dump_tasks(dump_base, teachers), progress=progress)
    finalize(store)
    return store


def run_latent_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """KaVa latent mode on the demo's models: latent students with and without the KV loss
    against a CoT student, all from one latent-compressed store; accuracy vs cost per question."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "demo_config-latent.yaml")
    lap = _Laps()
    student, teachers, _, test_data = demo_models(cfg, out, progress)
    lap("teachers")

    store = dump_latent_store(cfg, out, student, teachers, progress)
    lap("dump (latent)")
    store_info = inspect(store)
    print(format_inspect(store_info))
    lap("finalize")

    # Paper recipe where it fits a tiny model: weight decay 0.1, grad clip 2.0, 5% warm-up,
    # alpha1 = 10 (CODI); full fine-tuning instead of LoRA r=128 (the student is 64 wide).
    common = dict(
        store=str(store),
        student=student,
        max_steps=cfg.student_steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        lr=3e-3,
        weight_decay=0.1,
        grad_clip=2.0,
        warmup_steps=max(1, cfg.student_steps // 20),
        device="cpu",
    )
    runs = {
        "latent-kv": dict(mode="latent", kv_weight=cfg.kv_weight, latent_iterations=cfg.latent_iterations),
        "latent-codi": dict(mode="latent", kv_weight=0.0, latent_iterations=cfg.latent_iterations),
        "cot-kv": dict(mode="cot", kv_weight=cfg.kv_weight),
    }
    train_summaries = {}
    for name, kw in runs.items():
        tcfg = TrainConfig(**common, out=str(out / "runs-latent" / name), **kw)
        train_summaries[name] = train(tcfg, progress=progress)
        lap(f"train {name}")

    table = []
    for name, kw in runs.items():
        ev = evaluate(
            EvalConfig(
                model=str(out / "runs-latent" / name),
                data=test_data,
                mode=kw["mode"],
                out=str(out / "eval-latent" / f"{name}.json"),
                device="cpu",
            ),
            progress=progress,
        )
        ts = train_summaries[name]
        table.append(
            {
                "model": name,
                "mode": kw["mode"],
                "accuracy": ev["accuracy"],
                "perplexity": ev["perplexity"],
                "forward_passes_per_question": ev["forward_passes_per_question"],
                "generated_tokens_per_question": ev["generated_tokens_per_question"],
                "kv_loss_mean_last_20": (
                    (ts["mean_last_20_kv_k"] + ts["mean_last_20_kv_v"]) / 2
                    if ts.get("mean_last_20_kv_k") is not None
                    else None
                ),
            }
        )
    lap("eval")
    summary = {
        "config": cfg.to_dict(),
        "results": table,
        "train": train_summaries,
        "store": {
            "path": str(store),
            "bytes": store_info["bytes"],
            "bytes_per_token": store_info["bytes_per_token"],
            "teachers": store_info["teachers"],
        },
        "seconds": lap.times,
        "total_seconds": round(sum(lap.times.values()), 1),
    }
    (out / "summary-latent.json").write_text(json.dumps(summary, indent=1))
    print(format_latent_summary(summary))
    return summary


def format_latent_summary(s: dict[str, Any]) -> str:
    c = s["config"]
    lines = [
        "",
        (
            f"latent: M = {c['latent_slots']} slots, T = {c['latent_iterations']} Jacobi iterations; perplexity:"
            " latent = gold answer | question + latents, cot = gold reasoning + answer | question"
        ),
        (
            f"{'model':<12} {'mode':<7} {'accuracy':>9} {'perplexity':>11} {'fwd/question':>13}"
            f" {'tokens/question':>16} {'KV loss, last 20':>17}"
        ),
    ]
    for r in s["results"]:
        kv = f"{r['kv_loss_mean_last_20']:.4f}" if r["kv_loss_mean_last_20"] is not None else "-"
        lines.append(
            f"{r['model']:<12} {r['mode']:<7} {r['accuracy']:>9.3f} {r['perplexity']:>11.3f}"
            f" {r['forward_passes_per_question']:>13.1f} {r['generated_tokens_per_question']:>16.1f} {kv:>17}"
        )
    st = s["store"]
    lines.append(
        f"\nstore {st['path']}: {st['bytes']:,} bytes, {st['bytes_per_token']:.1f} bytes/token (all teachers)"
    )
    lines.append(
        "wall time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
        + f"; total {s['total_seconds']:.0f}s"
    )
    return "\n".join(lines)


def format_summary(s: dict[str, Any]) -> str:
    lines = ["", f"{'model':<20} {'accuracy':>9} {'perplexity':>11} {'KV loss, last 20':>17}"]
    for r in s["results"]:
        kv = f"{r['kv_loss_mean_last_20']:.4f}" if r["kv_loss_mean_last_20"] is not None else "-"
        lines.append(f"{r['model']:<20} {r['accuracy']:>9.3f} {r['perplexity']:>11.3f} {kv:>17}")
    st = s["store"]
    lines.append(
        f"\nstore {st['path']}: {st['bytes']:,} bytes, {st['bytes_per_token']:.1f} bytes/token (all teachers)"
    )
    lines.append(
        "wall time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
        + f"; total {s['total_seconds']:.0f}s"
    )
    lines.append(f"plot: {s['plot']}")
    return "\n".join(lines)
