"""One dump array task: teacher x shard -> aligned K/V in the store.

    run_dump(DumpConfig(teacher=..., student=..., data=..., store="out.zarr", shard=3, num_shards=8))

Steps: load rows, take this task's contiguous slice (identical for every teacher), render and
tokenize with the student's tokenizer, teacher-forced forward of the decoder stack only (no LM
head) under inference_mode in length-sorted padded batches, capture pre-RoPE K and V,
layer-map onto the student's depth, drop padding, write the shard and commit it atomically.
A complete shard makes the task a no-op; a sample over max_len is an error or a counted skip.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from kvdistill.align import apply_layer_map, ratio_layer_map
from kvdistill.data import data_fingerprint, load_examples
from kvdistill.schemas import DumpConfig, Example, StoreSpec, TeacherSpec
from kvdistill.store import ShardWriter, init_store, init_teacher, shard_is_complete

from .capture import forward_kv, kv_geometry
from .models import (
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_device,
    tokenizer_fingerprint,
)
from .prompts import Encoded, encode

__all__ = ["DumpResult", "partition", "run_dump"]

log = logging.getLogger(__name__)


@dataclass
class DumpResult:
    teacher: str
    shard: int
    status: str  # "written" or "already complete"
    samples: int = 0
    tokens: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.status != "written":
            return f"teacher {self.teacher} shard {self.shard}: {self.status}, nothing to do"
        rate = self.tokens / self.seconds if self.seconds else float("nan")
        skip = f", skipped {len(self.skipped)} over max_len" if self.skipped else ""
        return (
            f"teacher {self.teacher} shard {self.shard}: {self.samples} samples, {self.tokens} tokens "
            f"in {self.seconds:.1f}s ({rate:,.0f} tok/s){skip}"
        )


def partition(examples: list[Example], shard: int, num_shards: int) -> list[Example]:
    """Contiguous slice `shard` of `num_shards`: depends only on the row order, so shard i of
    every teacher holds the same samples."""
    n = len(examples)
    return examples[n * shard // num_shards : n * (shard + 1) // num_shards]


def _pad(batch: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(e) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, e in enumerate(batch):  # right padding: causal attention keeps valid positions exact
        ids[i, : len(e)] = torch.from_numpy(e.input_ids.astype(np.int64))
        mask[i, : len(e)] = 1
    return ids, mask


def run_dump(cfg: DumpConfig, progress: bool = True) -> DumpResult:
    t0 = time.perf_counter()
    name = cfg.teacher.short_name
    if shard_is_complete(cfg.store, name, cfg.shard):
        return DumpResult(name, cfg.shard, "already complete")

    examples = load_examples(cfg.data)
    rows = partition(examples, cfg.shard, cfg.num_shards)
    s_tok, t_tok = load_tokenizer(cfg.student), load_tokenizer(cfg.teacher)
    s_fp, t_fp = tokenizer_fingerprint(s_tok), tokenizer_fingerprint(t_tok)
    if s_fp != t_fp or cfg.teacher.prompt_template != cfg.student.prompt_template:
        raise NotImplementedError(
            f"teacher {name}: its tokenizer or prompt template differs from the student's; only the "
            "identity time map (same tokenizer, same rendered text) is implemented so far. Use a "
            "teacher with the student's tokenizer and template."
        )
    device = resolve_device(cfg.device)
    teacher = load_model(cfg.teacher, device)
    g_t, g_s = kv_geometry(teacher.config), kv_geometry(load_config(cfg.student))
    W = ratio_layer_map(g_t.num_layers, g_s.num_layers)  # [L_s, L_t]

    init_store(
        cfg.store,
        StoreSpec(
            student=cfg.student,
            geometry=g_s,
            tokenizer_fingerprint=s_fp,
            data=cfg.data,
            data_fingerprint=data_fingerprint(examples),
            num_shards=cfg.num_shards,
            kv_dtype=cfg.kv_dtype,
        ),
    )
    init_teacher(
        cfg.store,
        TeacherSpec(
            name=name,
            model=cfg.teacher,
            geometry=g_t,
            align=cfg.align,
            layer_map=W.tolist(),
            fingerprint=model_fingerprint(teacher, cfg.teacher, cfg.align.to_dict()),
        ),
    )

    encoded, skipped = [], []
    for ex in rows:
        e = encode(s_tok, cfg.student.prompt_template, ex)
        if len(e) > cfg.max_len:
            if cfg.on_too_long == "error":
                raise ValueError(
                    f"teacher {name}: sample {ex.id} has {len(e)} tokens > max_len {cfg.max_len}; "
                    "raise --max-len, or pass --on-too-long skip to skip (and count) such samples"
                )
            skipped.append(ex.id)
            continue
        encoded.append(e)
    # Length-sorted batches cut padding; the order depends only on the student's tokens, so it
    # is the same for every teacher (the trainer zips shards positionally).
    encoded.sort(key=len)
    pad_id = s_tok.pad_token_id if s_tok.pad_token_id is not None else s_tok.eos_token_id
    tokens = sum(len(e) for e in encoded)

    with ShardWriter(cfg.store, name, cfg.shard, num_layers=g_s.num_layers, width=g_t.width, dtype=cfg.kv_dtype) as w:
        bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"dump {name}[{cfg.shard}]", disable=not progress)
        for i in range(0, len(encoded), cfg.batch_size):
            batch = encoded[i : i + cfg.batch_size]
            ids, mask = _pad(batch, pad_id)
            with torch.inference_mode():
                k, v = forward_kv(teacher, ids.to(device), mask.to(device))  # [B, T, L_t, D_t]
                k = apply_layer_map(W, k).float().cpu().numpy()  # [B, T, L_s, D_t]
                v = apply_layer_map(W, v).float().cpu().numpy()
            for j, e in enumerate(batch):
                T = len(e)
                w.write(e.sample_id, k[j, :T], v[j, :T], e.input_ids, e.loss_mask)
            bar.update(int(mask.sum()))
        bar.close()
        w.close(extra_attrs={"skipped": skipped, "max_len": cfg.max_len})
    return DumpResult(name, cfg.shard, "written", len(encoded), tokens, skipped, time.perf_counter() - t0)
