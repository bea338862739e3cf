"""`kvdistill store inspect`: a store's layout in numbers (per teacher: shards complete,
samples, tokens, bytes on disk, bytes per token, compression ratio, the top-K of its stored
logits and their bytes), as a dict or a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .layout import (
    INDEX,
    disk_usage,
    partial_attempts,
    read_store_spec,
    read_teacher_specs,
    shard_attrs,
    shard_is_complete,
    shard_name,
    teacher_dir,
)
from .reader import LOGITS

__all__ = ["inspect", "format_inspect"]


def inspect(path: str | Path) -> dict[str, Any]:
    """Layout summary: per teacher shards complete, samples, tokens, bytes, bytes/token."""
    path = Path(path)
    spec = read_store_spec(path)
    out: dict[str, Any] = {
        "store": str(path),
        "student": spec.student.name_or_path,
        "geometry": spec.geometry.to_dict(),
        "kv_dtype": spec.kv_dtype,
        "compression_level": spec.compression_level,
        "blosc_shuffle": spec.blosc_shuffle,
        "num_shards": spec.num_shards,
        "fingerprints": {"tokenizer": spec.tokenizer_fingerprint, "data": spec.data_fingerprint},
        "finalized": (path / INDEX).exists(),
        "teachers": {},
    }
    for name, t in read_teacher_specs(path).items():
        done = [i for i in range(spec.num_shards) if shard_is_complete(path, name, i)]
        samples = tokens = logits_bytes = 0
        for i in done:
            a = shard_attrs(teacher_dir(path, name) / shard_name(i))
            samples += a["samples"]
            tokens += a["rows"]
            if a.get("logits"):  # zarr: the logits arrays' files
                logits_bytes += sum(disk_usage(teacher_dir(path, name) / shard_name(i) / n) for n in LOGITS)
        nbytes = disk_usage(teacher_dir(path, name))
        raw = tokens * 2 * spec.geometry.num_layers * t.width * 2  # as plain float16
        out["teachers"][name] = {
            "model": t.model.name_or_path,
            "codec": t.kv_dtype,
            "fingerprint": t.fingerprint,
            "shards_partial": sum(
                1 for i in range(spec.num_shards) if i not in done and partial_attempts(path, name, i)
            ),
            "time_map": t.time_map,
            "width": t.width,
            "latent_slots": t.latent.slots if t.latent else None,
            "shards_complete": len(done),
            "samples": samples,
            "tokens": tokens,
            "bytes": nbytes,
            "bytes_per_token": nbytes / tokens if tokens else float("nan"),
            "compression_ratio": raw / (nbytes - logits_bytes) if nbytes > logits_bytes else float("nan"),
            "logits_top_k": t.logits_top_k,
            "logits_bytes": logits_bytes,  # of `bytes`
            "logits_bytes_per_token": logits_bytes / tokens if tokens else float("nan"),
        }
    out["bytes"] = disk_usage(path)
    total_tokens = sum(t["tokens"] for t in out["teachers"].values())
    out["bytes_per_token"] = out["bytes"] / total_tokens if total_tokens else float("nan")
    return out


def format_inspect(info: dict[str, Any]) -> str:
    g = info["geometry"]
    fp = info["fingerprints"]
    lines = [
        f"store {info['store']}  ({'finalized' if info['finalized'] else 'NOT finalized'})",
        (
            f"student {info['student']}: {g['num_layers']} layers x {g['num_kv_heads']} kv heads x {g['head_dim']}"
            f" dims; {info['num_shards']} shards; K/V blosc-zstd level {info['compression_level']},"
            f" {info['blosc_shuffle']} shuffle; tokenizer {fp['tokenizer']}, data {fp['data']}"
        ),
        (
            f"{'teacher':<20} {'time map':<14} {'codec':<8} {'width':>6} {'shards':>8} {'samples':>8} {'tokens':>10} "
            f"{'bytes':>12} {'B/token':>9} {'ratio':>6} {'top-k':>5} {'latent':>6}  fingerprint"
        ),
    ]
    for name, t in info["teachers"].items():
        partial = f" ({t['shards_partial']} partial)" if t["shards_partial"] else ""
        lines.append(
            f"{name:<20} {t['time_map']:<14} {t['codec']:<8} {t['width']:>6}"
            f" {t['shards_complete']:>4}/{info['num_shards']:<3} {t['samples']:>8} {t['tokens']:>10} {t['bytes']:>12,}"
            f" {t['bytes_per_token']:>9.1f} {t['compression_ratio']:>6.2f} {t['logits_top_k'] or '-':>5}"
            f" {t['latent_slots'] or '-':>6}  {t['fingerprint']}{partial}"
        )
    for name, t in info["teachers"].items():
        if t["logits_top_k"]:
            lines.append(
                f"logits of teacher {name}: top-{t['logits_top_k']} log-probs per token, {t['logits_bytes']:,} bytes "
                f"({t['logits_bytes_per_token']:.1f} per token) of its {t['bytes']:,}"
            )
    lines.append(
        f"total {info['bytes']:,} bytes on disk, {info['bytes_per_token']:.1f} bytes per token (all teachers); ratio ="
        " plain float16 bytes / bytes on disk; top-k = teacher log-probs stored per token (dump --logits-top-k);"
        " latent = M compressed reasoning slots per sample (KaVa latent mode)"
    )
    lines.append(
        "one sample's time map and layer map, drawn: kvdistill store show-alignment STORE --teacher T --sample ID"
        " --out fig.png"
    )
    return "\n".join(lines)
