"""Tiny real models for the demo and the tests: a BPE tokenizer trained locally on the corpus,
real transformers architectures (Qwen2 / Llama / Qwen3) built from configs, briefly trained
with CE, and saved as ordinary HF checkpoints that load back through `from_pretrained(path)`,
the same call a hub id goes through. Nothing is downloaded."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    get_cosine_schedule_with_warmup,
)

from kvdistill.core.prompts import encode, pad_batch, render
from kvdistill.schemas import Example
from kvdistill.train.losses import masked_ce

__all__ = ["ARCHS", "train_tokenizer", "build_model", "train_lm"]

ARCHS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


# Qwen2's pre-tokenizer split (one token per digit keeps arithmetic learnable). transformers
# rebuilds Qwen2-family tokenizers with exactly this split and NFC on load, so we train with it:
# then the tokenizer behaves the same whichever class AutoTokenizer picks for a checkpoint.
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with exact decoding and character offsets."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|endoftext|>"
    )


def build_model(
    arch: str,
    tokenizer,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    **extra,
):
    """A randomly initialised causal LM of a real architecture; `extra` goes to the config
    (e.g. rope_scaling)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    return model_cls(config).float()


def train_lm(
    model,
    tokenizer,
    examples: list[Example],
    template: str,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """CE on reasoning + answer tokens (the way teachers learn the task). Returns the losses."""
    encoded = [encode(tokenizer, template, ex) for ex in examples]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        ids, mask = pad_batch([e.input_ids for e in batch], tokenizer.pad_token_id)
        lmask = pad_batch([e.loss_mask for e in batch], 0)[0].bool()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = masked_ce(logits, ids, lmask)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc}: non-finite CE loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def corpus(examples: list[Example], template: str) -> list[str]:
    return [render(template, ex).text for ex in examples]


def save(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
