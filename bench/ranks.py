"""N processes against one, side by side in one run: the learning rate at every step and how
far the weights and the logged terms end apart, for 1 process x batch 2b, 1 process x batch b
with 2 accumulation steps, and 2 processes x batch b (real gloo DDP through `accelerate
launch`), in the default configuration (layer_std standardisation, CKA on).

    python bench/ranks.py --store demo-out/store.zarr --student demo-out/models/student-init
    python bench/ranks.py --store S --student M --steps 30 --batch-size 8

Needs a finalized store and its student (`make demo` makes both). CPU, OMP_NUM_THREADS=1 each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch


def _run(args, out: Path, batch: int, accum: int, procs: int) -> None:
    launch = (
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if procs > 1
        else [sys.executable]
    )
    cmd = [
        *launch,
        "-m",
        "kvdistill",
        "train",
        "--store",
        args.store,
        "--student",
        args.student,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup),
        "--batch-size",
        str(batch),
        "--gradient-accumulation-steps",
        str(accum),
        "--log-every",
        "1",
        "--record-samples",
        "--no-progress",
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    return {
        **safetensors.torch.load_file(final / "model.safetensors"),
        **{f"adapters.{k}": v for k, v in torch.load(final / "adapters.pt").items()},
    }


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _samples(run: Path) -> dict[int, list[str]]:
    """{step: sorted sample ids over every rank}."""
    out: dict[int, list[str]] = {}
    for path in (run / "ranks").glob("samples-rank-*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["sample_ids"])
    return {k: sorted(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="b: per process and micro-batch")
    args = ap.parse_args()
    b = args.batch_size
    runs = {f"1 x {2 * b}": (2 * b, 1, 1), f"1 x {b} x 2 acc": (b, 2, 1), f"2 x {b} (DDP)": (b, 1, 2)}
    with tempfile.TemporaryDirectory(prefix="kvdistill-ranks-") as tmp:
        dirs = {}
        for name, (batch, accum, procs) in runs.items():
            dirs[name] = Path(tmp) / name.replace(" ", "")
            _run(args, dirs[name], batch, accum, procs)
        rows = {n: _rows(d) for n, d in dirs.items()}
        ref = next(iter(runs))
        print(f"learning rate / peak at each step ({args.steps} steps, warm-up {args.warmup}):")
        peak = max(r["lr"] for r in rows[ref])
        for n in runs:
            print(f"  {n:>14}: " + " ".join(f"{r['lr'] / peak:.3f}" for r in rows[n]))
        print(
            f"\nagainst {ref}:  {'max |dw|':>10} {'max |dW|/|W|':>13} {'max term diff':>14} {'same samples':>13}"
            f" {'same tokens':>12}"
        )
        w0 = _weights(dirs[ref])
        for n in list(runs)[1:]:
            w = _weights(dirs[n])
            dw = max(float((w[k] - w0[k]).abs().max()) for k in w0)
            rel = max(float((w[k] - w0[k]).norm() / w0[k].norm().clamp_min(1e-12)) for k in w0)
            terms = max(
                abs(a[k] - c[k])
                for a, c in zip(rows[n], rows[ref], strict=True)
                for k in a
                if isinstance(a[k], float) and k != "lr"
            )
            samples = [_samples(d) for d in (dirs[n], dirs[ref])]
            same_tokens = [r["tokens"] for r in rows[n]] == [r["tokens"] for r in rows[ref]]
            print(
                f"  {n:>14}:  {dw:10.2e} {rel:13.2e} {terms:14.2e} {str(samples[0] == samples[1]):>13}"
                f" {str(same_tokens):>12}"
            )


if __name__ == "__main__":
    main()
