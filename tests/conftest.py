"""Shared fixtures: a tokenizer trained here, tiny real models saved as HF checkpoints, the data
set (`tiny_data`), a small finalized store (`tiny_store`, `store_copy` to damage) and a latent-mode
one (`latent_store`). Each is defined once, here, and taken as an argument: no test imports a
fixture, nor this module. Nothing is downloaded."""

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
from kvdistill.schemas import (  # noqa: E402
    DEFAULT_TEMPLATE,
    DataSpec,
    DumpConfig,
    LatentSpec,
    ModelSpec,
    SyntheticSpec,
)
from kvdistill.store import finalize  # noqa: E402

torch.set_num_threads(2)

# 48 training rows keep every dump in the tests well under a second.
DATA = DataSpec(synthetic=SyntheticSpec(n_train=48, n_test=16, seed=0))
LATENT_SLOTS = 5  # M of `latent_store`


@pytest.fixture(scope="session")
def tiny_data() -> DataSpec:
    """The data set the tiny stores are dumped from (48 synthetic training rows, 16 test rows);
    tests take it here, not by importing conftest."""
    return DATA


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
        key = (
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            seed,
            tuple(sorted((k, repr(v)) for k, v in extra.items())),
        )
        if key not in cache:
            model = tiny.build_model(
                arch,
                tokenizer,
                layers=layers,
                hidden=hidden,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                seed=seed,
                **extra,
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
        ModelSpec(
            name_or_path=str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32)),
            name="teacher-a",
        ),
        ModelSpec(
            name_or_path=str(make_model("llama", layers=2, hidden=64, heads=4, kv_heads=1, head_dim=16)),
            name="teacher-b",
        ),
    ]
    student = ModelSpec(
        name_or_path=str(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)),
        name="student",
    )
    store = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    base = DumpConfig(
        teacher=teachers[0], student=student, store=str(store), data=DATA, num_shards=2, batch_size=8, device="cpu"
    )
    run_local(dump_tasks(base, teachers), progress=False)
    finalize(store)
    return {"store": store, "student": student, "teachers": teachers, "data": DATA}


@pytest.fixture(scope="session")
def student_path(make_model):
    """The tiny stores' student: Qwen2, 2 layers, D_s = H_s = 32."""
    return make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)


@pytest.fixture(scope="module")
def latent_store(tmp_path_factory, make_model, student_path, tiny_data):
    """KaVa latent mode's store (test_latent_train, and the fault, resume and scale tests):
    two teachers of other geometries than the student (D_s = 32, H_s = 32), dumped with R-KV
    compression to 5 slots: teacher-a Qwen2 3 layers, D_t = 64, H_t = 64 (linear adapter and
    CODI map); teacher-b Llama 2 layers, D_t = 16, H_t = 64; teacher-plain = teacher-b dumped
    without latent compression."""
    teachers = [
        ModelSpec(
            name_or_path=str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32)),
            name="teacher-a",
        ),
        ModelSpec(
            name_or_path=str(make_model("llama", layers=2, hidden=64, heads=4, kv_heads=1, head_dim=16)),
            name="teacher-b",
        ),
    ]
    student = ModelSpec(name_or_path=str(student_path), name="student")
    store = tmp_path_factory.mktemp("latent-stores") / "lat.zarr"
    base = DumpConfig(
        teacher=teachers[0],
        student=student,
        store=str(store),
        data=tiny_data,
        num_shards=1,
        batch_size=16,
        latent=LatentSpec(slots=LATENT_SLOTS),
        device="cpu",
    )
    run_local(dump_tasks(base, teachers), progress=False)
    plain = DumpConfig.from_dict(
        {**base.to_dict(), "latent": None, "teacher": {**teachers[1].to_dict(), "name": "teacher-plain"}}
    )
    run_local(dump_tasks(plain, [plain.teacher]), progress=False)
    finalize(store)
    return {"store": store, "student": student, "slots": LATENT_SLOTS}


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    """A copy of the tiny store to damage."""
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store["store"], store)
    return store
