"""`kvdistill store stats`: per-layer mean / std / absmax of every teacher's K and V, with dask.

    info = stats("out.zarr")               # one dask.compute over every shard of every teacher
    print(format_stats(info))
    plot_stats(info, "stats.png")

Statistics are over all rows (tokens) and channels of a layer: K and V of one teacher are
[N, L_s, D] once the shards are concatenated along rows, and each statistic is [L_s]. They are
what the trainer's `kv_norm: layer_std` divides by, and where a bad layer map or an outlier
channel shows first (an absmax far above the std).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from . import codecs
from .errors import CorruptShard, StoreError
from .layout import (
    KEY,
    read_store_spec,
    read_teacher_specs,
    shard_is_complete,
    shard_name,
    teacher_dir,
)
from .rows import check_chunks_present

__all__ = ["stats", "format_stats", "plot_stats"]


def _row_chunks(n: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, n - a) for a in range(0, n, step)) or (0,)


def _lazy(group: zarr.Group, part: str, width: int) -> da.Array:
    """Decoded K or V of one shard as a lazy float64 dask array [rows, L_s, width].

    One dask chunk per zarr shard (the write unit: ~16 MiB reads rather than a task per 1 MiB
    chunk). Quantised codecs are dequantised per block with `codecs.decode`, their scale arrays
    read as dask blocks aligned to the data's: row-indexed (v) alike, one scale row per GROUP
    rows (k) divided by GROUP (blocks start at multiples of GROUP)."""
    attrs = group.attrs[KEY]
    p = group[part]
    codec = attrs.get("codec") or ("float16" if p.dtype == np.float16 else "float32")
    n, L = p.shape[:2]
    step = max(codecs.GROUP, (p.shards or p.chunks)[0] // codecs.GROUP * codecs.GROUP)
    rows = _row_chunks(n, step)
    x = da.from_zarr(p, chunks=(rows, *p.shape[1:]))
    if codec in ("float16", "float32"):
        return x.astype(np.float64)  # float16 sums overflow
    aux = (attrs.get("scales") or {}).get(part) or [a for a in codecs.array_names(codec) if a]
    starts = np.cumsum((0, *rows[:-1]))
    extra = []
    if aux:  # int8 / int4: scale (and zero) rows for each data block
        aux_rows = tuple(
            b - a for a, b in (codecs.scale_rows(codec, part, s0, s0 + r) for s0, r in zip(starts, rows, strict=True))
        )
        extra = [da.from_zarr(group[f"{part}_{a}"], chunks=(aux_rows, *group[f"{part}_{a}"].shape[1:])) for a in aux]

    def decode(block, *params, block_info=None):
        start = block_info[0]["array-location"][0][0]
        return codecs.decode(codec, part, {"": block, **dict(zip(aux, params, strict=True))}, start, width)

    y = da.map_blocks(
        decode, x, *extra, chunks=(rows, (L,), (width,)), dtype=np.float32, meta=np.empty((0, 0, 0), np.float32)
    )
    return y.astype(np.float64)


def stats(path: str | Path, teachers: list[str] | None = None) -> dict[str, Any]:
    """Per teacher, K and V: mean, std (population) and absmax per student layer, over every
    row and channel of the complete shards, quantised codecs dequantised lazily. Teachers with
    no rows yet are listed under "skipped"."""
    path = Path(path)
    spec = read_store_spec(path)
    specs = read_teacher_specs(path)
    names = list(specs) if teachers is None else list(teachers)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise StoreError(f"store {path} has no teacher(s) {unknown}; it holds {list(specs)}")
    out: dict[str, Any] = {"store": str(path), "num_shards": spec.num_shards, "teachers": {}, "skipped": {}}
    lazy: dict[str, dict[str, dict[str, da.Array]]] = {}
    for name in names:
        width = specs[name].width
        shards = [i for i in range(spec.num_shards) if shard_is_complete(path, name, i)]
        parts: dict[str, list[da.Array]] = {"k": [], "v": []}
        rows = 0
        for i in shards:
            group = zarr.open_group(teacher_dir(path, name) / shard_name(i), mode="r")
            # dask reads through plain zarr, which checks every chunk's crc32c but reads a
            # missing chunk as the fill value: refuse that first.
            for a in group.array_keys():
                if a in ("k", "v") or a.startswith(("k_", "v_")):
                    check_chunks_present(group[a], teacher_dir(path, name) / shard_name(i) / a)
            for a in parts:
                if group[a].shape[0]:
                    parts[a].append(_lazy(group, a, width))
            rows += group["k"].shape[0]
        if not rows:
            out["skipped"][name] = f"no rows in its {len(shards)} complete shard(s)"
            continue
        out["teachers"][name] = {
            "codec": getattr(specs[name], "kv_dtype", "float16"),
            "shards": len(shards),
            "rows": rows,
        }
        lazy[name] = {}
        for a, p in parts.items():
            x = da.concatenate(p, axis=0)  # [N, L_s, D]
            lazy[name][a] = {
                "mean": x.mean(axis=(0, 2)),  # [L_s]
                "std": x.std(axis=(0, 2)),
                "absmax": abs(x).max(axis=(0, 2)),
            }
    try:
        (computed,) = dask.compute(lazy)  # one pass: the graphs share their from_zarr reads
    except ValueError as e:  # zarr's crc32c codec: "Stored and computed checksum do not match"
        if "checksum" not in str(e):
            raise
        raise CorruptShard(
            f"store {path}: a K/V chunk fails its crc32c check ({e}); run `kvdistill store verify {path}` to find"
            " which"
        ) from e
    for name, kv in computed.items():
        for a, st in kv.items():
            out["teachers"][name][a] = {s: np.asarray(v).tolist() for s, v in st.items()}
    return out


def format_stats(info: dict[str, Any]) -> str:
    lines = [f"store {info['store']}: per-layer K/V statistics over all rows and channels"]
    lines.append(f"{'teacher':<20} {'K/V':<3} {'layer':>5} {'mean':>11} {'std':>11} {'absmax':>11}")
    for name, t in info["teachers"].items():
        for a in ("k", "v"):
            st = t[a]
            for layer, (m, s, x) in enumerate(zip(st["mean"], st["std"], st["absmax"], strict=True)):
                lines.append(f"{name:<20} {a.upper():<3} {layer:>5} {m:>11.4g} {s:>11.4g} {x:>11.4g}")
    for name, t in info["teachers"].items():
        lines.append(
            f"{name}: {t['rows']:,} rows from {t['shards']}/{info['num_shards']} complete shards ({t['codec']})"
        )
    for name, why in info["skipped"].items():
        lines.append(f"{name}: skipped: {why}")
    return "\n".join(lines)


def plot_stats(info: dict[str, Any], png_path: str | Path) -> Path:
    """2 x 2 panels (std, absmax) x (K, V) against the student layer, one line per teacher."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for col, a in enumerate(("k", "v")):
        for row, s in enumerate(("std", "absmax")):
            ax = axes[row, col]
            for name, t in info["teachers"].items():
                ax.plot(range(len(t[a][s])), t[a][s], marker="o", label=name)
            ax.set_title(f"{a.upper()} {s}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[1, col].set_xlabel("student layer")
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(f"{info['store']}: per-layer K/V statistics")
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    return png_path
