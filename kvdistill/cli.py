"""`kvdistill <stage> ...`: one console script; each stage owns its CLI module."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from kvdistill.core.data import DataError
from kvdistill.dump import cli as dump_cli
from kvdistill.errors import ExitCode, Preempted, release_early_signals
from kvdistill.jobs import cli as jobs_cli
from kvdistill.jobs.local import LocalRunError
from kvdistill.schemas import CompareConfig, ConfigError, DemoConfig, ReportConfig
from kvdistill.schemas.cli import add_flags, config_from_args
from kvdistill.store import cli as store_cli
from kvdistill.store.errors import CorruptShard, ShardBusy, StoreError
from kvdistill.train import cli as train_cli

DEBUG_HINT = "(KVDISTILL_DEBUG=1 or --debug for the traceback)"

# errno -> (what, the fix) for failures of the machine rather than of the input.
_ENVIRONMENT = {
    errno.ENOSPC: ("disk full", "free space there or write elsewhere (--store / --out)"),
    errno.EDQUOT: ("disk quota exceeded", "free space in the quota or write elsewhere (--store / --out)"),
    errno.EROFS: ("read-only file system", "write to a writable file system (--store / --out)"),
    errno.EACCES: ("permission denied", "fix the permissions or write elsewhere (--store / --out)"),
    errno.EPERM: ("operation not permitted", "fix the permissions or write elsewhere (--store / --out)"),
}


def demo_main(args: argparse.Namespace) -> int:
    from kvdistill.demo import run_demo

    run_demo(config_from_args(DemoConfig, args), progress=not args.no_progress)
    return 0


def compare_main(args: argparse.Namespace) -> int:
    from kvdistill.compare import run_compare

    run_compare(config_from_args(CompareConfig, args), progress=not args.no_progress)
    return 0


def report_main(args: argparse.Namespace) -> int:
    from kvdistill.train.report import write_report

    cfg = config_from_args(ReportConfig, args, config=False)
    print(f"wrote {write_report(cfg.run_dir, cfg.out, cfg.compare)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvdistill", description="Distil teacher reasoning into a student through its KV cache, offline."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dump_cli.add_parser(sub)
    dump_cli.add_align_parser(sub)
    dump_cli.add_store_parsers(store_cli.add_parser(sub))
    jobs_cli.add_parser(sub)
    train_cli.add_parser(sub)
    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic data and tiny models (CPU, no network)")
    add_flags(demo, DemoConfig)
    demo.set_defaults(func=demo_main)
    compare = sub.add_parser(
        "compare",
        help=(
            "train and evaluate arms (ce, kv-*, shuffled control) over seeds: mean, 95%% CI, paired difference to the"
            " baseline arm (--baseline, default ce)"
        ),
    )
    add_flags(compare, CompareConfig)
    compare.set_defaults(func=compare_main)
    report = sub.add_parser(
        "report", help="one self-contained HTML page for a training run (curves, per-layer heatmap, routing, eval)"
    )
    add_flags(report, ReportConfig, config=False, progress=False)
    report.set_defaults(func=report_main)
    _debug_flag(parser)
    return parser


def _debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """`--debug` on the top parser and every subparser (so it may follow the subcommand); a
    subparser's default is SUPPRESS so it does not reset a `--debug` given before it."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="on an error, raise with the full traceback instead of one line (also KVDISTILL_DEBUG=1)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _debug_flag(child, top=False)


def _one_line(text: str) -> str:
    """Multi-line messages (a list of failed tasks, of problems) joined into one line."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    out = parts[0] if parts else ""
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


def explain(e: BaseException) -> tuple[ExitCode, str] | None:
    """(exit code, one-line message) of an expected failure; None for anything else (a bug,
    which keeps its traceback). Subclasses come before their bases."""
    if isinstance(e, Preempted):
        return ExitCode.PREEMPTED, e.message or (
            "preempted (SIGTERM): the partial shard was discarded and nothing visible is left; "
            "re-run the same command (a requeued SLURM task does) to redo it"
        )
    if isinstance(e, FloatingPointError):
        return ExitCode.FAILED, f"training diverged: {e}"
    if isinstance(e, LocalRunError):
        return ExitCode.FAILED, f"{e}; re-run the same command to redo only those"
    if isinstance(e, ConfigError):
        return ExitCode.USAGE, f"config error: {e}"
    if isinstance(e, CorruptShard):
        return ExitCode.INTEGRITY, f"data integrity: {e}"
    if isinstance(e, ValueError) and str(e).startswith("Stored and computed checksum do not match"):
        # zarr's crc32c codec (a plain zarr / dask read, e.g. `store stats`); it does not name the chunk.
        return (
            ExitCode.INTEGRITY,
            (
                f"data integrity: a chunk fails its crc32c check ({e}); `kvdistill store verify STORE` names it, "
                "then re-dump that shard"
            ),
        )
    if isinstance(e, ShardBusy):
        return ExitCode.BUSY, f"busy: {e}"
    if isinstance(e, jobs_cli.SubmitError):
        return ExitCode.ENVIRONMENT, str(e)
    if isinstance(e, json.JSONDecodeError):
        # json.loads does not know the file; a reader that knows it should raise StoreError naming it.
        where = getattr(e, "filename", None) or "a JSON file (a store's zarr.json?)"
        return (
            ExitCode.BAD_INPUT,
            (
                f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): it is truncated or corrupt;"
                " `kvdistill store verify STORE` checks a store, then re-dump the shard or restore the file"
            ),
        )
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT:
        what, fix = _ENVIRONMENT[e.errno]
        where = f" at {e.filename}" if e.filename else " (the error names no file)"
        return ExitCode.ENVIRONMENT, f"{what}{where}: {fix}"
    if isinstance(e, OSError) and e.errno is None and not isinstance(e, FileNotFoundError):
        # Raised by transformers / datasets loading a model, tokenizer or data set (no system call failed).
        return (
            ExitCode.BAD_INPUT,
            f"OSError: {e}; check the path or hub id and that the checkpoint is complete (config, tokenizer, weights)",
        )
    if isinstance(e, (StoreError, DataError, ValueError, FileNotFoundError, NotImplementedError)):
        return ExitCode.BAD_INPUT, f"{type(e).__name__}: {e}"
    if isinstance(e, OSError):  # a system call failed (I/O error, too many open files, ...)
        return ExitCode.ENVIRONMENT, f"{type(e).__name__}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("KVDISTILL_DEBUG", "") not in ("", "0")
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        release_early_signals(args.command)
        return int(args.func(args))
    except (Exception, Preempted) as e:
        known = explain(e)
        if debug or known is None:
            raise
        code, message = known
        # One line: the message names what and where and ends with the fix; a traceback would bury it.
        print(f"kvdistill {args.command}: {_one_line(message)} {DEBUG_HINT}", file=sys.stderr)
        return int(code)


if __name__ == "__main__":
    sys.exit(main())
