"""The trainer: streams the store, never builds a teacher, learns; losses and stream alone."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill import tiny
from kvdistill.core.data import load_examples
from kvdistill.schemas import DataSpec, EvalConfig, ModelSpec, SyntheticSpec, TrainConfig
from kvdistill.store import ShardReader, StoreError, finalize, shard_samples
from kvdistill.train.distiller import KVAdapter
from kvdistill.train.eval import evaluate
from kvdistill.train.loop import train
from kvdistill.train.losses import layer_std_norm, masked_ce, masked_kv_loss
from kvdistill.train.stream import KVStream, collate


def _train_cfg(tiny_store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(out),
        batch_size=8,
        max_steps=30,
        warmup_steps=3,
        log_every=1,
        device="cpu",
        shuffle_buffer=16,
    )
    return TrainConfig(**{**base, **kw})


def test_trainer_never_instantiates_a_teacher(tiny_store, tmp_path, monkeypatch):
    """Every from_pretrained call and every model construction is recorded: only the student."""
    loaded, built = [], []
    orig_fp = transformers.PreTrainedModel.from_pretrained.__func__
    orig_post = transformers.PreTrainedModel.post_init

    def from_pretrained(cls, path, *a, **kw):
        loaded.append(str(path))
        return orig_fp(cls, path, *a, **kw)

    def post_init(self):
        built.append((type(self).__name__, self.config.num_hidden_layers, self.config.hidden_size))
        return orig_post(self)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(transformers.PreTrainedModel, "post_init", post_init)
    train(_train_cfg(tiny_store, tmp_path / "run", max_steps=3), progress=False)
    teacher_paths = {t.name_or_path for t in tiny_store["teachers"]}
    assert loaded == [tiny_store["student"].name_or_path]
    assert not teacher_paths & set(loaded)
    student_cfg = transformers.AutoConfig.from_pretrained(tiny_store["student"].name_or_path)
    assert built and all(
        b == ("Qwen2ForCausalLM", student_cfg.num_hidden_layers, student_cfg.hidden_size) or b[0] == "Qwen2Model"
        for b in built
    )
    # Resident parameters: exactly student + adapters (64->32 and 16->32 per layer, for K and V).
    adapters = torch.load(tmp_path / "run" / "final" / "adapters.pt")
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    n_adapter = sum(v.numel() for v in adapters.values())
    assert n_adapter == 2 * 2 * (64 * 32 + 16 * 32)  # {K,V} x 2 layers x (teacher-a + teacher-b)
    assert sum(p.numel() for p in student.parameters()) < 200_000  # the tiny student, not a teacher


def test_end_to_end_dump_store_train_eval_kv_loss_falls(tiny_store, tmp_path):
    summary = train(_train_cfg(tiny_store, tmp_path / "kv"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "kv" / "metrics.jsonl").open()]
    assert len(rows) == 30 and summary["steps"] == 30
    kv = np.array([r["kv_k"] + r["kv_v"] for r in rows])
    assert np.isfinite(kv).all() and (kv > 0).all()
    assert kv[-5:].mean() < 0.8 * kv[:5].mean(), kv
    assert len(rows[0]["kv_k_layers"]) == 2
    # The summary says what each figure is: the last step's value, the mean of the last 20, the first.
    for term in ("ce", "kv_k", "kv_v"):
        assert summary[f"last_{term}"] == rows[-1][term] and summary[f"first_{term}"] == rows[0][term]
        assert summary[f"mean_last_20_{term}"] == pytest.approx(np.mean([r[term] for r in rows[-20:]]))
    assert summary["mean_last_20_over"] == 20
    final = tmp_path / "kv" / "final"
    assert (
        (final / "config.json").exists()
        and (final / "adapters.pt").exists()
        and (final / "train_config.yaml").exists()
    )
    data = DataSpec(split="test", limit=8, synthetic=tiny_store["data"].synthetic)
    result = evaluate(
        EvalConfig(
            model=str(tmp_path / "kv"), data=data, max_new_tokens=24, device="cpu", out=str(tmp_path / "eval.json")
        ),
        progress=False,
    )
    assert result["n"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    assert 1.0 < result["perplexity"] < 1e4
    preds = json.loads((tmp_path / "eval.json").read_text())["predictions"]
    assert len(preds) == 8 and all(p["text"] is not None for p in preds)


def test_ce_only_baseline_reads_no_kv_and_has_no_adapters(tiny_store, tmp_path):
    summary = train(_train_cfg(tiny_store, tmp_path / "ce", kv_weight=0.0, max_steps=5), progress=False)
    assert summary["mean_last_20_kv_k"] is None and np.isfinite(summary["mean_last_20_ce"])
    assert torch.load(tmp_path / "ce" / "final" / "adapters.pt") == {}


def test_training_refuses_a_store_built_for_another_student_tokenizer(tiny_store, tmp_path):
    rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=50, n_test=5, seed=7)))
    other_tok = tiny.train_tokenizer(tiny.corpus(rows, ModelSpec(name_or_path="x").prompt_template), vocab_size=300)
    other = tiny.save(
        tiny.build_model("qwen2", other_tok, layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16),
        other_tok,
        tmp_path / "other",
    )
    with pytest.raises(StoreError, match="tokenizer"):
        train(_train_cfg(tiny_store, tmp_path / "x", student=ModelSpec(name_or_path=str(other))), progress=False)


def test_training_refuses_an_unfinalized_store(tiny_store, store_copy, tmp_path):
    (store_copy / "index.parquet").unlink()
    with pytest.raises(StoreError, match="not finalized"):
        train(_train_cfg(tiny_store, tmp_path / "x", store=str(store_copy)), progress=False)


def test_every_rank_reads_its_part_of_every_global_batch_and_together_they_cover_the_epoch(tiny_store):
    from kvdistill.train.stream import MicroBatches

    teachers = ["teacher-a", "teacher-b"]
    seen = []
    for rank in range(3):
        batches = MicroBatches(
            KVStream(tiny_store["store"], teachers, shuffle_buffer=4),
            4,
            lambda s: {"ids": [x["sample_id"] for x in s]},
            rank=rank,
            world_size=3,
        )
        seen.append([i for b in batches if b["weight"] for i in b["ids"]])
    assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2])
    assert sorted(seen[0] + seen[1] + seen[2]) == sorted(ex.id for ex in load_examples(tiny_store["data"]))


def test_stream_zips_teachers_and_reshuffles_per_epoch(tiny_store):
    stream = KVStream(tiny_store["store"], ["teacher-a", "teacher-b"], seed=3, shuffle_buffer=64)
    first = list(stream)
    s = first[0]
    assert s["kv"]["teacher-a"][0].shape == (len(s["input_ids"]), 2, 64)
    assert s["kv"]["teacher-b"][1].shape == (len(s["input_ids"]), 2, 16)
    assert [x["sample_id"] for x in list(stream)] == [x["sample_id"] for x in first]  # same epoch, same order
    stream.set_epoch(1)
    assert [x["sample_id"] for x in stream] != [x["sample_id"] for x in first]
    batch = collate(first[:4], pad_id=0)
    T = max(len(x["input_ids"]) for x in first[:4])
    assert batch["input_ids"].shape == (4, T) and batch["kv"]["teacher-a"][0].shape == (4, T, 2, 64)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(x["input_ids"]) for x in first[:4]]  # padded, never truncated
    for i, n in enumerate(lengths):
        assert not batch["kv"]["teacher-a"][0][i, n:].any() and not batch["loss_mask"][i, n:].any()


def test_stream_read_ahead_across_shards_yields_each_shard_in_order_and_raises_at_a_bad_shard(tiny_store, tmp_path):
    teachers = ["teacher-a", "teacher-b"]
    per_shard = [ShardReader(tiny_store["store"], "teacher-a", i) for i in range(2)]
    for order in ([0, 1], [1, 0]):
        got = list(shard_samples(tiny_store["store"], teachers, order))
        assert [s["sample_id"] for s in got] == [sid for i in order for sid in per_shard[i].sample_ids]
        assert [s["shard"] for s in got] == [i for i in order for _ in per_shard[i].sample_ids]
        for s in got[:: max(1, len(got) // 7)]:  # K/V rows are the sample's own
            r = per_shard[s["shard"]]
            j = r.sample_ids.index(s["sample_id"])
            want = r.rows(int(r.offsets[j]), int(r.offsets[j + 1]), ("k",))["k"]
            assert np.array_equal(s["kv"]["teacher-a"][0], want)
    it = shard_samples(tiny_store["store"], teachers, [0, 1])
    next(it)
    it.close()  # stopping early leaves no thread waiting
    broken = tmp_path / "broken.zarr"
    shutil.copytree(tiny_store["store"], broken)
    shutil.rmtree(broken / "teachers" / "teacher-b" / "shard-00001")
    samples = shard_samples(broken, teachers, [0, 1])
    first = [next(samples) for _ in range(len(per_shard[0]))]  # every sample of the good shard first
    assert [s["sample_id"] for s in first] == per_shard[0].sample_ids
    with pytest.raises(StoreError, match="shard-00001 is missing or incomplete"):
        next(samples)


def test_a_shard_rewritten_after_finalize_is_refused_until_finalize_runs_again(tiny_store, tmp_path):
    # The stream opens shards through the consolidated metadata; a shard whose own record no
    # longer matches it (re-dumped after finalize) must not be read with the old metadata.
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store["store"], store)
    meta = store / "teachers" / "teacher-a" / "shard-00001" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["kvdistill"]["host"] = "elsewhere"  # any change to the completion record
    meta.write_text(json.dumps(doc))
    with pytest.raises(
        StoreError, match="rewritten after the store's metadata was consolidated; run `kvdistill store finalize"
    ):
        list(shard_samples(store, ["teacher-a"], [1]))
    finalize(store)
    assert len(list(shard_samples(store, ["teacher-a"], [1]))) == len(ShardReader(store, "teacher-a", 1))


def test_masked_ce_ignores_positions_outside_the_loss_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    base = masked_ce(logits, ids, mask)
    changed = logits.clone()
    changed[0, 4:] += 100.0  # predicts targets 5 (masked out) and beyond: no effect
    changed[1, 2:] -= 50.0
    assert torch.allclose(base, masked_ce(changed, ids, mask))
    ref = torch.nn.functional.cross_entropy(
        logits[0, 1:4], ids[0, 2:5], reduction="sum"
    ) + torch.nn.functional.cross_entropy(logits[1, 0:2], ids[1, 1:3], reduction="sum")
    assert torch.allclose(base, ref / 5)
    changed[0, 0] = changed[1, 3:] = float("nan")  # a pad or prompt row holding NaN: selected away
    assert torch.allclose(base, masked_ce(changed, ids, mask))
    empty = logits.clone().requires_grad_()  # no target in the loss mask: 0, and a zero gradient
    loss = masked_ce(empty, ids, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(empty.grad, torch.zeros_like(logits))


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), pad=st.integers(0, 4))
def test_layer_std_norm_standardises_each_layer_over_valid_positions_only(seed, pad):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 3, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1])[:, None] + 3.0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 6 - pad :] = False
    x_garbage = x.clone()
    x_garbage[~mask] = 1e6
    z = layer_std_norm(x_garbage, mask)
    valid = z[mask]  # [N, L, D]
    torch.testing.assert_close(valid.mean(dim=(0, 2)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(valid.std(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    mse, per_layer = masked_kv_loss(z, torch.zeros_like(z), mask, "mse")
    torch.testing.assert_close(per_layer, torch.ones(3), atol=1e-3, rtol=0)  # = variance of each layer
    assert torch.isclose(mse, per_layer.mean())


def test_kv_adapter_is_identity_without_parameters_when_widths_match():
    a = KVAdapter(3, 16, 16)
    x = torch.randn(2, 4, 3, 16)
    assert a.weight is None and torch.equal(a(x), x)
    b = KVAdapter(3, 64, 16)
    assert b(torch.randn(2, 4, 3, 64)).shape == (2, 4, 3, 16)


def test_a_run_stopped_mid_epoch_and_resumed_ends_bitwise_identical_to_an_uninterrupted_run(tiny_store, tmp_path):
    """48 samples / batch 4 = 12 batches an epoch: checkpoint at step 6 (mid-epoch), stop at 8,
    resume (from step 6) to 16, crossing into epoch 1."""
    common = dict(max_steps=16, batch_size=4, shuffle_buffer=8, log_every=1)
    train(_train_cfg(tiny_store, tmp_path / "straight", **common), progress=False)
    train(_train_cfg(tiny_store, tmp_path / "cut", save_every=6, stop_at_step=8, **common), progress=False)
    assert (tmp_path / "cut" / "checkpoints" / "step-0000006" / "loader.json").exists()
    train(
        _train_cfg(tiny_store, tmp_path / "cut", save_every=6, resume=str(tmp_path / "cut"), **common), progress=False
    )
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ad_a, ad_b = (torch.load(tmp_path / run / "final" / "adapters.pt") for run in ("straight", "cut"))
    assert ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
    # and the run did change the weights (the comparison is not between two untouched models)
    init = transformers.AutoModelForCausalLM.from_pretrained(tiny_store["student"].name_or_path).state_dict()
    assert not all(torch.equal(a[k], init[k]) for k in a)


@pytest.mark.parametrize("kv_loss", ["mse", "smooth_l1", "cosine"])
def test_padding_contributes_exactly_nothing_to_any_loss_term(tiny_store, kv_loss):
    """Perturb every padded position (teacher K/V to NaN, pad token ids to another token): every
    loss term is bit-for-bit unchanged."""
    from kvdistill.train.distiller import Distiller, KVShapes

    torch.manual_seed(0)
    student = transformers.AutoModelForCausalLM.from_pretrained(tiny_store["student"].name_or_path).eval()
    cfg = TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", kv_loss=kv_loss, cka_weight=0.0)
    model = Distiller(cfg, student, KVShapes({"teacher-a": 64, "teacher-b": 16}, 2, 32))
    samples = list(KVStream(tiny_store["store"], ["teacher-a", "teacher-b"], shuffle_buffer=1))[:6]
    batch = collate(samples, pad_id=0)
    pad = ~batch["attention_mask"].bool()
    assert pad.any()

    def losses(b):
        with torch.no_grad():
            out = model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["kv"])
        return {k: v for k, v in out.items() if v.dim() == 0}

    before = losses(batch)
    kv = {
        t: (k.masked_fill(pad[:, :, None, None], float("nan")), v.masked_fill(pad[:, :, None, None], float("nan")))
        for t, (k, v) in batch["kv"].items()
    }
    after = losses({**batch, "input_ids": batch["input_ids"].masked_fill(pad, 7), "kv": kv})
    assert before.keys() == after.keys() == {"ce", "kv_k", "kv_v", "loss"}
    for name in before:
        assert torch.isfinite(before[name]) and torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("kv_loss", ["smooth_l1", "cosine"])
def test_each_kv_loss_kind_trains_with_a_finite_falling_loss(tiny_store, tmp_path, kv_loss):
    train(_train_cfg(tiny_store, tmp_path / kv_loss, kv_loss=kv_loss, max_steps=25), progress=False)
    kv = np.array([json.loads(line)["kv_k"] for line in (tmp_path / kv_loss / "metrics.jsonl").open()])
    assert np.isfinite(kv).all() and kv[-5:].mean() < 0.85 * kv[:5].mean(), kv


def test_lora_trains_only_adapters_and_its_checkpoint_reloads_and_evaluates_the_same(tiny_store, tmp_path):
    from peft import PeftModel

    summary = train(
        _train_cfg(tiny_store, tmp_path / "lora", lora_r=4, lora_alpha=8, max_steps=8, lr=1e-2), progress=False
    )
    assert np.isfinite(summary["mean_last_20_kv_k"])
    final = tmp_path / "lora" / "final"
    assert (final / "lora" / "adapter_config.json").exists() and (final / "config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_store["student"].name_or_path).state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    # only attention projections moved (LoRA targets); the MLPs and embeddings are the base's
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    reloaded = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_store["student"].name_or_path), final / "lora"
    ).eval()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reloaded(ids).logits, rtol=1e-5, atol=1e-5)
    data = DataSpec(split="test", limit=4, synthetic=tiny_store["data"].synthetic)
    ppl = [
        evaluate(EvalConfig(model=str(p), data=data, max_new_tokens=8, device="cpu"), progress=False)["perplexity"]
        for p in (tmp_path / "lora", final)
    ]
    assert ppl[0] == ppl[1] and np.isfinite(ppl[0])


def test_similarity_routing_weights_sum_to_one_and_favour_the_teacher_that_matches_the_student():
    from kvdistill.train.distiller import Distiller, KVShapes

    base, shapes = dict(store="s", student=ModelSpec(name_or_path="x"), out="o"), KVShapes({"a": 8, "b": 8}, 3, 8)
    model = Distiller(TrainConfig(**base, fusion="similarity", fusion_temperature=0.05), torch.nn.Linear(1, 1), shapes)
    z_s = torch.randn(2, 5, 3, 8)
    z_t = torch.stack([z_s + 0.01 * torch.randn_like(z_s), torch.randn_like(z_s)])  # a ~ student, b unrelated
    w = model.route(z_s, z_t, ["a", "b"])  # [2, B, T, L]
    torch.testing.assert_close(w.sum(0), torch.ones(2, 5, 3))
    assert (w[0] > 0.9).float().mean() > 0.95 and not w.requires_grad
    fixed = Distiller(TrainConfig(**base, teacher_weights={"a": 3.0, "b": 1.0}), torch.nn.Linear(1, 1), shapes)
    assert fixed.route(z_s, z_t, ["a", "b"]).flatten().tolist() == [0.75, 0.25]


def test_similarity_fusion_trains_and_logs_router_weights(tiny_store, tmp_path):
    train(_train_cfg(tiny_store, tmp_path / "sim", fusion="similarity", max_steps=25), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").open()]
    kv = np.array([r["kv_k"] for r in rows])
    assert np.isfinite(kv).all() and kv[-5:].mean() < 0.85 * kv[:5].mean(), kv
    for r in rows:
        assert abs(r["route_k_teacher-a"] + r["route_k_teacher-b"] - 1) < 1e-4


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in
    it; a training job is one process, this test file is not."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision, want", [("auto", "no"), ("bf16", "bf16")])
def test_mixed_precision_is_off_on_cpu_by_default_and_bf16_autocast_trains(
    tiny_store, tmp_path, precision, want, fresh_accelerator_state
):
    cfg = TrainConfig(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(tmp_path / "run"),
        batch_size=8,
        max_steps=2,
        device="cpu",
        mixed_precision=precision,
    )
    summary = train(cfg, progress=False)
    rank = json.loads((tmp_path / "run" / "ranks" / "rank-0.json").read_text())
    assert rank["mixed_precision"] == want
    assert math.isfinite(summary["mean_last_20_ce"]) and math.isfinite(summary["mean_last_20_kv_k"])


def test_mixed_precision_auto_defers_to_accelerate_launch(monkeypatch, tiny_store):
    from kvdistill.train.loop import mixed_precision

    cfg = TrainConfig(store="s.zarr", student=tiny_store["student"], out="o", device="cpu")
    assert mixed_precision(cfg) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert mixed_precision(cfg) is None  # accelerate reads the launcher's choice itself
    assert mixed_precision(TrainConfig.from_dict({**cfg.to_dict(), "mixed_precision": "bf16"})) == "bf16"


def test_eval_counts_generations_cut_off_by_the_budget_and_says_so(tiny_store, capsys):
    from kvdistill.cli import main

    data = DataSpec(split="test", limit=6, synthetic=tiny_store["data"].synthetic)
    model = tiny_store["student"].name_or_path  # a random student: it never finishes in 3 tokens
    result = evaluate(EvalConfig(model=model, data=data, max_new_tokens=3, device="cpu"), progress=False)
    assert result["n"] == 6 and result["hit_cap"] == 6 and result["accuracy_finished"] == 0.0
    assert result["hit_cap_correct"] == round(result["accuracy"] * 6)
    assert (
        main(["eval", "--model", model, "--limit", "6", "--max-new-tokens", "3", "--device", "cpu", "--no-progress"])
        == 0
    )
    err = capsys.readouterr().err
    assert (
        "warning: 6 of" in err
        and "reached --max-new-tokens 3 without finishing" in err
        and "raise --max-new-tokens" in err
    )


def test_a_generation_that_ends_with_eos_is_finished_and_one_without_is_cut():
    from kvdistill.train.eval import finished, generated_lengths

    eos = 7
    new = torch.tensor([[3, 7, 0, 0], [3, 4, 5, 6], [3, 4, 5, 7]])  # EOS at 2; none; EOS exactly at the budget
    assert generated_lengths(new, eos).tolist() == [2, 4, 4]
    assert (~finished(new, eos)).tolist() == [False, True, False]  # eval's hit_cap: only the row without EOS


def test_warmup_ratio_sets_the_warm_up_as_a_fraction_of_max_steps(tiny_store, tmp_path):
    from kvdistill.schemas import ConfigError

    base = dict(store="s", student=ModelSpec(name_or_path="x"), out="o", max_steps=40)
    assert TrainConfig(**base, warmup_ratio=0.25).warmup_over(40) == 10
    assert TrainConfig(**base, warmup_steps=7).warmup_over(40) == 7
    with pytest.raises(ConfigError, match=r"TrainConfig.warmup_ratio: a fraction of max_steps in \[0, 1\), got 1.5"):
        TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", warmup_ratio=1.5)
    train(_train_cfg(tiny_store, tmp_path / "r", max_steps=8, warmup_ratio=0.5, log_every=1), progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").open()]
    peak = _train_cfg(tiny_store, tmp_path / "x").lr
    # Logged after each step's scheduler step: 4 warm-up steps of 8 reach the peak, then the cosine decays.
    assert lrs[:4] == pytest.approx([peak * (s + 1) / 4 for s in range(4)]) and lrs[4] < peak
