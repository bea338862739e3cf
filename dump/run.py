"""One dump array task: teacher x shard -> aligned K/V in the store.

    run_dump(DumpConfig(teacher=..., student=..., data=..., store="out.zarr", shard=3, num_shards=8))

The steps of `_run_dump`, one function each:

1. `_preflight`: load the data and take this task's contiguous slice (identical for every
   teacher), render and tokenize each sample for the student (the grid K/V is stored on) and for
   the teacher (its own tokenizer and template), resolve the time map, read the layer map and
   projection; nothing is on disk yet.
2. `_load_teacher`, `_write_metadata`: the store's and this teacher's attributes, and the files
   of both tokenizers (with each sample's text, stored beside its tokens, they rebuild its time map:
   `kvdistill store show-alignment`).
3. `_dump_batches`, per length-sorted padded batch: `_forward` (teacher-forced decoder stack
   only, no LM head, under inference_mode: pre-RoPE K and V), `align_batch` (align/batch.py:
   layer map and projection on the padded batch, one stacked time map onto the student's tokens
   that drops the padding: identity / char overlap / per-segment resampling), with
   `--logits-top-k K` `_top_logits` (the LM head on the final hidden states of the teacher
   positions the student rows are aligned to, in chunks: top-K log-probs), `_write_batch` on a
   writer thread.
4. `_commit`: the shard becomes visible atomically.

A complete shard makes the task a no-op if it is what the task would write: the store's spec, the
shard's record and the teacher's fingerprint equal this run's (checked after the preflight, the
teacher loaded; else the task is refused naming what differs). A sample over max_len is an error
or a counted skip.

Every check on the input (data, both tokenizers and their EOS, configs, layer map, projection,
every sample's tokens, a shard left with no sample: an error unless `allow_empty`) runs before
the store is created or its metadata written, so a failed run leaves nothing that blocks the
corrected rerun. Another live writer of the same (teacher, shard) is an error (`on_busy`
"fail") or is waited for ("wait"; if it completed the shard, this task is a no-op).

With `latent` (KaVa latent mode) the teacher runs eager attention (only then: eager materialises
a [B, H_q, T, T] probability map per layer, reduced layer by layer in a hook, so a batch costs
one such map more memory and eager's slower kernels) and every sample also gets its reasoning
K/V compressed by R-KV (align/rkv.py) on the teacher's own time grid (compression replaces the
time map here), layer-mapped / projected like the full K/V, plus the final-norm hidden state
before the first answer token (CODI). The full K/V are written too.

With `--logits-top-k K` (the offline-logits baseline, beside K/V in the same shard) each student
row also gets the teacher's K most likely next tokens and their log-probs. Only a teacher with
the student's tokenizer whose time map gives every student row one teacher position (identity,
or segment_linear with equal segment lengths) has logits that belong to the student's rows;
anything else is refused in the preflight, and a head the dump cannot reproduce (checked on a
probe against the model's own logits) once the teacher is loaded, both before the store is
touched.
"""

from __future__ import annotations

import ctypes
import json
import logging
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from kvdistill.align.batch import align_batch, batch_time_map, compress_batch, kv_block_projection
from kvdistill.align.cka import layer_map_from_json
from kvdistill.align.layers import ratio_layer_map
from kvdistill.align.pipeline import resolve_time_map
from kvdistill.align.time import TimeMap
from kvdistill.core.capture import (
    KVBuffer,
    forward_kv_importance,
    forward_kv_packed,
    head_mismatch,
    kv_geometry,
    output_head,
    top_log_probs,
)
from kvdistill.core.data import DataError, data_fingerprint, load_examples
from kvdistill.core.models import (
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    pad_token_id,
    require_eos,
    resolve_device,
    tokenizer_files,
    tokenizer_fingerprint,
)
from kvdistill.core.prompts import SEGMENTS, Encoded, encode, pad_batch
from kvdistill.errors import Preempted
from kvdistill.schemas import DumpConfig, Example, KVGeometry, StoreSpec, TeacherSpec
from kvdistill.store import (
    StoreError,
    compression,
    init_store,
    init_teacher,
    init_tokenizer,
    open_shard_writer,
    shard_is_complete,
    shard_name,
)
from kvdistill.store.errors import ShardComplete
from kvdistill.store.layout import (
    shard_attrs,
    store_spec_differences,
    teacher_dir,
    teacher_spec_differences,
)

REASONING, ANSWER = SEGMENTS.index("reasoning"), SEGMENTS.index("answer")

__all__ = ["DumpResult", "Preempted", "host_memory_kept", "partition", "run_dump"]

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
    teacher_tokens: int = 0
    # seconds per phase: load (models, data, tokenization), forward, align, write
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if self.status != "written":
            return f"teacher {self.teacher} shard {self.shard}: {self.status}, nothing to do"
        rate = self.tokens / self.seconds if self.seconds else float("nan")
        skip = f", skipped {len(self.skipped)} over max_len" if self.skipped else ""
        fwd = self.phases.get("forward", 0.0)
        split = ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
        align = f"; align = {self.phases.get('align', 0) / fwd:.1%} of forward" if fwd else ""
        return (
            f"teacher {self.teacher} shard {self.shard}: {self.samples} samples, {self.tokens} tokens "
            f"in {self.seconds:.1f}s ({rate:,.0f} tok/s){skip} [{split}{align}]"
        )


def partition(examples: list[Example], shard: int, num_shards: int) -> list[Example]:
    """Contiguous slice `shard` of `num_shards`: depends only on the row order, so shard i of
    every teacher holds the same samples."""
    n = len(examples)
    return examples[n * shard // num_shards : n * (shard + 1) // num_shards]


def run_dump(cfg: DumpConfig, progress: bool = True) -> DumpResult:
    with _sigterm_unwinds():
        return _run_dump(cfg, progress)


def _run_dump(cfg: DumpConfig, progress: bool) -> DumpResult:
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    name = cfg.teacher.short_name
    complete = shard_is_complete(cfg.store, name, cfg.shard)
    plan = _preflight(cfg)  # every check on the input: nothing is created before it passes
    device = resolve_device(cfg.device)
    if complete:  # a no-op, if the shard is what this task would write (else refused, naming what differs)
        _check_complete(cfg, plan, lambda: _load_teacher(cfg, device))
        return DumpResult(name, cfg.shard, "already complete")
    teacher = _load_teacher(cfg, device)
    head = _logits_head(cfg, plan, teacher, device)  # refused here if the dump cannot reproduce its logits
    spec, tspec = _write_metadata(cfg, plan, teacher)
    maps = _DeviceMaps.of(plan, device)
    phases = {"load": time.perf_counter() - t0, "forward": 0.0, "align": 0.0, "write": 0.0}
    if head is not None:
        phases["logits"] = 0.0
    clock = _Clock(device, phases)
    try:
        w = _open_writer(cfg, plan, spec, head)
    except ShardComplete:  # on_busy="wait": the writer we waited for completed the shard
        _check_complete(cfg, plan, lambda: teacher)
        return DumpResult(name, cfg.shard, "already complete")
    with w:
        bar = tqdm(
            total=plan.teacher_tokens,
            unit="tok",
            unit_scale=True,
            desc=f"dump {name}[{cfg.shard}]",
            disable=not progress,
        )
        with host_memory_kept(device):
            _dump_batches(cfg, plan, teacher, maps, w, clock, bar, head)
        with clock("write"):
            _commit(cfg, plan, tspec, w)
        bar.close()
    return DumpResult(
        name,
        cfg.shard,
        "written",
        len(plan.pairs),
        plan.student_tokens,
        plan.skipped,
        time.perf_counter() - t0,
        teacher_tokens=plan.teacher_tokens,
        phases=phases,
    )


# --- 1. preflight: check everything, create nothing ----------------------------------------------


@dataclass
class _Plan:
    """What the preflight settled for this (teacher, shard); nothing of it is on disk yet."""

    data_fingerprint: str
    student_tokenizer_fingerprint: str
    teacher_tokenizer_fingerprint: str
    tokenizers: tuple  # (student, teacher): their files are recorded in the store
    time_map: str  # resolved kind: identity / char_overlap / segment_linear
    geometry_t: KVGeometry
    geometry_s: KVGeometry
    layer_map: torch.Tensor  # W [L_s, L_t]
    similarity: list | None  # [L_s][L_t] CKA of a calibrated map
    projection: dict[str, torch.Tensor] | None  # {k,v}_mean [L_s, D_t], {k,v}_components [L_s, D_t, D]
    projection_info: dict | None
    width: int  # D stored per layer for K (and V): the projection's dim, else D_t
    codec: str
    logits_top_k: int  # K: top-K teacher log-probs stored per student row; 0 = none
    pad_id: int  # the teacher tokenizer's
    pairs: list[tuple[Encoded, Encoded]]  # (student grid, teacher input), sorted by student length
    skipped: list[str]  # ids over max_len (on_too_long "skip")
    examples: dict[str, dict[str, str]]  # sample id -> its text, stored with it (the time map is rebuilt from it)

    @property
    def student_tokens(self) -> int:
        return sum(len(s) for s, _ in self.pairs)

    @property
    def teacher_tokens(self) -> int:
        return sum(len(t) for _, t in self.pairs)


def _preflight(cfg: DumpConfig) -> _Plan:
    """Everything that can fail on the input (data, tokenizers and their EOS, configs, layer map,
    projection, every sample's tokens, an empty shard) is checked before the store is touched:
    metadata written by a failed run would pin its student / data and block the corrected rerun."""
    examples = load_examples(cfg.data)
    data_fp = data_fingerprint(examples)
    shard_examples = partition(examples, cfg.shard, cfg.num_shards)
    s_tok, t_tok = load_tokenizer(cfg.student, role="student"), load_tokenizer(cfg.teacher, role="teacher")
    require_eos(s_tok, "student", cfg.student)
    require_eos(t_tok, "teacher", cfg.teacher)
    s_fp, t_fp = tokenizer_fingerprint(s_tok), tokenizer_fingerprint(t_tok)
    kind = resolve_time_map(
        cfg.align.time_map,
        same_tokenizer=s_fp == t_fp,
        same_text=cfg.teacher.prompt_template == cfg.student.prompt_template,
    )
    t_config = load_config(cfg.teacher, role="teacher")
    g_t, g_s = kv_geometry(t_config), kv_geometry(load_config(cfg.student, role="student"))
    W, similarity = load_layer_map(cfg.align.layer_map, g_t.num_layers, g_s.num_layers)  # [L_s, L_t]
    proj, proj_info = _projection(cfg, W, g_t.width)
    pairs, skipped = _encode_samples(cfg, shard_examples, s_tok, t_tok, kind)
    if not pairs and not cfg.allow_empty:
        raise DataError(_empty_message(cfg, len(examples), len(shard_examples)))
    _check_logits(cfg, kind, s_fp == t_fp, pairs, t_config.vocab_size)
    # Length-sorted batches cut padding. The order depends only on the student's tokens, so it
    # is the same for every teacher (the trainer zips shards positionally).
    pairs.sort(key=lambda p: len(p[0]))
    return _Plan(
        data_fingerprint=data_fp,
        student_tokenizer_fingerprint=s_fp,
        teacher_tokenizer_fingerprint=t_fp,
        tokenizers=(s_tok, t_tok),
        time_map=kind,
        geometry_t=g_t,
        geometry_s=g_s,
        layer_map=W,
        similarity=similarity,
        projection=proj,
        projection_info=proj_info,
        width=proj_info["dim"] if proj_info else g_t.width,
        codec=cfg.teacher_kv_dtype.get(cfg.teacher.short_name, cfg.kv_dtype),
        logits_top_k=cfg.teacher_top_k,
        pad_id=pad_token_id(t_tok),
        pairs=pairs,
        skipped=skipped,
        examples={
            ex.id: {"question": ex.question, "reasoning": ex.reasoning, "answer": ex.answer} for ex in shard_examples
        },
    )


def load_layer_map(layer_map: str, L_t: int, L_s: int) -> tuple[torch.Tensor, list | None]:
    """W [L_s, L_t] of `--layer-map` ('ratio' or a layermap.json) and, for a calibrated map, its
    similarity matrix."""
    if layer_map == "ratio":
        return ratio_layer_map(L_t, L_s), None
    path = Path(layer_map)
    if not path.exists():
        raise FileNotFoundError(f"layer map {path} does not exist; make it with `kvdistill align calibrate`")
    d = json.loads(path.read_text())
    return layer_map_from_json(d, L_t, L_s), d.get("similarity")


def _projection(cfg: DumpConfig, W: torch.Tensor, D_t: int) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """PCA from `kvdistill align calibrate --pca D`: means [L_s, D_t], components [L_s, D_t, D].
    It must have been fitted under this dump's layer map W [L_s, L_t] (recorded in the file):
    a PCA of other layers' mixtures would keep the wrong subspace, silently."""
    if cfg.align.projection is None:
        return None, None
    L_s = W.shape[0]
    z = np.load(cfg.align.projection)
    arrays = {name: torch.from_numpy(z[name]) for name in ("k_mean", "k_components", "v_mean", "v_components")}
    dim = arrays["k_components"].shape[-1]
    for part in ("k", "v"):
        if arrays[f"{part}_mean"].shape != (L_s, D_t) or arrays[f"{part}_components"].shape != (L_s, D_t, dim):
            raise ValueError(
                f"projection {cfg.align.projection}: {part} has mean {tuple(arrays[f'{part}_mean'].shape)} and "
                f"components {tuple(arrays[f'{part}_components'].shape)}; this teacher needs ({L_s}, {D_t}) and "
                f"({L_s}, {D_t}, D). Recompute it with `kvdistill align calibrate --pca` for this teacher and student"
            )
    fitted = z["layer_map"] if "layer_map" in z.files else None
    if fitted is None or fitted.shape != tuple(W.shape) or not np.allclose(fitted, W.numpy(), atol=1e-6):
        why = "records no layer map (an older calibrate)" if fitted is None else "was fitted under another layer map"
        raise ValueError(
            f"projection {cfg.align.projection} {why}; this dump uses --layer-map {cfg.align.layer_map}. Refit it"
            f" under that map: `kvdistill align calibrate --pca D --pca-layer-map {cfg.align.layer_map}`"
        )
    info = {
        "dim": dim,
        "k_explained_variance": z["k_evr"].sum(-1).tolist(),
        "v_explained_variance": z["v_evr"].sum(-1).tolist(),
    }
    return arrays, info


def _encode_samples(cfg: DumpConfig, examples: list[Example], s_tok, t_tok, kind: str) -> tuple[list, list[str]]:
    """(student grid, teacher input) Encoded pairs of the samples within max_len, and the ids of
    those skipped over it (on_too_long "skip"; "error" raises naming the sample). Under "skip"
    a sample is also skipped when it is over max_len for another of `length_teachers`, so every
    teacher of the store skips the same samples (the store needs them to hold the same)."""
    name = cfg.teacher.short_name
    others = _other_lengths(cfg) if cfg.on_too_long == "skip" else []
    pairs, skipped = [], []
    for ex in examples:
        s = encode(s_tok, cfg.student.prompt_template, ex)
        t = s if kind == "identity" else encode(t_tok, cfg.teacher.prompt_template, ex)
        if max(len(s), len(t)) > cfg.max_len:
            if cfg.on_too_long == "error":
                raise ValueError(
                    f"teacher {name}: sample {ex.id} has {len(t)} teacher / {len(s)} student tokens > max_len "
                    f"{cfg.max_len}; raise --max-len, or pass --on-too-long skip to skip (and count) such samples"
                )
            skipped.append(ex.id)
            continue
        if any(length(ex) > cfg.max_len for length in others):
            skipped.append(ex.id)
            continue
        pairs.append((s, t))
    return pairs, skipped


def _other_lengths(cfg: DumpConfig) -> list:
    """ex -> its token count for each other teacher of `length_teachers` (tokenizer and template
    only; a tokenizer shared by several teachers is loaded once)."""
    tokenizers: dict[tuple[str, str | None], object] = {}
    out = []
    for spec in cfg.length_teachers:
        if spec.short_name == cfg.teacher.short_name:
            continue
        key = (spec.name_or_path, spec.revision)
        if key not in tokenizers:
            tokenizers[key] = load_tokenizer(spec, role="teacher")
        out.append(lambda ex, tok=tokenizers[key], template=spec.prompt_template: len(encode(tok, template, ex)))
    return out


def _check_logits(cfg: DumpConfig, kind: str, same_tokenizer: bool, pairs: list, vocab_size: int) -> None:
    """--logits-top-k only where the teacher's next-token log-probs belong to the student's rows:
    the same tokenizer (so the same vocabulary), and a time map that gives every student token
    exactly one teacher token with weight 1 (identity; segment_linear where every segment has as
    many tokens on both sides). Anything else is refused, never skipped."""
    top_k, name = cfg.teacher_top_k, cfg.teacher.short_name
    if not top_k:
        return
    drop = f"drop --logits-top-k for teacher {name} (in a job of several teachers: --teacher-logits-top-k {name}=0)"
    if cfg.backend != "zarr":
        raise ValueError(
            f"teacher {name}: teacher logits are stored by the zarr backend only; use --backend zarr, or {drop}"
        )
    if not same_tokenizer:
        raise ValueError(
            f"{drop}: its tokens are not the student's (another tokenizer), so its log-probs are over another"
            " vocabulary"
        )
    if top_k > vocab_size:
        raise ValueError(
            f"teacher {name}: --logits-top-k {top_k} exceeds its vocabulary of {vocab_size} tokens; lower it"
        )
    if kind not in ("identity", "segment_linear"):
        raise ValueError(
            f"{drop}: its time map {kind} mixes teacher tokens into each student token; logits need one teacher "
            "token per student token (use --time-map auto: identity for the same text)"
        )
    if kind == "segment_linear":
        for s, t in pairs:
            n_s, n_t = (np.bincount(x.segment_ids, minlength=len(SEGMENTS)).tolist() for x in (s, t))
            if n_s != n_t:
                raise ValueError(
                    f"{drop}: sample {s.sample_id} has {n_s} student / {n_t} teacher tokens per segment (prompt, "
                    "reasoning, answer), so its segment_linear time map interpolates; logits need one teacher token "
                    "per student token (segments of equal length: the same text per segment)"
                )


def _empty_message(cfg: DumpConfig, n_data: int, n_rows: int) -> str:
    """Why this task would write no sample, and the fix."""
    where = f"teacher {cfg.teacher.short_name} shard {cfg.shard}: data {cfg.data.source}"
    if n_data == 0:
        return f"{where} has 0 rows; check the path / split / limit, or pass --allow-empty to write an empty shard"
    if n_rows == 0:
        return (
            f"{where} has {n_data} rows for {cfg.num_shards} shards, so this shard gets none; use fewer shards "
            f"(at most {n_data}) or --allow-empty"
        )
    return (
        f"{where} has {n_data} rows, and all {n_rows} of this shard are over max_len {cfg.max_len} (skipped by "
        "--on-too-long skip); raise --max-len, check the data path / filter, or pass --allow-empty"
    )


# --- 2. load the teacher, write the metadata -------------------------------------------------------


def _load_teacher(cfg: DumpConfig, device: torch.device):
    teacher = load_model(cfg.teacher, device, role="teacher")
    if cfg.latent is not None:  # only eager attention returns the probabilities R-KV scores with
        teacher.set_attn_implementation("eager")
    return teacher


def _logits_head(cfg: DumpConfig, plan: _Plan, teacher, device: torch.device):
    """(head, V) that turns the teacher's final hidden states into its logits (core/capture.py
    `output_head`), checked on a probe (the shard's shortest sample, at most 64 tokens) against
    the model's own forward; None without --logits-top-k. A head it does not reproduce is refused."""
    if not plan.logits_top_k:
        return None
    name = cfg.teacher.short_name
    head, V = output_head(teacher)
    if plan.pairs:
        ids = torch.as_tensor(plan.pairs[0][1].input_ids[:64], dtype=torch.long, device=device)[None]  # [1, T]
        err = head_mismatch(teacher, head, ids, torch.ones_like(ids))
        if err > 1e-2:
            raise ValueError(
                f"drop --logits-top-k for teacher {name}: its logits are not its output embedding of the final hidden "
                f"state with a scaling kvdistill knows ({type(teacher).__name__}: {err:.2g} of the largest logit off "
                "on a probe)"
            )
    return head, V


def _open_writer(cfg: DumpConfig, plan: _Plan, spec: StoreSpec, head):
    """The shard's writer in the store's backend; with logits (zarr only: `_check_logits`) one
    that also stores them."""
    args = {"width": plan.width, "codec": plan.codec, "on_busy": cfg.on_busy}
    args["latent_slots"] = cfg.latent.slots if cfg.latent else None
    if head is not None:
        args |= {"logits_top_k": plan.logits_top_k, "vocab_size": head[1]}
    return open_shard_writer(cfg.store, cfg.teacher.short_name, cfg.shard, spec, **args)


def _write_metadata(cfg: DumpConfig, plan: _Plan, teacher) -> tuple[StoreSpec, TeacherSpec]:
    """The first writes, after the preflight: the store's spec (student, data; one for every
    task) and this teacher's (alignment, codec, fingerprint; the projection's arrays), and both
    tokenizers' files (with each sample's stored text they rebuild its time map exactly)."""
    spec = _store_spec(cfg, plan)
    init_store(cfg.store, spec)
    init_tokenizer(cfg.store, tokenizer_files(plan.tokenizers[0]), plan.student_tokenizer_fingerprint)
    tspec = _teacher_spec(cfg, plan, teacher)
    proj = plan.projection
    init_teacher(cfg.store, tspec, arrays={k: v.numpy() for k, v in proj.items()} if proj else None)
    init_tokenizer(
        cfg.store, tokenizer_files(plan.tokenizers[1]), plan.teacher_tokenizer_fingerprint, teacher=tspec.name
    )
    return spec, tspec


def _check_complete(cfg: DumpConfig, plan: _Plan, load_teacher) -> None:
    """This task's shard is complete: a no-op only if it is what this task would write. The
    store's spec (student geometry, tokenizer and template, data, shards, codecs), the shard's
    record (data, samples skipped over max_len) and then, the teacher loaded (`load_teacher()`),
    the teacher's fingerprint (weights, template, alignment, codec) must equal this run's;
    otherwise StoreError naming each difference and the fix (nothing is written either way)."""
    name, shard = cfg.teacher.short_name, cfg.shard
    where = teacher_dir(cfg.store, name) / shard_name(shard)
    attrs = shard_attrs(where) or {}
    store_level = store_spec_differences(cfg.store, _store_spec(cfg, plan))
    differ = list(store_level)
    if attrs.get("data_fingerprint") not in (None, plan.data_fingerprint) and not any(
        d.startswith("data_fingerprint:") for d in differ
    ):
        differ.append(
            f"data_fingerprint: shard has {attrs['data_fingerprint']!r}, this run has {plan.data_fingerprint!r}"
        )
    if sorted(attrs.get("skipped", [])) != sorted(plan.skipped):
        differ.append(
            f"samples skipped over max_len: shard skipped {len(attrs.get('skipped', []))} (max_len"
            f" {attrs.get('max_len')}), this run skips {len(plan.skipped)} (max_len {cfg.max_len})"
        )
    if not differ:  # the teacher only when all else agrees: loading it is the expensive part
        tspec = _teacher_spec(cfg, plan, load_teacher())
        differ += [f"teacher spec {d}" for d in teacher_spec_differences(cfg.store, tspec)]
        if attrs.get("fingerprint") not in (None, tspec.fingerprint):
            differ.append(
                f"teacher fingerprint (weights, template, alignment, codec): shard has {attrs['fingerprint']!r}, this"
                f" run has {tspec.fingerprint!r}"
            )
    if not differ:
        return
    if store_level:
        fix = "run with the settings the store was dumped with (the task is then a no-op), or write into a new --store"
    elif any(d.startswith("teacher spec ") for d in differ):
        fix = (
            "run with the teacher setup the store holds (the task is then a no-op), or dump this setup under another "
            "--teacher-name, or into a new --store"
        )
    else:  # the store and the teacher's spec agree with this run; the shard does not (stale, or other settings)
        fix = (
            f"run with the settings the shard was dumped with (the task is then a no-op), or delete {where} and run"
            " this task again to redo it with these, then `kvdistill store finalize`"
        )
    raise StoreError(
        f"teacher {name} shard {shard} of store {cfg.store} is complete, but was dumped with other settings than this"
        " run:\n  " + "\n  ".join(differ) + f"\n{fix}"
    )


def _store_spec(cfg: DumpConfig, plan: _Plan) -> StoreSpec:
    return StoreSpec(
        student=cfg.student,
        geometry=plan.geometry_s,
        tokenizer_fingerprint=plan.student_tokenizer_fingerprint,
        data=cfg.data,
        data_fingerprint=plan.data_fingerprint,
        num_shards=cfg.num_shards,
        kv_dtype=cfg.kv_dtype,
        teacher_kv_dtype=cfg.teacher_kv_dtype,
        backend=cfg.backend,
        **compression(cfg),
    )


def _teacher_spec(cfg: DumpConfig, plan: _Plan, teacher) -> TeacherSpec:
    W = plan.layer_map.tolist()
    return TeacherSpec(
        name=cfg.teacher.short_name,
        model=cfg.teacher,
        geometry=plan.geometry_t,
        align=cfg.align,
        time_map=plan.time_map,
        layer_map=W,
        width=plan.width,
        fingerprint=model_fingerprint(
            teacher,
            cfg.teacher,
            [
                cfg.align.to_dict(),
                W,
                plan.projection_info,
                plan.codec,
                cfg.latent and cfg.latent.to_dict(),
                *([{"logits_top_k": plan.logits_top_k}] if plan.logits_top_k else []),  # older stores' stay valid
            ],
        ),
        kv_dtype=plan.codec,
        layer_similarity=plan.similarity,
        projection=plan.projection_info,
        latent=cfg.latent,
        logits_top_k=plan.logits_top_k,
    )


# --- 3. per batch: forward, align, write -----------------------------------------------------------


@dataclass
class _DeviceMaps:
    """The plan's layer map and projection on the device, for K and V side by side ([.., 2D_t])."""

    device: torch.device
    layer_map: torch.Tensor  # [L_s, L_t]
    projection: tuple[torch.Tensor, torch.Tensor] | None  # mean [L_s, 2D_t], block-diagonal components [L_s, 2D_t, 2D]
    transfer_dtype: torch.dtype  # of the aligned K/V copied to the host (codecs encode there)

    @classmethod
    def of(cls, plan: _Plan, device: torch.device) -> _DeviceMaps:
        proj = None
        if plan.projection:
            p = plan.projection
            mean, comp = kv_block_projection(p["k_mean"], p["k_components"], p["v_mean"], p["v_components"])
            proj = (mean.to(device), comp.to(device))
        transfer = torch.float16 if plan.codec == "float16" else torch.float32
        return cls(device, plan.layer_map.to(device), proj, transfer)


class _Captured(NamedTuple):
    kv: torch.Tensor  # [B, T_pad, L_t, 2D_t] pre-RoPE K, then V (what align_batch takes)
    k: torch.Tensor  # [B, T_pad, L_t, D_t] pre-RoPE
    v: torch.Tensor  # [B, T_pad, L_t, D_t]
    importance: torch.Tensor | None  # [B, L_t, H_t, T_pad]: attention the answer pays each key (latent mode)
    hidden: torch.Tensor | None  # [B, T_pad, H] after the final norm (latent mode, logits)


_Batch = list[tuple[Encoded, Encoded]]  # (student grid, teacher input) per sample


def _dump_batches(cfg: DumpConfig, plan: _Plan, teacher, maps: _DeviceMaps, w, clock: _Clock, bar, head=None) -> None:
    """Forward, align and write every batch; returns once the last write is done. Pipelined: the
    time map of batch i+1 is built on a CPU thread while batch i runs, and batch i's compression
    and store writes overlap batch i+1's forward (at most one batch waits: bounded memory).
    head: (output head, V) with --logits-top-k (`_logits_head`), else None."""
    batches = [plan.pairs[i : i + cfg.batch_size] for i in range(0, len(plan.pairs), cfg.batch_size)]
    # The teacher's K/V land in one buffer sized for the largest padded batch, reused by every
    # batch (core/capture.py: KVBuffer says why). Each batch's aligned K/V are new tensors, so
    # nothing handed to the writer refers to it.
    g = plan.geometry_t
    buffer = KVBuffer(
        max((len(b) * max(len(t) for _, t in b) for b in batches), default=0) * g.num_layers * 2 * g.width
    )
    with (
        ThreadPoolExecutor(1, thread_name_prefix="kvdistill-maps") as maps_pool,
        ThreadPoolExecutor(1, thread_name_prefix="kvdistill-writer") as writer,
    ):
        next_time_map = maps_pool.submit(_time_map, plan.time_map, batches[0]) if batches else None
        pending: Future | None = None
        for b, batch in enumerate(batches):
            time_map = next_time_map
            if b + 1 < len(batches):
                next_time_map = maps_pool.submit(_time_map, plan.time_map, batches[b + 1])
            ids, mask = _teacher_inputs(batch, plan.pad_id, maps.device)  # [B, T_pad]
            with torch.inference_mode():
                with clock("forward"):
                    captured = _forward(
                        teacher, batch, ids, mask, buffer, latent=cfg.latent is not None, hidden=head is not None
                    )
                with clock("align"):
                    latent = None if cfg.latent is None else _compress(cfg, batch, captured, maps)
                    tmap = time_map.result()
                    kv = align_batch(captured.kv, maps.layer_map, tmap, maps.projection)  # [sum T_s, L_s, 2D]
                logits = None
                if head is not None:
                    with clock("logits"):
                        logits = _top_logits(
                            cfg.teacher.short_name, batch, captured.hidden, tmap, head, plan.logits_top_k
                        )
                with clock("write"):
                    kv = kv.to(maps.transfer_dtype).cpu().numpy()
                    if pending is not None:
                        pending.result()  # re-raises a writer error here
                    pending = writer.submit(_write_batch, w, batch, kv, latent, plan.width, plan.examples, logits)
            bar.update(sum(len(t) for _, t in batch))
        with clock("write"):
            if pending is not None:
                pending.result()


def _time_map(kind: str, batch: _Batch) -> TimeMap:
    """The batch's stacked time map [sum T_s, B * T_pad]: CPU work on offsets only."""
    return batch_time_map(
        kind,
        [s.offsets for s, _ in batch],
        [t.offsets for _, t in batch],
        [s.segment_ids for s, _ in batch],
        [t.segment_ids for _, t in batch],
    )


def _teacher_inputs(batch: _Batch, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's token ids and attention mask [B, T_pad], right-padded, on the device."""
    ids, mask = pad_batch([t.input_ids for _, t in batch], pad_id)
    if device.type == "cuda":  # pinned host memory: the copy overlaps queued kernels
        return ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
    return ids.to(device), mask.to(device)


def _forward(
    teacher, batch: _Batch, ids: torch.Tensor, mask: torch.Tensor, buffer: KVBuffer, latent: bool, hidden: bool = False
) -> _Captured:
    """Teacher-forced decoder pass capturing every layer's K and V (into `buffer`: valid until the
    next batch's forward); in latent mode also what R-KV scores with (the attention the answer
    tokens pay each key) and the final hidden states, which `hidden` (logits) asks for too."""
    if not latent:
        if hidden:
            kv, h = forward_kv_packed(teacher, ids, mask, buffer, hidden=True)  # [B, T_pad, L_t, 2D_t], [B, T_pad, H]
        else:
            kv, h = forward_kv_packed(teacher, ids, mask, buffer), None
        D = kv.shape[-1] // 2
        return _Captured(kv, kv[..., :D], kv[..., D:], None, h)
    answers, _ = pad_batch([t.segment_ids == ANSWER for _, t in batch], 0)  # [B, T_pad]
    k, v, importance, hidden = forward_kv_importance(teacher, ids, mask, answers.bool().to(ids.device))
    return _Captured(torch.cat([k, v], dim=-1), k, v, importance, hidden)


def _top_logits(
    name: str, batch: _Batch, hidden: torch.Tensor, tmap: TimeMap, head, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-K next tokens at the position each student row is aligned to: hidden
    [B, T_pad, H] -> ids [sum T_s, K] int32, log-probs [sum T_s, K] float16 (samples in batch
    order, as align_batch's rows). The head runs only on those positions, in chunks."""
    T_s = tmap.shape[0]
    if tmap.nnz != T_s or not bool((tmap.weights == 1).all()):  # the preflight rules it out; never averaged
        row = int(tmap.rows[tmap.weights != 1].min())
        ends = np.cumsum([len(s) for s, _ in batch])
        j = int(np.searchsorted(ends, row, side="right"))
        raise ValueError(
            f"drop --logits-top-k for teacher {name}: sample {batch[j][0].sample_id} token"
            f" {row - (ends[j] - len(batch[j][0]))} is aligned to several teacher tokens ({tmap.kind} time map);"
            " logits need one teacher token per student token"
        )
    at = tmap.cols.to(hidden.device)  # [sum T_s] flat index (b * T_pad + t) of each row's teacher position
    ids, lp = top_log_probs(*head, hidden.reshape(-1, hidden.shape[-1]).index_select(0, at), top_k)
    return ids.to(torch.int32).cpu().numpy(), lp.to(torch.float16).cpu().numpy()


def _compress(cfg: DumpConfig, batch: _Batch, captured: _Captured, maps: _DeviceMaps) -> dict[str, np.ndarray]:
    """KaVa latent mode on the host: R-KV slots of every sample (align.batch.compress_batch):
    kv [B, M, L_s, 2D], mask [B, M], pos [B, M, L_t, H_t]; with codi_hidden, hidden [B, H]."""
    lat = cfg.latent
    reasoning = [t.segment_ids == REASONING for _, t in batch]
    out = compress_batch(
        captured.k, captured.v, captured.importance, reasoning, lat.slots, lat.lam, maps.layer_map, maps.projection
    )
    res = {
        "kv": out["kv"].to(maps.transfer_dtype).cpu().numpy(),
        "mask": out["mask"].cpu().numpy(),
        "pos": out["pos"].to(torch.int32).cpu().numpy(),
    }
    if lat.codi_hidden:
        res["hidden"] = _codi_hidden(cfg.teacher.short_name, batch, captured.hidden)
    return res


def _codi_hidden(name: str, batch: _Batch, hidden: torch.Tensor) -> np.ndarray:
    """hidden [B, T_pad, H] -> [B, H] float32: each sample's state at the token before its answer."""
    before_answer = []
    for s, t in batch:
        first = int(np.argmax(t.segment_ids == ANSWER))
        if first == 0:
            raise ValueError(
                f"teacher {name}: sample {s.sample_id} starts with its answer; no token precedes it for the CODI"
                " hidden state"
            )
        before_answer.append(first - 1)
    at = torch.as_tensor(before_answer, device=hidden.device)
    return hidden[torch.arange(len(batch), device=hidden.device), at].float().cpu().numpy()


def _write_batch(
    w,
    batch: _Batch,
    kv: np.ndarray,
    latent: dict[str, np.ndarray] | None,
    width: int,
    examples: dict[str, dict[str, str]],
    logits: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """kv [sum T_s, L_s, 2D] (K then V, samples in batch order), the latent arrays [B, ...] and
    the logits (ids, lp) [sum T_s, K] -> one record per sample, with the sample's text. Runs on
    the writer thread."""
    start = 0
    for b, (s, _) in enumerate(batch):
        sample_kv = kv[start : start + len(s)]  # [T_s, L_s, 2D]
        lat = None
        if latent is not None:
            lat = {
                "k": latent["kv"][b, ..., :width],
                "v": latent["kv"][b, ..., width:],
                "mask": latent["mask"][b],
                "pos": latent["pos"][b],
            }
            if "hidden" in latent:
                lat["hidden"] = latent["hidden"][b]
        rows = (
            {}
            if logits is None
            else {"logits": (logits[0][start : start + len(s)], logits[1][start : start + len(s)])}
        )
        w.write(
            s.sample_id,
            sample_kv[..., :width],
            sample_kv[..., width:],
            s.input_ids,
            s.loss_mask,
            s.segment_ids,
            lat,
            examples[s.sample_id],
            **rows,  # only a ShardWriter with logits_top_k takes them
        )
        start += len(s)


# --- 4. commit ------------------------------------------------------------------------------------


def _commit(cfg: DumpConfig, plan: _Plan, tspec: TeacherSpec, w) -> None:
    """Close the shard: complete and visible from now on. The fingerprints let `store verify`
    tell a shard written by another setup (stale)."""
    w.close(
        extra_attrs={
            "skipped": plan.skipped,
            "max_len": cfg.max_len,
            "fingerprint": tspec.fingerprint,
            "data_fingerprint": plan.data_fingerprint,
        }
    )


# --- infrastructure: SIGTERM, phase clock, host memory ------------------------------------------------


@contextmanager
def _sigterm_unwinds():
    """In the main thread, turn SIGTERM into `Preempted` (exit code 143) for the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Preempted(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Clock:
    """`with clock("forward"): ...` adds the block's wall time to phases["forward"] (synchronising
    CUDA so asynchronous kernels are charged to the phase that launched them)."""

    def __init__(self, device: torch.device, phases: dict[str, float]) -> None:
        self.cuda, self.phases, self.name, self.t = device.type == "cuda", phases, "", 0.0

    def __call__(self, name: str) -> _Clock:
        self.name = name
        return self

    def __enter__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.phases[self.name] += time.perf_counter() - self.t


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@contextmanager
def host_memory_kept(device: torch.device):
    """On a CPU (glibc), freed memory stays in the process for the block instead of going back to
    the kernel. torch's CPU tensors come straight from malloc: by default glibc serves every
    block over its mmap threshold (at most 32 MiB; a real teacher's MLP activations are larger)
    with fresh pages and unmaps them on free, and trims the heap top past 64 MiB, so every batch
    faults its activations in again, page by page: 2-4 million page faults (2-6 us each on the
    2-core VM) per pass of 48 GSM8K rows through SmolLM2-135M, about a fifth of the forward's
    CPU time, bare forward or dump (BENCHMARKS.md). With both thresholds high the first batch
    grows the heap and the others reuse it. After the block the thresholds go to glibc's dynamic
    maxima (its own steady state once a process has freed a large block, as loading a model
    does) and the free memory is handed back (malloc_trim). A no-op elsewhere (CUDA: torch
    caches device memory itself; a C library other than glibc)."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)


def _glibc():
    """The process's C library if it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt thresholds)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc
