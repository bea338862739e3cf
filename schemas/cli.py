"""CLI plumbing shared by every stage: `--config file.yaml` plus flags that override it.

Each flag maps to a dotted config key (`--teacher` -> `teacher.name_or_path`); a flag left
unset does not override the file."""

from __future__ import annotations

import argparse
from typing import Any

from .base import Record, build

__all__ = ["Flag", "add_flags", "config_from_args"]

Flag = tuple[str, str, Any, str]  # (flag, dotted config key, type, help)


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    parser.add_argument("--config", help="YAML or JSON file with the config; flags override it")
    for flag, key, tp, help_ in flags:
        if tp is bool:
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=key, type=tp, default=None, help=help_, metavar=flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")


def config_from_args(cls: type[Record], args: argparse.Namespace, flags: list[Flag]) -> Record:
    overrides = {key: getattr(args, key) for _, key, _, _ in flags}
    return build(cls, args.config, overrides)
