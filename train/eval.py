"""Evaluation: greedy answers generated with the KV cache, accuracy against the gold answer,
and perplexity of the gold reasoning + answer given the prompt.

    evaluate(EvalConfig(model="runs/kv", data=DataSpec(split="test")))
    evaluate(EvalConfig(model="runs/lat", mode="latent"))  # question -> M latents -> answer

Both modes report the cost per question: forward passes (decoder calls that question alone
needs: CoT 1 prefill + G - 1 decode steps; latent T Jacobi iterations + G - 1, see
train/latent.py) and generated tokens G (up to and including EOS), and the speed:
questions_per_second of the eval loop (model loading excluded). Latent mode's perplexity
is of the gold answer given the question and the latents (teacher-forced).

The generation budget, unless EvalConfig.max_new_tokens gives one, comes from the data: the
longest gold continuation (CoT: reasoning + answer; latent: the answer; in the student's
tokens, EOS included) x 1.25 + 16, rounded up; the result's max_new_tokens is the value used.

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
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvdistill.core.capture import cache_kwarg, decoder
from kvdistill.core.data import load_examples
from kvdistill.core.models import load_model, load_tokenizer, pad_token_id, resolve_device
from kvdistill.core.prompts import encode, pad_batch, prompt_text
from kvdistill.schemas import DEFAULT_TEMPLATE, EvalConfig, ModelSpec, TrainConfig

from .answers import answers_match, extract_answer

__all__ = [
    "resolve_checkpoint",
    "evaluate",
    "greedy_generate",
    "default_max_new_tokens",
    "left_pad",
    "generated_lengths",
    "sequence_nll",
    "hidden_nll",
    "plain_head",
]

# Float32 logits of one chunk of the perplexity pass: 64 MiB (~110 tokens at a 150k
# vocabulary), so the pass never holds [B, T, V] (64 x 500 tokens x 150k: ~19 GB in float32).
NLL_CHUNK_BYTES = 2**26


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
    first = torch.where(
        is_eos.any(1),
        is_eos.float().argmax(1) + 1,
        torch.full_like(is_eos[:, 0], new_tokens.shape[1], dtype=torch.long),
    )
    return first.long()


def finished(new_tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] bool: the row emitted EOS within its budget; False means generation was cut off by
    max_new_tokens, so whatever it says is not its final answer."""
    return (new_tokens == eos_id).any(1)


def default_max_new_tokens(gold_lengths: list[int]) -> int:
    """The generation budget when none is given: the longest gold continuation (tokens) x 1.25
    + 16, rounded up. A model that writes like the data finishes, with room for a longer
    chain than any gold one; a fixed 64 cut most GSM8K chains (48-214 tokens) short."""
    if not gold_lengths:
        raise ValueError(
            "no eval examples to size max_new_tokens from; check --data / --split / --limit, or give --max-new-tokens"
        )
    return -(-5 * max(gold_lengths) // 4) + 16  # ceil(1.25 L) in integers: no float rounding


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: ids [B, P] long, mask [B, P] long. Every row's last prompt
    token sits in column P - 1, so the next token of every row comes from the same column."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, P - len(r) :] = 1
    return ids, mask


@torch.inference_mode()
def greedy_generate(
    model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int
) -> torch.Tensor:
    """Greedy continuations of left-padded prompts ids [B, P] (mask [B, P]) with the KV cache:
    new tokens [B, G] (G <= max_new_tokens, the longest row), `pad_id` after a row's EOS.

    Pure argmax, unlike `model.generate`, which merges in the checkpoint's
    generation_config.json (Qwen instruct checkpoints set repetition_penalty=1.05 there).
    Token for token what each row gives alone: positions count real tokens only, and padding
    is masked. A row that emits EOS leaves the batch and the cache, so a batch costs the sum
    of its rows' lengths, not B x its longest row."""
    B = ids.shape[0]
    new = ids.new_full((B, max_new_tokens), pad_id)  # [B, G]
    live = torch.arange(B, device=ids.device)  # [b] the original row of each row still generating
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, P]: left padding shifts no position
    cache = DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **kw).logits[
        :, -1
    ]  # [B, V]
    pos = pos[:, -1:]  # [B, 1]
    G = 0
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # [b]
        new[live, step] = nxt
        G = step + 1
        going = nxt != eos_id  # [b]
        n_going = int(going.sum())  # the one device -> host sync per step
        if step == max_new_tokens - 1 or n_going == 0:
            break
        if n_going < len(live):
            keep = going.nonzero().squeeze(1)
            live, nxt, mask, pos = live[keep], nxt[keep], mask[keep], pos[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # [b, P + step + 1]
        pos = pos + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, **kw).logits[:, -1]
    return new[:, :G]


def hidden_nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL (a float64 scalar) of targets [N] given the final-norm hidden states [N, H]
    that predict them, through the model's output head in chunks of NLL_CHUNK_BYTES of float32
    logits: what cross_entropy(head(hidden)) sums over the same tokens, to float rounding (the
    model's own logits where `plain_head`), with a few hundred MB at most whatever the vocabulary."""
    lm_head = model.get_output_embeddings()
    rows = max(1, NLL_CHUNK_BYTES // (4 * lm_head.weight.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for a in range(0, len(targets), rows):
        logits = lm_head(hidden[a : a + rows]).float()  # [rows, V]
        total += F.cross_entropy(logits, targets[a : a + rows], reduction="sum").double()
    return total


@torch.inference_mode()
def plain_head(model) -> bool:
    """Whether the model's logits are its output head applied to the decoder's final hidden
    states (Llama, Qwen2 / Qwen3 and most causal LMs; not those that scale or soft-cap logits
    in the forward: Gemma 2, Cohere, Granite), checked on a few tokens: where they are, the
    perplexity is computed in chunks (`hidden_nll`), else from the full logits."""
    device = model.get_output_embeddings().weight.device
    ids = torch.arange(1, 5, device=device)[None] % model.get_output_embeddings().weight.shape[0]  # [1, 4]
    full = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    mine = model.get_output_embeddings()(
        decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
    ).float()
    return bool(torch.allclose(full, mine, rtol=1e-3, atol=1e-3))


def sequence_nll(
    model, ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, plain: bool = True
) -> tuple[float, int]:
    """(summed next-token NLL, tokens) over the positions whose *target* is in loss_mask [B, T]
    (train.losses.masked_ce's tokens, summed instead of averaged). plain (`plain_head`): the
    decoder runs without its LM head and `hidden_nll` scores the masked positions only, in
    chunks, so no [B, T, V] logits exist; else the model's full logits."""
    sel = loss_mask[:, 1:].bool()  # [B, T - 1]: position t predicts token t + 1
    targets = ids[:, 1:][sel]
    if plain:
        hidden = decoder(model)(
            input_ids=ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # [B, T, H]
        return hidden_nll(model, hidden[:, :-1][sel], targets).item(), int(sel.sum())
    logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits  # [B, T, V]
    return F.cross_entropy(logits[:, :-1][sel].float(), targets, reduction="sum").item(), int(sel.sum())


class _NoLMHead:
    """The student as `train.latent.jacobi` sees it, without its LM head: the decoder stack
    (`.model`), the input embeddings and an identity output head, so the "logits" jacobi returns
    are the final hidden states and no [B, S, V] tensor is made (`hidden_nll` scores them)."""

    def __init__(self, model) -> None:
        self.model, self._embeddings = decoder(model), model.get_input_embeddings()

    def get_input_embeddings(self):
        return self._embeddings

    def get_output_embeddings(self):
        return torch.nn.Identity()


def _budget(cfg: EvalConfig, gold_lengths: list[int]) -> int:
    return cfg.max_new_tokens if cfg.max_new_tokens is not None else default_max_new_tokens(gold_lengths)


def _finish(
    cfg: EvalConfig,
    preds: list[dict],
    nll: float,
    n_tok: int,
    forwards: int,
    gen_tokens: int,
    t0: float,
    loop_s: float,
    **extra,
) -> dict[str, Any]:
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
        # Perplexity + generation over all questions; loading the model and data is excluded.
        "questions_per_second": len(preds) / max(loop_s, 1e-9),
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
    tok = load_tokenizer(spec, role="model")
    return device, tok, load_model(spec, device, role="model"), load_examples(cfg.data), pad_token_id(tok)


def _prediction(ex, text: str, g: int, forwards: int, capped: bool) -> dict[str, Any]:
    pred = extract_answer(text)
    return {
        "id": ex.id,
        "gold": ex.answer,
        "pred": pred,
        "correct": answers_match(pred, ex.answer),
        "text": text,
        "generated_tokens": g,
        "forward_passes": forwards,
        "hit_cap": capped,
    }


@torch.inference_mode()
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    if cfg.mode == "latent":
        return _evaluate_latent(cfg, progress)
    t0 = time.perf_counter()
    ckpt, template = resolve_checkpoint(cfg.model)
    template = cfg.prompt_template or template
    device, tok, model, examples, pad_id = _setup(cfg, ckpt, template)
    plain = plain_head(model)
    enc = [encode(tok, template, ex) for ex in examples]
    prompts = tok([prompt_text(template, ex.question) for ex in examples], add_special_tokens=False)["input_ids"]
    budget = _budget(cfg, [int(e.loss_mask.sum()) for e in enc])  # reasoning + answer + EOS: what generation writes
    # Longest prompts first: batches of similar lengths carry little padding, and a batch too
    # big for memory fails at the start, not after most of the run.
    order = sorted(range(len(examples)), key=lambda j: -len(prompts[j]))

    t_loop = time.perf_counter()
    preds: list[dict | None] = [None] * len(examples)
    nll, n_tok, forwards, gen_tokens = 0.0, 0, 0, 0
    bar = tqdm(total=len(examples), desc=f"eval {Path(cfg.model).name}", disable=not progress)
    for i in range(0, len(order), cfg.batch_size):
        rows = order[i : i + cfg.batch_size]
        # Perplexity of the gold continuation, teacher-forced.
        ids, mask = pad_batch([enc[j].input_ids for j in rows], pad_id)
        lmask = pad_batch([enc[j].loss_mask for j in rows], 0)[0].bool()
        batch_nll, n = sequence_nll(model, ids.to(device), mask.to(device), lmask.to(device), plain)
        nll += batch_nll
        n_tok += n
        # Greedy generation from the prompt.
        p_ids, p_mask = left_pad([prompts[j] for j in rows], pad_id)
        new = greedy_generate(model, p_ids.to(device), p_mask.to(device), budget, tok.eos_token_id, pad_id)
        texts = tok.batch_decode(new, skip_special_tokens=True)
        lengths = generated_lengths(new, tok.eos_token_id).tolist()
        capped = (~finished(new, tok.eos_token_id)).tolist()
        for j, text, g, cap in zip(rows, texts, lengths, capped, strict=True):
            preds[j] = _prediction(examples[j], text, g, g, cap)  # 1 prefill (gives token 1) + g - 1 decode steps
            forwards += g
            gen_tokens += g
        bar.update(len(rows))
    bar.close()
    return _finish(
        cfg, preds, nll, n_tok, forwards, gen_tokens, t0, time.perf_counter() - t_loop, max_new_tokens=budget
    )


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
    enc = [encode(tok, template, ex) for ex in examples]
    budget = _budget(
        cfg, [int((e.segment_ids == 2).sum()) for e in enc]
    )  # the answer + EOS: all a latent model writes

    t_loop = time.perf_counter()
    preds, nll, n_tok, forwards, gen_tokens = [], 0.0, 0, 0, 0
    bar = tqdm(total=len(examples), desc=f"eval latent {Path(cfg.model).name}", disable=not progress)
    for i in range(0, len(examples), cfg.batch_size):
        batch = examples[i : i + cfg.batch_size]
        # Perplexity of the gold answer given question + latents, teacher-forced.
        ids = pad_batch([e.input_ids for e in enc[i : i + cfg.batch_size]], pad_id)[0]
        seg = pad_batch([e.segment_ids.astype("int64") for e in enc[i : i + cfg.batch_size]], -1)[0]
        q, qm, a, am = (x.to(device) for x in split_segments(ids, seg, pad_id))
        # jacobi's logits are head(final hidden) (train/latent.py `_run`): here the hidden states
        # alone, scored at the answer's positions in chunks, so no [B, S, V] logits exist.
        run = jacobi(_NoLMHead(model), head, q, qm, iterations, tail_ids=a, tail_mask=am)
        P, sel = q.shape[1], am.bool()
        nll += hidden_nll(model, run["hidden"][:, P + head.slots - 1 : -1][sel], a[sel]).item()
        n_tok += int(sel.sum())
        # Greedy answers from the question alone (left-padded).
        p_ids, p_mask = left_pad(
            tok([prompt_text(template, ex.question) for ex in batch], add_special_tokens=False)["input_ids"], pad_id
        )
        gen = latent_generate(
            model, head, p_ids.to(device), p_mask.to(device), iterations, budget, tok.eos_token_id, pad_id
        )
        texts = tok.batch_decode(gen["tokens"], skip_special_tokens=True)
        capped = (~finished(gen["tokens"], tok.eos_token_id)).tolist()
        for ex, text, g, f, cap in zip(
            batch, texts, gen["lengths"].tolist(), gen["forwards_per_row"].tolist(), capped, strict=True
        ):
            preds.append(_prediction(ex, text, g, f, cap))
            forwards += f
            gen_tokens += g
        bar.update(len(batch))
    bar.close()
    return _finish(
        cfg,
        preds,
        nll,
        n_tok,
        forwards,
        gen_tokens,
        t0,
        time.perf_counter() - t_loop,
        max_new_tokens=budget,
        slots=head.slots,
        iterations=iterations,
    )
