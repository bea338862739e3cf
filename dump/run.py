"""One dump array task: teacher x shard -> aligned K/V in the store.

    run_dump(DumpConfig(teacher=..., student=..., data=..., store="out.zarr", shard=3, num_shards=8))

Steps: load rows, take this task's contiguous slice (identical for every teacher), render and
tokenize for the student (the grid K/V is stored on) and for the teacher (its own tokenizer and
template), teacher-forced forward of the decoder stack only (no LM head) under inference_mode
in length-sorted padded batches, capture pre-RoPE K and V, layer-map (and optionally project)
the whole batch, then per sample drop padding and time-map onto the student's tokens
(identity / char overlap / per-segment resampling), write the shard and commit it atomically.
A complete shard makes the task a no-op; a sample over max_len is an error or a counted skip.

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
before the first answer token (CODI). The full K/V are written as before.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvdistill.align.cka import layer_map_from_json
from kvdistill.align.layers import ratio_layer_map
from kvdistill.align.pipeline import build_time_map, map_layers, resolve_time_map
from kvdistill.align.rkv import compress
from kvdistill.align.time import stack_time_maps
from kvdistill.core.capture import forward_kv, forward_kv_importance, kv_geometry
from kvdistill.core.data import DataError, data_fingerprint, load_examples
from kvdistill.core.models import (
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    pad_token_id,
    require_eos,
    resolve_device,
    tokenizer_fingerprint,
)
from kvdistill.core.prompts import SEGMENTS, encode, pad_batch
from kvdistill.errors import Preempted
from kvdistill.schemas import DumpConfig, Example, StoreSpec, TeacherSpec
from kvdistill.store import (
    ShardWriter,
    WdsShardWriter,
    compression,
    init_store,
    init_teacher,
    shard_is_complete,
)
from kvdistill.store.errors import ShardComplete

REASONING, ANSWER = SEGMENTS.index("reasoning"), SEGMENTS.index("answer")

__all__ = ["DumpResult", "Preempted", "partition", "run_dump"]

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


def _layer_map(cfg: DumpConfig, L_t: int, L_s: int) -> tuple[torch.Tensor, list | None]:
    """W [L_s, L_t] and, for a calibrated map, its similarity matrix."""
    if cfg.align.layer_map == "ratio":
        return ratio_layer_map(L_t, L_s), None
    path = Path(cfg.align.layer_map)
    if not path.exists():
        raise FileNotFoundError(f"layer map {path} does not exist; make it with `kvdistill align calibrate`")
    d = json.loads(path.read_text())
    return layer_map_from_json(d, L_t, L_s), d.get("similarity")


def _projection(cfg: DumpConfig, L_s: int, D_t: int) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """PCA from `kvdistill align calibrate --pca D`: means [L_s, D_t], components [L_s, D_t, D]."""
    if cfg.align.projection is None:
        return None, None
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
    info = {"dim": dim, "k_explained_variance": z["k_evr"].sum(-1).tolist(), "v_explained_variance": z["v_evr"].sum(-1).tolist()}
    return arrays, info


def _encode_rows(cfg: DumpConfig, rows: list[Example], s_tok, t_tok, kind: str) -> tuple[list, list[str]]:
    """(student grid, teacher input) Encoded pairs of the rows within max_len, and the ids of
    those skipped over it (on_too_long "skip"; "error" raises naming the sample)."""
    name = cfg.teacher.short_name
    pairs, skipped = [], []
    for ex in rows:
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
        pairs.append((s, t))
    return pairs, skipped


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


def run_dump(cfg: DumpConfig, progress: bool = True) -> DumpResult:
    with _sigterm_unwinds():
        return _run_dump(cfg, progress)


def _run_dump(cfg: DumpConfig, progress: bool) -> DumpResult:
    t0 = time.perf_counter()
    name = cfg.teacher.short_name
    if shard_is_complete(cfg.store, name, cfg.shard):
        return DumpResult(name, cfg.shard, "already complete")

    # Everything that can fail on the input (data, tokenizers, configs, layer map, projection,
    # every sample's tokens) is checked before the store is touched: metadata written by a
    # failed run would pin its student / data and block the corrected rerun.
    examples = load_examples(cfg.data)
    data_fp = data_fingerprint(examples)
    rows = partition(examples, cfg.shard, cfg.num_shards)
    s_tok, t_tok = load_tokenizer(cfg.student), load_tokenizer(cfg.teacher)
    require_eos(s_tok, "student", cfg.student)
    require_eos(t_tok, "teacher", cfg.teacher)
    s_fp = tokenizer_fingerprint(s_tok)
    kind = resolve_time_map(
        cfg.align.time_map,
        same_tokenizer=s_fp == tokenizer_fingerprint(t_tok),
        same_text=cfg.teacher.prompt_template == cfg.student.prompt_template,
    )
    g_t, g_s = kv_geometry(load_config(cfg.teacher)), kv_geometry(load_config(cfg.student))
    W, similarity = _layer_map(cfg, g_t.num_layers, g_s.num_layers)  # [L_s, L_t]
    proj, proj_info = _projection(cfg, g_s.num_layers, g_t.width)
    width = proj_info["dim"] if proj_info else g_t.width
    pairs, skipped = _encode_rows(cfg, rows, s_tok, t_tok, kind)  # (student grid, teacher input) per sample
    if not pairs and not cfg.allow_empty:
        raise DataError(_empty_message(cfg, len(examples), len(rows)))

    device = resolve_device(cfg.device)
    teacher = load_model(cfg.teacher, device)
    if cfg.latent is not None:  # only eager attention returns the probabilities R-KV scores with
        teacher.set_attn_implementation("eager")

    init_store(
        cfg.store,
        StoreSpec(
            student=cfg.student,
            geometry=g_s,
            tokenizer_fingerprint=s_fp,
            data=cfg.data,
            data_fingerprint=data_fp,
            num_shards=cfg.num_shards,
            kv_dtype=cfg.kv_dtype,
            teacher_kv_dtype=cfg.teacher_kv_dtype,
            backend=cfg.backend,
            **compression(cfg),
        ),
    )
    codec = cfg.teacher_kv_dtype.get(name, cfg.kv_dtype)
    tspec = TeacherSpec(
        name=name,
        model=cfg.teacher,
        geometry=g_t,
        align=cfg.align,
        time_map=kind,
        layer_map=W.tolist(),
        width=width,
        fingerprint=model_fingerprint(teacher, cfg.teacher, [cfg.align.to_dict(), W.tolist(), proj_info, codec, cfg.latent and cfg.latent.to_dict()]),
        kv_dtype=codec,
        layer_similarity=similarity,
        projection=proj_info,
        latent=cfg.latent,
    )
    init_teacher(cfg.store, tspec, arrays={k: v.numpy() for k, v in proj.items()} if proj else None)

    # Length-sorted batches cut padding. The order depends only on the student's tokens, so it
    # is the same for every teacher (the trainer zips shards positionally).
    pairs.sort(key=lambda p: len(p[0]))
    pad_id = pad_token_id(t_tok)
    W_dev = W.to(device)
    proj_kv = None  # K and V are aligned side by side: one block-diagonal projection for both
    if proj:
        zeros = torch.zeros_like(proj["k_components"])
        proj_kv = (
            torch.cat([proj["k_mean"], proj["v_mean"]], dim=-1).to(device),  # [L_s, 2D_t]
            torch.cat([torch.cat([proj["k_components"], zeros], -1), torch.cat([zeros, proj["v_components"]], -1)], 1).to(device),
        )  # [L_s, 2D_t, 2D]
    tokens = sum(len(t) for _, t in pairs)

    transfer_dtype = torch.float16 if codec == "float16" else torch.float32  # codecs encode on the host
    phases = {"load": time.perf_counter() - t0, "forward": 0.0, "align": 0.0, "write": 0.0}
    clock = _Clock(device, phases)
    batches = [pairs[i : i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)]

    def time_maps(batch):  # CPU-only work on offsets: built for batch i+1 while batch i runs
        T_pad = max(len(t) for _, t in batch)
        maps = [build_time_map(kind, s.offsets, t.offsets, s.segment_ids, t.segment_ids) for s, t in batch]
        return stack_time_maps(maps, [len(t) for _, t in batch], T_pad)

    def write(batch, kv, latent):  # compression + zarr writes overlap the next forward
        start = 0
        for b, (s, _) in enumerate(batch):
            rows = kv[start : start + len(s)]
            lat = None
            if latent is not None:
                lat = {"k": latent["kv"][b, ..., :width], "v": latent["kv"][b, ..., width:], "mask": latent["mask"][b], "pos": latent["pos"][b]}
                if "hidden" in latent:
                    lat["hidden"] = latent["hidden"][b]
            w.write(s.sample_id, rows[..., :width], rows[..., width:], s.input_ids, s.loss_mask, s.segment_ids, lat)
            start += len(s)

    def compress_batch(batch, k, v, importance, hidden):
        """Per sample R-KV on the teacher's grid, then one layer map (+ projection) for the batch."""
        lat = cfg.latent
        out = [
            compress(k[b, : len(t)], v[b, : len(t)], importance[b, ..., : len(t)],
                     torch.as_tensor(t.segment_ids == REASONING, device=k.device), lat.slots, lat.lam)
            for b, (_, t) in enumerate(batch)
        ]
        mask = torch.stack([o["mask"] for o in out])  # [B, M]
        kv = torch.stack([torch.cat([o["k"], o["v"]], dim=-1) for o in out])  # [B, M, L_t, 2D_t]
        # Padding slots stay exactly 0 (a projection would move them to -mean @ components).
        kv = map_layers(kv, W_dev, proj_kv) * mask[:, :, None, None]  # [B, M, L_s, 2D]
        res = {
            "kv": kv.to(transfer_dtype).cpu().numpy(),
            "mask": mask.cpu().numpy(),
            "pos": torch.stack([o["pos"] for o in out]).to(torch.int32).cpu().numpy(),  # [B, M, L_t, H_t]
        }
        if lat.codi_hidden:
            before = []
            for s, t in batch:
                first = int(np.argmax(t.segment_ids == ANSWER))
                if first == 0:
                    raise ValueError(f"teacher {name}: sample {s.sample_id} starts with its answer; no token precedes it for the CODI hidden state")
                before.append(first - 1)
            rows = torch.as_tensor(before, device=hidden.device)
            res["hidden"] = hidden[torch.arange(len(batch), device=hidden.device), rows].float().cpu().numpy()  # [B, H]
        return res

    try:
        w = (WdsShardWriter if cfg.backend == "webdataset" else ShardWriter)(
            cfg.store, name, cfg.shard, num_layers=g_s.num_layers, width=width, codec=codec,
            latent_slots=cfg.latent.slots if cfg.latent else None, on_busy=cfg.on_busy,
            **({} if cfg.backend == "webdataset" else compression(cfg)),
        )
    except ShardComplete:  # on_busy="wait": the writer we waited for completed the shard
        return DumpResult(name, cfg.shard, "already complete")
    with (
        w,
        ThreadPoolExecutor(1, thread_name_prefix="kvdistill-maps") as maps_pool,
        ThreadPoolExecutor(1, thread_name_prefix="kvdistill-writer") as writer,
    ):
        bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"dump {name}[{cfg.shard}]", disable=not progress)
        next_maps = maps_pool.submit(time_maps, batches[0]) if batches else None
        pending: Future | None = None  # at most one batch waits for the writer (bounded memory)
        for b, batch in enumerate(batches):
            maps = next_maps
            if b + 1 < len(batches):
                next_maps = maps_pool.submit(time_maps, batches[b + 1])
            ids, mask = pad_batch([t.input_ids for _, t in batch], pad_id)
            if device.type == "cuda":  # pinned host memory: the copy overlaps queued kernels
                ids, mask = ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
            with torch.inference_mode():
                latent = None
                with clock("forward"):
                    if cfg.latent is None:
                        k, v = forward_kv(teacher, ids.to(device), mask.to(device))  # [B, T_t, L_t, D_t]
                    else:
                        answers, _ = pad_batch([t.segment_ids == ANSWER for _, t in batch], 0)
                        k, v, importance, hidden = forward_kv_importance(
                            teacher, ids.to(device), mask.to(device), answers.bool().to(device)
                        )  # importance [B, L_t, H_t, T_t], hidden [B, T_t, H]
                with clock("align"):
                    if cfg.latent is not None:
                        latent = compress_batch(batch, k, v, importance, hidden)
                    # K and V side by side: one layer map and one block-diagonal time map for both.
                    kv = map_layers(torch.cat([k, v], dim=-1), W_dev, proj_kv)  # [B, T_t, L_s, 2D]
                    kv = maps.result().apply(kv.reshape(-1, *kv.shape[2:]))  # [sum T_s, L_s, 2D]
                with clock("write"):
                    kv = kv.to(transfer_dtype).cpu().numpy()
                    if pending is not None:
                        pending.result()  # re-raises a writer error here
                    pending = writer.submit(write, batch, kv, latent)
            bar.update(int(mask.sum()))
        with clock("write"):
            if pending is not None:
                pending.result()
            # The fingerprints let `store verify` tell a shard written by another setup (stale).
            w.close(extra_attrs={"skipped": skipped, "max_len": cfg.max_len, "fingerprint": tspec.fingerprint, "data_fingerprint": data_fp})
        bar.close()
    return DumpResult(
        name, cfg.shard, "written", len(pairs), sum(len(s) for s, _ in pairs), skipped,
        time.perf_counter() - t0, teacher_tokens=tokens, phases=phases,
    )


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
