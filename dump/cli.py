"""`kvdistill dump`: one array task (teacher x shard) into the KV store."""

from __future__ import annotations

import argparse

from kvdistill.schemas import DumpConfig, LatentSpec
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
