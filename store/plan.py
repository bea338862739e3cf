"""`kvdistill store plan`: how big a store will be, before any teacher runs.

    p = plan(teacher_config, student_config, num_samples=7473, mean_tokens=212.4)
    print(format_plan({"teacher-a": p}))

Rows are tokens on the student's grid (every teacher's K/V is aligned onto it), so the row
count depends on the data and the student's tokenizer only. Per row a teacher stores K and V
for each student layer at its stored width: its own D_t = H_kv_t * d_t, or the PCA dimension
D of `dump --projection` (`kvdistill align calibrate --pca D`), plus its token arrays
(input_ids int32, loss_mask and segment_ids uint8: TOKEN_BYTES) and each sample's text:

    raw bytes per token = 2 * L_s * D * bytes per value + TOKEN_BYTES (+ K * LOGIT_BYTES with logits top-K)
    bytes on disk       = (rows * raw bytes per token + samples * text bytes) / compression ratio

Bytes per value come from the codec (`codec_bytes_per_value`: int8 / int4 include their
scale arrays, amortised). `options` lists every storage setting side by side (codec x
projection), the compact one (PCA to width / 8, int4: 1.9 KB a token for a 7B teacher on a
0.5B student; / 16: ~1 KB) among them, so the choice is made before dumping.
"""

from __future__ import annotations

import math
from typing import Any

from kvdistill.schemas import KVGeometry

from . import codecs

__all__ = [
    "KV_DTYPES",
    "COMPRESSION",
    "COMPACT",
    "TOKEN_BYTES",
    "LOGIT_BYTES",
    "codec_bytes_per_value",
    "plan",
    "format_plan",
    "options",
    "format_options",
]

KV_DTYPES = ("float32", *codecs.CODECS)
# What blosc-zstd with byte shuffle typically gains: float16 K/V ~1.3x; quantised codes are
# close to incompressible already.
COMPRESSION = {"float": 1.3, "quantised": 1.0}
TOKEN_BYTES = 6  # input_ids int32 + loss_mask + segment_ids, per row and teacher
LOGIT_BYTES = 4 + 2  # per stored top-K entry: logits_ids int32 + logits_lp float16 (dump --logits-top-k K)
# The compact setting: PCA to 1/8 of the teacher's K/V width, int4 codes. On the embedded default
# it kept all of the distillation gain (perplexity 1.05 [0.99, 1.13], 10 seeds paired); 1/16
# halves the bytes and kept 0.92 [0.84, 0.99] (bench/compact.py, BENCHMARKS.md).
COMPACT = {"fraction": 8, "codec": "int4"}


def codec_bytes_per_value(codec: str, num_layers: int, width: int) -> float:
    """Uncompressed bytes per stored K/V value, scales and zeros of int8 / int4 included."""
    if codec == "float32":
        return 4.0
    return codecs.bytes_per_row(codec, num_layers, width) / (2 * num_layers * width)


def plan(
    teacher: KVGeometry,
    student: KVGeometry,
    num_samples: int,
    mean_tokens: float,
    codec_bytes_per_value: float = 2.0,
    num_shards: int | None = None,
    target_shard_bytes: int = 2**30,
    compression_ratio: float | None = None,
    stored_width: int | None = None,
    text_bytes_per_sample: float = 0.0,
    logits_top_k: int = 0,
) -> dict[str, Any]:
    """Size estimate of one teacher's part of a store. `stored_width`: the PCA dimension when
    projected (default: the teacher's own width); `logits_top_k`: K top log-probs per token too.
    `compression_ratio` defaults to 1.3 for
    float codecs (>= 2 bytes per value) and 1.0 for quantised ones; `num_shards` defaults to
    the suggestion: the fewest shards of at most `target_shard_bytes` on disk each."""
    for name, value in (("num_samples", num_samples), ("mean_tokens", mean_tokens)):
        if not value >= 0:
            raise ValueError(f"plan: {name} must be >= 0, got {value}")
    for name, value in (
        ("codec_bytes_per_value", codec_bytes_per_value),
        ("target_shard_bytes", target_shard_bytes),
        ("compression_ratio", compression_ratio),
    ):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"plan: {name} must be finite and > 0, got {value}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"plan: num_shards must be >= 1 or None (the suggestion), got {num_shards}")
    L_s = student.num_layers
    L_t, H_t, d_t = teacher.num_layers, teacher.num_kv_heads, teacher.head_dim
    if compression_ratio is None:
        compression_ratio = COMPRESSION["float" if codec_bytes_per_value >= 2 else "quantised"]
    D = H_t * d_t if stored_width is None else stored_width
    if not 1 <= D <= H_t * d_t:
        raise ValueError(
            f"plan: stored_width must be in [1, {H_t * d_t}] (the teacher's K/V width), got {stored_width}"
        )
    rows = round(num_samples * mean_tokens)  # tokens on the student grid
    logits_per_token = logits_top_k * LOGIT_BYTES  # teacher top-K ids and log-probs
    raw_per_token = 2 * L_s * D * codec_bytes_per_value + TOKEN_BYTES + logits_per_token  # K and V, every layer
    text = num_samples * text_bytes_per_sample  # each sample's question / reasoning / answer, as JSON
    disk = (rows * raw_per_token + text) / compression_ratio
    suggested = max(1, math.ceil(disk / target_shard_bytes))
    n = suggested if num_shards is None else num_shards
    return {
        "samples": num_samples,
        "mean_tokens": mean_tokens,
        "rows": rows,
        "student_layers": L_s,
        "teacher_layers": L_t,
        "teacher_kv_heads": H_t,
        "teacher_head_dim": d_t,
        "width": H_t * d_t,
        "stored_width": D,
        "bytes_per_value": codec_bytes_per_value,
        "raw_bytes_per_token": raw_per_token,
        "logits_top_k": logits_top_k,
        "logits_bytes_per_token": logits_per_token,
        "raw_bytes": rows * raw_per_token + text,
        "compression_ratio": compression_ratio,
        "disk_bytes": disk,
        "suggested_num_shards": suggested,
        "num_shards": n,
        "rows_per_shard": math.ceil(rows / n),
        "disk_bytes_per_shard": disk / n,
        "target_shard_bytes": target_shard_bytes,
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" and abs(n) < 1000 else f"{n:,.0f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def format_plan(plans: dict[str, dict[str, Any]], codec: str = "float16") -> str:
    """One line per teacher and a total; the suggestion covers the largest teacher (every teacher
    shares num_shards: shard i of each holds the same samples)."""
    first = next(iter(plans.values()))
    n = first["num_shards"]
    lines = [
        (
            f"{first['samples']:,} samples x {first['mean_tokens']:.1f} student tokens = {first['rows']:,} rows "
            f"per teacher; K/V as {codec}; {n} shards of ~{math.ceil(first['rows'] / n):,} rows"
        ),
        (
            f"{'teacher':<24} {'L_s x H_kv x d':>16} {'B/token raw':>12} {'ratio':>6} {'raw':>11} {'on disk':>11}"
            f" {'per shard':>11}"
        ),
    ]
    for name, p in plans.items():
        geom = f"{p['student_layers']} x {p['teacher_kv_heads']} x {p['teacher_head_dim']}"
        if p["stored_width"] != p["width"]:
            geom = f"{p['student_layers']} x PCA {p['stored_width']}"
        lines.append(
            f"{name:<24} {geom:>16} {p['raw_bytes_per_token']:>12,.0f} {p['compression_ratio']:>6.2f} "
            f"{_size(p['raw_bytes']):>11} {_size(p['disk_bytes']):>11} {_size(p['disk_bytes_per_shard']):>11}"
        )
        if p.get("logits_top_k"):
            lines.append(
                f"{'':<24} of which top-{p['logits_top_k']} logits: {p['logits_bytes_per_token']:,} B/token raw"
            )
    total = sum(p["disk_bytes"] for p in plans.values())
    suggested = max(p["suggested_num_shards"] for p in plans.values())
    target = max(p["target_shard_bytes"] for p in plans.values())
    lines.append(
        f"total {_size(total)} on disk (all teachers); suggested --num-shards {suggested} "
        f"(at most ~{_size(target)} per shard of the largest teacher)"
    )
    return "\n".join(lines)


def options(
    teachers: dict[str, KVGeometry], student: KVGeometry, rows: int, pca: list[int] = (), text_bytes: float = 0.0
) -> list[dict[str, Any]]:
    """Every storage setting side by side, per teacher: each codec at full width, then PCA to
    width / 4, / 8, / 16 and / 32 (int8, int4; float16 too for / 16) and to each of `pca` dims
    (capped at a teacher's width). Per option: name, codec, projection ("none" or the kept
    fraction / dims), and per teacher the stored dim, raw bytes per token (K/V, scales and token
    arrays; plus `text_bytes`, every sample's text, per teacher), the estimated bytes on disk
    (COMPRESSION) and, summed, the total on disk."""
    settings = [(c, None, None) for c in codecs.CODECS]
    settings += [
        (c, f, None) for f in (4, 8, 16, 32) for c in (("float16", "int8", "int4") if f == 16 else ("int8", "int4"))
    ]
    settings += [(c, None, d) for d in pca for c in ("float16", "int8", "int4")]
    out = []
    for codec, fraction, dims in settings:
        widths = {
            t: g.width if fraction is None and dims is None else max(1, min(g.width, dims or g.width // fraction))
            for t, g in teachers.items()
        }
        ratio = COMPRESSION["float" if codec in ("float16", "bfloat16") else "quantised"]
        per_token = {t: codecs.bytes_per_row(codec, student.num_layers, widths[t]) + TOKEN_BYTES for t in teachers}
        name = (
            codec
            if fraction is None and dims is None
            else f"pca/{fraction}-{codec}"
            if fraction
            else f"pca{dims}-{codec}"
        )
        out.append(
            {
                "name": name,
                "codec": codec,
                "projection": (
                    "none"
                    if fraction is None and dims is None
                    else f"width/{fraction}"
                    if fraction
                    else f"{dims} dims"
                ),
                "compact": fraction == COMPACT["fraction"] and codec == COMPACT["codec"],
                "stored_width": widths,
                "bytes_per_token": per_token,
                "disk_bytes": {t: (rows * b + text_bytes) / ratio for t, b in per_token.items()},
                "total_disk_bytes": sum((rows * b + text_bytes) / ratio for b in per_token.values()),
            }
        )
    return out


def format_options(opts: list[dict[str, Any]]) -> str:
    """The options table: bytes per token per teacher, total on disk, times smaller than float16."""
    names = list(opts[0]["bytes_per_token"])
    base = next(o for o in opts if o["name"] == "float16")["total_disk_bytes"]
    head = (
        f"{'option':<20} "
        + " ".join(f"{('B/token ' + n)[:22]:>22}" for n in names)
        + f" {'total on disk':>14} {'vs float16':>10}"
    )
    lines = [
        (
            "storage options (compact: `kvdistill align calibrate --pca D` + `kvdistill dump --projection PCA.npz"
            " --kv-dtype int4`):"
        ),
        head,
    ]
    for o in opts:
        mark = "  <- compact" if o["compact"] else ""
        lines.append(
            f"{o['name']:<20} "
            + " ".join(f"{o['bytes_per_token'][n]:>22,.0f}" for n in names)
            + f" {_size(o['total_disk_bytes']):>14} {base / o['total_disk_bytes']:>9.1f}x{mark}"
        )
    return "\n".join(lines)
