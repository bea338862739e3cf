"""`kvdistill train` (student from the store; no teacher is loaded) and `kvdistill eval`.

Every TrainConfig field is a flag of its own name (`--lr`; the Hugging Face names
`--learning-rate`, `--per-device-train-batch-size`, `--save-steps`, ... are kept as aliases),
and the config is built in layers: `--recipe` < `--config` file < flags. A recipe is a YAML
preset in train/recipes/ (`kava`: the KaVa paper's LoRA r 128 / alpha 32 / dropout 0.1 on q,
k, v, o, weight decay 0.1, grad clip 2.0, 5% warm-up); without --recipe, `--mode latent` takes
kava and mode cot the plain defaults.

SIGTERM or SIGUSR1 (SLURM preemption, `#SBATCH --signal=B:USR1@N`) finishes the step that is
running, saves a checkpoint and exits 143; `--resume auto` continues from it."""

from __future__ import annotations

import argparse
import json
import sys

from kvdistill.schemas import DiagnoseConfig, EvalConfig, TrainConfig
from kvdistill.schemas.cli import add_flags, config_from_args, flags_of

from .recipes import recipe_names, train_config

# `kvdistill train --help`, in this order.
TRAIN_GROUPS = {
    "data": "the store and how it is streamed",
    "models": "the student, LoRA, device and precision",
    "optimisation": "AdamW and a cosine schedule after a linear warm-up",
    "KV loss": "how the teachers' K/V supervise the student's",
    "fusion": "how the K/V of several teachers are combined",
    "Z space": "fusion and the KV loss in a common space, for very different teachers (train/zspace.py)",
    "latent": "KaVa latent mode (--mode latent)",
    "checkpointing": "run directory, checkpoints, resume and preemption",
    "validation": "loss terms on held-out data during training",
    "logging": "metrics.jsonl and trackers",
}
TRAIN_FLAGS = flags_of(TrainConfig)
EVAL_FLAGS = flags_of(EvalConfig)


def _train_flags(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    p.usage = "%(prog)s [--recipe NAME] [--config FILE] [--FIELD VALUE ...]" + ("" if suppress else " [diagnose ...]")
    default = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--recipe",
        choices=recipe_names(),
        default=default,
        help=(
            "a preset of train/recipes/ under --config and the flags (default: kava with --mode latent, else default)"
        ),
    )
    add_flags(p, TrainConfig, groups=TRAIN_GROUPS, suppress=suppress)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a student from the KV store (no teacher is loaded)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _train_flags(p)
    p.set_defaults(func=train_main)
    tsub = p.add_subparsers(dest="train_command", required=False, metavar="{diagnose}", prog=p.prog)
    d = tsub.add_parser(
        "diagnose",
        help=(
            "loss terms and their gradient norms at init (or a trained run's: --checkpoint), with suggested weights"
            " (no step is taken)"
        ),
        description=(
            "Build what `train` builds (either mode), run a few batches without stepping, and print each loss term's"
            " value, its gradient norms on the student and on the mode's own modules, its gradient's cosine with CE's,"
            " and weights that balance it with CE. Flags may come before `diagnose` or after it."
        ),
    )
    # SUPPRESS: a flag not given after `diagnose` leaves what `train` parsed before it (its --config too).
    _train_flags(d, suppress=True)
    # --config and --no-progress are train's: the file is a TrainConfig.
    add_flags(d, DiagnoseConfig, config=False, progress=False)
    d.set_defaults(func=diagnose_main)
    e = sub.add_parser("eval", help="greedy-decode answers: accuracy and gold perplexity")
    add_flags(e, EvalConfig)
    e.set_defaults(func=eval_main)


def config_of(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `train` / `train diagnose` arguments: recipe < --config < flags."""
    overrides = {f.key: getattr(args, f.key, None) for f in TRAIN_FLAGS}
    return train_config(overrides, recipe=getattr(args, "recipe", None), config=getattr(args, "config", None))


def train_main(args: argparse.Namespace) -> int:
    from .loop import train

    summary = train(config_of(args), progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def diagnose_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .diagnose import diagnose, format_curve, format_table, loss_curve, run_dir_of

    opts = config_from_args(DiagnoseConfig, args, config=False)
    result: dict = {}
    if opts.run:
        result["curve"] = loss_curve(opts.run)
    else:
        run = run_dir_of(opts.checkpoint) if opts.checkpoint else None
        if run is not None and getattr(args, "config", None) is None:  # the run's own config
            args.config = str(run / "train_config.yaml")
        result = diagnose(config_of(args), batches=opts.batches, checkpoint=opts.checkpoint)
        print(format_table(result))
        if run is not None and (run / "metrics.jsonl").is_file():
            result["curve"] = loss_curve(run)
    if "curve" in result:
        print(("\n" if not opts.run else "") + format_curve(result["curve"]))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1))
    return 0


def eval_main(args: argparse.Namespace) -> int:
    from .eval import evaluate

    cfg = config_from_args(EvalConfig, args, EVAL_FLAGS)
    result = evaluate(cfg, progress=not args.no_progress)
    print(
        f"{result['model']} ({result['mode']}): accuracy {result['accuracy']:.3f} on {result['n']} questions,"
        f" perplexity {result['perplexity']:.3f}, {result['forward_passes_per_question']:.1f} forward passes and"
        f" {result['generated_tokens_per_question']:.1f} generated tokens per question (budget"
        f" {result['max_new_tokens']}), {result['questions_per_second']:.2f} questions/s"
    )
    if result["hit_cap"]:
        print(
            f"warning: {result['hit_cap']} of {result['n']} generations reached --max-new-tokens"
            f" {result['max_new_tokens']} without finishing ({result['hit_cap_correct']} of them scored correct from a"
            f" cut-off text; accuracy on finished generations only: {result['accuracy_finished']:.3f}); raise"
            " --max-new-tokens to let them finish",
            file=sys.stderr,
        )
    return 0
