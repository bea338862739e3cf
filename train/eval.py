"""Evaluation: greedy answers generated with the KV cache, accuracy against the gold answer,
and perplexity of the gold reasoning + answer given the prompt.

    evaluate(EvalConfig(model="runs/kv", data=DataSpec(split="test")))

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

from kvdistill.data import load_examples
from kvdistill.dump.models import load_model, load_tokenizer, resolve_device
from kvdistill.dump.prompts import encode, pad_batch, prompt_text
from kvdistill.schemas import DEFAULT_TEMPLATE, EvalConfig, ModelSpec, TrainConfig

from .answers import answers_match, extract_answer
from .losses import masked_ce

__all__ = ["resolve_checkpoint", "evaluate"]


def resolve_checkpoint(model: str) -> tuple[str, str]:
    """(checkpoint path or hub id, prompt template) for a run dir or a plain checkpoint."""
    path = Path(model)
    if (path / "final" / "config.json").exists():
        path = path / "final"
    cfg_file = path / "train_config.yaml"
    template = TrainConfig.load(cfg_file).student.prompt_template if cfg_file.exists() else DEFAULT_TEMPLATE
    return (str(path) if path.exists() else model), template


@torch.inference_mode()
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    ckpt, template = resolve_checkpoint(cfg.model)
    template = cfg.prompt_template or template
    spec = ModelSpec(name_or_path=ckpt, prompt_template=template)
    device = resolve_device(cfg.device)
    tok = load_tokenizer(spec)
    model = load_model(spec, device)
    examples = load_examples(cfg.data)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    preds, nll, n_tok = [], 0.0, 0
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
        texts = tok.batch_decode(gen[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)
        for ex, text in zip(batch, texts, strict=True):
            pred = extract_answer(text)
            preds.append({"id": ex.id, "gold": ex.answer, "pred": pred, "correct": answers_match(pred, ex.answer), "text": text})
        bar.update(len(batch))
    bar.close()
    result = {
        "model": cfg.model,
        "n": len(preds),
        "accuracy": sum(p["correct"] for p in preds) / max(1, len(preds)),
        "perplexity": math.exp(nll / max(1, n_tok)),
        "seconds": time.perf_counter() - t0,
    }
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({**result, "predictions": preds}, indent=1))
    return result
