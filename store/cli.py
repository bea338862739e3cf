"""`kvdistill store finalize | inspect | convert | verify | stats | plan | show-alignment`: close a
store after its dump tasks, look inside it, copy it into another backend or codec, check every
byte of it, summarise its K/V, size one before dumping, or draw the alignment one sample was
stored with."""

# Each command's flags are its record's fields (schemas/records.py). `plan` and `show-alignment`
# read tokenizers and model configs, which the store does not: the dump stage adds them
# (dump/cli.add_store_parsers).

from __future__ import annotations

import argparse
import json
import sys

from kvdistill.errors import ExitCode
from kvdistill.schemas import (
    StoreConvertConfig,
    StoreFinalizeConfig,
    StoreInspectConfig,
    StoreStatsConfig,
    StoreVerifyConfig,
)
from kvdistill.schemas.cli import add_flags, config_from_args


def add_parser(sub) -> argparse._SubParsersAction:
    """The `store` command and its tools; returns its subcommands, for the stages above to add theirs."""
    p = sub.add_parser(
        "store",
        help="finalize, inspect, verify, summarise or plan a KV store, or draw a sample's alignment",
        description=__doc__,
    )
    ssub = p.add_subparsers(dest="store_command", required=True)
    add_tool(
        ssub,
        "finalize",
        StoreFinalizeConfig,
        finalize_main,
        help="check every shard is complete, write index.parquet and consolidated metadata",
    )
    add_tool(
        ssub,
        "inspect",
        StoreInspectConfig,
        inspect_main,
        help="teachers, shards, rows, tokens, bytes on disk, bytes per token",
    )
    add_tool(
        ssub,
        "convert",
        StoreConvertConfig,
        convert_main,
        help="copy a store into a new one of the other backend (zarr <-> webdataset), or of another K/V codec",
        description=(
            "Copy every record of SRC, in order and checked as it is read, into the new store DST. K/V keep their"
            " codec where the target holds it (zarr: any; webdataset tars: float16 / float32): an int8 / int4 /"
            " bfloat16 teacher goes into webdataset only with --kv-dtype float16 or float32 (stored decoded). zarr ->"
            " zarr, a teacher whose codec stays is copied as stored, bit for bit (int8 / int4 codes with their scales"
            " and zeros, bfloat16 bits), never decoded and quantised again: e.g. to change --compression-level or"
            " --blosc-shuffle. A teacher whose codec changes (--kv-dtype) is decoded to float and encoded again."
        ),
    )
    add_tool(
        ssub,
        "verify",
        StoreVerifyConfig,
        verify_main,
        progress=True,
        help=(
            "re-read everything: shards complete, checksums, NaN/Inf, shapes, same samples per teacher, index; exit 4"
            " on any problem"
        ),
    )
    add_tool(
        ssub,
        "stats",
        StoreStatsConfig,
        stats_main,
        help="per-layer mean / std / absmax of every teacher's K and V (dask)",
    )
    return ssub


def add_tool(ssub, name: str, record, func, progress: bool = False, **kw) -> argparse.ArgumentParser:
    """One `store` subcommand whose flags are `record`'s fields (no --config: a tool of a few flags)."""
    p = ssub.add_parser(name, **kw)
    add_flags(p, record, config=False, progress=progress)
    p.set_defaults(func=func)
    return p


def finalize_main(args: argparse.Namespace) -> int:
    from .index import finalize
    from .summary import format_inspect, inspect

    cfg = config_from_args(StoreFinalizeConfig, args, config=False)
    index = finalize(cfg.store)
    print(format_inspect(inspect(cfg.store)))
    print(f"wrote {index}")
    return 0


def inspect_main(args: argparse.Namespace) -> int:
    from .summary import format_inspect, inspect

    cfg = config_from_args(StoreInspectConfig, args, config=False)
    info = inspect(cfg.store)
    print(json.dumps(info, indent=1) if cfg.json else format_inspect(info))
    return 0


def verify_main(args: argparse.Namespace) -> int:
    from .summary import inspect
    from .verify import format_problems, verify

    cfg = config_from_args(StoreVerifyConfig, args, config=False)
    problems = verify(cfg.store, progress=not args.no_progress)
    if problems:
        print(format_problems(problems))
        print(
            f"kvdistill store: verify found {len(problems)} problem(s) in {cfg.store}; each is listed above with"
            " its fix",
            file=sys.stderr,
        )
        return ExitCode.INTEGRITY
    info = inspect(cfg.store)
    rows = sum(t["tokens"] for t in info["teachers"].values())
    print(f"ok: {len(info['teachers'])} teachers x {info['num_shards']} shards, {rows:,} rows verified")
    return 0


def stats_main(args: argparse.Namespace) -> int:
    from .stats import format_stats, plot_stats, stats

    cfg = config_from_args(StoreStatsConfig, args, config=False)
    info = stats(cfg.store, teachers=cfg.teacher)
    print(json.dumps(info, indent=1) if cfg.json else format_stats(info))
    if cfg.png:
        print(f"wrote {plot_stats(info, cfg.png)}")
    return 0


def convert_main(args: argparse.Namespace) -> int:
    from .convert import convert
    from .layout import read_store_spec

    cfg = config_from_args(StoreConvertConfig, args, config=False)
    source = read_store_spec(cfg.src).backend
    target = cfg.to or ("zarr" if source == "webdataset" else "webdataset")
    dst = convert(
        cfg.src,
        cfg.dst,
        target,
        cfg.kv_dtype,
        compression_level=cfg.compression_level,
        blosc_shuffle=cfg.blosc_shuffle,
    )
    print(f"{source} -> {target}{f' ({cfg.kv_dtype})' if cfg.kv_dtype else ''}: wrote {dst}")
    return 0
