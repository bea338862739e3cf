"""The real pair (issue 26): a pretrained teacher, its layer-pruned student recovered four ways,
paired over seeds on real GSM8K.

    python bench/fetch_real.py --out real --student-layers 8        # SmolLM2-135M + its 8-layer student + GSM8K
    OMP_NUM_THREADS=2 python bench/real_pair.py --real real --out real-pair --train-rows 800 --test-rows 500 \\
        --max-len 2048 --steps 48 --batch-size 8 --lr 2e-4 --max-new-tokens 128 --seeds 5

(the sizing of BENCHMARKS.md "A real pair": on 2 CPU cores, one process, a run takes 10.6-15.3 min,
the dump 18 min and the references 18 min: ~5 h for 20 runs; larger --train-rows / --steps suit a GPU, --device cuda).

What it does:
1. dumps two teachers into one store: SmolLM2-135M-Instruct under the default template, with its
   top-K next-token log-probs (`--logits-top-k`), and the same model under a step-by-step template
   (the product's dual-prompt teacher: K/V only, its segments do not match the student's token for
   token, so it stores no logits); K/V on the student's 8 layers (ratio layer map).
2. `kvdistill compare` on that store, the student (the teacher pruned to 8 evenly spaced layers,
   its own weights) and the first `--test-rows` rows of GSM8K test, paired over `--seeds`:
       ce          CE only (the recovery baseline)
       logits      CE + offline top-K logits KD (the baseline labs use; no K/V read)
       kv          CE + K/V from both teachers (kv-fixed, default terms)
       kv-logits   both
   The primary measure is the perplexity of the gold reasoning + answer of the test questions
   (compare.json: paired deltas with 95% CIs, Holm p, MDE); accuracy too.
3. prints each arm's store bytes per token (what it reads: logits, K/V, both).
4. evaluates the references once on the same questions (reference.json): the teacher, and the
   pruned student before any recovery step.

Nothing in the tests or the default paths uses this; it needs bench/fetch_real.py's folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch_real import prune_student  # noqa: E402

from kvdistill.compare import run_compare  # noqa: E402
from kvdistill.jobs import dump_tasks, run_local  # noqa: E402
from kvdistill.schemas import AlignSpec, CompareConfig, DataSpec, DumpConfig, EvalConfig, ModelSpec  # noqa: E402
from kvdistill.store import finalize, inspect  # noqa: E402
from kvdistill.train.eval import evaluate  # noqa: E402

THINK = "Solve it step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\nFinal answer: {answer}"
ARMS = {
    "logits": {"kv_weight": 0.0, "logits_weight": 1.0},
    "kv": {"fusion": "fixed"},
    "kv-logits": {"fusion": "fixed", "logits_weight": 1.0},
}


def dump(args: argparse.Namespace, teacher: Path, student: Path, store: Path) -> None:
    if (store / "index.parquet").exists():
        print(f"store {store} exists, kept")
        return
    teachers = [
        ModelSpec(name_or_path=str(teacher), name="smol"),
        ModelSpec(name_or_path=str(teacher), name="smol-think", prompt_template=THINK),
    ]
    base = DumpConfig(
        teacher=teachers[0],
        student=ModelSpec(name_or_path=str(student), name="student"),
        store=str(store),
        data=DataSpec(source=str(args.real / "gsm8k" / "train.jsonl"), limit=args.train_rows),
        num_shards=args.shards,
        batch_size=args.dump_batch_size,
        max_len=args.max_len,
        on_too_long="skip",
        align=AlignSpec(layer_map="ratio"),
        logits_top_k=args.top_k,
        teacher_logits_top_k={"smol-think": 0},
        device=args.device,
    )
    run_local(dump_tasks(base, teachers), progress=True)
    finalize(store)


def bytes_per_token(store: Path) -> dict[str, float]:
    """Bytes on disk per student token: each teacher's K/V, and the logits."""
    out = {}
    for name, t in inspect(store)["teachers"].items():
        out[f"{name} K/V"] = (t["bytes"] - t["logits_bytes"]) / t["tokens"]
        if t["logits_top_k"]:
            out[f"{name} logits (top-{t['logits_top_k']})"] = t["logits_bytes_per_token"]
    return out


def references(args: argparse.Namespace, models: dict[str, Path], eval_data: DataSpec) -> dict[str, dict]:
    """Accuracy and perplexity of the teacher and the un-recovered student on the compare's questions
    (each evaluated once; kept in reference.json and reused)."""
    path = args.out / "reference.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for name, model in models.items():
        if name not in done:
            out = args.out / f"reference-{name}.json"
            cfg = EvalConfig(
                model=str(model), data=eval_data, max_new_tokens=args.max_new_tokens, out=str(out), device=args.device
            )
            r = evaluate(cfg, progress=True)
            done[name] = {"accuracy": r["accuracy"], "perplexity": r["perplexity"], "n": r["n"]}
            path.write_text(json.dumps(done, indent=1))
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", type=Path, default=Path("real"), help="bench/fetch_real.py's --out")
    p.add_argument("--out", type=Path, default=Path("real-pair"))
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument("--max-len", type=int, default=384, help="longer samples are skipped (counted by the dump)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dump-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--arms", default="ce,logits,kv,kv-logits")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    teacher = args.real / "smollm2-135m"
    student = prune_student(teacher, args.student_layers)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "store.zarr"
    dump(args, teacher, student, store)
    arms = args.arms.split(",")
    eval_data = DataSpec(source=str(args.real / "gsm8k" / "test.jsonl"), limit=args.test_rows)
    cfg = CompareConfig(
        out=str(args.out / "compare"),
        seeds=args.seeds,
        arms=arms,
        arm_overrides={a: o for a, o in ARMS.items() if a in arms},
        steps=args.steps,
        train={"batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.05},
        store=str(store),
        student=ModelSpec(name_or_path=str(student), name="student"),
        eval_data=eval_data,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    run_compare(cfg, progress=True)
    sizes = bytes_per_token(store)
    print("\nstore bytes per student token on disk:")
    for k, v in sizes.items():
        print(f"  {k:<24} {v:>10,.1f}")
    (args.out / "bytes_per_token.json").write_text(json.dumps(sizes, indent=1))
    refs = references(args, {"teacher": teacher, "student-before-recovery": student}, eval_data)
    print("\nreferences on the same questions:")
    for name, r in refs.items():
        print(f"  {name:<26} accuracy {r['accuracy']:.3f}  perplexity {r['perplexity']:,.3f}  (n {r['n']})")


if __name__ == "__main__":
    main()
