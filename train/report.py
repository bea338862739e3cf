"""Seeing a run: experiment trackers during training, and one self-contained HTML page after it.

    kvdistill report runs/kv               # -> runs/kv/report.html
    kvdistill report runs/kv --compare compare-out --out kv.html

The page opens on the results: what was trained (student, teachers, mode and loss weights, steps,
tokens, the store), each logged term's first, final and lowest value (validation too), the best
checkpoint, the evaluation JSON(s) found in the run directory, and tokens/s and peak memory from
the run's summary.json where the run left one. Then a curve per scalar term of metrics.jsonl (the
source of truth; any term a trainer adds is picked up) with its validation values (`val_<term>`)
drawn on it, a validation table (train vs validation per evaluation, the gap, the best
checkpoint), a heatmap over steps for every
per-layer list (`kv_k_layers`, `kv_v_layers`, ...), the routing weights (`route_k_<teacher>`,
`route_v_<teacher>`), a 2-D PCA of a Z-space run's
Z sample (train/zspace.py), and a compare table; last, train_config.yaml, folded.
Plots are matplotlib (Agg) PNGs embedded as base64, so the file travels alone. A piece that is
missing is said so on the page; only a directory without metrics.jsonl is an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from kvdistill.schemas.base import load_yaml

__all__ = [
    "resolve_trackers",
    "tracker_config",
    "tracker_values",
    "read_metrics",
    "run_report",
    "compare_report",
    "write_report",
]

# Row keys that are positions, not loss terms.
_AXES = ("step", "epoch", "tokens")
# A Z-space run's sample of Z, in RUN_DIR/final (train/zspace.py save_sample); drawn by `_zspace`.
ZSPACE_SAMPLE = "zspace_sample.npz"
# The run summary `kvdistill train` ends with (train/loop.py), where saved as RUN_DIR/summary.json:
# the only record of the run's wall time and peak memory.
RUN_SUMMARY = "summary.json"
# Logged settings that follow a schedule: drawn, but no result.
_SCHEDULES = ("lr", "kv_weight")
# Loss weights named in the results' recipe line, per mode (TrainConfig fields).
_WEIGHTS = {
    "cot": ("ce_weight", "kv_weight", "cka_weight", "attn_kl_weight"),
    "latent": ("cot_weight", "codi_weight", "kv_weight"),
}


# ----------------------------------------------------------------------------- trackers


def resolve_trackers(report_to: list[str]) -> list[str]:
    """TrainConfig.report_to -> accelerate `log_with` names. "all" / "auto": every tracker
    accelerate finds installed (maybe none). A named tracker must be one accelerate knows and
    be installed: accelerate itself would skip a missing one silently."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if any(name in ("all", "auto") for name in report_to):
        return available
    out = []
    for name in report_to:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"report_to: unknown tracker {name!r}; choose from {sorted(LOGGER_TYPE_TO_CLASS)} or 'all' "
                "(metrics.jsonl is always written)"
            )
        if name not in available:
            raise ValueError(
                f"report_to: tracker {name!r} is not installed; `pip install {name}` or drop it from report_to"
            )
        if name not in out:
            out.append(name)
    return out


def tracker_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to the scalar hyperparameters trackers accept (dotted keys;
    lists and None as text)."""
    flat: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(tracker_config(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        else:
            flat[key] = json.dumps(v)
    return flat


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker scalars: per-layer lists become `<term>/<layer>`."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, list):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


# ----------------------------------------------------------------------------- reading a run


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{run} has no metrics.jsonl; point `kvdistill report` at a training run directory (--out of `kvdistill"
            " train`)"
        )
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{i} is not JSON ({e}); was the run killed mid-write? remove that line"
                ) from e
    return rows


def _scalar_terms(rows: list[dict[str, Any]]) -> list[str]:
    terms: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k in _AXES or k.startswith(("route_", "val_")) or k in terms:  # val_<term>: drawn with <term>
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                terms.append(k)
    return terms


def _layer_terms(rows: list[dict[str, Any]]) -> list[str]:
    terms: list[str] = []
    for r in rows:
        for k, v in r.items():
            if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) and k not in terms:
                terms.append(k)
    return terms


def _evals(run: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every JSON in the run directory (or its eval/) that reads as a `kvdistill eval` result,
    and the .json files that do not parse at all ({file: why}: a killed eval leaves a truncated
    one; the report says so rather than leaving a result out unseen)."""
    found, unreadable = {}, {}
    for path in sorted([*run.glob("*.json"), *run.glob("eval/*.json")]):
        name = str(path.relative_to(run))
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            unreadable[name] = str(e)
            continue
        if isinstance(data, dict) and "accuracy" in data and "perplexity" in data:
            found[name] = data
    return found, unreadable


# ----------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curves(rows: list[dict[str, Any]], terms: list[str]) -> str:
    n = len(terms)
    cols = min(3, n)
    fig = Figure(figsize=(5 * cols, 3.2 * math.ceil(n / cols)))
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        x, y = _series(rows, term)
        ax.plot(x, y, label="train")
        vx, vy = _series(rows, f"val_{term}")
        if vx:
            ax.plot(vx, vy, "o-", label="validation")
            ax.legend()
            y = y + vy
        ax.set(title=term, xlabel="step")
        if term != "lr" and y and min(y) > 0 and max(y) / min(y) > 20:
            ax.set_yscale("log")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _validation(run: Path, rows: list[dict[str, Any]]) -> str:
    """Per validation step each validated term next to its training value and the gap
    (val / train - 1): train and validation should both fall, the gap stay within a few percent."""
    val = [r for r in rows if any(k.startswith("val_") for k in r)]
    if not val:
        return _missing("no validation logged: train with --eval-steps N and --val-shards K (or --val-store PATH)")
    terms = [k.removeprefix("val_") for k in val[-1] if k.startswith("val_")]
    header = ["step"] + [c for t in terms for c in (f"train {t}", f"val {t}", "gap")]
    table = []
    for r in val:
        cells: list[Any] = [r["step"]]
        for t in terms:
            tr, va = r.get(t), r.get(f"val_{t}")
            gap = (
                f"{100 * (va / tr - 1):+.1f}%"
                if isinstance(tr, (int, float)) and isinstance(va, (int, float)) and tr
                else "-"
            )
            cells += [tr, va, gap]
        table.append(cells)
    best = run / "best" / "best.json"
    note = ""
    if best.exists():
        b = json.loads(best.read_text())
        note = (
            f"<p>best checkpoint ({html.escape(str(run / 'best'))}): {html.escape(b['metric'])} = {_fmt(b['value'])}"
            f" at step {b['step']}</p>"
        )
    return note + _table(header, table)


def _heatmap(rows: list[dict[str, Any]], key: str) -> str:
    have = [r for r in rows if isinstance(r.get(key), list)]
    width = max(len(r[key]) for r in have)
    grid = np.full((width, len(have)), np.nan)  # [L, logged steps]
    for j, r in enumerate(have):
        grid[: len(r[key]), j] = r[key]
    fig = Figure(figsize=(10, 0.4 * width + 2))
    ax = fig.subplots()
    steps = [r["step"] for r in have]
    im = ax.imshow(
        grid,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, width - 0.5),
    )
    ax.set(title=f"{key} per student layer", xlabel="step", ylabel="layer")
    ax.yaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _png(fig)


def _routes(rows: list[dict[str, Any]], keys: list[str]) -> str:
    parts = sorted({k.split("_")[1] for k in keys})  # route_<part>_<teacher>
    fig = Figure(figsize=(6 * len(parts), 3.5))
    axes = fig.subplots(1, len(parts), squeeze=False)
    for ax, part in zip(axes.flat, parts, strict=True):
        for k in keys:
            if k.startswith(f"route_{part}_"):
                ax.plot(*_series(rows, k), label=k[len(f"route_{part}_") :])
        ax.set(title=f"mean routing weight, {part.upper()}", xlabel="step", ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def _erank(x: np.ndarray) -> float:
    """Effective rank of x [n, Z]'s correlation matrix (train/zspace.py collapse_stats)."""
    x = x - x.mean(axis=0)
    x = x / np.sqrt((x**2).mean(axis=0) + 1e-5)
    ev = np.clip(np.linalg.eigvalsh(x.T @ x / len(x)), 0, None)
    if ev.sum() <= 1e-6:
        return 0.0
    p = ev / ev.sum()
    return float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))


def _zspace(run: Path, rows: list[dict[str, Any]]) -> str:
    """PCA (2-D, by SVD of the pooled, centred tokens) of the Z sample of RUN_DIR/final: each
    teacher's, the fused target's and the student's standardised Z on the same real tokens of
    the last training batch, per layer (first, middle, last), coloured by source."""
    path = run / "final" / ZSPACE_SAMPLE
    if not path.exists():
        if any("z" in r for r in rows):
            return _missing(f"Z space on, but no {path}: the Z sample is written with final/, when the run ends")
        return (  # a setting, not a missing piece
            "<p>Z space off (--z-dim N fuses and distils in a common Z space).</p>"
        )
    with np.load(path) as data:
        z, sources = data["z"], [str(s) for s in data["sources"]]  # [S, n, L, Z]
    _, n, num_layers, z_dim = z.shape
    layers = sorted({0, num_layers // 2, num_layers - 1})
    fig = Figure(figsize=(5 * len(layers), 4.2))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers, strict=True):
        x = z[:, :, layer].reshape(-1, z_dim).astype(np.float64)
        x = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        pc = (x @ vt[:2].T).reshape(len(sources), n, -1)
        share = s**2 / max((s**2).sum(), 1e-30)
        for i, name in enumerate(sources):
            ax.scatter(pc[i, :, 0], pc[i, :, -1], s=6, alpha=0.5, label=name)
        ax.set(
            title=f"layer {layer}: PC1 {share[0]:.0%}, PC2 {share[1] if len(share) > 1 else 0:.0%}",
            xlabel="PC1",
            ylabel="PC2",
        )
        ax.legend(markerscale=2, fontsize=8)
    fig.tight_layout()
    table = _table(
        ["source", "mean per-dim std", "effective rank (mean over layers)"],
        [[name, float(z[i].std(axis=0).mean()), _erank_layers(z[i])] for i, name in enumerate(sources)],
    )
    note = (
        f"<p>{n} real tokens of the last training batch per source, Z of width {z_dim}, standardised per dimension as"
        " the loss sees it. A collapsed side shows as a point (std 0) or a line (effective rank near 1).</p>"
    )
    return note + _png(fig) + table


def _erank_layers(z: np.ndarray) -> float:
    return float(np.mean([_erank(z[:, layer]) for layer in range(z.shape[1])]))


# ----------------------------------------------------------------------------- results


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """train_config.yaml as a dict, and why it could not be read ({} and None when absent: the
    Config section says so)."""
    if not path.exists():
        return {}, None
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        return {}, f"{path} does not parse as YAML ({e})"
    return (data, None) if isinstance(data, dict) else ({}, f"{path} holds no mapping of settings")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object the run left, or None when absent or unreadable (`_evals` lists the latter)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _trained(cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    student = cfg.get("student")
    name = student.get("name_or_path") if isinstance(student, dict) else student
    if not name:
        return _missing("not recorded (no student in train_config.yaml)")
    text = f"student {name}"
    if cfg.get("lora_r"):
        text += f" (LoRA r {cfg['lora_r']} on {', '.join(cfg.get('lora_targets') or [])})"
    teachers = cfg.get("teachers") or summary.get("teachers")
    text += f", from teachers {', '.join(teachers)}" if teachers else ", from every teacher in the store"
    return html.escape(text)


def _recipe(cfg: dict[str, Any]) -> str:
    mode = cfg.get("mode", "cot")
    weights = [f"{w.removesuffix('_weight')} x {cfg[w]:g}" for w in _WEIGHTS.get(mode, ()) if cfg.get(w)]
    text = f"mode {mode}: loss " + (" + ".join(weights) if weights else "(weights not recorded)")
    if mode == "cot" and cfg.get("kv_weight"):
        text += f"; K/V {cfg.get('kv_loss', '?')} after {cfg.get('kv_norm', '?')} norm"
        text += f", adapter {cfg.get('adapter', '?')}, fusion {cfg.get('fusion', '?')}"
        if cfg.get("z_dim"):
            text += f", in a Z space of width {cfg['z_dim']}"
    if mode == "latent":
        text += f"; {cfg.get('latent_iterations', '?')} Jacobi iterations"
    if cfg.get("kv_control", "none") != "none":
        text += f"; control: {cfg['kv_control']} teacher K/V"
    return html.escape(text)


def _progress(run: Path, cfg: dict[str, Any], last: dict[str, Any]) -> str:
    if not last:
        return _missing("no step logged yet")
    text = f"{last['step']} optimizer steps"
    if cfg.get("max_steps"):
        text += f" of {cfg['max_steps']}"
    elif cfg.get("num_train_epochs"):
        text += f" ({cfg['num_train_epochs']} epochs planned)"
    if "epoch" in last:
        text += f" (the last in epoch {last['epoch']}, counted from 0)"
    if isinstance(last.get("tokens"), int):
        text += f", {last['tokens']:,} tokens"
    rank = _read_json(run / "ranks" / "rank-0.json") or {}
    if cfg.get("batch_size"):
        b, a, n = cfg["batch_size"], cfg.get("gradient_accumulation_steps", 1), rank.get("num_processes", 1)
        text += f"; effective batch {b * a * n} = {b} x {a} (accumulation) x {n} (processes)"
    text += "; finished (final/ written)" if (run / "final").is_dir() else ""
    out = html.escape(text)
    if not (run / "final").is_dir():
        out += _missing("not finished: no final/ yet (still running, preempted or failed)")
    return out


def _speed(run: Path, summary: dict[str, Any] | None) -> tuple[str, str]:
    """(tokens/s, peak memory) from the run summary, or what is missing."""
    if summary is None:
        return (
            _missing(f"not recorded: no {RUN_SUMMARY} in {run} (the run summary `kvdistill train` ends with)"),
            _missing(f"not recorded (no {RUN_SUMMARY})"),
        )
    speed = _missing(f"{RUN_SUMMARY} has no seconds / tokens")
    tokens = summary.get("tokens_this_run", summary.get("tokens"))  # a resumed run: what its last process trained
    if summary.get("seconds") and tokens:
        speed = html.escape(
            f"{tokens / summary['seconds']:,.0f} tokens/s ({tokens:,} tokens in "
            f"{summary['seconds']:,.0f} s, loading and saving included)"
        )
    memory = _missing(f"{RUN_SUMMARY} has no peak_rss_mib")
    if summary.get("peak_rss_mib") is not None:
        memory = f"{summary['peak_rss_mib']:,.0f} MiB resident (host, main process)"
        if summary.get("peak_device_mib") is not None:
            memory += f", {summary['peak_device_mib']:,.0f} MiB allocated on the device"
    return speed, memory


def _metrics_table(rows: list[dict[str, Any]]) -> str:
    """Each logged term (schedules aside): first, final and lowest value with its step, and the
    same for its validation value where validated."""
    terms = [t for t in _scalar_terms(rows) if t not in _SCHEDULES]
    if not terms:
        return _missing("no scalar terms logged")
    validated = any(f"val_{t}" in r for r in rows for t in terms)
    header = ["term", "first", "final", "lowest", "at step"]
    header += ["final validation", "lowest validation", "at step"] if validated else []
    table = []
    for t in terms:
        x, y = _series(rows, t)
        lo = int(np.argmin(y))
        cells: list[Any] = [t, y[0], y[-1], y[lo], x[lo]]
        if validated:
            vx, vy = _series(rows, f"val_{t}")
            vlo = int(np.argmin(vy)) if vy else 0
            cells += [vy[-1], vy[vlo], vx[vlo]] if vy else [None, None, None]
        table.append(cells)
    return _table(header, table, first_left=True)


def _results(
    run: Path,
    rows: list[dict[str, Any]],
    cfg: dict[str, Any],
    cfg_problem: str | None,
    evals: dict[str, dict[str, Any]],
    unreadable: dict[str, str],
) -> str:
    """The page's opening: what was trained, how far, on which store, how fast, and what came of it."""
    summary = _read_json(run / RUN_SUMMARY)
    speed, memory = _speed(run, summary)
    store = cfg.get("store") or (summary or {}).get("store")
    facts = [
        ("trained", _trained(cfg, summary or {})),
        ("recipe", _recipe(cfg) if cfg else _missing("not recorded (no train_config.yaml)")),
        ("progress", _progress(run, cfg, rows[-1] if rows else {})),
        ("store", html.escape(str(store)) if store else _missing("not recorded")),
        ("throughput", speed),
        ("peak memory", memory),
    ]
    if cfg.get("val_store"):
        facts.insert(4, ("validation store", html.escape(str(cfg["val_store"]))))
    best = _read_json(run / "best" / "best.json")
    if best:
        said = f"{run / 'best'}: {best.get('metric')} {_fmt(best.get('value'))} at step {best.get('step')}"
        facts.append(("best checkpoint", html.escape(said)))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in facts)
    out = (_missing(cfg_problem) if cfg_problem else "") + f'<table class="facts">{body}</table>'
    out += "<h3>Logged terms</h3>" + (_metrics_table(rows) if rows else _missing("metrics.jsonl is empty"))
    if evals:
        table = _table(
            ["file", "n", "accuracy", "perplexity"],
            [[f, e.get("n"), _fmt_share(e["accuracy"]), e["perplexity"]] for f, e in evals.items()],
            first_left=True,
        )
    else:
        table = _missing(f"no evaluation JSON in {run}; run `kvdistill eval --model {run} --out {run}/eval.json`")
    if unreadable:
        listed = "; ".join(f"{f} ({why})" for f, why in unreadable.items())
        table += _missing(f"left out, not readable as JSON (an interrupted eval? re-run it): {listed}")
    return out + "<h3>Evaluation</h3>" + table


def _config_section(path: Path) -> str:
    """The config, folded: every setting is there, none in the way of the results."""
    if not path.exists():
        return _missing(f"no train_config.yaml in {path.parent}")
    text = path.read_text()
    said = f"{path.name}: every setting of the run ({len(text.splitlines())} lines)"
    return f"<details><summary>{html.escape(said)}</summary><pre>{html.escape(text)}</pre></details>"


# ----------------------------------------------------------------------------- HTML


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits + 1}g}"  # learning rates and losses alike
    return html.escape(str(x))


def _fmt_share(x: Any) -> Any:
    return f"{x:.3f}" if isinstance(x, float) else x  # accuracy 0.0 reads 0.000, not 0


def _table(header: list[str], rows: list[list[Any]], first_left: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    cls = ' class="names"' if first_left else ""
    return f"<table{cls}><tr>{head}</tr>{body}</table>"


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"
        ".missing{color:#a60;font-style:italic}img{max-width:100%}"
        ".facts th,.facts td{border:none;background:none;text-align:left;vertical-align:top;padding:2px 12px 2px 0}"
        ".facts th{white-space:nowrap}"
        ".facts .missing{display:inline;margin:0 0 0 .5em}"
        ".names td:first-child,.names th:first-child{text-align:left}"
        "details summary{cursor:pointer;color:#246}h3{margin-top:1.5em}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (
        "<!DOCTYPE html><html><head><meta"
        f' charset="utf-8"><title>{html.escape(title)}</title><style>{style}</style></head>'
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def _ci(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['ci']:.{digits}f}"


def _p(p: float | None) -> str:
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _compare_section(compare: dict[str, Any]) -> str:
    conf = int(round(100 * compare["confidence"]))
    alpha = compare.get("alpha", 0.05)
    base = compare.get("baseline", "ce")
    header = [
        "arm",
        "seeds",
        f"accuracy (mean ± {conf}% CI)",
        f"Δ accuracy vs {base}",
        "p (paired t)",
        "p (Holm)",
        "p (bootstrap)",
        "d_z",
        "MDE",
        f"perplexity (mean ± {conf}% CI)",
        f"Δ perplexity vs {base}",
        "p (Holm)",
    ]
    rows = []
    for name, arm in compare["arms"].items():
        vs = arm.get("vs_baseline") or {}
        acc, ppl = vs.get("accuracy") or {}, vs.get("perplexity") or {}
        mark = lambda s: " *" if s.get("p_holm") is not None and s["p_holm"] < alpha else ""  # noqa: E731
        boot = acc.get("bootstrap") or {}
        rows.append(
            [
                name,
                len(arm["runs"]),
                _ci(arm["accuracy"]),
                _ci(acc or None) + mark(acc),
                _p(acc.get("p")),
                _p(acc.get("p_holm")),
                _p(boot.get("p")),
                _fmt(acc.get("d_z"), 2),
                _fmt(acc.get("mde")),
                _ci(arm["perplexity"]),
                _ci(ppl or None) + mark(ppl),
                _p(ppl.get("p_holm")),
            ]
        )
    note = (
        f"<p>n = {compare['seeds']} seeds per arm, {compare.get('n_eval', '?')} test questions per run. CI half-width"
        f" = t x s / sqrt(n), with s the sample standard deviation and t = {compare['t_quantile']:.4f} the two-sided"
        f" {conf}% Student t quantile at n - 1 degrees of freedom. Δ: the mean over seeds of (arm - {base}) on the"
        " same seed, with its own CI; p: two-sided paired t-test, Holm-adjusted over the arms; * marks Holm p &lt;"
        f" {alpha}. Bootstrap: seeds, then questions, resampled with replacement (paired). d_z: mean / sd of the"
        " paired differences. MDE: the smallest true Δ accuracy a paired t-test with these seeds detects with power"
        f" {compare.get('power', 0.8)} at level {alpha}, at the observed sd.</p>"
    )
    names = list(compare["arms"])
    fig = Figure(figsize=(15, 0.5 * len(rows) + 2))
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes[:2], ("accuracy", "perplexity"), strict=True):
        for i, name in enumerate(names):
            arm = compare["arms"][name]
            vals = [r[metric] for r in arm["runs"]]
            ax.plot(vals, [i] * len(vals), "o", color="#999", ms=4)
            ax.errorbar(arm[metric]["mean"], i, xerr=arm[metric]["ci"], fmt="s", color="C0", capsize=4)
        ax.set(
            yticks=range(len(names)),
            yticklabels=names,
            title=f"{metric}: seeds (grey), mean ± {conf}% CI",
            xlabel=metric,
        )
        ax.invert_yaxis()
    ax = axes[2]  # paired differences: one point per seed
    others = [n for n in names if n != base]
    for i, name in enumerate(others):
        d = compare["arms"][name]["vs_baseline"]["accuracy"]
        ax.plot(d["values"], [i] * len(d["values"]), "o", color="#999", ms=4)
        ax.errorbar(d["mean"], i, xerr=d["ci"], fmt="s", color="C1", capsize=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(
        yticks=range(len(others)),
        yticklabels=others,
        title=f"Δ accuracy vs {base} per seed, mean ± {conf}% CI",
        xlabel=f"arm - {base} (same seed)",
    )
    ax.invert_yaxis()
    fig.tight_layout()
    return (
        _table(header, rows)
        + note
        + _png(fig)
        + (_curve_section(compare["curve"], conf) if compare.get("curve") else "")
    )


def _curve_section(curve: dict[str, Any], conf: int) -> str:
    """Sample efficiency: accuracy against optimizer steps per curve arm, seeds as points."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for k, (name, pts) in enumerate(curve["arms"].items()):
        steps = [int(s) for s in pts]
        for s, p in zip(steps, pts.values(), strict=True):
            ax.plot([s * (1 + 0.03 * (k - 0.5))] * len(p["seeds"]), p["seeds"], "o", color=f"C{k}", alpha=0.35, ms=4)
        means = [p["accuracy"]["mean"] for p in pts.values()]
        ax.errorbar(
            steps,
            means,
            yerr=[p["accuracy"]["ci"] for p in pts.values()],
            fmt="-s",
            color=f"C{k}",
            capsize=4,
            label=name,
        )
    ax.set(
        xscale="log",
        xlabel="optimizer steps (each budget its own run and schedule)",
        ylabel="test accuracy",
        title=f"sample efficiency: seeds (points), mean ± {conf}% CI",
    )
    ax.legend()
    fig.tight_layout()
    rows = []
    for name, pts in curve["arms"].items():
        for s, p in pts.items():
            vs = p.get("vs_baseline")
            worth = curve["baseline_steps_equivalent"].get(name, {}).get(s)
            said = "-"
            if worth:
                said = {
                    "within": lambda w: f"{w['steps']:.0f}",
                    "above": lambda w: f"> {w['at_least']}",
                    "below": lambda w: f"<= {w['at_most']}",
                }[worth["bound"]](worth)
            rows.append([name, s, _ci(p["accuracy"]), _ci(vs), _p(vs["p"]) if vs else "-", said])
    base = curve["baseline"]
    table = _table(
        [
            "arm",
            "steps",
            "accuracy",
            f"Δ vs {base} (same budget)",
            "p (paired t)",
            f"{base} steps to the same accuracy",
        ],
        rows,
    )
    return f"<h3>Sample efficiency ({curve['seeds']} seeds per budget)</h3>" + table + _png(fig)


def run_report(run: str | Path, compare: str | Path | None = None) -> str:
    """The HTML page for one training run (and a compare directory's table): the results first,
    then the curves and tables behind them, the config last, folded."""
    run = Path(run)
    rows = read_metrics(run)
    cfg_file = run / "train_config.yaml"
    cfg, cfg_problem = _read_config(cfg_file)
    evals, unreadable = _evals(run)
    sections: list[tuple[str, str]] = [("Results", _results(run, rows, cfg, cfg_problem, evals, unreadable))]
    if not rows:
        sections.append(("Losses", _missing("metrics.jsonl is empty: the run logged no step yet")))
    else:
        terms = _scalar_terms(rows)
        sections.append(
            (
                "Losses",
                f"<p>{len(rows)} logged steps.</p>"
                + (_curves(rows, terms) if terms else _missing("no scalar terms logged")),
            )
        )
        sections.append(("Validation", _validation(run, rows)))
        layer_terms = _layer_terms(rows)
        sections.append(
            (
                "Per-layer loss",
                (
                    "".join(_heatmap(rows, k) for k in layer_terms)
                    if layer_terms
                    else _missing("no per-layer terms (kv_k_layers, ...) logged: a CE-only run has none")
                ),
            )
        )
        routes = sorted({k for r in rows for k in r if k.startswith("route_")})
        sections.append(
            (
                "Routing weights",
                (
                    _routes(rows, routes)
                    if routes
                    else _missing("no routing weights logged: fixed fusion (or CE only) routes nothing")
                ),
            )
        )
    sections.append(("Z space", _zspace(run, rows)))
    if compare is not None:
        sections.append(("Comparison", _compare_file_section(Path(compare))))
    sections.append(("Config", _config_section(cfg_file)))
    return _page(f"kvdistill run {run}", sections)


def _compare_file_section(compare: Path) -> str:
    path = compare / "compare.json" if compare.is_dir() else compare
    if not path.exists():
        return _missing(f"no compare.json at {compare}; run `kvdistill compare --out {compare}`")
    return _compare_section(json.loads(path.read_text()))


def compare_report(compare: dict[str, Any]) -> str:
    """The HTML page of a `kvdistill compare` result (compare.json's content)."""
    cfg = json.dumps(compare["config"], indent=1)
    cfg = f"<details><summary>the compare config</summary><pre>{html.escape(cfg)}</pre></details>"
    return _page("kvdistill compare", [("Arms over seeds", _compare_section(compare)), ("Config", cfg)])


def write_report(run: str | Path, out: str | Path | None = None, compare: str | Path | None = None) -> Path:
    out = Path(out) if out else Path(run) / "report.html"
    page = run_report(run, compare)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
