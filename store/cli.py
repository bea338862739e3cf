"""`kvdistill store finalize | inspect`: close a store after its dump tasks, look inside it."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("store", help="finalize or inspect a KV store", description=__doc__)
    ssub = p.add_subparsers(dest="store_command", required=True)
    f = ssub.add_parser("finalize", help="check every shard is complete, write index.parquet and consolidated metadata")
    f.add_argument("store", help="path to the store, e.g. out.zarr")
    f.set_defaults(func=finalize_main)
    i = ssub.add_parser("inspect", help="teachers, shards, rows, tokens, bytes on disk, bytes per token")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=inspect_main)


def finalize_main(args: argparse.Namespace) -> int:
    from .zarr_store import finalize, format_inspect, inspect

    index = finalize(args.store)
    print(format_inspect(inspect(args.store)))
    print(f"wrote {index}")
    return 0


def inspect_main(args: argparse.Namespace) -> int:
    from .zarr_store import format_inspect, inspect

    info = inspect(args.store)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    return 0
