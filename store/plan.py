"""`kvdistill store plan`: how big a store will be, before any teacher runs.

    p = plan(teacher_config, student_config, num_samples=7473, mean_tokens=212.4)
    print(format_plan({"teacher-a": p}))

Rows are tokens on the student's grid (every teacher's K/V is aligned onto it), so the row
count depends on the data and the student's tokenizer only. Per row a teacher stores K and V
for each student layer at its own width D_t = H_kv_t * d_t:

    raw bytes per token = 2 * L_s * H_kv_t * d_t * bytes per value
    bytes on disk       = rows * raw bytes per token / compression ratio

Bytes per value come from the codec (`codec_bytes_per_value`: int8 / int4 include their
scale arrays, amortised). The store's token arrays (input_ids int32 + loss_mask bool: 5 bytes
per row) are left out: they are small next to K/V.
"""

from __future__ import annotations

import math
from typing import Any

from kvdistill.schemas import KVGeometry

from . import codecs

__all__ = ["KV_DTYPES", "COMPRESSION", "codec_bytes_per_value", "plan", "format_plan"]

KV_DTYPES = ("float32", *codecs.CODECS)
# What blosc-zstd with byte shuffle typically gains: float16 K/V ~1.3x; quantised codes are
# close to incompressible already.
COMPRESSION = {"float": 1.3, "quantised": 1.0}


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
) -> dict[str, Any]:
    """Size estimate of one teacher's part of a store. `compression_ratio` defaults to 1.3 for
    float codecs (>= 2 bytes per value) and 1.0 for quantised ones; `num_shards` defaults to
    the suggestion: the fewest shards of at most `target_shard_bytes` on disk each."""
    for name, value in (("num_samples", num_samples), ("mean_tokens", mean_tokens)):
        if not value >= 0:
            raise ValueError(f"plan: {name} must be >= 0, got {value}")
    for name, value in (("codec_bytes_per_value", codec_bytes_per_value), ("target_shard_bytes", target_shard_bytes),
                        ("compression_ratio", compression_ratio)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"plan: {name} must be finite and > 0, got {value}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"plan: num_shards must be >= 1 or None (the suggestion), got {num_shards}")
    L_s = student.num_layers
    L_t, H_t, d_t = teacher.num_layers, teacher.num_kv_heads, teacher.head_dim
    if compression_ratio is None:
        compression_ratio = COMPRESSION["float" if codec_bytes_per_value >= 2 else "quantised"]
    rows = round(num_samples * mean_tokens)  # tokens on the student grid
    raw_per_token = 2 * L_s * H_t * d_t * codec_bytes_per_value  # K and V, every student layer
    disk = rows * raw_per_token / compression_ratio
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
        "bytes_per_value": codec_bytes_per_value,
        "raw_bytes_per_token": raw_per_token,
        "raw_bytes": rows * raw_per_token,
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
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def format_plan(plans: dict[str, dict[str, Any]], codec: str = "float16") -> str:
    """One line per teacher and a total; the suggestion covers the largest teacher (every teacher
    shares num_shards: shard i of each holds the same samples)."""
    first = next(iter(plans.values()))
    n = first["num_shards"]
    lines = [
        f"{first['samples']:,} samples x {first['mean_tokens']:.1f} student tokens = {first['rows']:,} rows "
        f"per teacher; K/V as {codec}; {n} shards of ~{math.ceil(first['rows'] / n):,} rows",
        f"{'teacher':<24} {'L_s x H_kv x d':>16} {'B/token raw':>12} {'ratio':>6} {'raw':>11} {'on disk':>11} {'per shard':>11}",
    ]
    for name, p in plans.items():
        geom = f"{p['student_layers']} x {p['teacher_kv_heads']} x {p['teacher_head_dim']}"
        lines.append(
            f"{name:<24} {geom:>16} {p['raw_bytes_per_token']:>12,.0f} {p['compression_ratio']:>6.2f} "
            f"{_size(p['raw_bytes']):>11} {_size(p['disk_bytes']):>11} {_size(p['disk_bytes_per_shard']):>11}"
        )
    total = sum(p["disk_bytes"] for p in plans.values())
    suggested = max(p["suggested_num_shards"] for p in plans.values())
    target = max(p["target_shard_bytes"] for p in plans.values())
    lines.append(
        f"total {_size(total)} on disk (all teachers); suggested --num-shards {suggested} "
        f"(at most ~{_size(target)} per shard of the largest teacher)"
    )
    return "\n".join(lines)
