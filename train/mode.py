"""What differs between the training modes, behind one small interface the loop drives:
the module to optimise and its parameter groups, what the stream reads, the batch -> loss terms
step, what each term averages over, and what is saved besides the student.

`cot` (the written chain, train/distiller.py) and `latent` (KaVa latent slots, train/latent.py)
each build one with `cot_mode` / `latent_mode`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Mode"]


@dataclass
class Mode:
    name: str
    model: nn.Module
    param_groups: list[dict[str, Any]]
    read_kv: bool  # the stream reads the teachers' per-token K/V
    read_latent: bool  # ... or their compressed latent K/V
    control: Callable  # kv_control "shuffled": the batch derangement (stream.shuffle_kv / shuffle_latent)
    # step(model, batch, device, step, shares) -> {"loss", scalar terms, 1-d per-layer terms}
    step: Callable[..., dict[str, torch.Tensor]]
    # counts(batch) -> {unit: how many of it the batch holds}: what each term is a mean over
    # (tokens, answer tokens, samples...), so accumulated micro-batches weigh as one batch
    counts: Callable[[dict[str, Any]], dict[str, float]]
    unit_of: Callable[[str], str]  # term name -> its unit in `counts`
    save_extra: Callable[[nn.Module, dict, Path], None]  # (unwrapped model, state dict, out dir)
    finite: tuple[str, ...]  # scalar terms a step must keep finite
    postfix: tuple[str, ...]  # terms on the progress bar
    summary: dict[str, str]  # run summary name -> logged term
    result: dict[str, Any] = field(default_factory=dict)  # extra keys of the run summary
    read_logits: bool = False  # the stream reads the teachers' stored top-k logits too (logits_weight > 0)
    # Terms that are not a mean over a unit (CKA, layer_std K/V): step returns their statistics as
    # "sums" (sums over the batch's rows, with graph); window(the whole step's summed "sums", every
    # rank; step) -> {"loss": their part of the loss, term: value}. The trainer sums them first.
    window: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None
    # Statistics the loss is standardised by (kv_norm layer_std): step returns "moments" (sums,
    # detached); update_norm takes the step's window total (every rank) for the next step;
    # norm_missing() says none were measured yet (a fresh run measures its first window first).
    norm_missing: Callable[[], bool] | None = None
    update_norm: Callable[[dict[str, torch.Tensor]], None] | None = None
