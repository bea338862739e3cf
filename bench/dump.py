"""Dump throughput, measured side by side in one run on the same samples and batches:

  bare     the teacher's decoder stack alone (no hooks, no LM head), inference_mode
  dump     our full dump task (capture, layer map, time map, cast, compress, write, commit)
  naive    one sample at a time: forward with capture, then torch.save of K and V per sample

and the alignment cost (layer map + time map + projection) as a share of the teacher forward,
for the three time maps: identity (same tokenizer and text), char_overlap (a teacher with its
own tokenizer) and segment_linear (the same teacher under another prompt template).

    python bench/dump.py --size small --samples 512      # numbers for BENCHMARKS.md
    python bench/dump.py --size medium --samples 4096 --device cuda   # on a GPU (bfloat16 by default there)
    python bench/dump.py --teacher real/smollm2-135m --data real/gsm8k/train.jsonl --limit 48 --repeat 3

Teachers are random-weight real architectures by default (throughput does not depend on
training). `--teacher` takes a local pretrained model folder instead (bench/fetch_real.py makes
one) and `--data` a GSM8K-format file: the student is then the demo's geometry on the teacher's
tokenizer (identity, segment_linear), or on a tokenizer of its own (char_overlap, a second store).

The comparison is fair by construction: `bare` runs the dump's own padded batches (samples in
the student-length order the dump uses, the teacher's tokens padded with its pad id), the same
dtype, the same torch threads, the same attention implementation (both load the teacher with
core.models.load_model) and the same host allocator settings (dump.run.host_memory_kept: on a CPU
freed memory stays in the process while the batches run), after one untimed warm-up forward of
this process; `--repeat` alternates bare and the identity dump and prints each ratio.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the imports: start-up is part of what is reported

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from kvdistill import tiny  # noqa: E402
from kvdistill.core.capture import decoder, forward_kv  # noqa: E402
from kvdistill.core.data import load_examples  # noqa: E402
from kvdistill.core.models import load_model, load_tokenizer, pad_token_id  # noqa: E402
from kvdistill.core.prompts import encode, pad_batch  # noqa: E402
from kvdistill.dump.run import host_memory_kept, run_dump  # noqa: E402
from kvdistill.jobs.local import run_local  # noqa: E402
from kvdistill.schemas import (  # noqa: E402
    DEFAULT_TEMPLATE,
    DataSpec,
    DumpConfig,
    DumpTask,
    JobsConfig,
    ModelSpec,
    SyntheticSpec,
)
from kvdistill.store import inspect  # noqa: E402

IMPORTS_S = time.perf_counter() - T_START

SIZES = {  # teacher geometries; the student is always the demo's
    "tiny": dict(layers=6, hidden=128, heads=4, kv_heads=2, head_dim=32),
    "small": dict(layers=8, hidden=512, heads=8, kv_heads=2, head_dim=64),
    "medium": dict(layers=16, hidden=1024, heads=16, kv_heads=4, head_dim=64),  # for a GPU
}
STUDENT = dict(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16)
THINK = "Think step by step.\nQuestion: {question}\nReasoning:\n{reasoning}\n#### {answer}"
MAPS = ("identity", "char_overlap", "segment_linear")


def build(
    root: Path, size: str, data: DataSpec, dtype: str, teacher: Path | None
) -> dict[str, tuple[ModelSpec, ModelSpec, str]]:
    """time map -> (teacher, student, store name). Random-weight teachers of `size` sharing one
    store and student; or the pretrained `teacher` folder, whose char_overlap student (a
    tokenizer of its own) needs a store of its own."""
    rows = load_examples(data)
    texts = tiny.corpus(rows, DEFAULT_TEMPLATE)
    xtok = tiny.train_tokenizer(texts, vocab_size=512)
    if teacher is None:
        tok = tiny.train_tokenizer(texts, vocab_size=384)
        paths = {
            "teacher": tiny.save(tiny.build_model("qwen2", tok, **SIZES[size]), tok, root / "teacher"),
            "xtok": tiny.save(tiny.build_model("llama", xtok, **SIZES[size]), xtok, root / "xtok"),
            "student": tiny.save(tiny.build_model("qwen2", tok, **STUDENT), tok, root / "student"),
        }
        student = ModelSpec(name_or_path=str(paths["student"]))
        return {
            "identity": (
                ModelSpec(name_or_path=str(paths["teacher"]), name="identity", dtype=dtype),
                student,
                "store.zarr",
            ),
            "char_overlap": (
                ModelSpec(name_or_path=str(paths["xtok"]), name="char_overlap", dtype=dtype),
                student,
                "store.zarr",
            ),
            "segment_linear": (
                ModelSpec(
                    name_or_path=str(paths["teacher"]), name="segment_linear", prompt_template=THINK, dtype=dtype
                ),
                student,
                "store.zarr",
            ),
        }
    tok = load_tokenizer(ModelSpec(name_or_path=str(teacher)))
    same = ModelSpec(name_or_path=str(tiny.save(tiny.build_model("llama", tok, **STUDENT), tok, root / "student")))
    own = ModelSpec(
        name_or_path=str(tiny.save(tiny.build_model("qwen2", xtok, **STUDENT), xtok, root / "student-xtok"))
    )
    return {
        "identity": (ModelSpec(name_or_path=str(teacher), name="identity", dtype=dtype), same, "store.zarr"),
        "char_overlap": (
            ModelSpec(name_or_path=str(teacher), name="char_overlap", dtype=dtype),
            own,
            "store-xtok.zarr",
        ),
        "segment_linear": (
            ModelSpec(name_or_path=str(teacher), name="segment_linear", prompt_template=THINK, dtype=dtype),
            same,
            "store.zarr",
        ),
    }


def batches(
    teacher: ModelSpec, student: ModelSpec, data: DataSpec, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dump's own batches: samples in student-length order (a stable sort of the data
    order), the teacher's tokens padded with the teacher's pad id, as dump/run.py cuts them."""
    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    pairs = [
        (encode(s_tok, student.prompt_template, ex), encode(t_tok, teacher.prompt_template, ex))
        for ex in load_examples(data)
    ]
    pairs.sort(key=lambda p: len(p[0]))
    pad = pad_token_id(t_tok)
    return [
        pad_batch([t.input_ids for _, t in pairs[i : i + batch_size]], pad) for i in range(0, len(pairs), batch_size)
    ]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Bare:
    """The teacher's decoder stack alone over the dump's batches (loaded once, timed per call)."""

    def __init__(self, teacher: ModelSpec, student: ModelSpec, data: DataSpec, batch_size: int, device: str) -> None:
        t0 = time.perf_counter()
        self.model = load_model(teacher, device)
        self.load_s = time.perf_counter() - t0
        self.stack, self.work, self.device = decoder(self.model), batches(teacher, student, data, batch_size), device
        self.tokens = sum(int(m.sum()) for _, m in self.work)
        self.padded = sum(m.numel() for _, m in self.work)
        ids, mask = self.work[0]
        t0 = time.perf_counter()
        self._run([(ids[:2, :64], mask[:2, :64])])  # warm-up, untimed: thread pools, kernel dispatch
        self.warmup_s = time.perf_counter() - t0

    def _run(self, work) -> None:
        # host batches copied per step, and on a CPU freed memory kept in the process, as the dump does
        with torch.inference_mode(), host_memory_kept(torch.device(self.device)):
            for ids, mask in work:
                self.stack(
                    input_ids=ids.to(self.device, non_blocking=True),
                    attention_mask=mask.to(self.device, non_blocking=True),
                    use_cache=False,
                )
        _sync(self.device)

    def seconds(self) -> float:
        _sync(self.device)
        f0, t0 = _faults(), time.perf_counter()
        self._run(self.work)
        self.faults = _faults() - f0
        return time.perf_counter() - t0


def _faults() -> int:
    """Minor page faults of this process so far: memory the kernel had to hand out fresh."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def naive(spec: ModelSpec, data: DataSpec, out: Path, device: str) -> tuple[int, float]:
    model, tok = load_model(spec, device), load_tokenizer(spec)
    enc = [encode(tok, spec.prompt_template, ex) for ex in load_examples(data)]
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with torch.inference_mode(), host_memory_kept(torch.device(device)):
        for e in enc:
            ids = torch.as_tensor(e.input_ids, dtype=torch.long, device=device)[None]
            k, v = forward_kv(model, ids, torch.ones_like(ids))
            torch.save({"k": k[0].half().cpu(), "v": v[0].half().cpu()}, out / f"{e.sample_id}.pt")
    return sum(len(e) for e in enc), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size", choices=sorted(SIZES), default="small", help="random-weight teacher geometry (without --teacher)"
    )
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="a local pretrained model folder as the teacher (e.g. real/smollm2-135m)",
    )
    p.add_argument("--data", type=Path, default=None, help="a GSM8K-format .jsonl (default: the synthetic problems)")
    p.add_argument("--samples", type=int, default=512, help="synthetic rows (without --data)")
    p.add_argument("--limit", type=int, default=None, help="the first N rows of --data (default: all)")
    p.add_argument(
        "--maps",
        default=",".join(MAPS),
        help=f"time maps to dump, comma-separated (of {', '.join(MAPS)}; identity always runs)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate bare and the identity dump this many times; each ratio is printed",
    )
    p.add_argument(
        "--naive", action=argparse.BooleanOptionalAction, default=True, help="also time the naive per-sample path"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=(
            "also time the local executor with 1 vs this many workers (0: skip; CPU only; default 2, 0 with --teacher)"
        ),
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="teacher dtype (default: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument(
        "--dir", type=Path, default=None, help="where to write models and stores (default: a temp dir, removed)"
    )
    args = p.parse_args()
    maps = [m for m in args.maps.split(",") if m]
    if unknown := set(maps) - set(MAPS):
        p.error(f"--maps: unknown {sorted(unknown)}; choose from {', '.join(MAPS)}")
    args.maps = ["identity", *[m for m in MAPS if m in maps and m != "identity"]]
    if args.workers is None:
        args.workers = 0 if args.teacher else 2
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
    if args.data is None:
        data = DataSpec(synthetic=SyntheticSpec(n_train=args.samples, n_test=16))
    else:
        data = DataSpec(source=str(args.data), limit=args.limit)
    specs = build(root / "models", args.size, data, dtype, args.teacher)
    teacher, student, _ = specs["identity"]
    what = f"{args.teacher} (pretrained)" if args.teacher else f"{args.size}: {SIZES[args.size]}"
    bare = Bare(teacher, student, data, args.batch_size, args.device)
    n = len(load_examples(data))
    print(
        f"teacher {what}; {n} samples of {args.data or 'synthetic'}, batch {args.batch_size}, {args.threads} threads,"
        f" device {args.device}, {dtype}, attention {bare.model.config._attn_implementation}\npadded batches (the"
        f" dump's): {len(bare.work)}, {bare.tokens:,} tokens, {bare.padded:,} with padding\nstart-up: imports"
        f" {IMPORTS_S:.1f}s, teacher load {bare.load_s:.1f}s, warm-up forward {bare.warmup_s:.1f}s (this process)\n"
    )

    def dump(kind: str, tag: str = ""):
        t, s, store = specs[kind]
        cfg = DumpConfig(
            teacher=t,
            student=s,
            store=str(root / tag / store),
            data=data,
            batch_size=args.batch_size,
            device=args.device,
        )
        f0 = _faults()
        r = run_dump(cfg, progress=False)
        r.faults = _faults() - f0
        return r

    # bare and the identity dump alternate, so drift in the machine's load hits both alike
    s_bares, f_bares, idents = [], [], []
    for i in range(args.repeat):
        s_bares.append(bare.seconds())
        f_bares.append(bare.faults)
        idents.append(dump("identity", tag=f"rep{i}" if i else ""))
    print(
        f"{'repeat':<7} {'bare s':>7} {'dump forward s':>15} {'steady s':>9} {'fwd vs bare':>12}"
        f" {'steady vs bare':>15} {'page faults bare / dump task':>29}"
    )
    for i, (sb, fb, r) in enumerate(zip(s_bares, f_bares, idents, strict=True)):
        st = r.phases["forward"] + r.phases["align"] + r.phases["write"]
        print(
            f"{i:<7} {sb:>7.2f} {r.phases['forward']:>15.2f} {st:>9.2f} {sb / r.phases['forward']:>12.2f}"
            f" {sb / st:>15.2f} {fb:>14,} / {r.faults:>12,}"
        )
    print()
    results = {"identity": idents[-1]}
    for kind in args.maps[1:]:
        results[kind] = dump(kind)
    tok_bare, s_bare = bare.tokens, s_bares[-1]
    del bare

    r = results["identity"]
    steady = r.phases["forward"] + r.phases["align"] + r.phases["write"]
    rate = {"bare": tok_bare / s_bare, "dump": r.teacher_tokens / steady, "dump_wall": r.teacher_tokens / r.seconds}
    print(f"{'path':<34} {'tokens/s':>10} {'vs bare':>8}")
    print(f"{'bare teacher forward':<34} {rate['bare']:>10,.0f} {1.0:>8.2f}")
    print(
        f"{'kvdistill dump (forward phase)':<34} {r.teacher_tokens / r.phases['forward']:>10,.0f}"
        f" {s_bare / r.phases['forward']:>8.2f}"
    )
    print(f"{'kvdistill dump (steady state)':<34} {rate['dump']:>10,.0f} {rate['dump'] / rate['bare']:>8.2f}")
    print(
        f"{'kvdistill dump (incl. loading)':<34} {rate['dump_wall']:>10,.0f} {rate['dump_wall'] / rate['bare']:>8.2f}"
    )
    if args.naive:
        tok_naive, s_naive = naive(teacher, data, root / "naive", args.device)
        rate["naive"] = tok_naive / s_naive
        print(f"{'naive per-sample torch.save':<34} {rate['naive']:>10,.0f} {rate['naive'] / rate['bare']:>8.2f}")
        print(f"dump / naive: {rate['dump'] / rate['naive']:.2f}x")
    print()

    print(f"{'time map':<16} {'load s':>7} {'forward s':>10} {'align s':>8} {'align/forward':>14} {'write s':>8}")
    for kind, res in results.items():
        ph = res.phases
        print(
            f"{kind:<16} {ph['load']:>7.2f} {ph['forward']:>10.2f} {ph['align']:>8.2f}"
            f" {ph['align'] / ph['forward']:>14.1%} {ph['write']:>8.2f}"
        )
    print()
    for store in sorted({specs[kind][2] for kind in results}):
        for name, t in inspect(root / store)["teachers"].items():
            print(
                f"store {name:<16} {t['bytes_per_token']:>8.1f} bytes/token (compression"
                f" {t['compression_ratio']:.2f}x)"
            )
    if args.naive:
        naive_bytes = sum(f.stat().st_size for f in (root / "naive").iterdir())
        print(f"naive torch.save files   {naive_bytes / tok_naive:>8.1f} bytes/token (teacher depth, uncompressed)")
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (this process; workers not"
        " included)"
    )
    if args.workers > 1 and args.device == "cpu":
        # The same 4 shards of one teacher: 1 process using every core vs N processes splitting them.
        seconds = {}
        for n in (1, args.workers):
            cfg = JobsConfig(
                teachers=[teacher],
                dump=DumpTask(
                    student=student,
                    store=str(root / f"workers{n}.zarr"),
                    data=data,
                    num_shards=4,
                    batch_size=args.batch_size,
                    device="cpu",
                ),
            )
            t0 = time.perf_counter()
            run_local(cfg.tasks(), workers=n, progress=False)
            seconds[n] = time.perf_counter() - t0
        print(
            f"\nlocal executor, 4 shards: 1 worker {seconds[1]:.1f}s, {args.workers} workers"
            f" {seconds[args.workers]:.1f}s -> {seconds[1] / seconds[args.workers]:.2f}x (process start-up included)"
        )


if __name__ == "__main__":
    main()
