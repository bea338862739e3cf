"""`kvdistill store show-alignment`: the alignment one sample of a store was trained on, rebuilt
from the store alone (no teacher weights, no dump re-run) and drawn.

    a = reconstruct("out.zarr", "teacher-a", "gsm8k-train-12")
    print(summary(a))
    plot_alignment(a, "fig.png", max_tokens=64)   # alignment_figure(a): the matplotlib Figure

The time map is rebuilt exactly as the dump built it: the sample's stored text (question,
reasoning, answer) rendered with the student's and the teacher's prompt templates, tokenized by
the tokenizers recorded in the store (`tokenizers/`), and passed to the same align/ function
(`build_time_map`: identity, char_overlap or segment_linear, as the teacher spec recorded). The
student's tokens are checked against the stored ones, so a picture never shows another
tokenization than the one trained on. The layer map is the teacher spec's W [L_s, L_t] (ratio
interpolation or a calibrated CKA map, with its similarity matrix when recorded).

Stores written before kvdistill recorded tokenizers and texts still work where the rest can be
found: the tokenizers at their recorded paths (the student's checked by fingerprint), the text
by reloading the recorded data set (checked by the data fingerprint); an identity map needs no
text at all. What cannot be found is a StoreError naming it and the fix.

This lives with the dump (it tokenizes, through core); the store itself knows no tokenizers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvdistill.align.pipeline import build_time_map
from kvdistill.align.time import TimeMap, identity_time_map
from kvdistill.core.data import DataError, data_fingerprint, load_examples
from kvdistill.core.models import load_tokenizer, tokenizer_fingerprint, tokenizer_from_files
from kvdistill.core.prompts import SEGMENTS, encode, render
from kvdistill.schemas import ConfigError, Example, ModelSpec, StoreSpec
from kvdistill.store import open_specs, read_sample
from kvdistill.store.errors import StoreError
from kvdistill.store.layout import read_tokenizer

__all__ = ["SampleAlignment", "reconstruct", "summary", "alignment_figure", "plot_alignment", "visible"]

DPI = 120  # the PNG's; the figure's sizes are in inches
REDUMP = "re-dump into a new --store with this kvdistill (it records both tokenizers and each sample's text)"


@dataclass
class SampleAlignment:
    """One sample's alignment onto the student, as the dump computed it."""

    store: str
    teacher: str
    sample_id: str
    shard: int
    kind: str  # the teacher's time map as recorded: identity / char_overlap / segment_linear
    time_map: TimeMap  # A [T_s, T_t], rows sum to 1 (kind "identity" where both tokenizations coincide)
    student_tokens: list[str]  # [T_s] token strings, whitespace visible
    teacher_tokens: list[str]  # [T_t]
    student_segments: np.ndarray  # [T_s] index into SEGMENTS
    teacher_segments: np.ndarray  # [T_t]
    layer_map: np.ndarray  # W [L_s, L_t]
    layer_map_source: str  # "ratio" or the calibrated layermap.json
    similarity: np.ndarray | None = None  # [L_s, L_t] CKA of a calibrated map
    notes: list[str] = field(default_factory=list)  # where the text and tokenizers came from


def reconstruct(store: str | Path, teacher: str, sample_id: str) -> SampleAlignment:
    """Rebuild sample `sample_id`'s time map and layer map for `teacher` from the store."""
    spec, specs = open_specs(store)
    if teacher not in specs:
        raise StoreError(f"store {store} has no teacher {teacher!r}; it holds {list(specs)}")
    tspec = specs[teacher]
    rec = read_sample(store, teacher, sample_id)
    ids = np.asarray(rec["input_ids"])  # [T_s] the student tokens the K/V are aligned to
    kind = tspec.time_map
    notes: list[str] = []
    s_tok = _tokenizer(store, spec, None, spec.student, notes)
    ex = _example(store, spec, sample_id, rec["example"], need=kind != "identity", notes=notes)
    if ex is None:  # identity map without the text: the stored tokens are the whole story
        seg = rec["segment_ids"] if rec["segment_ids"] is not None else np.zeros(len(ids), np.uint8)
        labels = [visible(s_tok.decode([int(i)])) for i in ids]
        tmap = identity_time_map(len(ids))
        s_seg = t_seg = np.asarray(seg)
        s_labels = t_labels = labels
    else:
        s = encode(s_tok, spec.student.prompt_template, ex)
        if not np.array_equal(s.input_ids, ids) or (
            rec["segment_ids"] is not None and not np.array_equal(s.segment_ids, rec["segment_ids"])
        ):
            raise StoreError(
                f"store {store}: sample {sample_id!r} tokenizes to other student tokens than teacher {teacher!r}'s"
                f" shard holds ({len(s)} vs {len(ids)}); the student tokenizer or template differs from the dump's, so"
                f" its time map cannot be rebuilt; {REDUMP}"
            )
        # identity: the dump fed the teacher the student's tokens (same tokenizer, same text)
        t_tok = s_tok if kind == "identity" else _tokenizer(store, spec, teacher, tspec.model, notes)
        t = s if kind == "identity" else encode(t_tok, tspec.model.prompt_template, ex)
        tmap = build_time_map(kind, s.offsets, t.offsets, s.segment_ids, t.segment_ids) or identity_time_map(len(s))
        s_labels = _labels(s_tok, render(spec.student.prompt_template, ex).text, s)
        t_labels = s_labels if t is s else _labels(t_tok, render(tspec.model.prompt_template, ex).text, t)
        s_seg, t_seg = s.segment_ids, t.segment_ids
    source = tspec.align.layer_map
    return SampleAlignment(
        store=str(store),
        teacher=teacher,
        sample_id=sample_id,
        shard=rec["shard"],
        kind=kind,
        time_map=tmap,
        student_tokens=s_labels,
        teacher_tokens=t_labels,
        student_segments=np.asarray(s_seg),
        teacher_segments=np.asarray(t_seg),
        layer_map=np.asarray(tspec.layer_map, dtype=np.float64),
        layer_map_source=source,
        similarity=None if tspec.layer_similarity is None else np.asarray(tspec.layer_similarity, dtype=np.float64),
        notes=notes,
    )


def _tokenizer(store, spec: StoreSpec, teacher: str | None, model: ModelSpec, notes: list[str]):
    """The tokenizer the dump used for the student (teacher None) or `teacher`: the store's copy,
    else (older stores) the one at its recorded path."""
    role = "student" if teacher is None else f"teacher {teacher!r}"
    rec = read_tokenizer(store, teacher)
    if rec is not None:
        files, fp = rec
        tok = tokenizer_from_files(files)
        if tokenizer_fingerprint(tok) != fp:
            raise StoreError(
                f"store {store}: the recorded {role} tokenizer loads as another tokenizer (fingerprint"
                f" {tokenizer_fingerprint(tok)}, recorded {fp}): this transformers / tokenizers version reads its"
                " files differently; use the versions of the dump"
            )
        return tok
    try:
        tok = load_tokenizer(model, role="student" if teacher is None else "teacher")
    except (OSError, ValueError) as e:
        raise StoreError(
            f"store {store} holds no copy of the {role} tokenizer (written before kvdistill recorded tokenizers) and"
            f" its recorded path {model.name_or_path} does not load ({type(e).__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}); {REDUMP}, or make {model.name_or_path} available again"
        ) from e
    if teacher is None and tokenizer_fingerprint(tok) != spec.tokenizer_fingerprint:
        raise StoreError(
            f"store {store} holds no copy of the student tokenizer and the one at {model.name_or_path} is not the"
            f" dump's (fingerprint {tokenizer_fingerprint(tok)}, store {spec.tokenizer_fingerprint}); {REDUMP}"
        )
    notes.append(
        f"{role} tokenizer from {model.name_or_path} (no copy in the store"
        + (")" if teacher is None else "; not verifiable)")
    )
    return tok


def _example(
    store, spec: StoreSpec, sample_id: str, stored: dict | None, need: bool, notes: list[str]
) -> Example | None:
    """The sample's text: stored with it, else (older stores) from the recorded data set, checked
    by its fingerprint; None when not stored and not needed (an identity map)."""
    if stored is not None:
        return Example(id=sample_id, **stored)
    if not need:
        notes.append("no sample text in the store: token strings decoded from the stored ids")
        return None
    where = f"store {store} holds no text for sample {sample_id!r} (written before kvdistill recorded sample texts)"
    try:
        examples = load_examples(spec.data)
    except (DataError, OSError, ValueError) as e:
        raise StoreError(
            f"{where} and its data {spec.data.source} does not load ({e}); {REDUMP}, or make the data available again"
        ) from e
    if data_fingerprint(examples) != spec.data_fingerprint:
        raise StoreError(
            f"{where} and its data {spec.data.source} changed since the dump (fingerprint"
            f" {data_fingerprint(examples)}, store {spec.data_fingerprint}); {REDUMP}"
        )
    ex = next((e for e in examples if e.id == sample_id), None)
    if ex is None:
        raise StoreError(f"{where} and its data {spec.data.source} has no row {sample_id!r}; {REDUMP}")
    notes.append(f"sample text reloaded from {spec.data.source} (fingerprint checked; not stored)")
    return ex


# --- token strings -------------------------------------------------------------------------------

_WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def visible(piece: str, width: int = 14) -> str:
    """A token's text with its whitespace shown ('␣' space, '↵' newline, '⇥' tab), cut to `width`."""
    s = piece.translate(_WHITESPACE)
    return s if len(s) <= width else s[: width - 1] + "…"


def _labels(tok, text: str, enc) -> list[str]:
    """Each token's characters in the rendered text (its offsets); a token with no characters (the
    appended EOS) by its name."""
    return [
        visible(text[a:b]) if b > a else visible(tok.convert_ids_to_tokens(int(i)))
        for i, (a, b) in zip(enc.input_ids, enc.offsets, strict=True)
    ]


# --- summary and picture -------------------------------------------------------------------------


def summary(a: SampleAlignment) -> str:
    """One line: time map kind and shape, how student tokens read teacher tokens, the layer map."""
    A = a.time_map
    T_s, T_t = A.shape
    per_row = np.bincount(A.rows.numpy(), minlength=T_s)  # [T_s] teacher tokens each student token reads
    per_col = np.bincount(A.cols.numpy(), minlength=T_t)  # [T_t] student tokens each teacher token feeds
    W = a.layer_map
    mixed = int(((W > 0).sum(1) > 1).sum())
    layer = "ratio" if a.layer_map_source == "ratio" else f"CKA ({Path(a.layer_map_source).name})"
    return (
        f"{a.teacher} / {a.sample_id} (shard {a.shard}): time map {_kind(a)} {T_s} student x {T_t} teacher tokens,"
        f" {A.nnz} weights; {int((per_row > 1).sum())} student tokens read >1 teacher token (max"
        f" {int(per_row.max()) if T_s else 0}), {int((per_col > 1).sum())} teacher tokens feed >1 student token,"
        f" {int((per_col == 0).sum())} feed none; layer map {layer} {W.shape[0]} student <- {W.shape[1]} teacher"
        f" layers, {mixed} mix >1 teacher layer" + (f" [{'; '.join(a.notes)}]" if a.notes else "")
    )


def _kind(a: SampleAlignment) -> str:
    """The recorded kind, and what it came to for this sample when they differ (char_overlap of
    two tokenizations that split this text alike is the identity)."""
    return (
        a.kind if a.time_map.kind == a.kind else f"{a.kind} (identity for this sample: both tokenizers split it alike)"
    )


def window(a: SampleAlignment, max_tokens: int, start: int = 0) -> tuple[int, int, int, int, int]:
    """(r0, r1, c0, c1, c_end): the student rows drawn, the teacher columns drawn (at most
    2 * max_tokens), and the end of those the rows read (c1 < c_end: cut)."""
    T_s = a.time_map.shape[0]
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    if not 0 <= start < T_s:
        raise ValueError(f"--start {start}: sample {a.sample_id!r} has {T_s} student tokens (0..{T_s - 1})")
    r0, r1 = start, min(T_s, start + max_tokens)
    rows, cols = a.time_map.rows.numpy(), a.time_map.cols.numpy()
    read = cols[(rows >= r0) & (rows < r1)]
    c0, c_end = int(read.min()), int(read.max()) + 1
    return r0, r1, c0, min(c_end, c0 + 2 * max_tokens), c_end


def plot_alignment(a: SampleAlignment, out: str | Path, max_tokens: int = 64, start: int = 0) -> Path:
    """PNG of `alignment_figure` at `out` (`output_path`)."""
    fig = alignment_figure(a, max_tokens, start)
    out = output_path(out, a.teacher, a.sample_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def alignment_figure(a: SampleAlignment, max_tokens: int = 64, start: int = 0):
    """The time map (student tokens x teacher tokens, token strings on the axes, segment
    boundaries dashed) beside the layer map (weights written in where the cells hold them), and
    the CKA similarity of a calibrated map. Long samples: student tokens [start, start +
    max_tokens), said in the title. Layer panels grow with the layer counts (`_layer_cell`)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    T_s, T_t = a.time_map.shape
    r0, r1, c0, c1, c_end = window(a, max_tokens, start)
    A = a.time_map.dense().numpy()[r0:r1, c0:c1]  # [rows, cols]
    n_r, n_c = r1 - r0, c1 - c0
    L_s, L_t = a.layer_map.shape
    side = [a.layer_map] + ([a.similarity] if a.similarity is not None else [])
    cell = 0.16  # inches per token
    lcell = _layer_cell(L_s, L_t)  # inches per layer: a layer panel grows with the layer counts
    panel = max(2.2, lcell * L_t)  # its width
    width = max(5.0, cell * n_c + 2.5) + (panel + 1.1) * len(side)
    height = max(4.5, cell * n_r + 2.5, lcell * L_s + 2.6)
    fig = Figure(figsize=(width, height), layout="constrained")
    gs = fig.add_gridspec(1, 1 + len(side), width_ratios=[max(n_c, 20) * cell] + [panel] * len(side))

    ax = fig.add_subplot(gs[0, 0])
    im = ax.imshow(A, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_yticks(
        range(n_r),
        [f"{r0 + i} {t}" for i, t in enumerate(a.student_tokens[r0:r1])],
        fontsize=6,
        family="DejaVu Sans Mono",
    )
    ax.set_xticks(
        range(n_c),
        [f"{c0 + j} {t}" for j, t in enumerate(a.teacher_tokens[c0:c1])],
        fontsize=6,
        family="DejaVu Sans Mono",
        rotation=90,
    )
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("student token")
    ax.set_xlabel("teacher token")
    for i in np.flatnonzero(np.diff(a.student_segments[r0:r1].astype(int))) + 1:
        ax.axhline(i - 0.5, color="tab:orange", lw=0.8, ls="--")
    for j in np.flatnonzero(np.diff(a.teacher_segments[c0:c1].astype(int))) + 1:
        ax.axvline(j - 0.5, color="tab:orange", lw=0.8, ls="--")
    cut = []
    if (r0, r1) != (0, T_s):
        cut.append(f"student tokens {r0}-{r1 - 1} of {T_s} (--max-tokens {max_tokens}, --start {start})")
    if c1 < c_end:
        cut.append(f"teacher tokens {c0}-{c1 - 1} of the {c0}-{c_end - 1} they read")
    ax.set_title(
        f"time map {_kind(a)}: {T_s} student x {T_t} teacher tokens\n"
        f"weight A[s, t], each row sums to 1; dashed: {' | '.join(SEGMENTS)} boundaries"
        + "".join(f"\nshowing {c}" for c in cut),
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.3, location="bottom", label="weight")

    W = a.layer_map
    axw, caxw = _layer_panel(fig, gs[0, 1], lcell * L_s, height)
    imw = axw.imshow(W, cmap="Greens", vmin=0.0, vmax=1.0, interpolation="nearest")
    written = _cells(axw, W, lcell * 72)
    _layer_axes(axw, L_s, L_t, lcell * 72)
    how = (
        "ratio: l_s(L_t-1)/(L_s-1), interpolated"
        if a.layer_map_source == "ratio"
        else f"CKA top-k: {Path(a.layer_map_source).name}"
    )
    said = "" if written else "\n(cells too small to write in: the colour says it)"
    axw.set_title(f"layer map W [{L_s} x {L_t}]\n{how}{said}", fontsize=9)
    fig.colorbar(imw, cax=caxw, orientation="horizontal", label="weight")
    if a.similarity is not None:
        axs, caxs = _layer_panel(fig, gs[0, 2], lcell * L_s, height)
        ims = axs.imshow(a.similarity, cmap="viridis", interpolation="nearest")
        for s, t in zip(*np.nonzero(W > 0), strict=True):
            axs.add_patch(_box(s, t, lw=min(1.2, lcell * 6)))
        _layer_axes(axs, L_s, L_t, lcell * 72)
        fig.colorbar(ims, cax=caxs, orientation="horizontal", label="CKA")
        axs.set_title("CKA similarity\n(boxes: the chosen layers)", fontsize=9)
    fig.suptitle(f"{Path(a.store).name}: teacher {a.teacher}, sample {a.sample_id} (shard {a.shard})", fontsize=10)
    return fig


def output_path(out: str | Path, teacher: str, sample_id: str) -> Path:
    """The file `--out` names, as written: an existing folder gets
    FOLDER/alignment-TEACHER-SAMPLE.png, a name without a suffix `.png` (what matplotlib would add
    unsaid). A path no image can be written to (a parent that is a file, a suffix matplotlib does
    not write) is a ConfigError naming --out, raised before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    given = out
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / re.sub(r"[^A-Za-z0-9_.-]", "-", f"alignment-{teacher}-{sample_id}.png")
    elif not out.suffix:
        out = out.with_name(out.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise ConfigError(
            f"--out {given}: matplotlib writes no {out.suffix} files; give a .png (or one of"
            f" {', '.join(sorted(formats))})"
        )
    parent = next((d for d in out.parents if d.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {given}: {parent} is a file, not a folder; give a path inside a folder")
    return out


# A layer panel's square cells: 0.3 in for small models, smaller for deep ones so that the panel's
# long side stays within 6 in (30 layers: 0.2 in, room for a weight like .52 and a tick label).
LAYER_CELL_MAX, LAYER_PANEL_MAX = 0.3, 6.0
_DIGIT = 0.62  # a digit's width in DejaVu Sans, in ems
_LAYER_FONT = 7.0  # points: layer tick labels and the weights written in the cells


def _layer_cell(L_s: int, L_t: int) -> float:
    """Inches per layer cell of the layer-map panels."""
    return min(LAYER_CELL_MAX, LAYER_PANEL_MAX / max(L_s, L_t))


def _weight(w: float) -> str:
    """A weight as few characters as it takes: 1, .5, .25."""
    return f"{w:.2f}".rstrip("0").rstrip(".").removeprefix("0") or "0"


def _cells(ax, W: np.ndarray, cell_pt: float) -> bool:
    """Write each nonzero weight in its cell, at a size that fits the cell (down to 5 pt); False,
    writing nothing, when even that does not fit (a deep model's map: its colour says it)."""
    where = list(zip(*np.nonzero(W), strict=True))
    if not where:
        return True
    longest = max(len(_weight(W[s, t])) for s, t in where)
    size = min(_LAYER_FONT, (cell_pt - 3) / (_DIGIT * longest), 0.7 * cell_pt)
    if size < 5:
        return False
    for s, t in where:
        white = W[s, t] > 0.6
        ax.text(t, s, _weight(W[s, t]), ha="center", va="center", fontsize=size, color="white" if white else "black")
    return True


def layer_ticks(n: int, cell_pt: float, need_pt: float) -> list[int]:
    """The labelled layers of an axis of n cells of cell_pt points: every k-th layer (k = 1, 2, 5,
    10, ...) such that at most 12 labels show, each with need_pt points of room, and the last
    layer when it has room to spare."""
    step = next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500) if n <= 12 * k and k * cell_pt >= need_pt)
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1 and (n - 1 - ticks[-1]) * cell_pt >= 1.5 * need_pt:
        ticks.append(n - 1)
    return ticks


def _layer_panel(fig, slot, tall: float, height: float):
    """(axes, colour-bar axes) of a layer panel in its grid column: the map at the top, beside
    the first tokens, `tall` inches high, its colour bar under it (a figure `height` inches high)."""
    rows = slot.subgridspec(3, 1, height_ratios=[tall, 0.12, max(0.1, height - tall - 2.4)])
    return fig.add_subplot(rows[0]), fig.add_subplot(rows[1])


def _layer_axes(ax, L_s: int, L_t: int, cell_pt: float) -> None:
    ax.set_anchor("N")  # at the top, beside the first tokens
    ax.set_xlabel("teacher layer", fontsize=8)
    ax.set_ylabel("student layer", fontsize=8)
    wide = _DIGIT * _LAYER_FONT * len(str(max(L_s, L_t) - 1)) + 4  # points a label takes along the x axis
    ax.set_xticks(layer_ticks(L_t, cell_pt, wide))
    ax.set_yticks(layer_ticks(L_s, cell_pt, _LAYER_FONT + 3))
    ax.set_xticks(range(L_t), minor=True)  # every layer marked, every k-th named
    ax.set_yticks(range(L_s), minor=True)
    ax.tick_params(labelsize=_LAYER_FONT)
    ax.tick_params(which="minor", length=2)


def _box(s: int, t: int, lw: float = 1.2):
    from matplotlib.patches import Rectangle

    return Rectangle((t - 0.5, s - 0.5), 1, 1, fill=False, edgecolor="red", lw=lw)
