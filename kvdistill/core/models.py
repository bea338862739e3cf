"""Loading models and tokenizers by hub id or local path (the same `from_pretrained` call),
devices, and fingerprints that pin down exactly which model / tokenizer produced a store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvdistill.schemas import ConfigError, ModelSpec

__all__ = [
    "resolve_device",
    "load_model",
    "load_config",
    "load_tokenizer",
    "require_eos",
    "tokenizer_fingerprint",
    "model_fingerprint",
    "tokenizer_files",
    "tokenizer_from_files",
]


def resolve_device(device: str) -> torch.device:
    """--device as a torch device, the one rule of every stage (dump, calibrate, train, diagnose,
    eval): "auto" is the GPU when torch sees one, else the CPU; "cpu", "cuda", "cuda:N" as written
    (an index is kept). A CUDA device torch does not see is refused here, naming the fix, rather
    than at the first tensor moved ("Torch not compiled with CUDA enabled")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        got = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r}: not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if got.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA device here; use --device cpu (or auto)")
    if got.type == "cuda" and got.index is not None and got.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...); "
            "pick one of them, or check CUDA_VISIBLE_DEVICES"
        )
    return got


# What marks a folder as holding a model's parts (for the messages that say which is missing).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_source(spec: ModelSpec, role: str | None, need: str) -> None:
    """Refuse, naming the role and the path, what from_pretrained would refuse confusingly: a
    local path that does not exist (it would be looked up on the hub: "couldn't connect"), a
    file, a folder that holds no model (it would ask for sentencepiece). `need`: what the caller
    reads from a folder, "config", "tokenizer" or "model" (config and weights)."""
    p = spec.name_or_path
    path = Path(p).expanduser()
    if not path.exists():
        if p.startswith(("/", ".", "~")) or "\\" in p:  # a path, never a hub id
            raise FileNotFoundError(
                f"{role or 'model'} {p}: no such folder; give an existing checkpoint folder or a hub id (org/name)"
            )
        return  # maybe a hub id: from_pretrained fetches it, _fetching explains a failure
    who = f"{role or 'model'} {p}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{who}: a file, not a checkpoint folder; give the folder that holds config.json, the tokenizer and the"
            " weights"
        )
    names = sorted(f.name for f in path.iterdir())
    has_config = "config.json" in names
    has_tokenizer = any(n in names for n in _TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names)
    has_weights = any(next(iter(path.glob(w)), None) is not None for w in _WEIGHTS)
    fix = "give a checkpoint folder (config.json, the tokenizer and the weights, as save_pretrained writes them)"
    held = f"it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else "it is empty"
    if not has_config and not has_tokenizer and not has_weights:
        raise FileNotFoundError(
            f"{who}: the folder holds no model (no config.json, no tokenizer, no weights: {held}); {fix}"
        )
    if need == "tokenizer" and not has_tokenizer:
        raise FileNotFoundError(
            f"{who}: the folder holds no tokenizer (no tokenizer.json or tokenizer_config.json: {held}); "
            "save the tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )
    if need in ("config", "model") and not has_config:
        raise FileNotFoundError(f"{who}: the folder holds no config.json ({held}); {fix}")
    # Weights missing beside a config: from_pretrained's own message names the file it looked for.


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@contextlib.contextmanager
def _fetching(spec: ModelSpec, role: str | None):
    """from_pretrained of a name that is no local folder, so a hub id: its failure to fetch said
    as what it is, naming the role and the name (transformers says "couldn't connect to the hub"
    even offline, and never names the path)."""
    try:
        yield
    except OSError as e:
        p = spec.name_or_path
        if Path(p).expanduser().exists():
            raise
        causes = list(_causes(e))
        who = f"{role or 'model'} {p}: no such folder"
        if any(isinstance(c, HFValidationError) for c in causes):
            raise FileNotFoundError(
                f"{who}, and not a hub id (name or org/name); give an existing checkpoint folder or a hub id"
            ) from e
        if any(isinstance(c, RepositoryNotFoundError) and not isinstance(c, GatedRepoError) for c in causes):
            raise FileNotFoundError(
                f"{who}, and the hub has no repo {p} (a private one needs `hf auth login`); give an existing"
                " checkpoint folder or a hub id"
            ) from e
        if any(isinstance(c, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for c in causes):
            if hf_constants.is_offline_mode():
                raise FileNotFoundError(
                    f"{who}, and not a hub id that can be fetched offline (HF_HUB_OFFLINE is set and the hub cache"
                    " holds no copy); give an existing checkpoint folder, or fetch it once online"
                ) from e
            raise FileNotFoundError(
                f"{who}, and it could not be fetched from the hub (no connection, and the hub cache holds no copy); "
                "give an existing checkpoint folder, or check the network"
            ) from e
        raise


def load_config(spec: ModelSpec, role: str | None = None):
    """The model's config. `role` ("teacher", "student", "model") names it in errors."""
    _check_source(spec, role, "config")
    with _fetching(spec, role):
        return AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision)


def load_model(spec: ModelSpec, device: torch.device | str = "cpu", role: str | None = None):
    """A causal LM in eval mode, in spec.dtype, on `device` (hub id or local directory)."""
    _check_source(spec, role, "model")
    with _fetching(spec, role):
        model = AutoModelForCausalLM.from_pretrained(
            spec.name_or_path, revision=spec.revision, dtype=getattr(torch, spec.dtype)
        )
    return model.to(device).eval()


def load_tokenizer(spec: ModelSpec, role: str | None = None):
    _check_source(spec, role, "tokenizer")
    with _fetching(spec, role):
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
            f"the {role} tokenizer ({spec.name_or_path}) has no eos_token; every sample ends with EOS so generation"
            " can stop. Add one to the tokenizer (tokenizer.eos_token = '...' or add_special_tokens({'eos_token':"
            " ...}), then save_pretrained), or use another tokenizer"
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
