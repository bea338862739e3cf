"""`kvdistill train diagnose`: the loss terms and their gradients, before any step is taken.

Builds exactly what `train` builds (`loop.build_mode`: `student.load_student` + `distiller.cot_mode`,
student, store checks, LoRA, adapters, router; or `latent.latent_mode`, the latent head, KV
adapters and CODI maps), runs a few batches of the same stream through it without stepping,
and reports per term its value, the norm of its gradient w.r.t. the student's trainable
parameters and w.r.t. the mode's own modules (cot: adapters + router; latent: the latent head,
and the KV adapters + CODI maps), and the cosine between its student gradient and CE's (> 0:
the two pull the student the same way). Then suggests weights that make each term's weighted
gradient norm on the student equal CE's (ce_weight x |grad CE|), the usual first guess for a
balance:

    kvdistill train diagnose --config run.yaml --batches 4
    kvdistill train diagnose --checkpoint runs/lat --json diag.json  # at a trained run's weights
    kvdistill train diagnose --run runs/lat  # only: do the run's logged loss terms fall?

CE is "ce" in mode cot and "ce_answer" (the answer given question + latents) in mode latent.
Terms are evaluated as at train step 0 (warm-ups at their start, layer annealing at its first
layer), with --checkpoint too. A term whose weight is 0 is not computed by train, so it is not
reported. The entropy term reaches only the router, so no weight is suggested for it.

--checkpoint takes a run directory (its final/), a final/ directory, or a training checkpoint
RUN_DIR/checkpoints/step-N; the config is then the run's train_config.yaml unless --config
is given, and its metrics curve (`loss_curve`) is printed after the table.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from kvdistill.core.models import resolve_device
from kvdistill.schemas import ConfigError, TrainConfig
from kvdistill.store import StoreError

from .latent import LATENT_FILE
from .loop import SUMMARY_WINDOW, build_mode, training_loader
from .mode import Mode

__all__ = ["diagnose", "format_table", "load_trained", "run_dir_of", "loss_curve", "format_curve"]


def _terms(cfg: TrainConfig) -> tuple[str, dict[str, float], tuple[tuple[str, str], ...]]:
    """(the CE term, {term: its weight in the loss}, ((term, the config field to suggest a weight for), ...))."""
    if cfg.mode == "latent":
        weights = {
            "ce_answer": cfg.ce_weight,
            "ce_cot": cfg.cot_weight,
            "codi": cfg.codi_weight,
            "kv": cfg.kv_weight,
            "kv_k": cfg.kv_weight,
            "kv_v": cfg.kv_weight,
        }
        return "ce_answer", weights, (("kv", "kv_weight"), ("codi", "codi_weight"), ("ce_cot", "cot_weight"))
    weights = {
        "ce": cfg.ce_weight,
        "kv": cfg.kv_weight,
        "kv_k": cfg.kv_weight,
        "kv_v": cfg.kv_weight,
        "cka": cfg.cka_weight,
        "router_entropy": -cfg.router_entropy_weight,
        "z": cfg.kv_weight,
        "attn_kl": cfg.attn_kl_weight,
    }
    return (
        "ce",
        weights,
        (("kv", "kv_weight"), ("z", "kv_weight"), ("cka", "cka_weight"), ("attn_kl", "attn_kl_weight")),
    )


def _groups(mode: Mode) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by where they sit: the student, then the mode's own modules."""
    m = mode.model
    groups = {"student": [p for p in m.student.parameters() if p.requires_grad]}
    if mode.name == "latent":
        groups["head"] = [p for p in m.head.parameters() if p.requires_grad]
        groups["adapters"] = [p for p in (*m.adapters.parameters(), *m.codi.parameters()) if p.requires_grad]
    else:
        groups["adapters"] = [p for p in m.adapters.parameters() if p.requires_grad]
        if m.router is not None:
            groups["adapters"] += [p for p in m.router.parameters() if p.requires_grad]
        if m.zspace is not None:  # the learned maps into Z (train/zspace.py)
            groups["adapters"] += [p for p in m.zspace.parameters() if p.requires_grad]
    return groups


def _norm(grads: tuple[torch.Tensor | None, ...]) -> float:
    sq = [g.double().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def _cosine(a: tuple[torch.Tensor | None, ...], b: tuple[torch.Tensor | None, ...]) -> float | None:
    """cos(a, b) of two gradients given per parameter (None: zero); None when either is zero."""
    dot = sum(
        float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True) if x is not None and y is not None
    )
    na, nb = _norm(a), _norm(b)
    return dot / (na * nb) if na > 0 and nb > 0 else None


def _grad(value: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor | None, ...]:
    if not value.requires_grad:  # a term no parameter reaches
        return (None,) * len(params)
    return torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)


def diagnose(cfg: TrainConfig, batches: int = 4, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """{"mode", "batches", "checkpoint" (path loaded or None: at init), "ce_term", "groups",
    "terms": {term: {"weight", "value", "grad_student", "grad_adapters" (+ "grad_head" in mode
    latent), "cos_ce", "weighted_grad_student", "vs_ce"}}, "suggested": {config field: weight}};
    values, norms and cosines are means over the batches (a cosine over the batches where both
    gradients are non-zero; None if none). Term "kv" is kv_k + kv_v, the pair kv_weight
    scales; "vs_ce" is weighted_grad_student over CE's."""
    if batches < 1:
        raise ValueError(f"--batches must be >= 1, got {batches}")
    device = resolve_device(cfg.device)
    built = build_mode(cfg)
    mode = built.mode
    loaded = load_trained(mode, cfg, checkpoint) if checkpoint is not None else None
    model = mode.model
    model.to(device).train()  # the mode train runs in (dropout on, as in its first step)
    groups = _groups(mode)
    params = [p for ps in groups.values() for p in ps]
    bounds = list(itertools.accumulate(len(ps) for ps in groups.values()))
    loader = training_loader(cfg, built, device)  # as in train, the shuffled-KV control included
    ce_name, weights, suggest = _terms(cfg)
    acc: dict[str, dict[str, list[float]]] = {}

    def record(name: str, value: float, grads: tuple[torch.Tensor | None, ...], ce_grads) -> None:
        row = acc.setdefault(name, {"value": [], "cos_ce": [], **{f"grad_{g}": [] for g in groups}})
        row["value"].append(value)
        for g, lo, hi in zip(groups, [0, *bounds[:-1]], bounds, strict=True):
            row[f"grad_{g}"].append(_norm(grads[lo:hi]))
        cos = (
            1.0
            if name == ce_name
            else None
            if ce_grads is None
            else _cosine(grads[: bounds[0]], ce_grads[: bounds[0]])
        )
        if cos is not None:
            row["cos_ce"].append(cos)

    n = 0
    for batch in itertools.islice(loader, batches):
        losses = mode.step(model, batch, device, 0, None)
        terms = {t: losses[t] for t in mode.finite if t in losses}  # CE first in both modes
        ce_grads = kv_k = None
        for name, value in terms.items():
            grads = _grad(value, params)
            if name == ce_name:
                ce_grads = grads
            record(name, value.item(), grads, ce_grads)
            if name == "kv_k":
                kv_k = grads
            if name == "kv_v" and kv_k is not None:  # the pair's gradient is the sum: no extra backward
                both = tuple(
                    None if a is None and b is None else (b if a is None else a if b is None else a + b)
                    for a, b in zip(kv_k, grads, strict=True)
                )
                record("kv", (terms["kv_k"] + value).item(), both, ce_grads)
                kv_k = None
        n += 1
        del losses, terms
    if n == 0:
        raise StoreError(f"store {cfg.store} yielded no batch to diagnose")
    order = [x for t in mode.finite for x in ((t, "kv") if t == "kv_v" else (t,)) if x in acc]
    report: dict[str, dict[str, float | None]] = {}
    for name in order:
        r: dict[str, float | None] = {k: sum(v) / len(v) if v else None for k, v in acc[name].items()}
        r["weight"] = weights[name]
        r["weighted_grad_student"] = abs(weights[name]) * r["grad_student"]
        report[name] = r
    ce_ref = report[ce_name]["weighted_grad_student"]
    for r in report.values():
        r["vs_ce"] = r["weighted_grad_student"] / ce_ref if ce_ref > 0 else None
    suggested: dict[str, float | None] = {}
    for name, field in suggest:
        if name in report:
            g = report[name]["grad_student"]
            suggested[field] = ce_ref / g if g > 0 and ce_ref > 0 else None
    return {
        "mode": mode.name,
        "batches": n,
        "checkpoint": None if loaded is None else str(loaded),
        "ce_term": ce_name,
        "groups": list(groups),
        "terms": report,
        "suggested": suggested,
    }


# --------------------------------------------------------------------------- trained weights

# Fields that decide which modules a run has: a config differing in one cannot load its weights.
_STRUCTURE = (
    "mode",
    "lora_r",
    "lora_targets",
    "adapter",
    "fusion",
    "router_groups",
    "router_hidden",
    "teachers",
    "z_dim",
    "z_teacher_maps",
)


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of a --checkpoint: RUN_DIR itself, RUN_DIR/final or RUN_DIR/checkpoints/step-N."""
    path = Path(checkpoint)
    if (path / "loader.json").is_file():
        return path.parent.parent
    if (path / "config.json").is_file() and not (path / "final").is_dir():
        return path.parent
    return path


def _check_structure(cfg: TrainConfig, run: Path) -> None:
    saved_file = run / "train_config.yaml"
    if not saved_file.is_file():
        return
    saved = TrainConfig.load(saved_file)
    pairs = [(f, getattr(saved, f), getattr(cfg, f)) for f in _STRUCTURE]
    pairs += [("kv_weight > 0", saved.kv_weight > 0, cfg.kv_weight > 0)]
    if cfg.mode == "latent":
        pairs += [("codi_weight > 0", saved.codi_weight > 0, cfg.codi_weight > 0)]
    for field, was, now in pairs:
        if was != now:
            raise ConfigError(
                f"--checkpoint {run} was trained with {field} = {was!r}, this config has {now!r}, so its weights do"
                " not fit; diagnose it with its own config (leave out --config and that flag, or pass --config"
                f" {saved_file})"
            )


def load_trained(mode: Mode, cfg: TrainConfig, checkpoint: str | Path) -> Path:
    """Overwrites `mode.model`, built as at init, with a trained run's weights; returns the path
    they came from. A training checkpoint (RUN_DIR/checkpoints/step-N: accelerate's state of the
    whole module) loads as it is; a final/ directory (or a run directory's) as train saved it:
    the student (with LoRA: the adapter under final/lora onto the base student cfg names; without:
    the saved weights), then latent.pt (head, KV adapters, CODI maps) or adapters.pt + router.pt."""
    from safetensors.torch import load_file, load_model

    path = Path(checkpoint)
    _check_structure(cfg, run_dir_of(path))
    model = mode.model
    if (path / "loader.json").is_file():
        load_model(model, path / "model.safetensors", strict=True)  # tied weights saved once: load_model knows
        return path
    if (path / "final" / "config.json").is_file():
        path = path / "final"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: neither a run directory with final/, a final/ directory, nor"
            " RUN_DIR/checkpoints/step-N"
        )
    if cfg.lora_r > 0:
        from peft import set_peft_model_state_dict

        lora = path / "lora" / "adapter_model.safetensors"
        if not lora.is_file():
            raise FileNotFoundError(
                f"{path} has no lora/adapter_model.safetensors: was it trained without LoRA? Diagnose it with its own"
                " config (--lora-r 0)"
            )
        result = set_peft_model_state_dict(model.student, load_file(lora))
        if result.unexpected_keys:
            raise ValueError(
                f"{lora}: LoRA weights {result.unexpected_keys[:4]} fit no module of this student; diagnose it with"
                " its own config"
            )
    else:
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.student.dtype))
        model.student.load_state_dict(trained.state_dict())
        del trained
    if mode.name == "latent":
        state = torch.load(path / LATENT_FILE, map_location="cpu")
        if state["slots"] != model.head.slots:
            raise StoreError(
                f"{path / LATENT_FILE} has {state['slots']} latent slots, the store {cfg.store} {model.head.slots};"
                " diagnose it on the store it was trained on"
            )
        model.head.load_state_dict(state["head"])
        model.adapters.load_state_dict(state["adapters"])
        model.codi.load_state_dict(state["codi"])
    else:
        model.adapters.load_state_dict(torch.load(path / "adapters.pt", map_location="cpu"))
        if model.router is not None:
            model.router.load_state_dict(torch.load(path / "router.pt", map_location="cpu"))
        if model.zspace is not None:
            state = torch.load(path / "zspace.pt", map_location="cpu")
            state.pop("teachers")
            model.zspace.load_state_dict(state)
    return path


# --------------------------------------------------------------------------- the logged curve

_NOT_LOSSES = ("step", "epoch", "lr", "tokens")


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run takes a training run directory (`kvdistill train --out`)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last row can be cut off (a killed run)
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    if not rows:
        raise ValueError(f"{path} holds no logged step yet")
    return rows


def loss_curve(run_dir: str | Path, window: int = SUMMARY_WINDOW, tolerance: float = 0.05) -> dict[str, Any]:
    """Do a run's logged loss terms fall? From RUN_DIR/metrics.jsonl, per training term (not
    val_*, not the routing means): its first logged value, the mean of its last `window`
    logged values, the relative change (mean_last - first) / |first|, and "falls" below
    -tolerance, "rises" above +tolerance, else "flat". The latent K/V terms are also followed
    per Jacobi iteration (kv_k_iters -> "kv_k[iter 1]", ...: the slots' K/V of that forward).

    Returns {"run", "steps": [first, last] logged, "window", "terms": {term: {"n", "first",
    "mean_last", "change", "trend"}}}."""
    rows = _rows(Path(run_dir) / "metrics.jsonl")
    series: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k in _NOT_LOSSES or k.startswith(("val_", "route_")):
                continue
            if isinstance(v, list) and k.endswith("_iters"):
                for i, x in enumerate(v):
                    series.setdefault(f"{k.removesuffix('_iters')}[iter {i + 1}]", []).append(x)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                series.setdefault(k, []).append(v)
    terms = {}
    for k, xs in series.items():
        tail = xs[-window:]
        first, last = xs[0], sum(tail) / len(tail)
        change = (last - first) / abs(first) if first != 0 else (0.0 if last == 0 else math.copysign(math.inf, last))
        trend = "falls" if change < -tolerance else "rises" if change > tolerance else "flat"
        terms[k] = {"n": len(xs), "first": first, "mean_last": last, "change": change, "trend": trend}
    return {
        "run": str(run_dir),
        "steps": [rows[0].get("step"), rows[-1].get("step")],
        "window": window,
        "terms": terms,
    }


def format_curve(curve: dict[str, Any]) -> str:
    """The curve as a plain-text table."""
    w = curve["window"]
    head = f"{'term':<18}{'logged':>8}{'first':>12}{f'mean last {w}':>14}{'change':>10}  trend"
    lines = [
        (
            f"{curve['run']}/metrics.jsonl, steps {curve['steps'][0]}..{curve['steps'][1]}: first logged value vs the"
            f" mean of the last {w}"
        ),
        head,
        "-" * len(head),
    ]
    for name, r in curve["terms"].items():
        lines.append(
            f"{name:<18}{r['n']:>8}{r['first']:>12.5g}{r['mean_last']:>14.5g}{r['change']:>+10.1%}  {r['trend']}"
        )
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """The diagnosis as a plain-text table plus the suggested weights."""
    latent = result["mode"] == "latent"
    aux = "|grad| adapt+codi" if latent else "|grad| adapt+router"
    head = f"{'term':<16}{'weight':>9}{'value':>12}{'|grad| student':>17}" + (f"{'|grad| head':>14}" if latent else "")
    head += f"{aux:>21}{'cos(CE)':>9}{'weight x |grad|':>17}{'vs CE':>8}"
    where = "at init" if result["checkpoint"] is None else f"at {result['checkpoint']}"
    lines = [
        f"loss terms {where}, mode {result['mode']}, mean over {result['batches']} batch(es), step 0",
        head,
        "-" * len(head),
    ]

    def num(x: float | None, fmt: str, width: int) -> str:
        return f"{'n/a':>{width}}" if x is None else f"{x:>{width}{fmt}}"

    for name, r in result["terms"].items():
        lines.append(
            f"{name:<16}{r['weight']:>9.3g}{r['value']:>12.5g}{r['grad_student']:>17.4g}"
            + (f"{r['grad_head']:>14.4g}" if latent else "")
            + f"{r['grad_adapters']:>21.4g}{num(r['cos_ce'], '.3f', 9)}"
            + f"{r['weighted_grad_student']:>17.4g}{num(r['vs_ce'], '.3g', 8)}"
        )
    ce = result["ce_term"]
    lines.append(
        f"(kv = kv_k + kv_v, the pair kv_weight scales; cos(CE): cosine of the term's student gradient with {ce}'s; vs"
        f" CE: weight x |grad| over {ce}'s)"
    )
    if latent:
        lines.append(
            "(head: the latent slots' init + proj; adapt+codi: the KV adapters and CODI maps; weights: ce_answer"
            " ce_weight, ce_cot cot_weight, codi codi_weight)"
        )
    else:
        lines.append("(router_entropy enters the loss with weight -router_entropy_weight)")
    if result["suggested"]:
        lines.append(f"suggested weights (weight x |grad student| = ce_weight x |grad {ce}|):")
        for field, w in result["suggested"].items():
            lines.append(f"  {field}: {'n/a (no gradient on the student)' if w is None else f'{w:.4g}'}")
    return "\n".join(lines)
