"""`kvdistill train` (student from the store; no teacher is loaded) and `kvdistill eval`.

SIGTERM or SIGUSR1 (SLURM preemption, `#SBATCH --signal=B:USR1@N`) finishes the step that is
running, saves a checkpoint and exits 143; `--resume auto` continues from it.

`--mode latent` (KaVa, train/latent.py) takes the paper's recipe for every setting neither a
flag nor --config gives: LoRA r 128, alpha 32, dropout 0.1 (q, k, v, o), weight decay 0.1, grad
clip 2.0, warm-up 5% of the steps; CODI weight 10 and KV weight 1 are the defaults anyway."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvdistill.schemas import EvalConfig, TrainConfig
from kvdistill.schemas.base import load_yaml
from kvdistill.schemas.cli import Flag, add_flags, config_from_args


def _layers(text: str) -> str | list[int]:
    if text in ("middle", "last"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected middle, last or comma-separated layer indices, got {text!r}") from None

# KaVa's setup: LoRA r 128 / alpha 32 / dropout 0.1 on q, k, v, o; weight decay 0.1; grad
# clip 2.0; alpha1 (CODI) 10 and alpha2 (KV) 1 are TrainConfig's own defaults.
LATENT_RECIPE: dict[str, Any] = {"lora_r": 128, "lora_alpha": 32, "lora_dropout": 0.1, "weight_decay": 0.1, "grad_clip": 2.0}

TRAIN_FLAGS: list[Flag] = [
    ("--store", "store", str, "finalized KV store to stream from"),
    ("--student", "student.name_or_path", str, "student: hub id or local checkpoint (the one the store was dumped for)"),
    ("--out", "out", str, "run directory: metrics.jsonl, final/ checkpoint"),
    ("--kv-weight", "kv_weight", float, "weight of the KV loss (0: CE-only baseline)"),
    ("--ce-weight", "ce_weight", float, "weight of the CE loss"),
    ("--kv-norm", "kv_norm", str, "layer_std | none"),
    ("--kv-loss", "kv_loss", str, "mse | smooth_l1 | cosine"),
    ("--fusion", "fusion", str, "fixed | similarity (per-token routing by cosine to the student's KV) | router (learned, per sample)"),
    ("--fusion-temperature", "fusion_temperature", float, "softmax temperature of similarity routing"),
    ("--router-groups", "router_groups", int, "router: 1 weight vector per sample, or 3 (shallow / middle / deep layers)"),
    ("--router-hidden", "router_hidden", int, "router MLP hidden width"),
    ("--router-entropy-weight", "router_entropy_weight", float, "loss -= weight x router entropy (> 0: against collapse onto one teacher)"),
    ("--router-learning-rate", "router_lr", float, "router learning rate"),
    ("--adapter", "adapter", str, "flat (D_t x D_s per layer) | headwise (kv-head mixer + per-head d_t x d_s)"),
    ("--kv-attn-weight", "kv_attn_weight", str, "none | student (weight tokens by the student's attention to them; eager attention)"),
    ("--kv-attn-warmup-steps", "kv_attn_warmup_steps", int, "linear warm-up from uniform token weights"),
    ("--cka-weight", "cka_weight", float, "weight of 1 - debiased CKA(student K|V, fused target) (0: off; cot mode only)"),
    ("--cka-layers", "cka_layers", _layers, "middle | last | comma list of student layers, e.g. 0,3"),
    ("--layer-anneal-steps", "layer_anneal_steps", int, "phase deeper layers into the KV loss over N steps (0: off)"),
    ("--lora-r", "lora_r", int, "LoRA rank (peft); 0 trains every weight"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout"),
    ("--learning-rate", "lr", float, "student learning rate"),
    ("--adapter-learning-rate", "adapter_lr", float, "adapter learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--per-device-train-batch-size", "batch_size", int, "batch size per process"),
    ("--max-steps", "max_steps", int, "optimizer steps"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps of the cosine schedule"),
    ("--warmup-ratio", "warmup_ratio", float, "warm-up over this fraction of --max-steps instead (e.g. 0.05); replaces --warmup-steps"),
    ("--max-grad-norm", "grad_clip", float, "gradient clipping (0: off)"),
    ("--seed", "seed", int, "seed for init order, shuffling and dropout"),
    ("--shuffle-buffer", "shuffle_buffer", int, "samples held for shuffling within shards"),
    ("--num-workers", "num_workers", int, "dataloader worker processes"),
    ("--kv-transfer", "kv_transfer", str, "auto | stored (K/V to the device as stored, made float32 there) | decoded (float32 from the reader threads)"),
    ("--logging-steps", "log_every", int, "write metrics every N steps"),
    ("--save-steps", "save_every", int, "checkpoint every N steps (0: only the final model)"),
    ("--stop-at-step", "stop_at_step", int, "stop cleanly after this step (time-limited jobs); --resume continues"),
    ("--resume", "resume", str, "auto (the latest complete checkpoint in --out if there is one, else start fresh), a run directory (its latest checkpoint) or a checkpoint directory"),
    ("--requeue-on-usr1", "requeue_on_usr1", bool, "on SIGUSR1 under SLURM, after the checkpoint: `scontrol requeue $SLURM_JOB_ID` (SIGTERM / SIGUSR1 always save and exit 143)"),
    ("--device", "device", str, "auto | cpu"),
    ("--mixed-precision", "mixed_precision", str, "auto (bf16 on a GPU that has it, none on CPU) | no | bf16 | fp16"),
    ("--mode", "mode", str, "cot (KV on the written chain) | latent (KaVa: question -> M latents -> answer)"),
    ("--latent-iterations", "latent_iterations", int, "latent mode: Jacobi iterations T"),
    ("--codi-weight", "codi_weight", float, "latent mode: CODI hidden-state loss weight (alpha1)"),
    ("--cot-weight", "cot_weight", float, "latent mode: weight of CE on the written chain (teacher mode)"),
    ("--report-to", "report_to", lambda s: [x for x in s.split(",") if x], "trackers besides metrics.jsonl, comma list (tensorboard, wandb, ...) | all"),
    ("--kv-control", "kv_control", str, "none | shuffled (negative control: each sample gets another sample's teacher K/V)"),
]

EVAL_FLAGS: list[Flag] = [
    ("--model", "model", str, "a training run directory or any checkpoint (hub id or path)"),
    ("--data", "data.source", str, "'synthetic', a .jsonl/.parquet, or a data set dir / hub id"),
    ("--split", "data.split", str, "split"),
    ("--data-config", "data.config_name", str, "hub data set config"),
    ("--limit", "data.limit", int, "first N rows"),
    ("--batch-size", "batch_size", int, "generation batch size"),
    ("--max-new-tokens", "max_new_tokens", int, "generation budget per question"),
    ("--out", "out", str, "write metrics and predictions as JSON here"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--mode", "mode", str, "cot | latent (a checkpoint trained with --mode latent)"),
    ("--latent-iterations", "latent_iterations", int, "latent mode: Jacobi iterations T (default: as trained)"),
]


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a student from the KV store (no teacher is loaded)", description=__doc__)
    add_flags(p, TRAIN_FLAGS, TrainConfig)
    p.set_defaults(func=train_main)
    tsub = p.add_subparsers(dest="train_command", required=False, metavar="{diagnose}")
    d = tsub.add_parser(
        "diagnose",
        help="loss terms and their gradient norms at init, with suggested weights (no step is taken)",
        description="Build what `train` builds, run a few batches without stepping, and print each loss term's value and gradient norm.",
    )
    add_flags(d, TRAIN_FLAGS, TrainConfig)
    d.add_argument("--batches", type=int, default=4, help="batches to average over (default: 4)")
    d.set_defaults(func=diagnose_main)
    e = sub.add_parser("eval", help="greedy-decode answers: accuracy and gold perplexity")
    add_flags(e, EVAL_FLAGS, EvalConfig)
    e.set_defaults(func=eval_main)


def train_main(args: argparse.Namespace) -> int:
    from .loop import train

    cfg = config_from_args(TrainConfig, args, TRAIN_FLAGS)
    if cfg.mode == "latent":
        from .latent import train_latent

        summary = train_latent(latent_recipe(cfg, args), progress=not args.no_progress)
    else:
        summary = train(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def diagnose_main(args: argparse.Namespace) -> int:
    from .diagnose import diagnose, format_table

    cfg = config_from_args(TrainConfig, args, TRAIN_FLAGS)
    print(format_table(diagnose(cfg, batches=args.batches)))
    return 0
def latent_recipe(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """cfg with LATENT_RECIPE (and warm-up = 5% of max_steps) for every field that neither a
    flag nor the --config file set."""
    given = {key for _, key, _, _ in TRAIN_FLAGS if getattr(args, key) is not None}
    if args.config:
        with open(args.config) as f:
            given |= set(load_yaml(f.read()) or {})
    recipe = {**LATENT_RECIPE, "warmup_steps": max(1, round(0.05 * cfg.max_steps))}
    return TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in recipe.items() if k not in given}})


def eval_main(args: argparse.Namespace) -> int:
    from .eval import evaluate

    cfg = config_from_args(EvalConfig, args, EVAL_FLAGS)
    result = evaluate(cfg, progress=not args.no_progress)
    print(
        f"{result['model']} ({result['mode']}): accuracy {result['accuracy']:.3f} on {result['n']} questions, "
        f"perplexity {result['perplexity']:.3f}, {result['forward_passes_per_question']:.1f} forward passes and "
        f"{result['generated_tokens_per_question']:.1f} generated tokens per question"
    )
    if result["hit_cap"]:
        print(
            f"warning: {result['hit_cap']} of {result['n']} generations reached --max-new-tokens {cfg.max_new_tokens} without "
            f"finishing ({result['hit_cap_correct']} of them scored correct from a cut-off text; accuracy on finished "
            f"generations only: {result['accuracy_finished']:.3f}); raise --max-new-tokens to let them finish",
            file=sys.stderr,
        )
    return 0
