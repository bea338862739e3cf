"""Shared fixtures: a tokenizer trained here, tiny real models saved as HF checkpoints, and a
small finalized store. Nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvdistill import tiny  # noqa: E402
from kvdistill.core.data import load_examples  # noqa: E402
from kvdistill.jobs import dump_tasks, run_local  # noqa: E402
from kvdistill.schemas import DEFAULT_TEMPLATE, DataSpec, DumpConfig, ModelSpec, SyntheticSpec  # noqa: E402
from kvdistill.store import finalize  # noqa: E402

torch.set_num_threads(2)

# 48 training rows keep every dump in the tests well under a second.
DATA = DataSpec(synthetic=SyntheticSpec(n_train=48, n_test=16, seed=0))


@pytest.fixture(scope="session")
def examples():
    return load_examples(DATA)


@pytest.fixture(scope="session")
def tokenizer():
    rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=400, n_test=16, seed=1)))
    return tiny.train_tokenizer(tiny.corpus(rows, DEFAULT_TEMPLATE), vocab_size=320)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory, tokenizer):
    """make_model(arch, layers=.., hidden=.., heads=.., kv_heads=.., head_dim=..) -> checkpoint dir.
    Random weights, deterministic by seed; cached per geometry for the session."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "qwen2", *, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=0, **extra) -> Path:
        key = (arch, layers, hidden, heads, kv_heads, head_dim, seed, tuple(sorted((k, repr(v)) for k, v in extra.items())))
        if key not in cache:
            model = tiny.build_model(
                arch, tokenizer, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seed=seed, **extra
            )
            cache[key] = tiny.save(model, tokenizer, tmp_path_factory.mktemp(f"{arch}-{layers}l"))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def other_tokenizer_teacher(tmp_path_factory):
    """A Llama teacher with its own, differently sized BPE vocabulary (a cross-tokenizer teacher)."""
    rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=300, n_test=5, seed=9)))
    tok = tiny.train_tokenizer(tiny.corpus(rows, DEFAULT_TEMPLATE), vocab_size=420)
    model = tiny.build_model("llama", tok, layers=3, hidden=32, heads=2, kv_heads=1, head_dim=16)
    return tiny.save(model, tok, tmp_path_factory.mktemp("other-tok"))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, make_model):
    """A finalized 2-shard store with two teachers of other geometries than the student:
    teacher-a Qwen2 3 layers GQA (4 q / 2 kv heads, head_dim 32: D=64),
    teacher-b Llama 2 layers MQA (1 kv head, head_dim 16: D=16), student Qwen2 2 layers (D=32)."""
    teachers = [
        ModelSpec(name_or_path=str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32)), name="teacher-a"),
        ModelSpec(name_or_path=str(make_model("llama", layers=2, hidden=64, heads=4, kv_heads=1, head_dim=16)), name="teacher-b"),
    ]
    student = ModelSpec(name_or_path=str(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)), name="student")
    store = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    base = DumpConfig(teacher=teachers[0], student=student, store=str(store), data=DATA, num_shards=2, batch_size=8, device="cpu")
    run_local(dump_tasks(base, teachers), progress=False)
    finalize(store)
    return {"store": store, "student": student, "teachers": teachers, "data": DATA}


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    """A copy of the tiny store to damage."""
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store["store"], store)
    return store
