"""Seconds per optimizer step of the trainer, measured side by side in one process on the same
store and the same batches, for each training configuration:

  a       CE only (kv_weight 0: the stream reads no K/V)
  b       CE + KV, fixed fusion, the default terms (TrainConfig's: layer-std MSE on K and V,
          and the CKA term at cka_weight 0.05)
  b-cka0  b without the CKA term (cka_weight 0): what CKA costs, forward and backward
  c       b with similarity routing (fusion similarity)
  d       b with the learned router (fusion router)
  e       b with attention weighting (kv_attn_weight student: eager attention, probabilities out)
  f       latent mode (KaVa: T = 3 Jacobi iterations over M slots + the written chain's CE,
          CODI and latent K/V terms; full fine-tuning like the others, not the kava recipe's LoRA)
  b-gc    b with gradient checkpointing (TrainConfig.gradient_checkpointing)

for the demo's student (kvdistill.demo.STUDENT with the demo's two teachers) and a larger CPU
student (Qwen2, 8 layers, hidden 512; two teachers, one needing a linear adapter, one not).

Each configuration is built as train/loop.py builds it (load_student, cot_mode / latent_mode,
AdamW + cosine schedule, KVStream + train_loader with the default DataLoader settings,
accelerate's prepare) and stepped with the loop's own `optimizer_step`; a step is
next(loader) (the data wait) + `optimizer_step`. The configurations are interleaved: after a
warm-up block each, R rounds run S steps of every configuration in turn (the order rotated
each round), so machine load falls on all alike; s/step is the median over rounds of a
round's mean, "vs a" the median over rounds of the ratio to a's block of the same round, and
"best of rounds" the fastest round of the configuration over a's fastest (the least disturbed
by other processes on a shared machine).

Then the split of a step of b (and of a, beside it), from timing wrappers this bench installs
around the trainer's functions (train/ is not edited): waiting for data, K/V to the device, the
student forward with K/V capture, the adapters, the loss terms (CE, layer-std norm, KV MSE,
CKA) and the rest of the forward (stacking, fusion), the backward of all terms, the optimizer
(zero_grad, clipping, AdamW, schedule); per part the median over the instrumented steps. On
CUDA every timed part synchronises, so the split's total runs slower than b's row in the main
table.

Memory, per configuration in its own spawned process (peak RSS is monotone within a process):
`train(cfg)` itself for a few steps: peak RSS (VmHWM; resource.getrusage's ru_maxrss in a
spawned child would include the parent's peak, inherited through exec) and, on CUDA,
torch.cuda.max_memory_allocated.

    OMP_NUM_THREADS=2 python bench/train.py              # BENCHMARKS.md (~8 min on 2 idle cores)
    python bench/train.py --quick                        # smoke check, demo student (~1 min)
    python bench/train.py --device cuda                  # on a GPU (bf16 autocast, K/V as stored)

On a shared machine, OMP_NUM_THREADS=2 under other load slows steps up to 10x at random (a
thread waits for a descheduled sibling); OMP_NUM_THREADS=1 stays steady there.

Targets (issue 16): b <= 1.15x a on the larger CPU student, <= 1.10x on an accelerator; the data
wait <= 5% of a step with the default DataLoader settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers.utils import logging as hf_logging

from kvdistill import demo, tiny
from kvdistill.core.data import load_examples
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import (
    DEFAULT_TEMPLATE,
    DataSpec,
    DumpConfig,
    LatentSpec,
    ModelSpec,
    SyntheticSpec,
    TrainConfig,
)
from kvdistill.store import finalize
from kvdistill.train import distiller, loop

SIZES = {
    "demo": {"student": demo.STUDENT, "teachers": demo.TEACHERS},
    # teacher-qwen2's K/V are 256 wide (a linear adapter onto the student's 128), teacher-llama's 128 (identity).
    "large": {
        "student": dict(arch="qwen2", layers=8, hidden=512, heads=8, kv_heads=2, head_dim=64),
        "teachers": {
            "teacher-qwen2": dict(arch="qwen2", layers=12, hidden=768, heads=12, kv_heads=4, head_dim=64),
            "teacher-llama": dict(arch="llama", layers=8, hidden=512, heads=8, kv_heads=2, head_dim=64),
        },
    },
}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (what it is, TrainConfig overrides)
    "a": ("CE only (kv_weight 0)", {"kv_weight": 0.0}),
    "b": ("CE + KV, fixed fusion, default terms (CKA 0.05)", {}),
    "b-cka0": ("b without CKA (cka_weight 0)", {"cka_weight": 0.0}),
    "c": ("b + similarity routing", {"fusion": "similarity"}),
    "d": ("b + learned router", {"fusion": "router"}),
    "e": ("b + attention weighting (student)", {"kv_attn_weight": "student"}),
    "f": ("latent mode (T = 3, M slots)", {"mode": "latent"}),
    "b-gc": ("b + gradient checkpointing", {"gradient_checkpointing": True}),
}
LATENT_SLOTS = 8  # the demo's M
SPLIT_CONFIGS = ("a", "b")  # the split of b, and of a beside it: where b's extra time goes
SPLIT_ORDER = (
    "data wait",
    "K/V to device",
    "student forward + capture",
    "adapters",
    "CE loss",
    "layer-std norm",
    "KV loss (MSE)",
    "CKA term",
    "rest of forward",
    "backward",
    "optimizer",
    "rest of step",
)


# ----------------------------------------------------------------------------- models and store


def build_store(root: Path, size: str, samples: int, device: str) -> ModelSpec:
    """Random-weight student and teachers of `size` (speed does not depend on training) sharing
    one tokenizer, and a finalized store of `samples` synthetic samples over 2 shards with the
    full K/V and R-KV latent slots of every teacher. Returns the student's ModelSpec."""
    data = DataSpec(synthetic=SyntheticSpec(n_train=samples, n_test=16))
    tok = tiny.train_tokenizer(tiny.corpus(load_examples(data), DEFAULT_TEMPLATE))
    geo = SIZES[size]
    student = ModelSpec(
        name_or_path=str(tiny.save(tiny.build_model(tokenizer=tok, seed=1, **geo["student"]), tok, root / "student")),
        name="student",
    )
    teachers = [
        ModelSpec(
            name_or_path=str(tiny.save(tiny.build_model(tokenizer=tok, seed=2 + i, **g), tok, root / name)), name=name
        )
        for i, (name, g) in enumerate(geo["teachers"].items())
    ]
    store = root / "store.zarr"
    base = DumpConfig(
        teacher=teachers[0],
        student=student,
        store=str(store),
        data=data,
        num_shards=2,
        batch_size=32,
        latent=LatentSpec(slots=LATENT_SLOTS),
        device=device,
    )
    run_local(dump_tasks(base, teachers), progress=False)
    finalize(store)
    return student


def train_config(root: Path, student: ModelSpec, name: str, device: str, batch_size: int) -> TrainConfig:
    # max_steps only sets the cosine schedule's length here; the bench decides how many steps run.
    return TrainConfig(
        store=str(root / "store.zarr"),
        student=student,
        out=str(root / "runs" / name),
        device=device,
        batch_size=batch_size,
        max_steps=100_000,
        **CONFIGS[name][1],
    )


# ----------------------------------------------------------------------------- one configuration


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Run:
    """One configuration, set up with train/loop.py's own setup (`build_mode`, `training_loader`,
    `optimizer_and_schedule`), stepped with the loop's `optimizer_step`; its loader starts a new
    epoch when spent."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        built = loop.build_mode(cfg)
        self.mode = built.mode
        self.loader = loop.training_loader(cfg, built, accelerator.device)
        self.stream = self.loader.dataset.stream
        steps = loop.planned_steps(cfg, self.loader.dataset)
        opt, self.sched = loop.optimizer_and_schedule(cfg, self.mode, steps)  # stepped once per step, as in train
        self.model, self.opt = accelerator.prepare(self.mode.model, opt)
        self.model.train()
        self.epoch, self.step_no = 0, 0
        self.batches: Iterator = iter(self.loader)

    def next_batch(self) -> dict[str, Any]:
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.loader.dataset.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> tuple[float, float]:
        """(seconds waiting for the batch, seconds of the whole step)."""
        device = self.cfg.device
        _sync(device)
        t0 = time.perf_counter()
        batch = self.next_batch()
        t1 = time.perf_counter()
        loop.optimizer_step(
            self.mode, self.model, self.opt, self.sched, self.accelerator, self.cfg, [batch], self.step_no
        )
        _sync(device)
        self.step_no += 1
        return t1 - t0, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the split of a step


@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class Split:
    """Seconds per part of a step, from wrappers around the trainer's functions and forward
    hooks on its modules. Parts never nest (student forward, adapters and loss functions are
    called one after another in Distiller.forward), so they add up; "rest of ..." is what the
    wrapped parts leave of the Distiller forward and of the step."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds = device, defaultdict(float)

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[part] += time.perf_counter() - t0

        return timed

    def hook(self, module: torch.nn.Module, part: str) -> list:
        starts: list[float] = []

        def pre(*_):
            _sync(self.device)
            starts.append(time.perf_counter())

        def post(*_):
            _sync(self.device)
            self.seconds[part] += time.perf_counter() - starts.pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    @contextmanager
    def installed(self, run: Run) -> Iterator[None]:
        d = run.accelerator.unwrap_model(run.model)
        handles = self.hook(d, "forward") + self.hook(d.student, "student forward + capture")
        for adapters in d.adapters.values():
            for a in adapters.values():
                handles += self.hook(a, "adapters")
        patches = [
            (distiller, "kv_to_device", "K/V to device"),
            (distiller, "rows_ce", "CE loss"),
            (distiller, "layer_std_norm", "layer-std norm"),
            (distiller, "masked_kv_loss", "KV loss (MSE)"),
            (distiller, "_mse_sums", "KV loss (MSE)"),  # the exact (layer_std) path: sums per micro-batch
            (distiller, "cka_sums", "CKA term"),
            (distiller, "cka_from_sums", "CKA term"),
            (run.accelerator, "backward", "backward"),
            (run.accelerator, "clip_grad_norm_", "optimizer"),
            (run.opt, "zero_grad", "optimizer"),
            (run.opt, "step", "optimizer"),
            (run.sched, "step", "optimizer"),
        ]
        try:
            with ExitStack() as stack:
                for obj, name, part in patches:
                    stack.enter_context(_patched(obj, name, self.wrap(part, getattr(obj, name))))
                yield
        finally:
            for h in handles:
                h.remove()

    def take(self, wait: float, total: float) -> dict[str, float]:
        """The step just run, in seconds per part of SPLIT_ORDER; starts the next step's count."""
        s, self.seconds = self.seconds, defaultdict(float)
        inner = ("student forward + capture", "adapters", "CE loss", "layer-std norm", "KV loss (MSE)", "CKA term")
        out = {"data wait": wait, **{k: s.get(k, 0.0) for k in ("K/V to device", *inner, "backward", "optimizer")}}
        out["rest of forward"] = s.get("forward", 0.0) - sum(out[k] for k in inner)
        out["rest of step"] = total - sum(out.values())
        return {k: out[k] for k in SPLIT_ORDER}


def split_of(runs: dict[str, Run], steps: int) -> dict[str, dict[str, float]]:
    """{config: {part: median seconds over the instrumented steps}} of the SPLIT_CONFIGS that ran,
    their steps interleaved one by one. Medians per part, so a step slowed by other processes
    does not skew a part; the parts then add up to about, not exactly, a median step."""
    splits = {name: Split(runs[name].cfg.device) for name in SPLIT_CONFIGS if name in runs}
    got: dict[str, list[dict[str, float]]] = {name: [] for name in splits}
    for _ in range(steps):
        for name, split in splits.items():
            with split.installed(runs[name]):
                w, t = runs[name].step()
            got[name].append(split.take(w, t))
    return {name: {part: statistics.median(x[part] for x in got[name]) for part in SPLIT_ORDER} for name in got}


# ----------------------------------------------------------------------------- memory, one process each


def _vm(field: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process, MiB. getrusage's ru_maxrss would do, but a
    spawned child inherits the parent's peak through exec; VmHWM is this process's own."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _peak_memory(cfg: TrainConfig, threads: int) -> dict[str, float]:
    """In a fresh process: `train(cfg)` (a few steps, the final save included); MiB."""
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    start = _vm("VmRSS")  # torch, transformers and kvdistill imported
    loop.train(cfg, progress=False)
    peak = _vm("VmHWM")
    cuda = torch.cuda.max_memory_allocated() / 2**20 if cfg.device == "cuda" else None
    return {"rss_peak_mib": peak, "rss_above_start_mib": peak - start, "cuda_peak_mib": cuda}


def peak_memory(cfg: TrainConfig, steps: int) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, max_steps=steps, out=cfg.out + "-memory")
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_peak_memory, cfg, torch.get_num_threads()).result()


# ----------------------------------------------------------------------------- one size


def measure(root: Path, size: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    student = build_store(root, size, args.samples, args.device)
    print(f"[{size}] models and store built in {time.perf_counter() - t0:.0f}s", flush=True)
    cfgs = {name: train_config(root, student, name, args.device, args.batch_size) for name in args.configs}
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=loop.mixed_precision(cfgs[args.configs[0]]))
    runs = {name: Run(cfg, accelerator) for name, cfg in cfgs.items()}
    for run in runs.values():  # warm-up: fills the shuffle buffer, allocates the optimizer state
        for _ in range(args.warmup):
            run.step()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got = [runs[name].step() for _ in range(args.steps)]
            rounds[name].append(
                {"s": statistics.fmean(t for _, t in got), "wait": statistics.fmean(w for w, _ in got)}
            )
        print(
            f"[{size}] round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {rounds[n][-1]['s']:.3f}" for n in names),
            flush=True,
        )
    base = "a" if "a" in runs else names[0]
    rows = {}
    for name in names:
        s = [x["s"] for x in rounds[name]]
        rows[name] = {
            "what": CONFIGS[name][0],
            "s_per_step": statistics.median(s),
            "s_min": min(s),
            "s_max": max(s),
            "vs_a": statistics.median(x["s"] / y["s"] for x, y in zip(rounds[name], rounds[base], strict=True)),
            "vs_a_best": min(s) / min(x["s"] for x in rounds[base]),
            "wait": statistics.median(x["wait"] for x in rounds[name]),
            "wait_share": statistics.median(x["wait"] / x["s"] for x in rounds[name]),
            "rounds": rounds[name],
        }
    if "b" in runs and "b-gc" in runs:
        rows["b-gc"]["vs_b"] = statistics.median(
            x["s"] / y["s"] for x, y in zip(rounds["b-gc"], rounds["b"], strict=True)
        )
    split = split_of(runs, args.split_steps) if args.split_steps else {}
    del runs
    if args.memory_steps:
        for name in [n for n in args.memory_configs if n in cfgs]:
            rows[name].update(peak_memory(cfgs[name], args.memory_steps))
        print(f"[{size}] memory measured", flush=True)
    return {
        "size": size,
        "geometry": SIZES[size],
        "rows": rows,
        "split": split,
        "base": base,
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    g = result["geometry"]["student"]
    teachers = ", ".join(
        f"{n} {t['arch']} {t['layers']}x{t['hidden']} (K/V {t['kv_heads'] * t['head_dim']} wide)"
        for n, t in result["geometry"]["teachers"].items()
    )
    lines = [
        (
            f"### {result['size']} student: {g['arch']} {g['layers']} layers, hidden {g['hidden']}, {g['heads']} q /"
            f" {g['kv_heads']} kv heads, head_dim {g['head_dim']}; teachers {teachers}"
        ),
        "",
        (
            "| config | what | s/step | min-max | vs a | vs a, best of rounds | data wait | wait / step | peak RSS MiB"
            " | RSS above start MiB | peak device MiB |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        mem = (
            f"{r['rss_peak_mib']:,.0f} | {r['rss_above_start_mib']:,.0f} | "
            + (f"{r['cuda_peak_mib']:,.0f}" if r.get("cuda_peak_mib") is not None else "-")
            if "rss_peak_mib" in r
            else "- | - | -"
        )
        lines.append(
            f"| {name} | {r['what']} | {r['s_per_step']:.3f} | {r['s_min']:.3f}-{r['s_max']:.3f} | {r['vs_a']:.2f}x |"
            f" {r['vs_a_best']:.2f}x | {r['wait'] * 1e3:.1f} ms | {r['wait_share']:.1%} | {mem} |"
        )
    split = result["split"]
    if split:
        names = list(split)
        totals = {n: sum(split[n].values()) for n in names}
        lines += [
            "",
            f"Split of a step (median per part over {args.split_steps} instrumented steps each, interleaved; sum of"
            " the parts " + ", ".join(f"{n} {totals[n]:.3f}" for n in names) + "):",
            "",
            "| part | "
            + " | ".join(f"{n} s/step | {n} share" for n in names)
            + (" | b - a |" if names == ["a", "b"] else ""),
            "|---|" + "---:|---:|" * len(names) + ("---:|" if names == ["a", "b"] else ""),
        ]
        for part in SPLIT_ORDER:
            cells = " | ".join(f"{split[n][part]:.4f} | {split[n][part] / totals[n]:.1%}" for n in names)
            diff = f" {split['b'][part] - split['a'][part]:+.4f} |" if names == ["a", "b"] else ""
            lines.append(f"| {part} | {cells} |{diff}")
    return "\n".join(lines)


def targets(result: dict[str, Any], device: str) -> list[str]:
    rows, out = result["rows"], []
    limit = 1.10 if device == "cuda" else 1.15
    if "b" in rows and result["base"] == "a" and (result["size"] == "large" or device == "cuda"):
        r, best = rows["b"]["vs_a"], rows["b"]["vs_a_best"]
        out.append(
            f"b <= {limit:.2f}x a ({result['size']} student, {device}): {r:.2f}x (median of paired rounds; best of"
            f" rounds {best:.2f}x)  {'met' if r <= limit else 'MISSED'}"
        )
    for name in ("a", "b"):
        if name in rows:
            w = rows[name]["wait_share"]
            out.append(
                f"data wait <= 5% of a step ({name}, {result['size']}): {w:.1%}  {'met' if w <= 0.05 else 'MISSED'}"
            )
    if "vs_b" in rows.get("b-gc", {}):
        gc, b = rows["b-gc"], rows["b"]
        mem = f", peak RSS {gc['rss_peak_mib']:,.0f} vs {b['rss_peak_mib']:,.0f} MiB" if "rss_peak_mib" in gc else ""
        mem += (
            f", peak device {gc['cuda_peak_mib']:,.0f} vs {b['cuda_peak_mib']:,.0f} MiB"
            if gc.get("cuda_peak_mib") is not None
            else ""
        )
        out.append(f"gradient checkpointing ({result['size']}): {gc['vs_b']:.2f}x the s/step of b{mem}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,large", help=f"comma-separated subset of {list(SIZES)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--steps", type=int, default=1, help="steps of a configuration per round")
    p.add_argument("--repeats", type=int, default=10, help="rounds over the configurations (medians over rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of every configuration first")
    p.add_argument(
        "--split-steps", type=int, default=8, help="instrumented steps of a and b each for the split (0: skip)"
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        help="steps of train() per configuration in its own process for peak memory (0: skip)",
    )
    p.add_argument(
        "--memory-configs", default=None, help="configurations whose memory is measured (default: every one run)"
    )
    p.add_argument("--batch-size", type=int, default=TrainConfig.__dataclass_fields__["batch_size"].default)
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples in the store (default: enough that no configuration starts a second epoch)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: demo student, 3 rounds of 1 step, memory of a, b and b-gc only",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--dir", type=Path, default=None, help="where to write models, stores and runs (default: a temp dir, removed)"
    )
    args = p.parse_args()
    if args.quick:
        args.sizes, args.steps, args.repeats, args.warmup, args.split_steps = "demo", 1, 3, 1, 2
        args.memory_configs = args.memory_configs or "a,b,b-gc"
    args.configs = [c for c in args.configs.split(",") if c]
    args.memory_configs = [c for c in (args.memory_configs or ",".join(args.configs)).split(",") if c]
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [c for c in args.configs + args.memory_configs if c not in CONFIGS] + [
        s for s in sizes if s not in SIZES
    ]
    if unknown:
        p.error(f"unknown configuration / size {unknown}; configurations: {list(CONFIGS)}, sizes: {list(SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    # Enough samples that b (warm-up, rounds and the split) stays in its first epoch.
    args.samples = args.samples or max(
        128, args.batch_size * (args.warmup + args.repeats * args.steps + args.split_steps + 1)
    )
    hf_logging.disable_progress_bar()
    print(
        f"bench/train.py: {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.samples}"
        f" samples; {args.repeats} rounds x {args.steps} steps per configuration after {args.warmup} warm-up steps;"
        f" load average {os.getloadavg()}",
        flush=True,
    )
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvdistill-bench-train-"))
    results = []
    try:
        for size in sizes:
            results.append(measure(root / size, size, args))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at the end {os.getloadavg()}\n")
    for r in results:
        print(markdown(r, args) + "\n")
    print("targets")
    for r in results:
        for line in targets(r, args.device):
            print("  " + line)
    if args.out:
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
