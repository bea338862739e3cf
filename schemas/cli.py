"""CLI plumbing shared by every stage: `--config file.yaml` plus flags that override it.

Each flag maps to a dotted config key (`--teacher` -> `teacher.name_or_path`); a flag left
unset does not override the file. Help texts show the record's real defaults."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints

from .base import Record, build

__all__ = ["Flag", "add_flags", "config_from_args"]

Flag = tuple[str, str, Any, str]  # (flag, dotted config key, type, help)


def _default(cls: type, dotted: str) -> str:
    """The default of a dotted field of a record class, as help text (nested defaults come
    from the parent's default instance: EvalConfig.data.split is "test", not DataSpec's)."""
    *parents, leaf = dotted.split(".")
    obj = None
    for p in parents:
        f = {f.name: f for f in dataclasses.fields(cls)}[p]
        obj = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        cls = get_type_hints(cls)[p]
        if obj is None:
            return ""
    if obj is not None:
        value = getattr(obj, leaf)
        return "" if value is None else f" (default: {value})"
    f = {f.name: f for f in dataclasses.fields(cls)}[leaf]
    if f.default is not dataclasses.MISSING:
        return "" if f.default is None else f" (default: {f.default})"
    if f.default_factory is not dataclasses.MISSING:
        return f" (default: {f.default_factory()})"
    return " (required unless in --config)"


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], record: type[Record]) -> None:
    parser.add_argument("--config", help="YAML or JSON file with the config; flags override it")
    for flag, key, tp, help_ in flags:
        help_ += _default(record, key)
        if tp is bool:
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            metavar = flag.lstrip("-").upper().replace("-", "_")
            parser.add_argument(flag, dest=key, type=tp, default=None, help=help_, metavar=metavar)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")


def config_from_args(cls: type[Record], args: argparse.Namespace, flags: list[Flag]) -> Record:
    overrides = {key: getattr(args, key) for _, key, _, _ in flags}
    return build(cls, args.config, overrides)
