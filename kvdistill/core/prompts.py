"""Render an example through a prompt template with known character spans per segment, and
tokenize it with offsets so every token knows its segment (never guessed afterwards)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvdistill.schemas import Example

__all__ = ["SEGMENTS", "Rendered", "Encoded", "render", "prompt_text", "encode", "pad_batch"]

SEGMENTS = ("prompt", "reasoning", "answer")  # segment id = index in this tuple


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: dict[str, tuple[int, int]]  # segment -> [start, end) character span


@dataclass(frozen=True)
class Encoded:
    sample_id: str
    input_ids: np.ndarray  # [T] int32, ends with EOS
    segment_ids: np.ndarray  # [T] uint8, index into SEGMENTS
    loss_mask: np.ndarray  # [T] bool: reasoning + answer tokens (what CE and generation learn)
    offsets: np.ndarray  # [T, 2] int64 character span of each token; EOS is (len, len)

    def __len__(self) -> int:
        return len(self.input_ids)


def _pieces(template: str) -> tuple[str, str, str, str]:
    head, rest = template.split("{question}", 1)
    mid1, rest = rest.split("{reasoning}", 1)
    mid2, tail = rest.split("{answer}", 1)
    return head, mid1, mid2, tail


def render(template: str, ex: Example) -> Rendered:
    """`template` holds {question}, {reasoning}, {answer} in order (ModelSpec validates it).
    Substitution is literal (no str.format), so braces in the data are safe."""
    head, mid1, mid2, tail = _pieces(template)
    prompt = head + ex.question + mid1
    r0, r1 = len(prompt), len(prompt) + len(ex.reasoning)
    text = prompt + ex.reasoning + mid2 + ex.answer + tail
    return Rendered(text, {"prompt": (0, r0), "reasoning": (r0, r1), "answer": (r1, len(text))})


def prompt_text(template: str, question: str) -> str:
    """What a model is given at generation time: everything before the reasoning."""
    head, mid1, _, _ = _pieces(template)
    return head + question + mid1


def encode(tokenizer, template: str, ex: Example) -> Encoded:
    """Tokenize the rendered example (+ EOS) with offsets; label each token by the segment
    holding its first character."""
    r = render(template, ex)
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in enc:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} returns no offsets; load a fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    offsets = np.array(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    offsets = np.concatenate([offsets, [[len(r.text), len(r.text)]]])  # EOS: empty span at the end
    starts = offsets[:-1, 0]
    bounds = np.array([r.spans["reasoning"][0], r.spans["answer"][0]])
    seg = np.searchsorted(bounds, starts, side="right").astype(np.uint8)  # [T]
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has no eos_token; every sample "
            "ends with EOS so generation can stop. Add one (tokenizer.eos_token = '...', then save_pretrained), "
            "or use another tokenizer"
        )
    ids = np.array([*enc["input_ids"], tokenizer.eos_token_id], dtype=np.int32)
    seg = np.append(seg, np.uint8(2))
    return Encoded(ex.id, ids, seg, seg > 0, offsets)


def pad_batch(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D int arrays: ids [B, T] long, mask [B, T] long."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
