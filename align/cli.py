"""`kvdistill align calibrate`: a CKA layer map (and optional PCA) for a teacher and a student."""

from __future__ import annotations

import argparse
import json

from kvdistill.schemas import CalibrateConfig
from kvdistill.schemas.cli import Flag, add_flags, config_from_args

FLAGS: list[Flag] = [
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


def add_parser(sub) -> None:
    p = sub.add_parser("align", help="alignment tools: calibrate a CKA layer map / PCA projection", description=__doc__)
    asub = p.add_subparsers(dest="align_command", required=True)
    c = asub.add_parser("calibrate", help="debiased linear CKA between every student and teacher layer -> top-k layer map")
    add_flags(c, FLAGS, CalibrateConfig)
    c.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvdistill.dump.calibrate import calibrate

    cfg = config_from_args(CalibrateConfig, args, FLAGS)
    result = calibrate(cfg, progress=not args.no_progress)
    sim = result.pop("similarity")
    print("debiased linear CKA [student layer x teacher layer]:")
    for i, row in enumerate(sim):
        print(f"  s{i:<3}" + " ".join(f"{x:6.3f}" for x in row))
    print(json.dumps({k: v for k, v in result.items() if k != "map"}, indent=1))
    return 0
