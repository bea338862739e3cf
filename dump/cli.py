"""`kvdistill dump`: one array task (teacher x shard) into the KV store; `kvdistill align calibrate`
(a CKA layer map from both models) and the tokenising front end of `kvdistill store plan`."""

from __future__ import annotations

import argparse
import json

from kvdistill.schemas import CalibrateConfig, DumpConfig, LatentSpec
from kvdistill.schemas.cli import Flag, add_flags, config_from_args

FLAGS: list[Flag] = [
    ("--teacher", "teacher.name_or_path", str, "teacher: hub id or local checkpoint directory"),
    ("--teacher-name", "teacher.name", str, "teacher's name in the store (default: last path component)"),
    ("--teacher-revision", "teacher.revision", str, "hub revision (branch, tag or commit) of the teacher"),
    ("--teacher-dtype", "teacher.dtype", str, "float32 | bfloat16 | float16"),
    ("--teacher-template", "teacher.prompt_template", str, "the teacher's prompt template ({question}, {reasoning}, {answer}); another template than the student's is aligned per segment"),
    ("--student-template", "student.prompt_template", str, "the student's prompt template"),
    ("--layer-map", "align.layer_map", str, "'ratio' or a layermap.json from `kvdistill align calibrate`"),
    ("--time-map", "align.time_map", str, "auto | identity | char_overlap | segment_linear"),
    ("--projection", "align.projection", str, "a PCA .npz from `kvdistill align calibrate --pca D`: store D dims per layer"),
    ("--student", "student.name_or_path", str, "student: hub id or local directory (its tokenizer + config are read; no weights)"),
    ("--data", "data.source", str, "'synthetic', a GSM8K-format .jsonl/.parquet, or a data set dir / hub id"),
    ("--split", "data.split", str, "data set split"),
    ("--data-config", "data.config_name", str, "hub data set config, e.g. 'main' for openai/gsm8k"),
    ("--limit", "data.limit", int, "use the first N rows"),
    ("--store", "store", str, "the zarr store to write into, e.g. out.zarr"),
    ("--shard", "shard", int, "this task's shard index (SLURM: $SLURM_ARRAY_TASK_ID)"),
    ("--num-shards", "num_shards", int, "how many shards the data set is split into"),
    ("--batch-size", "batch_size", int, "teacher forward batch size"),
    ("--max-len", "max_len", int, "longest sample in tokens; longer ones are an error (or see --on-too-long)"),
    ("--on-too-long", "on_too_long", str, "error | skip: skip and count samples over --max-len"),
    ("--allow-empty", "allow_empty", bool, "write a shard even when it gets no sample (more shards than rows, every sample "
     "skipped); without it that is an error, as an empty shard is almost always a wrong path or filter"),
    ("--on-busy", "on_busy", str, "fail | wait: another live writer owns this (teacher, shard): fail at once naming it, "
     "or wait until it finishes or dies"),
    ("--kv-dtype", "kv_dtype", str, "codec of stored K/V: float16 | float32 | bfloat16 | int8 | int4 (KIVI-style, scales beside)"),
    ("--backend", "backend", str, "zarr | webdataset (one .tar per task; float16 / float32 only)"),
    ("--compression-level", "compression_level", int, "blosc-zstd level of the K/V chunks, 0 (none) to 9; 1 writes ~4x faster than 3 for 1-5 percent more bytes"),
    ("--blosc-shuffle", "blosc_shuffle", str, "byte | bit: blosc's filter of the K/V chunks (bit stores int8 ~6 percent smaller, byte the others)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:1"),
    # Any --latent-* flag turns latent mode on (its other fields keep LatentSpec's defaults).
    ("--latent-slots", "latent.slots", int, "KaVa latent mode: also store the reasoning K/V R-KV-compressed to M slots per layer and "
     f"KV head (needs eager attention: T^2 memory per layer) (default when on: {LatentSpec().slots})"),
    ("--latent-lambda", "latent.lam", float, "latent mode: R-KV score = lambda * importance + (1 - lambda) * redundancy "
     f"(default when on: {LatentSpec().lam})"),
    ("--latent-codi-hidden", "latent.codi_hidden", bool, "latent mode: also store the teacher's hidden state before the answer "
     f"(default when on: {LatentSpec().codi_hidden})"),
]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dump",
        help="run one teacher over one shard of the data and write its aligned K/V into the store",
        description=__doc__,
    )
    add_flags(p, FLAGS, DumpConfig)
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
    from kvdistill.store.plan import codec_bytes_per_value, format_plan, plan

    student = ModelSpec(name_or_path=args.student, **({"prompt_template": args.student_template} if args.student_template else {}))
    examples = load_examples(DataSpec(source=args.data, split=args.split, config_name=args.data_config, limit=args.limit))
    if not examples:
        raise ValueError(f"data {args.data} split {args.split} holds no rows; nothing to plan")
    tok = load_tokenizer(student)
    lengths = [len(encode(tok, student.prompt_template, ex)) for ex in examples]  # student grid rows
    s_geom = kv_geometry(load_config(student))
    t_geoms = {ModelSpec(name_or_path=t).short_name: kv_geometry(load_config(ModelSpec(name_or_path=t))) for t in args.teacher}

    def estimate(num_shards: int | None) -> dict:
        return {
            name: plan(
                geom,
                s_geom,
                num_samples=len(lengths),
                mean_tokens=sum(lengths) / len(lengths),
                codec_bytes_per_value=codec_bytes_per_value(args.kv_dtype, s_geom.num_layers, geom.width),
                num_shards=num_shards,
                target_shard_bytes=int(args.target_shard_gib * 2**30),
                compression_ratio=args.compression,
            )
            for name, geom in t_geoms.items()
        }

    # Every teacher shares num_shards; by default the largest teacher's suggestion.
    plans = estimate(args.num_shards or max(p["suggested_num_shards"] for p in estimate(None).values()))
    print(format_plan(plans, codec=args.kv_dtype))
    print(f"longest sample: {max(lengths):,} student tokens (dump's --max-len must cover the teacher's tokens too)")
    return 0


CALIBRATE_FLAGS: list[Flag] = [
    ("--teacher", "teacher.name_or_path", str, "teacher: hub id or local directory"),
    ("--teacher-template", "teacher.prompt_template", str, "the teacher's prompt template"),
    ("--student", "student.name_or_path", str, "student: hub id or local directory (its weights are read)"),
    ("--student-template", "student.prompt_template", str, "the student's prompt template"),
    ("--data", "data.source", str, "'synthetic', a .jsonl/.parquet, or a data set dir / hub id"),
    ("--split", "data.split", str, "split"),
    ("--data-config", "data.config_name", str, "hub data set config"),
    ("--samples", "samples", int, "calibration samples"),
    ("--top-k", "top_k", int, "teacher layers per student layer"),
    ("--out", "out", str, "layer map JSON (a heatmap .png is written beside it)"),
    ("--pca", "pca", int, "also fit a per-layer PCA of this many dims for `dump --projection`"),
    ("--time-map", "time_map", str, "auto | identity | char_overlap | segment_linear"),
    ("--batch-size", "batch_size", int, "forward batch size"),
    ("--device", "device", str, "auto | cpu | cuda"),
]


def add_align_parser(sub) -> None:
    p = sub.add_parser("align", help="alignment tools: calibrate a CKA layer map / PCA projection", description="Calibrate a CKA layer map (and optional PCA) for a teacher and a student: it runs both models, so it is part of the dump stage.")
    asub = p.add_subparsers(dest="align_command", required=True)
    c = asub.add_parser("calibrate", help="debiased linear CKA between every student and teacher layer -> top-k layer map")
    add_flags(c, CALIBRATE_FLAGS, CalibrateConfig)
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
