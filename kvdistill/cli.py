"""`kvdistill <stage> ...`: one console script; each stage owns its CLI module."""

from __future__ import annotations

import argparse
import os
import sys

from kvdistill.align import cli as align_cli
from kvdistill.data import DataError
from kvdistill.dump import cli as dump_cli
from kvdistill.jobs import cli as jobs_cli
from kvdistill.schemas import CompareConfig, ConfigError, DemoConfig
from kvdistill.schemas.cli import Flag, add_flags, config_from_args
from kvdistill.store import StoreError
from kvdistill.store import cli as store_cli
from kvdistill.train import cli as train_cli

DEMO_FLAGS: list[Flag] = [
    ("--out", "out", str, "output directory (models, store.zarr, runs, summary.json, training.png)"),
    ("--num-shards", "num_shards", int, "shards per teacher"),
    ("--teacher-steps", "teacher_steps", int, "CE steps for each tiny teacher"),
    ("--student-steps", "student_steps", int, "steps for each student run"),
    ("--kv-weight", "kv_weight", float, "KV loss weight of the distilled student"),
    ("--seed", "seed", int, "seed"),
    ("--extra-teachers", "extra_teachers", lambda s: [x for x in s.split(",") if x], "comma list: cross-tokenizer, dual-prompt"),
    ("--mode", "mode", str, "cot | latent (KaVa: latent students with / without the KV loss vs a CoT student)"),
    ("--latent-slots", "latent_slots", int, "latent mode: M, compressed reasoning slots per teacher"),
    ("--latent-iterations", "latent_iterations", int, "latent mode: Jacobi iterations T"),
]


COMPARE_FLAGS: list[Flag] = [
    ("--out", "out", str, "output directory (runs/<arm>/seed-<n>, compare.json, compare.html)"),
    ("--seeds", "seeds", int, "seeds per arm (>= 2: the CI is Student t with seeds - 1 degrees of freedom)"),
    ("--arms", "arms", lambda s: [x for x in s.split(",") if x], "comma list of arms; 'ce' is required (differences are paired against it)"),
    ("--steps", "steps", int, "optimizer steps per run"),
    ("--max-new-tokens", "max_new_tokens", int, "generation budget per eval question"),
    ("--demo-out", "demo.out", str, "where the embedded demo (teachers, store) is built or reused"),
    ("--store", "store", str, "a finalized store instead of the demo's (with --student and eval_data in --config)"),
    ("--student", "student.name_or_path", str, "the student that --store was dumped for"),
    ("--device", "device", str, "auto | cpu | cuda"),
]


def demo_main(args: argparse.Namespace) -> int:
    from kvdistill.demo import run_demo

    run_demo(config_from_args(DemoConfig, args, DEMO_FLAGS), progress=not args.no_progress)
    return 0


def compare_main(args: argparse.Namespace) -> int:
    from kvdistill.compare import run_compare

    run_compare(config_from_args(CompareConfig, args, COMPARE_FLAGS), progress=not args.no_progress)
    return 0


def report_main(args: argparse.Namespace) -> int:
    from kvdistill.train.report import write_report

    print(f"wrote {write_report(args.run, args.out, args.compare)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvdistill", description="Distil teacher reasoning into a student through its KV cache, offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    dump_cli.add_parser(sub)
    align_cli.add_parser(sub)
    store_cli.add_parser(sub)
    jobs_cli.add_parser(sub)
    train_cli.add_parser(sub)
    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic data and tiny models (CPU, no network)")
    add_flags(demo, DEMO_FLAGS, DemoConfig)
    demo.set_defaults(func=demo_main)
    compare = sub.add_parser(
        "compare", help="train and evaluate arms (ce, kv-*, shuffled control) over seeds: mean, 95%% CI, paired difference to ce"
    )
    add_flags(compare, COMPARE_FLAGS, CompareConfig)
    compare.set_defaults(func=compare_main)
    report = sub.add_parser("report", help="one self-contained HTML page for a training run (curves, per-layer heatmap, routing, eval)")
    report.add_argument("run", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    report.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument("--compare", metavar="DIR", help="a `kvdistill compare` output directory: add its table")
    report.set_defaults(func=report_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"kvdistill {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (StoreError, DataError, ValueError, FileNotFoundError, NotImplementedError) as e:
        # Input problems: the message names the problem and the fix; a traceback would bury it.
        if os.environ.get("KVDISTILL_DEBUG"):
            raise
        print(f"kvdistill {args.command}: {type(e).__name__}: {e}\n(set KVDISTILL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
