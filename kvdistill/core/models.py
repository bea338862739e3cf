"""Loading models and tokenizers by hub id or local path (the same `from_pretrained` call),
devices, and fingerprints that pin down exactly which model / tokenizer produced a store."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvdistill.schemas import ModelSpec

__all__ = [
    "resolve_device", "load_model", "load_config", "load_tokenizer", "require_eos", "tokenizer_fingerprint", "model_fingerprint",
    "tokenizer_files", "tokenizer_from_files",
]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_source(spec: ModelSpec) -> None:
    """A path that does not exist is a clear error, not a confusing hub lookup."""
    p = spec.name_or_path
    if p.startswith(("/", ".", "~")) and not Path(p).expanduser().exists():
        raise FileNotFoundError(f"model {p} does not exist; give an existing checkpoint directory or a hub id (org/name)")


def load_config(spec: ModelSpec):
    _check_source(spec)
    return AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision)


def load_model(spec: ModelSpec, device: torch.device | str = "cpu"):
    """A causal LM in eval mode, in spec.dtype, on `device` (hub id or local directory)."""
    _check_source(spec)
    model = AutoModelForCausalLM.from_pretrained(
        spec.name_or_path, revision=spec.revision, dtype=getattr(torch, spec.dtype)
    )
    return model.to(device).eval()


def load_tokenizer(spec: ModelSpec):
    _check_source(spec)
    tok = AutoTokenizer.from_pretrained(spec.name_or_path, revision=spec.revision)
    if not tok.is_fast:
        raise ValueError(
            f"{spec.name_or_path}: tokenizer {type(tok).__name__} is a slow tokenizer without "
            "character offsets; kvdistill needs a fast (tokenizers-backed) tokenizer"
        )
    return tok


def tokenizer_files(tok) -> dict[str, bytes]:
    """The files `save_pretrained` writes for `tok` ({file name: bytes}): what a store records so
    the tokenizer loads again without its checkpoint (`tokenizer_from_files`)."""
    with tempfile.TemporaryDirectory(prefix="kvdistill-tok-") as d:
        tok.save_pretrained(d)
        return {f.name: f.read_bytes() for f in sorted(Path(d).iterdir()) if f.is_file()}


def tokenizer_from_files(files: dict[str, bytes]):
    """The fast tokenizer `tokenizer_files` recorded (loaded from a temporary directory, offline)."""
    with tempfile.TemporaryDirectory(prefix="kvdistill-tok-") as d:
        for name, data in files.items():
            (Path(d) / Path(name).name).write_bytes(data)
        return AutoTokenizer.from_pretrained(d)


def require_eos(tok, role: str, spec: ModelSpec) -> None:
    """Every sample ends with EOS (so the student learns to stop, and batches pad with it when
    there is no pad token): a tokenizer without one is refused, naming whose it is."""
    if tok.eos_token_id is None:
        raise ValueError(
            f"the {role} tokenizer ({spec.name_or_path}) has no eos_token; every sample ends with EOS so generation "
            "can stop. Add one to the tokenizer (tokenizer.eos_token = '...' or add_special_tokens({'eos_token': ...}), "
            "then save_pretrained), or use another tokenizer"
        )


def pad_token_id(tok) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Texts that exercise digits, spaces, newlines, punctuation and non-ASCII characters.
_PROBES = [
    "Question: Mia has 1,234 apples.\nReasoning:\n7+15=<<7+15=22>>22\n#### 22",
    "  two  spaces,\ttabs\r\nand   runs... ¿Qué? naïve café 東京 👍 $3.50 -7 1e5",
    "The answer is 42. 'll 's 're <|endoftext|>",
]


def tokenizer_fingerprint(tok) -> str:
    """What the tokenizer *does*: its vocabulary, special tokens and the ids it gives a set of
    probe texts. Two tokenizers with one fingerprint tokenize alike, however they were loaded
    (transformers may rebuild a hub tokenizer in another class)."""
    probes = [tok(t, add_special_tokens=False)["input_ids"] for t in _PROBES]
    return _sha([sorted(tok.get_vocab().items()), tok.eos_token, tok.pad_token, probes])


def model_fingerprint(model, spec: ModelSpec, extra=None) -> str:
    """Config + revision + prompt template + a sample of every weight tensor + `extra`."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(_sha([spec.revision, spec.prompt_template, spec.dtype, extra]).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
