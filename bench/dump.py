"""Dump throughput, measured side by side in one run on the same samples and batches:

  bare     the teacher's decoder stack alone (no hooks, no LM head), inference_mode
  dump     our full dump task (capture, layer map, time map, cast, compress, write, commit)
  naive    one sample at a time: forward with capture, then torch.save of K and V per sample

and the alignment cost (layer map + time map + projection) as a share of the teacher forward,
for the three time maps: identity (same tokenizer and text), char_overlap (a teacher with its
own tokenizer) and segment_linear (the same teacher under another prompt template).

    python bench/dump.py --size small --samples 512      # numbers for BENCHMARKS.md
    python bench/dump.py --size medium --samples 4096 --device cuda   # on a GPU (bfloat16 by default there)

Teachers are random-weight real architectures (throughput does not depend on training).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from kvdistill import tiny
from kvdistill.core.capture import decoder, forward_kv
from kvdistill.core.data import load_examples
from kvdistill.core.models import load_model, load_tokenizer
from kvdistill.core.prompts import encode, pad_batch
from kvdistill.dump.run import run_dump
from kvdistill.jobs.local import run_local
from kvdistill.schemas import (
    DEFAULT_TEMPLATE,
    DataSpec,
    DumpConfig,
    DumpTask,
    JobsConfig,
    ModelSpec,
    SyntheticSpec,
)
from kvdistill.store import inspect

SIZES = {  # teacher geometries; the student is always the demo's
    "tiny": dict(layers=6, hidden=128, heads=4, kv_heads=2, head_dim=32),
    "small": dict(layers=8, hidden=512, heads=8, kv_heads=2, head_dim=64),
    "medium": dict(layers=16, hidden=1024, heads=16, kv_heads=4, head_dim=64),  # for a GPU
}
STUDENT = dict(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16)
THINK = "Think step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\n#### {answer}"


def build(root: Path, size: str, data: DataSpec, dtype: str) -> dict[str, ModelSpec]:
    rows = load_examples(data)
    texts = tiny.corpus(rows, DEFAULT_TEMPLATE)
    tok, xtok = tiny.train_tokenizer(texts, vocab_size=384), tiny.train_tokenizer(texts, vocab_size=512)
    paths = {
        "teacher": tiny.save(tiny.build_model("qwen2", tok, **SIZES[size]), tok, root / "teacher"),
        "xtok": tiny.save(tiny.build_model("llama", xtok, **SIZES[size]), xtok, root / "xtok"),
        "student": tiny.save(tiny.build_model("qwen2", tok, **STUDENT), tok, root / "student"),
    }
    return {
        "identity": ModelSpec(name_or_path=str(paths["teacher"]), name="identity", dtype=dtype),
        "char_overlap": ModelSpec(name_or_path=str(paths["xtok"]), name="char_overlap", dtype=dtype),
        "segment_linear": ModelSpec(name_or_path=str(paths["teacher"]), name="segment_linear", prompt_template=THINK, dtype=dtype),
        "student": ModelSpec(name_or_path=str(paths["student"])),
    }


def batches(spec: ModelSpec, data: DataSpec, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dump's own batches: student-length order, padded the same way."""
    tok = load_tokenizer(spec)
    enc = sorted((encode(tok, spec.prompt_template, ex) for ex in load_examples(data)), key=len)
    return [pad_batch([e.input_ids for e in enc[i : i + batch_size]], tok.pad_token_id) for i in range(0, len(enc), batch_size)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def bare_forward(spec: ModelSpec, data: DataSpec, batch_size: int, device: str) -> tuple[int, float]:
    model = load_model(spec, device)
    stack, work = decoder(model), batches(spec, data, batch_size)
    _sync(device)
    t0 = time.perf_counter()  # host batches copied per step, as the dump does
    with torch.inference_mode():
        for ids, mask in work:
            stack(input_ids=ids.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True), use_cache=False)
    _sync(device)
    return sum(int(m.sum()) for _, m in work), time.perf_counter() - t0


def naive(spec: ModelSpec, data: DataSpec, out: Path, device: str) -> tuple[int, float]:
    model, tok = load_model(spec, device), load_tokenizer(spec)
    enc = [encode(tok, spec.prompt_template, ex) for ex in load_examples(data)]
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for e in enc:
            ids = torch.as_tensor(e.input_ids, dtype=torch.long, device=device)[None]
            k, v = forward_kv(model, ids, torch.ones_like(ids))
            torch.save({"k": k[0].half().cpu(), "v": v[0].half().cpu()}, out / f"{e.sample_id}.pt")
    return sum(len(e) for e in enc), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workers", type=int, default=2, help="also time the local executor with 1 vs this many workers (0: skip; CPU only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="teacher dtype (default: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--dir", type=Path, default=None, help="where to write models and stores (default: a temp dir, removed)")
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvdistill-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(args, root, dtype)
    finally:  # models, stores and the naive files: gigabytes at --size medium
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path, dtype: str) -> None:
    data = DataSpec(synthetic=SyntheticSpec(n_train=args.samples, n_test=16))
    specs = build(root / "models", args.size, data, dtype)
    g = SIZES[args.size]
    print(f"teacher {args.size}: {g}; {args.samples} samples, batch {args.batch_size}, {args.threads} threads, device {args.device}, {dtype}\n")

    tok_bare, s_bare = bare_forward(specs["identity"], data, args.batch_size, args.device)
    results = {}
    for kind in ("identity", "char_overlap", "segment_linear"):
        cfg = DumpConfig(teacher=specs[kind], student=specs["student"], store=str(root / "store.zarr"), data=data, batch_size=args.batch_size, device=args.device)
        results[kind] = run_dump(cfg, progress=False)
    tok_naive, s_naive = naive(specs["identity"], data, root / "naive", args.device)

    r = results["identity"]
    steady = r.phases["forward"] + r.phases["align"] + r.phases["write"]
    rate = {"bare": tok_bare / s_bare, "dump": r.teacher_tokens / steady, "dump_wall": r.teacher_tokens / r.seconds, "naive": tok_naive / s_naive}
    print(f"{'path':<34} {'tokens/s':>10} {'vs bare':>8}")
    print(f"{'bare teacher forward':<34} {rate['bare']:>10,.0f} {1.0:>8.2f}")
    print(f"{'kvdistill dump (steady state)':<34} {rate['dump']:>10,.0f} {rate['dump'] / rate['bare']:>8.2f}")
    print(f"{'kvdistill dump (incl. loading)':<34} {rate['dump_wall']:>10,.0f} {rate['dump_wall'] / rate['bare']:>8.2f}")
    print(f"{'naive per-sample torch.save':<34} {rate['naive']:>10,.0f} {rate['naive'] / rate['bare']:>8.2f}")
    print(f"dump / naive: {rate['dump'] / rate['naive']:.2f}x\n")

    print(f"{'time map':<16} {'forward s':>10} {'align s':>8} {'align/forward':>14} {'write s':>8}")
    for kind, res in results.items():
        ph = res.phases
        print(f"{kind:<16} {ph['forward']:>10.2f} {ph['align']:>8.2f} {ph['align'] / ph['forward']:>14.1%} {ph['write']:>8.2f}")
    info = inspect(root / "store.zarr")
    print()
    for name, t in info["teachers"].items():
        print(f"store {name:<16} {t['bytes_per_token']:>8.1f} bytes/token (compression {t['compression_ratio']:.2f}x)")
    naive_bytes = sum(f.stat().st_size for f in (root / "naive").iterdir())
    print(f"naive torch.save files   {naive_bytes / tok_naive:>8.1f} bytes/token (teacher depth, uncompressed)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (this process; workers not included)")
    if args.workers > 1 and args.device == "cpu":
        # The same 4 shards of one teacher: 1 process using every core vs N processes splitting them.
        seconds = {}
        for n in (1, args.workers):
            cfg = JobsConfig(teachers=[specs["identity"]], dump=DumpTask(student=specs["student"], store=str(root / f"workers{n}.zarr"), data=data, num_shards=4, batch_size=args.batch_size, device="cpu"))
            t0 = time.perf_counter()
            run_local(cfg.tasks(), workers=n, progress=False)
            seconds[n] = time.perf_counter() - t0
        print(f"\nlocal executor, 4 shards: 1 worker {seconds[1]:.1f}s, {args.workers} workers {seconds[args.workers]:.1f}s "
              f"-> {seconds[1] / seconds[args.workers]:.2f}x (process start-up included)")


if __name__ == "__main__":
    main()
