"""Evaluation: greedy answers generated with the KV cache, accuracy against the gold answer,
and perplexity of the gold reasoning + answer given the prompt.

    evaluate(EvalConfig(model="runs/kv", data=DataSpec(split="test")))
    evaluate(EvalConfig(model="runs/lat", mode="latent"))  # question -> M latents -> answer

Both modes report the cost per question: forward passes (decoder calls that question alone
needs: CoT 1 prefill + G - 1 decode steps; latent T Jacobi iterations + G - 1, see
train/latent.py) and generated tokens G (up to and including EOS). Latent mode's perplexity
is of the gold answer given the question and the latents (teacher-forced).

`model` is a training run directory (its `final/` checkpoint is used) or any HF checkpoint
(hub id or local path). The prompt template is the one the run was trained with, unless given.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvdistill.core.data import load_examples
from kvdistill.core.models import load_model, load_tokenizer, pad_token_id, resolve_device
from kvdistill.core.prompts import encode, pad_batch, prompt_text
from kvdistill.schemas import DEFAULT_TEMPLATE, EvalConfig, ModelSpec, TrainConfig

from .answers import answers_match, extract_answer
from .losses import masked_ce

__all__ = ["resolve_checkpoint", "evaluate", "generated_lengths"]


def resolve_checkpoint(model: str) -> tuple[str, str]:
    """(checkpoint path or hub id, prompt template) for a run dir or a plain checkpoint."""
    path = Path(model)
    if (path / "final" / "config.json").exists():
        path = path / "final"
    cfg_file = path / "train_config.yaml"
    template = TrainConfig.load(cfg_file).student.prompt_template if cfg_file.exists() else DEFAULT_TEMPLATE
    return (str(path) if path.exists() else model), template


def generated_lengths(new_tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Tokens generated per row of new_tokens [B, G], up to and including the first EOS
    (a row without EOS ran to the budget: all G)."""
    is_eos = new_tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], new_tokens.shape[1], dtype=torch.long))
    return first.long()


def finished(new_tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] bool: the row emitted EOS within its budget; False means generation was cut off by
    max_new_tokens, so whatever it says is not its final answer."""
    return (new_tokens == eos_id).any(1)


def _finish(cfg: EvalConfig, preds: list[dict], nll: float, n_tok: int, forwards: int, gen_tokens: int, t0: float, **extra) -> dict[str, Any]:
    n = max(1, len(preds))
    cut = [p for p in preds if p["hit_cap"]]
    result = {
        "model": cfg.model,
        "mode": cfg.mode,
        "n": len(preds),
        "accuracy": sum(p["correct"] for p in preds) / n,
        # Generations that reached max_new_tokens without an EOS: their "answer" is the last
        # number of a cut-off text. Counted and reported, never passed off as finished.
        "hit_cap": len(cut),
        "hit_cap_correct": sum(p["correct"] for p in cut),
        "accuracy_finished": sum(p["correct"] for p in preds if not p["hit_cap"]) / n,
        "perplexity": math.exp(nll / max(1, n_tok)),
        "forward_passes_per_question": forwards / n,
        "generated_tokens_per_question": gen_tokens / n,
        **extra,
        "seconds": time.perf_counter() - t0,
    }
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({**result, "predictions": preds}, indent=1))
    return result


def _setup(cfg: EvalConfig, ckpt: str, template: str):
    """(device, tokenizer, model on device, test examples, pad id) for either eval mode."""
    spec = ModelSpec(name_or_path=ckpt, prompt_template=template)
    device = resolve_device(cfg.device)
    tok = load_tokenizer(spec)
    return device, tok, load_model(spec, device), load_examples(cfg.data), pad_token_id(tok)


@torch.inference_mode()
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    if cfg.mode == "latent":
        return _evaluate_latent(cfg, progress)
    t0 = time.perf_counter()
    ckpt, template = resolve_checkpoint(cfg.model)
    template = cfg.prompt_template or template
    device, tok, model, examples, pad_id = _setup(cfg, ckpt, template)

    preds, nll, n_tok, forwards, gen_tokens = [], 0.0, 0, 0, 0
    bar = tqdm(total=len(examples), desc=f"eval {Path(cfg.model).name}", disable=not progress)
    for i in range(0, len(examples), cfg.batch_size):
        batch = examples[i : i + cfg.batch_size]
        # Perplexity of the gold continuation, teacher-forced.
        enc = [encode(tok, template, ex) for ex in batch]
        ids, mask = pad_batch([e.input_ids for e in enc], pad_id)
        lmask = pad_batch([e.loss_mask for e in enc], 0)[0].bool()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        n = int(lmask[:, 1:].sum())
        nll += masked_ce(logits, ids.to(device), lmask.to(device)).item() * n
        n_tok += n
        # Greedy generation from the prompt (left-padded so new tokens line up).
        prompts = tok(
            [prompt_text(template, ex.question) for ex in batch],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(device)
        gen = model.generate(
            **prompts,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tok.eos_token_id,
        )
        new = gen[:, prompts["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        lengths = generated_lengths(new, tok.eos_token_id).tolist()
        capped = (~finished(new, tok.eos_token_id)).tolist()
        for ex, text, g, cap in zip(batch, texts, lengths, capped, strict=True):
            pred = extract_answer(text)
            preds.append({"id": ex.id, "gold": ex.answer, "pred": pred, "correct": answers_match(pred, ex.answer), "text": text, "generated_tokens": g,
                          "forward_passes": g, "hit_cap": cap})
            forwards += g  # 1 prefill (gives token 1) + g - 1 decode steps
            gen_tokens += g
        bar.update(len(batch))
    bar.close()
    return _finish(cfg, preds, nll, n_tok, forwards, gen_tokens, t0)


def _evaluate_latent(cfg: EvalConfig, progress: bool) -> dict[str, Any]:
    """Question -> T Jacobi iterations over M latents -> greedy answer with the KV cache."""
    from .latent import jacobi, latent_generate, load_latent, split_segments

    t0 = time.perf_counter()
    ckpt, template = resolve_checkpoint(cfg.model)
    template = cfg.prompt_template or template
    head, trained_iters = load_latent(ckpt)
    iterations = cfg.latent_iterations or trained_iters
    device, tok, model, examples, pad_id = _setup(cfg, ckpt, template)
    head = head.to(device)

    preds, nll, n_tok, forwards, gen_tokens = [], 0.0, 0, 0, 0
    bar = tqdm(total=len(examples), desc=f"eval latent {Path(cfg.model).name}", disable=not progress)
    for i in range(0, len(examples), cfg.batch_size):
        batch = examples[i : i + cfg.batch_size]
        # Perplexity of the gold answer given question + latents, teacher-forced.
        enc = [encode(tok, template, ex) for ex in batch]
        ids = pad_batch([e.input_ids for e in enc], pad_id)[0]
        seg = pad_batch([e.segment_ids.astype("int64") for e in enc], -1)[0]
        q, qm, a, am = (x.to(device) for x in split_segments(ids, seg, pad_id))
        run = jacobi(model, head, q, qm, iterations, tail_ids=a, tail_mask=am)
        P = q.shape[1]
        logits = run["logits"][:, P + head.slots - 1 : -1]
        nll += torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), a, reduction="none")[am.bool()].sum().item()
        n_tok += int(am.sum())
        # Greedy answers from the question alone (left-padded).
        prompts = tok(
            [prompt_text(template, ex.question) for ex in batch],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(device)
        gen = latent_generate(model, head, prompts["input_ids"], prompts["attention_mask"], iterations, cfg.max_new_tokens, tok.eos_token_id, pad_id)
        texts = tok.batch_decode(gen["tokens"], skip_special_tokens=True)
        capped = (~finished(gen["tokens"], tok.eos_token_id)).tolist()
        for ex, text, g, f, cap in zip(batch, texts, gen["lengths"].tolist(), gen["forwards_per_row"].tolist(), capped, strict=True):
            pred = extract_answer(text)
            preds.append({"id": ex.id, "gold": ex.answer, "pred": pred, "correct": answers_match(pred, ex.answer), "text": text, "generated_tokens": g,
                          "forward_passes": f, "hit_cap": cap})
            forwards += f
            gen_tokens += g
        bar.update(len(batch))
    bar.close()
    return _finish(cfg, preds, nll, n_tok, forwards, gen_tokens, t0, slots=head.slots, iterations=iterations)
