"""`kvdistill dump`: one array task (teacher x shard) into the KV store; `kvdistill align calibrate`
(a CKA layer map from both models) and the tokenising front ends of `kvdistill store plan` and
`kvdistill store show-alignment`."""

from __future__ import annotations

import argparse
import json

from kvdistill.schemas import CalibrateConfig, DumpConfig
from kvdistill.schemas.cli import add_flags, config_from_args, flags_of

FLAGS = flags_of(DumpConfig)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dump",
        help="run one teacher over one shard of the data and write its aligned K/V into the store",
        description=__doc__,
    )
    add_flags(p, DumpConfig, groups=dict.fromkeys(["teacher", "student", "data", "align", "latent"]))
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .run import run_dump

    cfg = config_from_args(DumpConfig, args, FLAGS)
    print(run_dump(cfg, progress=not args.no_progress).summary())
    return 0


def plan_main(args: argparse.Namespace) -> int:
    """`kvdistill store plan`: tokenise the data with the student, read the configs, and size the
    store with store.plan's arithmetic."""
    from kvdistill.core.capture import kv_geometry
    from kvdistill.core.data import load_examples
    from kvdistill.core.models import load_config, load_tokenizer
    from kvdistill.core.prompts import encode
    from kvdistill.schemas import DataSpec, ModelSpec
    from kvdistill.store.plan import (
        codec_bytes_per_value,
        format_options,
        format_plan,
        options,
        plan,
    )
    from kvdistill.store.writer import example_json

    student = ModelSpec(
        name_or_path=args.student, **({"prompt_template": args.student_template} if args.student_template else {})
    )
    examples = load_examples(
        DataSpec(source=args.data, split=args.split, config_name=args.data_config, limit=args.limit)
    )
    if not examples:
        raise ValueError(f"data {args.data} split {args.split} holds no rows; nothing to plan")
    tok = load_tokenizer(student, role="student")
    lengths = [len(encode(tok, student.prompt_template, ex)) for ex in examples]  # student grid rows
    text = sum(
        len(example_json(ex.id, {"question": ex.question, "reasoning": ex.reasoning, "answer": ex.answer}).encode())
        for ex in examples
    )
    s_geom = kv_geometry(load_config(student, role="student"))
    t_geoms = {
        ModelSpec(name_or_path=t).short_name: kv_geometry(load_config(ModelSpec(name_or_path=t), role="teacher"))
        for t in args.teacher
    }

    def width(geom) -> int:  # what each teacher stores: its own width, or --pca D (at most its width)
        return geom.width if args.pca is None else min(args.pca, geom.width)

    def estimate(num_shards: int | None) -> dict:
        return {
            name: plan(
                geom,
                s_geom,
                num_samples=len(lengths),
                mean_tokens=sum(lengths) / len(lengths),
                codec_bytes_per_value=codec_bytes_per_value(args.kv_dtype, s_geom.num_layers, width(geom)),
                num_shards=num_shards,
                target_shard_bytes=int(args.target_shard_gib * 2**30),
                compression_ratio=args.compression,
                stored_width=width(geom),
                text_bytes_per_sample=text / len(examples),
            )
            for name, geom in t_geoms.items()
        }

    # Every teacher shares num_shards; by default the largest teacher's suggestion.
    plans = estimate(args.num_shards or max(p["suggested_num_shards"] for p in estimate(None).values()))
    opts = options(t_geoms, s_geom, round(sum(lengths)), [] if args.pca is None else [args.pca], text_bytes=text)
    if args.json:
        first = next(iter(plans.values()))
        print(
            json.dumps(
                {
                    "samples": first["samples"],
                    "mean_tokens": first["mean_tokens"],
                    "rows": first["rows"],
                    "longest_sample": max(lengths),
                    "kv_dtype": args.kv_dtype,
                    "pca": args.pca,
                    "teachers": plans,
                    "options": opts,
                },
                indent=1,
            )
        )
        return 0
    print(format_plan(plans, codec=args.kv_dtype))
    print(f"longest sample: {max(lengths):,} student tokens (dump's --max-len must cover the teacher's tokens too)")
    print(format_options(opts))
    return 0


def show_alignment_main(args: argparse.Namespace) -> int:
    """`kvdistill store show-alignment`: rebuild one sample's time map and layer map from the store
    (its recorded tokenizers and text; dump/show_alignment.py), print one line, write the PNG."""
    from .show_alignment import output_path, plot_alignment, reconstruct, summary

    out = output_path(args.out, args.teacher, args.sample)  # a bad --out fails before any work
    a = reconstruct(args.store, args.teacher, args.sample)
    print(summary(a))
    print(f"wrote {plot_alignment(a, out, max_tokens=args.max_tokens, start=args.start)}")
    return 0


CALIBRATE_FLAGS = flags_of(CalibrateConfig)


def add_align_parser(sub) -> None:
    p = sub.add_parser(
        "align",
        help="alignment tools: calibrate a CKA layer map / PCA projection",
        description="Calibrate a CKA layer map (and optional PCA) for a teacher and a student: it runs both models, so it is part of the dump stage.",
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
