"""`kvdistill dump`: one array task (teacher x shard) into the KV store; `kvdistill align calibrate`
(a CKA layer map from both models); and the two `kvdistill store` commands that read tokenizers
and model configs, which the store itself does not: `store plan` (dump's flags, --teacher
repeated: the store a dump would write, sized) and `store show-alignment`."""

from __future__ import annotations

import argparse
import json

from kvdistill.schemas import CalibrateConfig, DumpConfig, PlanConfig, ShowAlignmentConfig
from kvdistill.schemas.cli import add_flags, config_from_args, flags_of
from kvdistill.store import cli as store_cli

FLAGS = flags_of(DumpConfig)
PLAN_FLAGS = flags_of(PlanConfig)
# `dump --help` and `store plan --help`, in this order.
DUMP_GROUPS = dict.fromkeys(["teacher", "student", "data", "align", "latent"])


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dump",
        help="run one teacher over one shard of the data and write its aligned K/V into the store",
        description=__doc__,
    )
    add_flags(p, DumpConfig, groups=DUMP_GROUPS)
    p.set_defaults(func=main)


def add_store_parsers(ssub) -> None:
    """`store plan` and `store show-alignment`, into `kvdistill store`'s subcommands."""
    pl = ssub.add_parser(
        "plan",
        help="estimate rows, GiB per teacher and a --num-shards before dumping (configs + tokenizer only, no weights)",
        description=PlanConfig.__doc__,
    )
    add_flags(pl, PlanConfig, groups={"plan": "the teachers, and how the plan is made", **DUMP_GROUPS})
    pl.set_defaults(func=plan_main)
    store_cli.add_tool(
        ssub,
        "show-alignment",
        ShowAlignmentConfig,
        show_alignment_main,
        help="draw one sample's time map (student x teacher tokens) and layer map, rebuilt from the store alone",
        description=(
            "Rebuild the alignment one sample of TEACHER was stored with: its time map A[student token, teacher token]"
            " (identity, char_overlap or segment_linear, as the dump chose) from the sample's stored text and the"
            " tokenizers the store recorded, and the layer map W[student layer, teacher layer] (ratio or calibrated"
            " CKA) from the teacher spec. No teacher weights are loaded. Prints a one-line summary and writes a PNG."
        ),
    )


def main(args: argparse.Namespace) -> int:
    from .run import run_dump

    cfg = config_from_args(DumpConfig, args, FLAGS)
    print(run_dump(cfg, progress=not args.no_progress).summary())
    return 0


def _stored_width(cfg: PlanConfig, name: str, width: int) -> int:
    """What a teacher stores per layer: a --projection file's D (teacher_projection's first),
    else --pca D, else its own width (D at most that)."""
    path = cfg.teacher_projection.get(name) or cfg.align.projection
    if path is None:
        return width if cfg.pca is None else min(cfg.pca, width)
    import zipfile
    from pathlib import Path

    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"projection {path} does not exist; make it with `kvdistill align calibrate --pca D`")
    try:
        dim = int(np.load(path)["k_components"].shape[-1])  # [L_s, D_t, D]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"projection {path} is not a PCA .npz of `kvdistill align calibrate --pca D` ({e}); make it again"
        ) from e
    return min(dim, width)


def plan_main(args: argparse.Namespace) -> int:
    """`kvdistill store plan`: tokenise the data with the student, read the configs, and size the
    store with store.plan's arithmetic."""
    from kvdistill.core.capture import kv_geometry
    from kvdistill.core.data import load_examples
    from kvdistill.core.models import load_config, load_tokenizer
    from kvdistill.core.prompts import encode
    from kvdistill.store.plan import (
        codec_bytes_per_value,
        format_options,
        format_plan,
        options,
        plan,
    )
    from kvdistill.store.writer import example_json

    cfg = config_from_args(PlanConfig, args, PLAN_FLAGS)
    student = cfg.student
    examples = load_examples(cfg.data)
    if not examples:
        raise ValueError(f"data {cfg.data.source} split {cfg.data.split} holds no rows; nothing to plan")
    tok = load_tokenizer(student, role="student")
    lengths = [len(encode(tok, student.prompt_template, ex)) for ex in examples]  # student grid rows
    text = sum(
        len(example_json(ex.id, {"question": ex.question, "reasoning": ex.reasoning, "answer": ex.answer}).encode())
        for ex in examples
    )
    s_geom = kv_geometry(load_config(student, role="student"))
    t_geoms = {t.short_name: kv_geometry(load_config(t, role="teacher")) for t in cfg.teachers}
    widths = {name: _stored_width(cfg, name, geom.width) for name, geom in t_geoms.items()}
    codecs = {name: cfg.teacher_kv_dtype.get(name, cfg.kv_dtype) for name in t_geoms}
    # webdataset tars hold K/V uncompressed.
    compression = cfg.compression or (1.0 if cfg.backend == "webdataset" else None)

    def estimate(num_shards: int | None) -> dict:
        return {
            name: plan(
                geom,
                s_geom,
                num_samples=len(lengths),
                mean_tokens=sum(lengths) / len(lengths),
                codec_bytes_per_value=codec_bytes_per_value(codecs[name], s_geom.num_layers, widths[name]),
                num_shards=num_shards,
                target_shard_bytes=int(cfg.target_shard_gib * 2**30),
                compression_ratio=compression,
                stored_width=widths[name],
                text_bytes_per_sample=text / len(examples),
                logits_top_k=cfg.teacher_logits_top_k.get(name, cfg.logits_top_k),
            )
            for name, geom in t_geoms.items()
        }

    # Every teacher shares num_shards; by default the largest teacher's suggestion.
    plans = estimate(cfg.num_shards or max(p["suggested_num_shards"] for p in estimate(None).values()))
    dims = sorted({d for n, d in widths.items() if d != t_geoms[n].width} | ({cfg.pca} if cfg.pca else set()))
    opts = options(t_geoms, s_geom, round(sum(lengths)), dims, text_bytes=text)
    if cfg.json:
        first = next(iter(plans.values()))
        print(
            json.dumps(
                {
                    "samples": first["samples"],
                    "mean_tokens": first["mean_tokens"],
                    "rows": first["rows"],
                    "longest_sample": max(lengths),
                    "kv_dtype": cfg.kv_dtype,
                    "teacher_kv_dtype": {n: c for n, c in codecs.items() if c != cfg.kv_dtype},
                    "pca": cfg.pca,
                    "teachers": plans,
                    "options": opts,
                },
                indent=1,
            )
        )
        return 0
    others = ", ".join(f"{n}: {c}" for n, c in codecs.items() if c != cfg.kv_dtype)
    print(format_plan(plans, codec=cfg.kv_dtype + (f" ({others})" if others else "")))
    print(f"longest sample: {max(lengths):,} student tokens (dump's --max-len must cover the teacher's tokens too)")
    print(format_options(opts))
    return 0


def show_alignment_main(args: argparse.Namespace) -> int:
    """`kvdistill store show-alignment`: rebuild one sample's time map and layer map from the store
    (its recorded tokenizers and text; dump/show_alignment.py), print one line, write the PNG."""
    from .show_alignment import output_path, plot_alignment, reconstruct, summary

    cfg = config_from_args(ShowAlignmentConfig, args, config=False)
    out = output_path(cfg.out, cfg.teacher, cfg.sample)  # a bad --out fails before any work
    a = reconstruct(cfg.store, cfg.teacher, cfg.sample)
    print(summary(a))
    print(f"wrote {plot_alignment(a, out, max_tokens=cfg.max_tokens, start=cfg.start)}")
    return 0


CALIBRATE_FLAGS = flags_of(CalibrateConfig)


def add_align_parser(sub) -> None:
    p = sub.add_parser(
        "align",
        help="alignment tools: calibrate a CKA layer map / PCA projection",
        description=(
            "Calibrate a CKA layer map (and optional PCA) for a teacher and a student: it runs both models, so it is"
            " part of the dump stage."
        ),
    )
    asub = p.add_subparsers(dest="align_command", required=True)
    c = asub.add_parser(
        "calibrate", help="debiased linear CKA between every student and teacher layer -> top-k layer map"
    )
    add_flags(c, CalibrateConfig)
    c.set_defaults(func=calibrate_main)


def calibrate_main(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    cfg = config_from_args(CalibrateConfig, args, CALIBRATE_FLAGS)
    result = calibrate(cfg, progress=not args.no_progress)
    sim = result.pop("similarity")
    print("debiased linear CKA [student layer x teacher layer]:")
    for i, row in enumerate(sim):
        print(f"  s{i:<3}" + " ".join(f"{x:6.3f}" for x in row))
    print(json.dumps({k: v for k, v in result.items() if k != "map"}, indent=1))
    return 0
