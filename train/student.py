"""The student, both modes: loaded with `from_pretrained`, checked against the store it learns
from, LoRA-wrapped (peft) when lora_r > 0, gradient checkpointing when asked; and saved the
same way at the end (`save_student`)."""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kvdistill.core.capture import kv_geometry
from kvdistill.core.models import load_tokenizer, tokenizer_fingerprint
from kvdistill.schemas import TrainConfig
from kvdistill.store import StoreError, open_specs
from kvdistill.store.index import check_finalized

__all__ = ["check_store", "load_student", "save_student", "param_hash"]


def check_store(cfg: TrainConfig, tokenizer, student, store: str | Path | None = None) -> tuple[Any, dict]:
    """(StoreSpec, {teacher: TeacherSpec} of the chosen teachers) of `store` (default cfg.store),
    after checking it is finalized, was dumped for this student's tokenizer and geometry, and that
    its metadata is what finalize wrote and agrees with every shard (store.index.check_finalized:
    CorruptShard for a damaged index.parquet or consolidated metadata, StoreError otherwise)."""
    store = Path(store or cfg.store)
    spec, teachers = open_specs(store)
    if not (store / "index.parquet").exists():
        raise StoreError(f"store {store} is not finalized; run `kvdistill store finalize {store}` first")
    fp = tokenizer_fingerprint(tokenizer)
    if fp != spec.tokenizer_fingerprint:
        raise StoreError(
            f"store {store} was built for a student tokenizer with fingerprint {spec.tokenizer_fingerprint} "
            f"({spec.student.name_or_path}); {cfg.student.name_or_path} has {fp}. Train the student the "
            "store was dumped for, or re-dump with --student pointing at this one"
        )
    g = kv_geometry(student.config)
    if g != spec.geometry:
        raise StoreError(f"store {store} holds K/V for student geometry {spec.geometry}, this student has {g}")
    chosen = cfg.teachers or sorted(teachers)
    missing = [t for t in chosen if t not in teachers]
    if missing:
        raise StoreError(f"store {store} has no teacher(s) {missing}; it holds {sorted(teachers)}")
    # What `store verify` checks of the metadata, before a sample is read: index.parquet and the
    # consolidated metadata as finalize wrote them (checksums), every shard of every chosen
    # teacher complete, not stale, and listed in the index with the counts it records.
    check_finalized(store, chosen)
    return spec, {t: teachers[t] for t in chosen}


def load_student(cfg: TrainConfig) -> tuple[Any, nn.Module, Any, dict]:
    """(tokenizer, student, StoreSpec, {teacher: TeacherSpec}): the student checked against the
    store, then LoRA-wrapped (K/V capture reaches through to the base model) and with gradient
    checkpointing (non-reentrant: K/V captured in the forward stay valid through recompute)."""
    tokenizer = load_tokenizer(cfg.student, role="student")
    student = AutoModelForCausalLM.from_pretrained(
        cfg.student.name_or_path, revision=cfg.student.revision, dtype=getattr(torch, cfg.student.dtype)
    )
    spec, teachers = check_store(cfg, tokenizer, student)
    if cfg.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # the current name in transformers 5
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets
        )
        with warnings.catch_warnings():  # peft's PeftModel reads transformers' deprecated name; nothing of ours to fix
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            student = get_peft_model(student, lora)
    return tokenizer, student, spec, teachers


def save_student(accelerator, model: nn.Module, cfg: TrainConfig, tokenizer, out: Path, save_extra) -> None:
    """`model` (the prepared Distiller / LatentStudent) into `out` as a Hugging Face checkpoint:
    the student (merged when LoRA, the adapter itself under out/lora), the tokenizer,
    train_config.yaml, and what `save_extra(unwrapped, state, out)` adds. Every rank takes
    part: under FSDP the full weights are gathered onto rank 0 (jobs/accelerate/fsdp.yaml's
    FULL_STATE_DICT); otherwise it is the module's own state dict."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.lora_r > 0:
            unwrapped.student.save_pretrained(out / "lora")
            tokenizer.save_pretrained(out / "lora")
            copy.deepcopy(unwrapped.student).merge_and_unload().save_pretrained(out)
        else:
            prefix = "student."
            own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            for tied in getattr(unwrapped.student, "all_tied_weights_keys", None) or {}:
                own.pop(tied, None)  # FSDP gathers a tied weight as a copy of its own
            unwrapped.student.save_pretrained(out, state_dict=own)
        tokenizer.save_pretrained(out)
        save_extra(unwrapped, state, out)
        cfg.save(out / "train_config.yaml")
    accelerator.wait_for_everyone()


def param_hash(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in order: one parameter on the CPU at a time, no
    copy of the whole model (ranks of a DDP run must agree bit for bit)."""
    h = hashlib.sha256()
    for p in model.parameters():
        t = p.detach()
        if isinstance(t, torch.distributed.tensor.DTensor):  # FSDP2: gathered (a collective: every rank hashes)
            t = t.full_tensor()
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
