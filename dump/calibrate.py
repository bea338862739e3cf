"""`kvdistill align calibrate`: which teacher layers should feed each student layer, measured.

Both models read a calibration sample; the teacher's K/V are time-mapped onto the student's
tokens (so rows pair up), and debiased linear CKA is computed between every student layer and
every teacher layer on valid tokens only (layer features: K and V concatenated). The top-k
teacher layers per student layer, weighted by similarity, form the layer map. Optionally a
per-layer PCA of the layer-mapped teacher K and V is fitted for `dump --projection`.

Writes OUT (JSON: similarity matrix, map, metadata), OUT with .png (heatmap) and, with
--pca D, OUT with -pcaD.npz (fitted under --pca-layer-map, which it records: the dump refuses
a projection fitted under another layer map than its own)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from kvdistill.align.cka import cka_matrix, layer_map_to_json, topk_layer_map
from kvdistill.align.pipeline import build_time_map, map_layers, resolve_time_map
from kvdistill.align.projection import fit_layer_pca
from kvdistill.core.capture import forward_kv, kv_geometry
from kvdistill.core.data import load_examples
from kvdistill.core.models import load_model, load_tokenizer, resolve_device, tokenizer_fingerprint
from kvdistill.core.prompts import encode, pad_batch
from kvdistill.schemas import CalibrateConfig

from .run import load_layer_map

__all__ = ["calibrate"]


def _features(model, batch, pad_id, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids, mask = pad_batch([e.input_ids for e in batch], pad_id)
    with torch.inference_mode():
        k, v = forward_kv(model, ids.to(device), mask.to(device))  # [B, T, L, D]
    return [(k[j, : len(e)].float().cpu(), v[j, : len(e)].float().cpu()) for j, e in enumerate(batch)]


def _heatmap(sim: np.ndarray, path: Path, title: str) -> None:
    fig = Figure(figsize=(1.2 + 0.35 * sim.shape[1], 1.2 + 0.35 * sim.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(sim, origin="lower", cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
    ax.set(xlabel="teacher layer", ylabel="student layer", title=title)
    fig.colorbar(im, ax=ax, label="debiased linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def calibrate(cfg: CalibrateConfig, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    s_tok, t_tok = load_tokenizer(cfg.student, role="student"), load_tokenizer(cfg.teacher, role="teacher")
    kind = resolve_time_map(
        cfg.time_map,
        same_tokenizer=tokenizer_fingerprint(s_tok) == tokenizer_fingerprint(t_tok),
        same_text=cfg.teacher.prompt_template == cfg.student.prompt_template,
    )
    teacher, student = load_model(cfg.teacher, device, role="teacher"), load_model(cfg.student, device, role="student")
    g_t, g_s = kv_geometry(teacher.config), kv_geometry(student.config)
    rows = load_examples(cfg.data)[: cfg.samples]
    s_feats, t_feats, tokens = [], [], 0  # per sample: [T_s, L, 2D] (K and V concatenated)
    t_kv = []  # per sample: teacher (k, v) on the student grid [T_s, L_t, D_t], for PCA
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i : i + cfg.batch_size]
        s_enc = [encode(s_tok, cfg.student.prompt_template, ex) for ex in chunk]
        t_enc = s_enc if kind == "identity" else [encode(t_tok, cfg.teacher.prompt_template, ex) for ex in chunk]
        s_out = _features(student, s_enc, s_tok.pad_token_id or 0, device)
        t_out = _features(teacher, t_enc, t_tok.pad_token_id or 0, device)
        for s, t, (sk, sv), (tk, tv) in zip(s_enc, t_enc, s_out, t_out, strict=True):
            tmap = build_time_map(kind, s.offsets, t.offsets, s.segment_ids, t.segment_ids)
            if tmap is not None:
                tk, tv = tmap.apply(tk), tmap.apply(tv)
            s_feats.append(torch.cat([sk, sv], dim=-1))
            t_feats.append(torch.cat([tk, tv], dim=-1))
            t_kv.append((tk, tv))
            tokens += len(s)
    S, T = torch.cat(s_feats), torch.cat(t_feats)  # [N, L_s, 2D_s], [N, L_t, 2D_t]
    sim = cka_matrix(list(S.unbind(1)), list(T.unbind(1)))  # [L_s, L_t]
    W = topk_layer_map(sim, min(cfg.top_k, g_t.num_layers))
    meta = {
        "teacher": cfg.teacher.to_dict(),
        "student": cfg.student.to_dict(),
        "samples": len(rows),
        "tokens": tokens,
        "time_map": kind,
        "features": "pre-RoPE K and V of each layer, concatenated, on the student's tokens",
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(layer_map_to_json(W, sim, g_t.num_layers, g_s.num_layers, {**meta, "k": cfg.top_k}), indent=1)
    )
    png = out.with_suffix(".png")
    _heatmap(sim.numpy(), png, f"{cfg.teacher.short_name} vs {cfg.student.short_name}")
    result: dict[str, Any] = {
        "layer_map": str(out),
        "heatmap": str(png),
        "similarity": sim.tolist(),
        "map": W.tolist(),
        "tokens": tokens,
    }
    if cfg.pca is not None:
        W_pca = (
            W
            if cfg.pca_layer_map == "calibrated"
            else load_layer_map(cfg.pca_layer_map, g_t.num_layers, g_s.num_layers)[0]
        )
        K = map_layers(torch.cat([k for k, _ in t_kv]).double(), W_pca)  # [N, L_s, D_t]
        V = map_layers(torch.cat([v for _, v in t_kv]).double(), W_pca)
        k_mean, k_comp, k_evr = fit_layer_pca(K, cfg.pca)
        v_mean, v_comp, v_evr = fit_layer_pca(V, cfg.pca)
        pca_path = out.with_name(f"{out.stem}-pca{cfg.pca}.npz")
        np.savez(
            pca_path,
            k_mean=k_mean.float().numpy(),
            k_components=k_comp.float().numpy(),
            k_evr=k_evr.numpy(),
            v_mean=v_mean.float().numpy(),
            v_components=v_comp.float().numpy(),
            v_evr=v_evr.numpy(),
            layer_map=W_pca.float().numpy(),  # dump checks it is fitted under the map it uses
        )
        result.update(
            projection=str(pca_path),
            k_explained_variance=k_evr.sum(-1).tolist(),
            v_explained_variance=v_evr.sum(-1).tolist(),
        )
    result["seconds"] = time.perf_counter() - t0
    return result
