"""The compact store: bytes per token against fidelity, decode rate and distillation gain kept,
for every storage option side by side (issue: a store a lab can afford).

An option is a codec (store/codecs.py) and a PCA projection keeping a fraction of each
teacher's K/V width per student layer (`kvdistill align calibrate --pca D` fits it,
`kvdistill dump --projection` applies it). Three measurements, three subcommands:

  frontier  on REAL pretrained K/V (SmolLM2-135M-Instruct on GSM8K: `python bench/fetch_real.py`
            first): per option the bytes per token at a 7B -> 0.5B geometry (Qwen2-7B's 4 KV
            heads x 128 on Qwen2.5-0.5B's 24 layers: raw 16-bit is 49,152 B), the bytes the
            store's compressor actually writes for these codes (measured on the real K/V, as a
            ratio), the explained variance and the relative Frobenius error of K and V on held-out
            tokens, and the training stream's rate per CPU core (read + decompress + collate;
            tokens per CPU-second, one teacher) on a store of that geometry.
  stores    the embedded default's teachers (`kvdistill demo`) dumped again through each
            fraction's PCA and a codec into DEMO/store-pca<f>-<codec>.zarr, plus the compare
            config that trains kv-fixed from each (same data, seeds and steps as kv-fixed).
  gain      from that compare's compare.json: each compact arm's gain over ce as a fraction of
            the float16 store's gain (kv-fixed), per seed paired, with a 95% bootstrap CI over
            seeds, on accuracy and on perplexity.

    python bench/fetch_real.py --out real
    OMP_NUM_THREADS=1 python bench/compact.py frontier --model real/smollm2-135m --data real/gsm8k/train.jsonl
    OMP_NUM_THREADS=1 python bench/compact.py stores --demo-out demo-out --fractions 8,16 --codec int4
    OMP_NUM_THREADS=1 kvdistill compare --config demo-out/compare-compact.yaml      # or split over 2 processes:
    #   ... --out cmp-a --arms ce,kv-pca16-int4  and  ... --out cmp-b --arms kv-fixed,kv-pca8-int4 --baseline kv-fixed
    python bench/compact.py gain --compare cmp-a,cmp-b
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvdistill.schemas import AlignSpec, DataSpec, KVGeometry, ModelSpec, StoreSpec, TeacherSpec
from kvdistill.store import ShardWriter, codecs, finalize, init_store, init_teacher

# The geometry the bytes are quoted at: a 7B-class teacher onto a 0.5B-class student.
TEACHER_7B = KVGeometry(num_layers=28, num_kv_heads=4, head_dim=128)  # Qwen2-7B-Instruct
STUDENT_05B = KVGeometry(num_layers=24, num_kv_heads=2, head_dim=64)  # Qwen2.5-0.5B
FRACTIONS = (1, 4, 8, 16, 32)  # kept width = width / fraction (1: no projection)
CODECS = ("float16", "bfloat16", "int8", "int4")


def option_name(fraction: int, codec: str) -> str:
    return f"{codec}" if fraction == 1 else f"pca/{fraction}-{codec}"


def bytes_per_token(codec: str, layers: int, width: int) -> float:
    """Raw stored bytes of one token's K and V (codes, scales, zeros), one teacher."""
    return codecs.bytes_per_row(codec, layers, width, part="k") + codecs.bytes_per_row(codec, layers, width, part="v")


# ----------------------------------------------------------------------------- frontier


def real_kv(model: str, data: str, samples: int, student_layers: int, batch: int = 16) -> tuple[dict, np.ndarray]:
    """Pre-RoPE K and V of a real model teacher-forced on GSM8K rows (the product's capture and
    prompt template), ratio-layer-mapped onto `student_layers` student layers: {"k", "v"}
    [tokens, L_s, D] float32, and the sample boundaries (token offsets)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvdistill.align.layers import apply_layer_map, ratio_layer_map
    from kvdistill.core.capture import forward_kv
    from kvdistill.core.data import load_examples
    from kvdistill.core.prompts import encode, pad_batch
    from kvdistill.schemas import DEFAULT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    enc = [encode(tok, DEFAULT_TEMPLATE, ex) for ex in load_examples(DataSpec(source=data, limit=samples))]
    W = ratio_layer_map(m.config.num_hidden_layers, student_layers)
    ks, vs, lens = [], [], []
    with torch.inference_mode():
        for i in range(0, len(enc), batch):
            ids, mask = pad_batch([e.input_ids for e in enc[i : i + batch]], tok.pad_token_id or 0)
            k, v = forward_kv(m, ids, mask)
            for j, e in enumerate(enc[i : i + batch]):
                ks.append(apply_layer_map(W, k[j, : len(e)].float()))
                vs.append(apply_layer_map(W, v[j, : len(e)].float()))
                lens.append(len(e))
    return {"k": torch.cat(ks).numpy(), "v": torch.cat(vs).numpy()}, np.concatenate([[0], np.cumsum(lens)])


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm((got - want).ravel()) / np.linalg.norm(want.ravel()))


def int2_simulated(part: str, x: np.ndarray) -> np.ndarray:
    """What a 2-bit codec would give (not a store codec: the frontier asks whether one would
    help): int4's layout (asymmetric min / max, keys per channel over 32 rows, values per token
    over 32 channels) with 4 levels instead of 16."""
    n, _, D = x.shape
    g = codecs._groups(x, part)
    axis = 1 if part == "k" else 3
    lo, hi = g.min(axis=axis), g.max(axis=axis)
    zero, scale = codecs._expand(lo, part, n, D), codecs._expand((hi - lo) / 3, part, n, D)
    q = np.clip(np.rint(np.divide(x - zero, scale, out=np.zeros_like(x), where=scale > 0)), 0, 3)
    return zero + scale * q


def int2_bytes_per_token(layers: int, width: int) -> float:
    """2 bits a code, plus int4's scale and zero arrays."""
    scales = {p: codecs.bytes_per_row("int4", layers, width, part=p) - layers * -(-width // 2) for p in "kv"}
    return 2 * layers * -(-width // 4) + sum(scales.values())


def stored_bytes(codec: str, k: np.ndarray, v: np.ndarray, offsets: np.ndarray) -> int:
    """Bytes on disk of K/V as the store writes them (ShardWriter: codec + blosc-zstd)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        _store(path, codec, [(k, v, offsets)])
        kv_arrays = {f"{p}{suffix}" for p in "kv" for suffix in ("", "_scale", "_zero")}
        return sum(
            f.stat().st_size for f in (path / "teachers" / "t").rglob("*") if f.is_file() and kv_arrays & set(f.parts)
        )


def _store(path: Path, codec: str, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """A finalized one-teacher store of the given K/V (one shard per entry, samples at offsets)."""
    _, L, D = shards[0][0].shape
    geom = KVGeometry(num_layers=L, num_kv_heads=1, head_dim=D)
    init_store(
        path,
        StoreSpec(
            student=ModelSpec("bench"),
            geometry=geom,
            tokenizer_fingerprint="bench",
            data=DataSpec(),
            data_fingerprint="bench",
            num_shards=len(shards),
            kv_dtype=codec,
        ),
    )
    eye = [[float(i == j) for j in range(L)] for i in range(L)]
    init_teacher(
        path,
        TeacherSpec(
            name="t",
            model=ModelSpec("bench"),
            geometry=geom,
            align=AlignSpec(),
            time_map="identity",
            layer_map=eye,
            width=D,
            fingerprint="bench",
            kv_dtype=codec,
        ),
    )
    for s, (k, v, offsets) in enumerate(shards):
        with ShardWriter(path, "t", s, num_layers=L, width=D, codec=codec) as w:
            for j in range(len(offsets) - 1):
                a, b = int(offsets[j]), int(offsets[j + 1])
                w.write(f"s{s}-{j}", k[a:b], v[a:b], np.zeros(b - a, np.int32), np.ones(b - a, np.bool_))
    finalize(path)


def stream_rate(codec: str, width: int, evr: np.ndarray, tokens: int = 200_000, sample_len: int = 200) -> dict:
    """The training stream over one teacher's store at the 7B -> 0.5B geometry (24 layers x
    `width`; values Gaussian with the real per-component variances `evr` [width], so codes and
    compression behave like projected K/V): tokens per CPU-second (the process's CPU time, its
    read threads included) and per wall second; and the trainer's dequantisation of the same
    batches on this CPU (train/quant.py; on a GPU it runs there)."""
    from kvdistill.train.quant import kv_to_device
    from kvdistill.train.stream import KVStream, collate

    L = STUDENT_05B.num_layers
    rng = np.random.default_rng(0)
    tokens = min(tokens, int(4e8) // (2 * L * width * 4))  # the float32 source within ~400 MB
    n = max(8, tokens // sample_len)
    scale = np.sqrt(np.resize(evr, width)).astype(np.float32) * 4
    k = rng.standard_normal((n * sample_len, L, width), dtype=np.float32) * scale
    v = rng.standard_normal((n * sample_len, L, width), dtype=np.float32) * scale
    offsets = np.arange(n + 1) * sample_len
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        _store(path, codec, [(k, v, offsets)])
        del k, v
        cpu0, t0 = time.process_time(), time.perf_counter()
        batches, rows = [], 0
        batch = []
        for sample in KVStream(path, ["t"], shuffle_buffer=1, kv_as_stored=True):
            batch.append(sample)
            if len(batch) == 16:
                batches.append(collate(batch, 0))
                rows += sum(len(b["input_ids"]) for b in batch)
                batch = []
                if len(batches) > 4:  # keep a few for the dequant timing, let the rest go
                    batches.pop(0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        d0 = time.perf_counter()
        for b in batches:
            kv_to_device(b["kv"], torch.device("cpu"))
        deq = time.perf_counter() - d0
        deq_rows = sum(int(b["attention_mask"].sum()) for b in batches)
    return {
        "tokens": rows,
        "per_cpu_second": rows / cpu,
        "per_wall_second": rows / wall,
        "dequant_cpu_tokens_per_s": deq_rows / deq,
    }


def frontier(args: argparse.Namespace) -> None:
    from kvdistill.align.projection import fit_layer_pca, project_layers, reconstruct_layers

    t0 = time.perf_counter()
    kv, offsets = real_kv(args.model, args.data, args.samples, STUDENT_05B.num_layers)
    n_cal = int(offsets[len(offsets) // 2])  # PCA on the first half of the samples, errors on the rest
    print(
        f"[frontier] {args.model}: {len(offsets) - 1} samples, {offsets[-1]:,} tokens, K/V {kv['k'].shape[1:]} after"
        f" the ratio layer map; PCA fitted on {n_cal:,} tokens ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    D_real, D_7b = kv["k"].shape[-1], TEACHER_7B.width
    held = {p: kv[p][n_cal:] for p in "kv"}
    held_offsets = offsets[len(offsets) // 2 :] - n_cal
    rows = []
    print(HEADER)
    for f in FRACTIONS:
        d = D_real // f
        fits = {}
        for p in "kv":
            if f == 1:
                fits[p] = None
                continue
            mean, comp, evr = fit_layer_pca(torch.from_numpy(kv[p][:n_cal]), d)
            fits[p] = (mean.float(), comp.float(), evr.numpy())
        for codec in CODECS:
            r = {"option": option_name(f, codec), "fraction": f, "codec": codec, "dim_real": d, "dim_7b": D_7b // f}
            coords = {}
            for p in "kv":
                x = held[p]
                y = x if fits[p] is None else project_layers(torch.from_numpy(x), *fits[p][:2]).numpy()
                q = codecs.decode(codec, p, codecs.encode(codec, p, y), 0, y.shape[-1])
                back = q if fits[p] is None else reconstruct_layers(torch.from_numpy(q), *fits[p][:2]).numpy()
                r[f"err_{p}"] = rel_err(back, x)
                r[f"ev_{p}"] = 1.0 if fits[p] is None else float(fits[p][2].sum(-1).mean())
                coords[p] = y
            raw = bytes_per_token(codec, STUDENT_05B.num_layers, d) * len(held["k"])
            r["compression"] = raw / stored_bytes(codec, coords["k"], coords["v"], held_offsets)
            r["bytes_7b_raw"] = bytes_per_token(codec, STUDENT_05B.num_layers, D_7b // f)
            r["bytes_7b_disk"] = r["bytes_7b_raw"] / r["compression"]
            evr = fits["k"][2].mean(0) if fits["k"] is not None else np.ones(1, np.float32)
            r.update(
                {f"stream_{k}": v for k, v in stream_rate(codec, D_7b // f, evr, tokens=args.stream_tokens).items()}
            )
            rows.append(r)
            print(_row(r), flush=True)
    for f in (4, 8, 16, 32):  # a 2-bit codec, simulated: would twice the dims at int4's bytes help?
        d = D_real // f
        r = {
            "option": f"pca/{f}-int2 (simulated)",
            "fraction": f,
            "codec": "int2 (simulated)",
            "dim_real": d,
            "dim_7b": D_7b // f,
        }
        for p in "kv":
            mean, comp, evr = fit_layer_pca(torch.from_numpy(kv[p][:n_cal]), d)
            y = project_layers(torch.from_numpy(held[p]), mean.float(), comp.float()).numpy()
            back = reconstruct_layers(torch.from_numpy(int2_simulated(p, y)), mean.float(), comp.float()).numpy()
            r[f"err_{p}"], r[f"ev_{p}"] = rel_err(back, held[p]), float(evr.sum(-1).mean())
        r["bytes_7b_raw"] = r["bytes_7b_disk"] = int2_bytes_per_token(STUDENT_05B.num_layers, D_7b // f)
        r["compression"] = 1.0
        rows.append(r)
        print(_row(r), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "data": args.data,
                "samples": args.samples,
                "tokens": int(offsets[-1]),
                "held_out_tokens": int(len(held["k"])),
                "geometry_7b": {"teacher": TEACHER_7B.to_dict(), "student": STUDENT_05B.to_dict()},
                "options": rows,
            },
            indent=1,
        )
    )
    print(f"[frontier] wrote {out} ({time.perf_counter() - t0:.0f}s)")


HEADER = (
    f"{'option':<20} {'dim 7B':>6} {'B/tok raw':>9} {'B/tok disk':>10} {'x smaller':>9} {'EV K':>5} {'EV V':>5} "
    f"{'err K':>6} {'err V':>6} {'tok/s/core':>10} {'dequant tok/s':>13}"
)


def _row(r: dict) -> str:
    return (
        f"{r['option']:<20} {r['dim_7b']:>6} {r['bytes_7b_raw']:>9,.0f} {r['bytes_7b_disk']:>10,.0f}"
        f" {49152 / r['bytes_7b_disk']:>8.1f}x {r['ev_k']:>5.3f} {r['ev_v']:>5.3f} {r['err_k']:>6.3f}"
        f" {r['err_v']:>6.3f} {_rate(r, 'stream_per_cpu_second'):>10}"
        f" {_rate(r, 'stream_dequant_cpu_tokens_per_s'):>13}"
    )


def _rate(r: dict, key: str) -> str:
    return f"{r[key]:,.0f}" if key in r else "-"


# ----------------------------------------------------------------------------- stores


def stores(args: argparse.Namespace) -> None:
    """Dump the demo's teachers through PCA (width / fraction, fitted under the dump's ratio
    layer map on 64 training samples) and a codec; write the compare config."""
    import yaml

    from kvdistill.dump.calibrate import calibrate
    from kvdistill.jobs.local import dump_tasks, run_local
    from kvdistill.schemas import CalibrateConfig, DemoConfig, DumpConfig, TrainConfig
    from kvdistill.store import inspect

    demo = Path(args.demo_out)
    cfg = DemoConfig.load(demo / "demo_config.yaml")
    student = TrainConfig.load(demo / "runs" / "student-ce" / "train_config.yaml").student
    done = json.loads((demo / "summary.json").read_text())
    teachers = [ModelSpec(name_or_path=str(demo / "models" / t), name=t) for t in done["store"]["teachers"]]
    arms = {}
    for f in [int(x) for x in args.fractions.split(",")]:
        store = demo / f"store-pca{f}-{args.codec}.zarr"
        tasks = []
        for t in teachers:
            width = json.loads((Path(t.name_or_path) / "config.json").read_text())
            D = width.get("num_key_value_heads") * (
                width.get("head_dim") or width["hidden_size"] // width["num_attention_heads"]
            )
            out = demo / "pca" / f"{t.name}-pca{f}" / "layermap.json"
            if not out.with_name(f"layermap-pca{D // f}.npz").exists():
                calibrate(
                    CalibrateConfig(
                        teacher=t,
                        student=student,
                        data=cfg.data,
                        samples=64,
                        out=str(out),
                        pca=D // f,
                        pca_layer_map="ratio",
                        device="cpu",
                    ),
                    progress=False,
                )
            base = DumpConfig(
                teacher=t,
                student=student,
                store=str(store),
                data=cfg.data,
                num_shards=cfg.num_shards,
                batch_size=64,
                device="cpu",
                kv_dtype=args.codec,
                align=AlignSpec(projection=str(out.with_name(f"layermap-pca{D // f}.npz"))),
            )
            tasks += dump_tasks(base, [t])
        run_local(tasks, progress=True)
        finalize(store)
        info = inspect(store)
        print(f"[stores] {store}: {info['bytes_per_token']:.1f} bytes per token on disk (all teachers)", flush=True)
        arms[f"kv-pca{f}-{args.codec}"] = {"fusion": "fixed", "store": str(store)}
    compare = {
        "out": args.compare_out,
        "arms": ["ce", "kv-fixed", *arms],
        "arm_overrides": arms,
        "seeds": args.seeds,
        "demo": {"out": str(demo)},
    }
    path = demo / "compare-compact.yaml"
    path.write_text(yaml.safe_dump(compare, sort_keys=False))
    print(f"[stores] wrote {path}: kvdistill compare --config {path}")


# ----------------------------------------------------------------------------- gain


def gain(args: argparse.Namespace) -> None:
    """(arm - ce) / (kv-fixed - ce), per seed paired, with a 95% bootstrap CI over seeds."""
    arms: dict = {}
    for folder in args.compare.split(","):  # compares may split the arms (one process each)
        arms.update(json.loads((Path(folder) / "compare.json").read_text())["arms"])

    def per_seed(arm: str, metric: str) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in arms[arm]["runs"]}

    rng = np.random.default_rng(0)
    print(f"{'arm':<22} {'metric':<11} {'gain':>8} {'float16 gain':>12} {'kept':>6} {'95% CI':>16} {'seeds':>5}")
    for name in arms:
        if name in ("ce", "kv-fixed"):
            continue
        for metric, sign in (("accuracy", 1), ("perplexity", -1)):
            ce, full, arm = per_seed("ce", metric), per_seed("kv-fixed", metric), per_seed(name, metric)
            seeds = sorted(set(ce) & set(full) & set(arm))
            g_arm = sign * np.array([arm[s] - ce[s] for s in seeds])
            g_full = sign * np.array([full[s] - ce[s] for s in seeds])
            boots = []
            for _ in range(args.bootstrap):
                i = rng.integers(0, len(seeds), len(seeds))
                if g_full[i].mean() > 0:
                    boots.append(g_arm[i].mean() / g_full[i].mean())
            lo, hi = np.percentile(boots, [2.5, 97.5])
            print(
                f"{name:<22} {metric:<11} {g_arm.mean():>+8.3f} {g_full.mean():>+12.3f}"
                f" {g_arm.mean() / g_full.mean():>6.2f} {f'[{lo:.2f}, {hi:.2f}]':>16} {len(seeds):>5}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("frontier", help="bytes / error / decode rate per option on real K/V")
    f.add_argument(
        "--model", required=True, help="a local transformers folder (bench/fetch_real.py writes real/smollm2-135m)"
    )
    f.add_argument("--data", required=True, help="GSM8K-format JSONL (real/gsm8k/train.jsonl)")
    f.add_argument("--samples", type=int, default=128)
    f.add_argument("--stream-tokens", type=int, default=100_000, help="tokens in each decode-rate store")
    f.add_argument("--out", default="bench-out/compact-frontier.json")
    f.set_defaults(func=frontier)
    s = sub.add_parser("stores", help="the demo's teachers dumped compactly + a compare config")
    s.add_argument("--demo-out", default="demo-out")
    s.add_argument("--fractions", default="8,16")
    s.add_argument("--codec", default="int4", choices=CODECS)
    s.add_argument("--seeds", type=int, default=10)
    s.add_argument("--compare-out", default="cmp-compact")
    s.set_defaults(func=stores)
    g = sub.add_parser("gain", help="distillation gain kept, from a compare run")
    g.add_argument(
        "--compare",
        default="cmp-compact",
        help="compare folder(s), comma-separated, holding ce, kv-fixed and the compact arms",
    )
    g.add_argument("--bootstrap", type=int, default=10_000)
    g.set_defaults(func=gain)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
