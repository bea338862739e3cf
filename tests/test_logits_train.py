"""Offline logits distillation in the trainer (--logits-weight, --logits-temperature): the term is
topk_kl between each teacher's stored top-K and the student's logits on the CE positions, mixed by
teacher weight; it trains alone (kv_weight 0: the offline-logits baseline) or beside K/V from the
same store, exactly under accumulation; a store without logits is refused in one line."""

from __future__ import annotations

import pytest
import torch

from kvdistill.cli import main
from kvdistill.jobs import dump_tasks, run_local
from kvdistill.schemas import ConfigError, DumpConfig, ModelSpec, TrainConfig
from kvdistill.store import finalize, read_teacher_specs
from kvdistill.train.distiller import Distiller, KVShapes
from kvdistill.train.loop import train
from kvdistill.train.losses import topk_kl
from kvdistill.train.stream import KVStream, collate

from .test_equivalence import assert_same_run, metrics

K = 8


@pytest.fixture(scope="module")
def logits_store(tmp_path_factory, make_model, student_path, tiny_data):
    """One shard pair, teacher-a (the student's tokenizer) with top-8 logits, teacher-b without."""
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
    store = tmp_path_factory.mktemp("logits-train") / "lg.zarr"
    student = ModelSpec(name_or_path=str(student_path), name="student")
    base = DumpConfig(
        teacher=teachers[0],
        student=student,
        store=str(store),
        data=tiny_data,
        num_shards=2,
        batch_size=8,
        device="cpu",
        logits_top_k=K,
        teacher_logits_top_k={"teacher-b": 0},
    )
    run_local(dump_tasks(base, teachers), progress=False)
    finalize(store)
    return {"store": store, "student": student}


def _cfg(store, out, **kw) -> TrainConfig:
    common = dict(max_steps=6, warmup_steps=1, log_every=1, device="cpu", shuffle_buffer=16, batch_size=8)
    return TrainConfig(store=str(store["store"]), student=store["student"], out=str(out), **{**common, **kw})


def test_the_term_is_the_teacher_weighted_topk_kl_on_the_ce_positions(logits_store, student_path):
    from transformers import AutoModelForCausalLM

    batch = collate(
        [
            s
            for _, s in zip(
                range(4), KVStream(logits_store["store"], ["teacher-a", "teacher-b"], read_logits=True), strict=False
            )
        ],
        pad_id=0,
    )
    assert set(batch["logits"]) == {"teacher-a"}  # only the teacher that stores them
    ids, lp = batch["logits"]["teacher-a"]
    assert ids.shape == lp.shape == (*batch["input_ids"].shape, K)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    cfg = _cfg(logits_store, "unused", kv_weight=0.0, logits_weight=1.0, logits_temperature=2.0)
    model = Distiller(cfg, student, _shapes(logits_store))
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], {}, logits=batch["logits"])
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["loss_mask"][:, 1:]
    want = topk_kl(logits[:, :-1][keep], ids[:, :-1][keep], lp[:, :-1][keep], 2.0).mean()
    torch.testing.assert_close(out["logits"], want)
    torch.testing.assert_close(out["loss"], out["ce"] + out["logits"])


def _shapes(store) -> KVShapes:
    from kvdistill.store import read_store_spec

    specs = read_teacher_specs(store["store"])
    return KVShapes.of_store(read_store_spec(store["store"]), specs)


def test_logits_alone_train_and_accumulation_is_exact(logits_store, tmp_path):
    """kv_weight 0 + logits: no K/V read; the logged loss is ce + w x logits; batch 8 = 2 x 4 accumulated."""
    cfg = _cfg(logits_store, tmp_path / "b8", kv_weight=0.0, logits_weight=0.5, record_samples=True)
    train(cfg, progress=False)
    rows = metrics(tmp_path / "b8")
    assert all(r["logits"] > 0 for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(r["ce"] + 0.5 * r["logits"], abs=1e-5)
    assert rows[-1]["logits"] < rows[0]["logits"]  # the student moves towards the teacher's distribution
    train(
        _cfg(
            logits_store,
            tmp_path / "b4x2",
            kv_weight=0.0,
            logits_weight=0.5,
            record_samples=True,
            batch_size=4,
            gradient_accumulation_steps=2,
        ),
        progress=False,
    )
    assert_same_run(tmp_path / "b8", tmp_path / "b4x2")


def test_kv_and_logits_from_one_store(logits_store, tmp_path):
    train(_cfg(logits_store, tmp_path / "both", logits_weight=1.0, max_steps=3), progress=False)
    rows = metrics(tmp_path / "both")
    assert all({"kv_k", "kv_v", "logits"} <= r.keys() for r in rows)


def test_a_store_without_logits_is_refused_in_one_line(tiny_store, tmp_path, capsys):
    code = main(
        [
            "train",
            "--store",
            str(tiny_store["store"]),
            "--student",
            tiny_store["student"].name_or_path,
            "--out",
            str(tmp_path / "run"),
            "--logits-weight",
            "1",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--logits-top-k" in err[0] and "logits_weight 0" in err[0]
    assert not (tmp_path / "run" / "final").exists()


def test_logits_options_are_validated():
    base = dict(store="s", student={"name_or_path": "s"}, out="o")
    with pytest.raises(ConfigError, match="logits_weight"):
        TrainConfig.from_dict({**base, "logits_weight": -1})
    with pytest.raises(ConfigError, match="logits_temperature"):
        TrainConfig.from_dict({**base, "logits_temperature": 0})
    with pytest.raises(ConfigError, match="logits_weight"):
        TrainConfig.from_dict({**base, "mode": "latent", "logits_weight": 1.0})
