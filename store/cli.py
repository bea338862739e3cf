"""`kvdistill store finalize | inspect | verify | stats | plan | show-alignment`: close a store
after its dump tasks, look inside it, check every byte of it, summarise its K/V, size one before
dumping, or draw the alignment one sample was trained on."""

from __future__ import annotations

import argparse
import json
import math
import sys

from kvdistill.errors import ExitCode
from kvdistill.schemas import ConfigError

from .plan import KV_DTYPES


def add_parser(sub, plan_main, show_alignment_main=None) -> None:
    """`plan_main(args)`: the tokenising front end of `store plan`; `show_alignment_main(args)`: that
    of `store show-alignment` (they load tokenizers and configs, so they live with the dump stage;
    the store itself knows no models)."""
    p = sub.add_parser(
        "store",
        help="finalize, inspect, verify, summarise or plan a KV store, or draw a sample's alignment",
        description=__doc__,
    )
    ssub = p.add_subparsers(dest="store_command", required=True)
    f = ssub.add_parser(
        "finalize", help="check every shard is complete, write index.parquet and consolidated metadata"
    )
    f.add_argument("store", help="path to the store, e.g. out.zarr")
    f.set_defaults(func=finalize_main)
    i = ssub.add_parser("inspect", help="teachers, shards, rows, tokens, bytes on disk, bytes per token")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=inspect_main)
    c = ssub.add_parser(
        "convert",
        help="copy a store into a new one of the other backend (zarr <-> webdataset), or of another K/V codec",
        description="Copy every record of SRC, in order and checked as it is read, into the new store DST. K/V keep their "
        "codec where the target holds it (zarr: any; webdataset tars: float16 / float32): an int8 / int4 / bfloat16 teacher "
        "goes into webdataset only with --kv-dtype float16 or float32 (stored decoded). zarr -> zarr, a teacher whose codec "
        "stays is copied as stored, bit for bit (int8 / int4 codes with their scales and zeros, bfloat16 bits), never "
        "decoded and quantised again: e.g. to change --compression-level or --blosc-shuffle. A teacher whose codec "
        "changes (--kv-dtype) is decoded to float and encoded again.",
    )
    c.add_argument("src", help="a finalized store of either backend")
    c.add_argument(
        "dst", help="the new store (must not exist, or be an empty directory; removed again if the conversion fails)"
    )
    c.add_argument("--to", choices=("zarr", "webdataset"), help="backend of DST (default: the other one than SRC's)")
    c.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        help="store every teacher's K/V in this codec (default: each teacher's own); webdataset holds float16 / float32 only",
    )
    c.add_argument(
        "--compression-level",
        type=int,
        choices=range(10),
        metavar="0-9",
        help="blosc-zstd level of DST's K/V chunks (zarr only; default: SRC's)",
    )
    c.add_argument(
        "--blosc-shuffle",
        choices=("byte", "bit"),
        help="blosc shuffle of DST's K/V chunks (zarr only; default: SRC's)",
    )
    c.set_defaults(func=convert_main)
    v = ssub.add_parser(
        "verify",
        help="re-read everything: shards complete, checksums, NaN/Inf, shapes, same samples per teacher, index; exit 4 on any problem",
    )
    v.add_argument("store")
    v.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    v.set_defaults(func=verify_main)
    s = ssub.add_parser("stats", help="per-layer mean / std / absmax of every teacher's K and V (dask)")
    s.add_argument("store")
    s.add_argument("--teacher", action="append", help="only this teacher (repeatable; default: all)")
    s.add_argument("--png", help="also plot per-layer std and absmax to this PNG")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=stats_main)
    pl = ssub.add_parser(
        "plan",
        help="estimate rows, GiB per teacher and a --num-shards before dumping (configs + tokenizer only, no weights)",
    )
    pl.add_argument("--teacher", action="append", required=True, help="teacher hub id or checkpoint dir (repeatable)")
    pl.add_argument("--student", required=True, help="student hub id or checkpoint dir: its tokenizer sets the rows")
    pl.add_argument("--student-template", help="the student's prompt template (default: the built-in one)")
    pl.add_argument(
        "--data", required=True, help="'synthetic', a GSM8K-format .jsonl/.parquet, or a data set dir / hub id"
    )
    pl.add_argument("--split", default="train", help="data set split (default: train)")
    pl.add_argument("--data-config", help="hub data set config, e.g. 'main' for openai/gsm8k")
    pl.add_argument("--limit", type=int, help="use the first N rows")
    pl.add_argument(
        "--kv-dtype",
        "--codec",
        dest="kv_dtype",
        default="float16",
        choices=KV_DTYPES,
        help="codec of the stored K/V (default: float16)",
    )
    pl.add_argument("--num-shards", type=int, help="shards per teacher (default: the suggestion)")
    pl.add_argument(
        "--target-shard-gib", type=float, default=1.0, help="suggest shards of about this size on disk (default: 1)"
    )
    pl.add_argument(
        "--compression", type=float, help="expected compression ratio (default: 1.3 for float codecs, 1.0 quantised)"
    )
    pl.add_argument(
        "--pca",
        type=int,
        help="size a store projected to D dims per layer (`kvdistill align calibrate --pca D` + `dump --projection`)",
    )
    pl.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (the plan per teacher, and every storage option under 'options')",
    )
    pl.set_defaults(func=lambda args: plan_main(check_plan_args(args)))
    if show_alignment_main is not None:
        sa = ssub.add_parser(
            "show-alignment",
            help="draw one sample's time map (student x teacher tokens) and layer map, rebuilt from the store alone",
            description="Rebuild the alignment one sample of TEACHER was stored with: its time map A[student token, teacher token] "
            "(identity, char_overlap or segment_linear, as the dump chose) from the sample's stored text and the tokenizers the "
            "store recorded, and the layer map W[student layer, teacher layer] (ratio or calibrated CKA) from the teacher spec. "
            "No teacher weights are loaded. Prints a one-line summary and writes a PNG.",
        )
        sa.add_argument("store")
        sa.add_argument(
            "--teacher", required=True, help="teacher name in the store (`kvdistill store inspect` lists them)"
        )
        sa.add_argument(
            "--sample", required=True, help="sample id (index.parquet's sample_id column, e.g. synth-train-3)"
        )
        sa.add_argument(
            "--out",
            required=True,
            help="image to write, e.g. alignment.png (no suffix: .png is added; an existing folder: FOLDER/alignment-TEACHER-SAMPLE.png)",
        )
        sa.add_argument(
            "--max-tokens",
            type=int,
            default=64,
            help="draw at most this many student tokens (default: 64; the title says so when cut)",
        )
        sa.add_argument("--start", type=int, default=0, help="first student token drawn (default: 0)")
        sa.set_defaults(func=show_alignment_main)


def check_plan_args(args: argparse.Namespace) -> argparse.Namespace:
    """`store plan`'s numbers refused before any tokenizer loads, each naming its flag and value
    (a ConfigError: exit 2): negative sizes, a shard count of 0, a ratio of 0 that divides."""

    def bad(flag: str, value, rule: str) -> ConfigError:
        return ConfigError(f"{flag} {value:g}: {rule}")

    if args.num_shards is not None and args.num_shards < 1:
        raise bad(
            "--num-shards", args.num_shards, "must be >= 1 (shards per teacher); leave it out for the suggestion"
        )
    if not (math.isfinite(args.target_shard_gib) and args.target_shard_gib * 2**30 >= 1):
        raise bad("--target-shard-gib", args.target_shard_gib, "must be a finite size > 0 in GiB, e.g. 1 or 0.5")
    if args.compression is not None and not (math.isfinite(args.compression) and args.compression > 0):
        raise bad(
            "--compression",
            args.compression,
            "must be a finite ratio > 0 (raw bytes / bytes on disk, e.g. 1.3); leave it out for the codec's default",
        )
    if args.pca is not None and args.pca < 1:
        raise bad("--pca", args.pca, "must be >= 1 (dims kept per layer); leave it out for the teachers' own width")
    if args.limit is not None and args.limit < 1:
        raise bad("--limit", args.limit, "must be >= 1 (the first N rows); leave it out for every row")
    return args


def finalize_main(args: argparse.Namespace) -> int:
    from .index import finalize
    from .summary import format_inspect, inspect

    index = finalize(args.store)
    print(format_inspect(inspect(args.store)))
    print(f"wrote {index}")
    return 0


def inspect_main(args: argparse.Namespace) -> int:
    from .summary import format_inspect, inspect

    info = inspect(args.store)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    return 0


def verify_main(args: argparse.Namespace) -> int:
    from .summary import inspect
    from .verify import format_problems, verify

    problems = verify(args.store, progress=not args.no_progress)
    if problems:
        print(format_problems(problems))
        print(
            f"kvdistill store: verify found {len(problems)} problem(s) in {args.store}; each is listed above with its fix",
            file=sys.stderr,
        )
        return ExitCode.INTEGRITY
    info = inspect(args.store)
    rows = sum(t["tokens"] for t in info["teachers"].values())
    print(f"ok: {len(info['teachers'])} teachers x {info['num_shards']} shards, {rows:,} rows verified")
    return 0


def stats_main(args: argparse.Namespace) -> int:
    from .stats import format_stats, plot_stats, stats

    info = stats(args.store, teachers=args.teacher)
    print(json.dumps(info, indent=1) if args.json else format_stats(info))
    if args.png:
        print(f"wrote {plot_stats(info, args.png)}")
    return 0


def convert_main(args: argparse.Namespace) -> int:
    from .layout import read_store_spec
    from .wds import convert

    source = read_store_spec(args.src).backend
    target = args.to or ("zarr" if source == "webdataset" else "webdataset")
    dst = convert(
        args.src,
        args.dst,
        target,
        args.kv_dtype,
        compression_level=args.compression_level,
        blosc_shuffle=args.blosc_shuffle,
    )
    print(f"{source} -> {target}{f' ({args.kv_dtype})' if args.kv_dtype else ''}: wrote {dst}")
    return 0
