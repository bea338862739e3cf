"""`kvdistill train diagnose`: the loss terms at initialisation, before any step.

Builds exactly what `train` builds (`student.load_student` + `distiller.cot_mode`: student,
store checks, LoRA, adapters, router), runs a few batches of the same stream through it without stepping, and reports per
term its value and the norm of its gradient w.r.t. the student's trainable parameters and
w.r.t. the adapters + router. Then suggests weights that make each term's weighted gradient
norm on the student equal CE's (ce_weight x |grad CE|), the usual first guess for a balance:

    kvdistill train diagnose --config run.yaml --batches 4

Terms are evaluated as at train step 0 (warm-ups at their start, layer annealing at its
first layer). The entropy term reaches only the router, so no weight is suggested for it.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from accelerate.utils import set_seed

from kvdistill.core.models import pad_token_id
from kvdistill.schemas import TrainConfig
from kvdistill.store import StoreError

from .distiller import LOSS_TERMS, cot_mode
from .quant import kv_as_stored, kv_to_device
from .stream import KVStream, train_loader
from .student import load_student

__all__ = ["diagnose", "format_table"]


def _norm(grads: tuple[torch.Tensor | None, ...]) -> float:
    sq = [g.double().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def diagnose(cfg: TrainConfig, batches: int = 4) -> dict[str, Any]:
    """{"batches", "terms": {term: {"weight", "value", "grad_student", "grad_adapters",
    "weighted_grad_student"}}, "suggested": {config field: weight}}; values and norms are
    means over the batches. Term "kv" is kv_k + kv_v, the pair kv_weight scales."""
    if batches < 1:
        raise ValueError(f"--batches must be >= 1, got {batches}")
    set_seed(cfg.seed)
    device = torch.device("cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "cuda")
    tokenizer, student, spec, teachers = load_student(cfg)
    model = cot_mode(cfg, student, spec, teachers).model
    model.to(device).train()  # the mode train runs in (dropout on, as in its first step)
    student = [p for p in model.student.parameters() if p.requires_grad]
    aux = [p for p in model.adapters.parameters() if p.requires_grad]
    if model.router is not None:
        aux += [p for p in model.router.parameters() if p.requires_grad]
    stream = KVStream(cfg.store, list(teachers), seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, read_kv=cfg.kv_weight > 0, kv_as_stored=kv_as_stored(cfg.kv_transfer, device))
    pad_id = pad_token_id(tokenizer)

    loader = train_loader(stream, cfg, pad_id)  # as in train, the shuffled-KV control included
    weights = {"ce": cfg.ce_weight, "kv": cfg.kv_weight, "kv_k": cfg.kv_weight, "kv_v": cfg.kv_weight, "cka": cfg.cka_weight, "router_entropy": -cfg.router_entropy_weight}
    acc: dict[str, dict[str, list[float]]] = {}
    n = 0
    for batch in itertools.islice(loader, batches):
        kv = kv_to_device(batch["kv"], device)  # int8 / int4 dequantised there
        losses = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["loss_mask"].to(device), kv, step=0)
        terms = {}
        for t in LOSS_TERMS:
            if t in losses:
                terms[t] = losses[t]
            if t == "kv_v" and t in losses:
                terms["kv"] = losses["kv_k"] + losses["kv_v"]
        for name, value in terms.items():
            grads = torch.autograd.grad(value, student + aux, retain_graph=True, allow_unused=True)
            row = acc.setdefault(name, {"value": [], "grad_student": [], "grad_adapters": []})
            row["value"].append(value.item())
            row["grad_student"].append(_norm(grads[: len(student)]))
            row["grad_adapters"].append(_norm(grads[len(student) :]))
        n += 1
    if n == 0:
        raise StoreError(f"store {cfg.store} yielded no batch to diagnose")
    report: dict[str, dict[str, float]] = {}
    for name, row in acc.items():
        r = {k: sum(v) / len(v) for k, v in row.items()}
        r["weight"] = weights[name]
        r["weighted_grad_student"] = abs(weights[name]) * r["grad_student"]
        report[name] = r
    ce_ref = report["ce"]["weighted_grad_student"]
    suggested: dict[str, float | None] = {}
    for name, field in (("kv", "kv_weight"), ("cka", "cka_weight")):
        if name in report:
            g = report[name]["grad_student"]
            suggested[field] = ce_ref / g if g > 0 and ce_ref > 0 else None
    return {"batches": n, "terms": report, "suggested": suggested}


def format_table(result: dict[str, Any]) -> str:
    """The diagnosis as a plain-text table plus the suggested weights."""
    head = f"{'term':<16}{'weight':>9}{'value':>12}{'|grad| student':>17}{'|grad| adapt+router':>21}{'weight x |grad|':>17}"
    lines = [f"loss terms at init, mean over {result['batches']} batch(es), step 0", head, "-" * len(head)]
    for name, r in result["terms"].items():
        lines.append(
            f"{name:<16}{r['weight']:>9.3g}{r['value']:>12.5g}{r['grad_student']:>17.4g}{r['grad_adapters']:>21.4g}{r['weighted_grad_student']:>17.4g}"
        )
    lines.append("(kv = kv_k + kv_v, the pair kv_weight scales; router_entropy enters the loss with weight -router_entropy_weight)")
    if result["suggested"]:
        lines.append("suggested weights (weight x |grad student| = ce_weight x |grad CE|):")
        for field, w in result["suggested"].items():
            lines.append(f"  {field}: {'n/a (no gradient on the student)' if w is None else f'{w:.4g}'}")
    return "\n".join(lines)
