"""Latent mode (KaVa), train / eval side: Jacobi refinement, the latent KV and CODI losses,
training, checkpoint reload and the cost numbers eval reports. Hand-made batches follow the
store contract: latent[teacher] = {"k", "v": [B, M, L_s, D_t], "mask": [B, M], "hidden": [B, H_t]}."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from kvdistill.cli import main
from kvdistill.core.capture import decoder
from kvdistill.core.prompts import encode, pad_batch
from kvdistill.schemas import (
    DEFAULT_TEMPLATE,
    DataSpec,
    EvalConfig,
    ModelSpec,
    TrainConfig,
)
from kvdistill.store import StoreError
from kvdistill.train.adapters import KVShapes
from kvdistill.train.eval import evaluate
from kvdistill.train.latent import (
    LatentStudent,
    jacobi,
    latent_generate,
    load_latent,
    save_latent,
    split_segments,
)
from kvdistill.train.loop import train

M = 5  # latent slots of the hand-made batches (conftest's latent_store has its own)


def _student(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _batch(tokenizer, examples, n=6):
    enc = [encode(tokenizer, DEFAULT_TEMPLATE, ex) for ex in examples[:n]]
    ids, attn = pad_batch([e.input_ids for e in enc], tokenizer.pad_token_id)
    seg = pad_batch([e.segment_ids.astype("int64") for e in enc], -1)[0]
    seg[attn == 0] = -1
    loss_mask = pad_batch([e.loss_mask for e in enc], 0)[0].bool()
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "segment_ids": seg}


def _latent(B, widths, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t, d in widths.items():
        mask = torch.ones(B, M, dtype=torch.bool)
        mask[1, 3:] = False  # a chain shorter than M
        mask[4, 1:] = False
        out[t] = {
            "k": torch.randn(B, M, 2, d, generator=g),
            "v": torch.randn(B, M, 2, d, generator=g),
            "mask": mask,
            "hidden": torch.randn(B, hidden[t], generator=g),
        }
    return out


def _model(path, tokenizer, iterations=3, widths=None, hidden=None, **kw):
    widths = widths or {"t": 32}
    hidden = hidden or {t: 48 for t in widths}
    torch.manual_seed(0)
    cfg = TrainConfig(
        store="s", student={"name_or_path": "x"}, out="o", mode="latent", latent_iterations=iterations, **kw
    )
    return LatentStudent(cfg, _student(path), KVShapes(widths, 2, 32), M, hidden, pad_id=tokenizer.pad_token_id).eval()


class _Calls:
    """Counts forward calls of the decoder stack (one per forward pass of the student)."""

    def __init__(self, model):
        self.n = 0
        self.handle = decoder(model).register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize("iterations", [1, 3, 4])
def test_jacobi_makes_exactly_T_forwards_training_T_plus_1_and_generation_T_plus_G_minus_1(
    student_path, tokenizer, examples, iterations
):
    model = _model(student_path, tokenizer, iterations)
    b = _batch(tokenizer, examples)
    q, qm, a, am = split_segments(b["input_ids"], b["segment_ids"], tokenizer.pad_token_id)
    calls = _Calls(model.student)
    with torch.no_grad():
        run = jacobi(model.student, model.head, q, qm, iterations, capture=True)
    assert calls.n == iterations == run["forwards"] and len(run["kv"]) == iterations
    assert run["kv"][0][0].shape == (6, M, 2, 32)
    calls.n = 0
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["segment_ids"], _latent(6, {"t": 32}, {"t": 48}))
    assert calls.n == iterations + 1  # T Jacobi forwards (the last carries the answer) + the written chain
    for budget in (1, 7):
        calls.n = 0
        gen = latent_generate(
            model.student,
            model.head,
            q[:1],
            qm[:1],
            iterations,
            budget,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        G = int(gen["lengths"][0])
        assert gen["tokens"].shape[1] == G <= budget
        assert calls.n == gen["forwards"] == iterations + G - 1 == int(gen["forwards_per_row"][0])


def test_jacobi_with_T_equal_M_plus_1_reproduces_the_sequential_latent_chain(student_path, tokenizer, examples):
    """Coconut's chain, one slot at a time: s_1 = proj(h at the last question token), s_m =
    proj(h at slot m-1). Jacobi converges to it slot by slot: T = M + 1 gives it exactly."""
    model = _model(student_path, tokenizer)
    b = _batch(tokenizer, examples, n=3)
    q, qm, _, _ = split_segments(b["input_ids"], b["segment_ids"], tokenizer.pad_token_id)
    P = q.shape[1]
    emb = model.student.get_input_embeddings()
    with torch.no_grad():
        slots = torch.zeros(3, 0, 32)
        embeds, mask = emb(q), qm
        for _ in range(M):
            out = decoder(model.student)(
                inputs_embeds=torch.cat([embeds, slots], 1),
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            )
            slots = torch.cat([slots, model.head.proj(out.last_hidden_state[:, -1:])], 1)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        seq = decoder(model.student)(
            inputs_embeds=torch.cat([embeds, slots], 1),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
        ).last_hidden_state
        par = jacobi(model.student, model.head, q, qm, M + 1)["hidden"]
        short = jacobi(model.student, model.head, q, qm, M)["hidden"]
    torch.testing.assert_close(par[:, P:], seq[:, P:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        short[:, -1], seq[:, -1], atol=1e-3
    )  # one iteration short: the last slot is not there yet
    torch.testing.assert_close(short[:, P:-1], seq[:, P:-1], rtol=1e-5, atol=1e-5)


def test_left_padding_changes_no_slot_state(student_path, tokenizer, examples):
    """A question alone vs the same question left-padded in a batch with a longer one."""
    model = _model(student_path, tokenizer)
    b = _batch(tokenizer, examples)
    q, qm, _, _ = split_segments(b["input_ids"], b["segment_ids"], tokenizer.pad_token_id)
    lengths = qm.sum(1)
    i = int(lengths.argmin())
    assert lengths[i] < q.shape[1]
    with torch.no_grad():
        both = jacobi(model.student, model.head, q, qm, 3, capture=True)
        n = int(lengths[i])
        alone = jacobi(model.student, model.head, q[i : i + 1, -n:], qm[i : i + 1, -n:], 3, capture=True)
    torch.testing.assert_close(both["hidden"][i, -M:], alone["hidden"][0, -M:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both["kv"][-1][1][i], alone["kv"][-1][1][0], rtol=1e-4, atol=1e-5)


def test_kv_loss_on_latent_slots_is_exactly_zero_when_the_student_latent_kv_is_the_stored_teacher_kv(
    student_path, tokenizer, examples
):
    """Identity adapter (D_t = D_s): target = the student's own slot K/V from the same
    iterations -> every iteration's loss is exactly 0; any change at a real slot makes it > 0."""
    for kind in ("mse", "smooth_l1"):
        model = _model(student_path, tokenizer, iterations=2, kv_loss=kind)
        assert model.adapters["t"]["k"].weight is None
        b = _batch(tokenizer, examples)
        q, qm, _, _ = split_segments(b["input_ids"], b["segment_ids"], tokenizer.pad_token_id)
        with torch.no_grad():
            kv = jacobi(model.student, model.head, q, qm, 2, capture=True)["kv"]
        for it in range(2):  # the teacher's one target against the student's iteration `it`
            lat = _latent(6, {"t": 32}, {"t": 48})
            lat["t"]["k"], lat["t"]["v"] = kv[it][0].clone(), kv[it][1].clone()
            terms = model.kv_terms(kv, lat)
            assert terms["kv_k_iters"][it].item() == 0.0 and terms["kv_v_iters"][it].item() == 0.0
            assert (terms["kv_k_iters"][1 - it] > 0).item()
        lat["t"]["k"][0, 0, 1, 3] += 0.5
        assert model.kv_terms(kv, lat)["kv_k_iters"][it].item() > 0


def test_masked_slots_contribute_nothing_to_any_loss_term(student_path, tokenizer, examples):
    """Teacher K/V at padding slots set to NaN / 1e6, batch padding ids changed: every loss
    term is bit-for-bit unchanged (two teachers, one with a linear adapter and CODI map)."""
    widths, hidden = {"a": 64, "b": 32}, {"a": 48, "b": 32}
    model = _model(student_path, tokenizer, widths=widths, hidden=hidden, kv_loss="smooth_l1")
    b = _batch(tokenizer, examples)
    lat = _latent(6, widths, hidden)
    with torch.no_grad():
        before = model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["segment_ids"], lat)
        for t in widths:
            pad = ~lat[t]["mask"]
            assert pad.any()
            lat[t]["k"][pad] = float("nan")
            lat[t]["v"][pad] = 1e6
        ids = b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)
        after = model(ids, b["attention_mask"], b["loss_mask"], b["segment_ids"], lat)
    assert {"ce_answer", "ce_cot", "codi", "kv_k", "kv_v", "loss"} <= before.keys()
    for k, v in before.items():
        assert torch.isfinite(v).all() and torch.equal(v, after[k]), k


def test_codi_is_smooth_l1_over_the_teacher_std_at_the_last_slot(student_path, tokenizer, examples):
    model = _model(student_path, tokenizer, widths={"t": 32}, hidden={"t": 32})
    assert isinstance(model.codi["t"], torch.nn.Identity)
    b = _batch(tokenizer, examples)
    q, qm, a, am = split_segments(b["input_ids"], b["segment_ids"], tokenizer.pad_token_id)
    lat = _latent(6, {"t": 32}, {"t": 32})
    with torch.no_grad():
        h_s = jacobi(model.student, model.head, q, qm, 3, tail_ids=a, tail_mask=am)["hidden"][:, q.shape[1] + M - 1]
        out = model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["segment_ids"], lat)
        h_t = lat["t"]["hidden"]
        ref = torch.nn.functional.smooth_l1_loss(h_s, h_t) / h_t.std()
        torch.testing.assert_close(out["codi"], ref)
        lat["t"]["hidden"] = h_s.clone()
        assert model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["segment_ids"], lat)["codi"].item() == 0.0


# --- on a real dumped store ---------------------------------------------------------------


def _cfg(latent_store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(latent_store["store"]),
        student=latent_store["student"],
        out=str(out),
        mode="latent",
        teachers=["teacher-a", "teacher-b"],
        batch_size=8,
        max_steps=12,
        warmup_steps=1,
        log_every=1,
        lr=3e-3,
        device="cpu",
        shuffle_buffer=16,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def latent_run(latent_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lat"
    return out, train(_cfg(latent_store, out), progress=False)


def test_latent_training_on_a_dumped_store_has_finite_falling_losses_and_saves_the_latent_head(
    latent_run, latent_store
):
    out, summary = latent_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert len(rows) == 12 and summary["steps"] == 12 and summary["slots"] == latent_store["slots"]
    for k in ("loss", "ce_answer", "ce_cot", "codi", "kv_k", "kv_v"):
        x = np.array([r[k] for r in rows])
        assert np.isfinite(x).all() and x[-3:].mean() < 0.9 * x[:3].mean(), (k, x)
    assert len(rows[0]["kv_k_iters"]) == 3 and len(rows[0]["kv_k_layers"]) == 2
    state = torch.load(out / "final" / "latent.pt")
    assert state["slots"] == latent_store["slots"] and state["iterations"] == 3 and state["hidden"] == 32
    # teacher-a: D 64 -> 32 adapters, teacher-b: 16 -> 32; both CODI maps 32 -> 64 (H_t = 64)
    assert state["adapters"]["teacher_a.k.weight"].shape == (2, 64, 32) and state["adapters"][
        "teacher_b.v.weight"
    ].shape == (2, 16, 32)
    assert state["codi"]["teacher_a.weight"].shape == (64, 32)


def test_a_saved_latent_head_reloads_to_the_same_logits_and_answers(student_path, tokenizer, examples, tmp_path):
    model = _model(student_path, tokenizer)
    with torch.no_grad():  # move the head off its initialisation
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.student.save_pretrained(tmp_path)
    save_latent(model, tmp_path / "latent.pt")
    head, iterations = load_latent(tmp_path)
    student = _student(tmp_path)
    b = _batch(tokenizer, examples)
    q, qm, a, am = split_segments(b["input_ids"], b["segment_ids"], tokenizer.pad_token_id)
    with torch.no_grad():
        ref = jacobi(model.student, model.head, q, qm, 3, tail_ids=a, tail_mask=am)["logits"]
        got = jacobi(student, head, q, qm, iterations, tail_ids=a, tail_mask=am)["logits"]
    assert iterations == 3 and torch.equal(ref, got)
    gens = [
        latent_generate(m, h, q, qm, 3, 10, tokenizer.eos_token_id, tokenizer.pad_token_id)["tokens"]
        for m, h in ((model.student, model.head), (student, head))
    ]
    assert torch.equal(*gens)
    with pytest.raises(FileNotFoundError, match="--mode latent"):
        load_latent(student_path)


def test_a_latent_run_evaluates_identically_from_its_run_dir_and_from_final(latent_run, tiny_data, tmp_path):
    out, _ = latent_run
    data = DataSpec(split="test", limit=4, synthetic=tiny_data.synthetic)
    results = []
    for i, model in enumerate((out, out / "final")):
        r = evaluate(
            EvalConfig(
                model=str(model),
                mode="latent",
                data=data,
                max_new_tokens=12,
                batch_size=4,
                device="cpu",
                out=str(tmp_path / f"{i}.json"),
            ),
            progress=False,
        )
        results.append((r, json.loads((tmp_path / f"{i}.json").read_text())["predictions"]))
    (a, pa), (b, pb) = results
    assert a["perplexity"] == b["perplexity"] and np.isfinite(a["perplexity"])
    assert [p["text"] for p in pa] == [p["text"] for p in pb] and a["accuracy"] == b["accuracy"]


def test_eval_reports_forward_passes_and_generated_tokens_per_question_in_both_modes(
    latent_run, student_path, tiny_data
):
    """batch_size 1, decoder calls counted with a hook: latent = per question T (gold-answer
    perplexity) + T + G - 1 (generation); CoT = 1 (gold perplexity) + G (prefill + G - 1 steps)."""
    out, _ = latent_run
    data = DataSpec(split="test", limit=3, synthetic=tiny_data.synthetic)
    calls = []
    orig = transformers.PreTrainedModel.post_init

    def post_init(self):  # hook every model eval builds
        orig(self)
        if hasattr(self, "layers"):
            self.register_forward_hook(lambda *_: calls.append(1))

    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.PreTrainedModel, "post_init", post_init)
    try:
        for mode, model, extra in (("latent", out, 3), ("cot", student_path, 1)):
            calls.clear()
            r = evaluate(
                EvalConfig(model=str(model), mode=mode, data=data, max_new_tokens=9, batch_size=1, device="cpu"),
                progress=False,
            )
            assert r["n"] == 3 and 1 <= r["generated_tokens_per_question"] <= 9
            expected = r["generated_tokens_per_question"] + (2 if mode == "latent" else 0)  # T + G - 1 with T = 3
            assert r["forward_passes_per_question"] == pytest.approx(expected)
            once = (
                2 if mode == "cot" else 0
            )  # eval.plain_head's check of the output head, once per run: 2 decoder calls on 4 tokens
            assert len(calls) == pytest.approx(3 * (extra + r["forward_passes_per_question"]) + once)
    finally:
        mp.undo()


def test_cli_latent_mode_takes_the_kava_recipe_where_not_given_and_evaluates(latent_store, tmp_path, capsys):
    """Also the CODI-only run (--kv-weight 0): no adapters saved, no KV terms logged."""
    run = tmp_path / "cli"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "teachers: [teacher-a, teacher-b]\nweight_decay: 0.0\n"
    )  # the file's setting wins over the recipe
    args = [
        "train",
        "--mode",
        "latent",
        "--store",
        str(latent_store["store"]),
        "--student",
        latent_store["student"].name_or_path,
        "--config",
        str(cfg_file),
        "--out",
        str(run),
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--lora-r",
        "8",
        "--kv-weight",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    cfg = TrainConfig.load(run / "final" / "train_config.yaml")
    assert (
        cfg.mode,
        cfg.lora_r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.weight_decay,
        cfg.grad_clip,
        cfg.warmup_ratio,
    ) == ("latent", 8, 32, 0.1, 0.0, 2.0, 0.05)
    assert (run / "final" / "lora" / "adapter_config.json").exists()
    assert torch.load(run / "final" / "latent.pt")["adapters"] == {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert "kv_k" not in rows[-1] and np.isfinite(rows[-1]["codi"]) and np.isfinite(rows[-1]["ce_answer"])
    assert (
        main(
            [
                "eval",
                "--mode",
                "latent",
                "--model",
                str(run),
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "forward passes" in capsys.readouterr().out


def test_latent_training_refuses_a_teacher_dumped_without_latent(latent_store, tmp_path):
    with pytest.raises(StoreError, match=r"\['teacher-plain'\] were dumped without latent compression; re-dump"):
        train(_cfg(latent_store, tmp_path / "x", teachers=None), progress=False)


def test_a_latent_run_stopped_and_resumed_ends_bitwise_identical_to_an_uninterrupted_one(latent_store, tmp_path):
    """Mid-epoch (48 samples / batch 4 = 12 batches an epoch): checkpoint at step 2, stop at 3,
    resume from step 2 to 4."""
    common = dict(max_steps=4, batch_size=4, shuffle_buffer=8)
    train(_cfg(latent_store, tmp_path / "straight", **common), progress=False)
    train(_cfg(latent_store, tmp_path / "cut", save_every=2, stop_at_step=3, **common), progress=False)
    assert (tmp_path / "cut" / "checkpoints" / "step-0000002" / "loader.json").exists()
    train(_cfg(latent_store, tmp_path / "cut", save_every=2, resume=str(tmp_path / "cut"), **common), progress=False)
    a, b = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / r / "final").state_dict()
        for r in ("straight", "cut")
    )
    init = transformers.AutoModelForCausalLM.from_pretrained(latent_store["student"].name_or_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], init[k]) for k in a)
    la, lb = (torch.load(tmp_path / r / "final" / "latent.pt") for r in ("straight", "cut"))
    for part in ("head", "adapters", "codi"):
        assert la[part].keys() == lb[part].keys() and all(torch.equal(la[part][k], lb[part][k]) for k in la[part]), (
            part
        )


def test_shuffled_latent_control_swaps_compressed_kv_between_samples_and_keeps_the_rest():
    from kvdistill.train.stream import shuffle_latent

    rng = np.random.default_rng(0)
    samples = [
        {
            "sample_id": f"s{i}",
            "input_ids": np.arange(3 + i),
            "latent": {
                "t": {
                    "k": rng.normal(size=(M, 2, 4)),
                    "v": rng.normal(size=(M, 2, 4)),
                    "mask": rng.random(M) > 0.3,
                    "hidden": np.full(6, float(i)),
                }
            },
        }
        for i in range(4)
    ]
    out = shuffle_latent(samples, seed=3)
    assert [o["kv_from"] for o in out] == [o["kv_from"] for o in shuffle_latent(samples, seed=3)]  # seeded
    assert sorted(o["kv_from"] for o in out) == [s["sample_id"] for s in samples]
    for s, o in zip(samples, out, strict=True):
        src = next(x for x in samples if x["sample_id"] == o["kv_from"])
        assert o["kv_from"] != s["sample_id"]
        for n in ("k", "v", "mask"):
            assert np.array_equal(o["latent"]["t"][n], src["latent"]["t"][n])
        assert np.array_equal(o["latent"]["t"]["hidden"], s["latent"]["t"]["hidden"]) and np.array_equal(
            o["input_ids"], s["input_ids"]
        )


def test_compare_runs_latent_arms_on_a_latent_store(latent_store, tiny_data, tmp_path):
    from kvdistill.compare import run_compare
    from kvdistill.schemas import CompareConfig, DataSpec

    data = DataSpec.from_dict({**tiny_data.to_dict(), "split": "test", "limit": 3})
    cfg = CompareConfig(
        out=str(tmp_path / "cmp"),
        seeds=2,
        arms=["ce", "latent-codi", "latent-shuffled"],
        steps=2,
        store=str(latent_store["store"]),
        student=latent_store["student"],
        eval_data=data,
        max_new_tokens=4,
        device="cpu",
        baseline="latent-codi",
        train={
            "batch_size": 4,
            "warmup_steps": 1,
            "shuffle_buffer": 8,
            "log_every": 1,
            "teachers": ["teacher-a", "teacher-b"],
        },
    )
    result = run_compare(cfg, progress=False)
    for arm in ("latent-codi", "latent-shuffled"):
        assert [r["seed"] for r in result["arms"][arm]["runs"]] == [0, 1]
        run = tmp_path / "cmp" / "runs" / arm / "seed-0"
        assert (run / "final" / "latent.pt").exists()
        ev = json.loads((run / "eval.json").read_text())
        assert ev["mode"] == "latent" and ev["n"] == 3
    assert (
        TrainConfig.load(tmp_path / "cmp" / "runs" / "latent-shuffled" / "seed-1" / "train_config.yaml").kv_control
        == "shuffled"
    )
    # Paired against the CODI-only arm, the baseline a latent KV sweep is read against.
    assert result["baseline"] == "latent-codi" and "vs_baseline" not in result["arms"]["latent-codi"]
    codi = {r["seed"]: r["accuracy"] for r in result["arms"]["latent-codi"]["runs"]}
    for arm in ("ce", "latent-shuffled"):
        runs = result["arms"][arm]["runs"]
        assert result["arms"][arm]["vs_baseline"]["accuracy"]["values"] == pytest.approx(
            [r["accuracy"] - codi[r["seed"]] for r in runs]
        )


@pytest.mark.parametrize(
    "option",
    [{"fusion": "router"}, {"adapter": "headwise"}, {"kv_attn_weight": "student"}, {"layer_anneal_steps": 10}],
)
def test_latent_mode_refuses_options_only_the_written_chain_trainer_has(option):
    from kvdistill.schemas import ConfigError

    with pytest.raises(ConfigError, match=next(iter(option))):
        TrainConfig(store="s.zarr", student=ModelSpec(name_or_path="s"), out="o", mode="latent", **option)
    TrainConfig(store="s.zarr", student=ModelSpec(name_or_path="s"), out="o", mode="cot", **option)  # fine there


# --- `kvdistill train diagnose` in latent mode -----------------------------------------------------


def test_latent_diagnose_reports_every_term_its_gradients_on_student_head_and_adapters_and_balancing_weights(
    latent_store, tmp_path, capsys
):
    from kvdistill.train.diagnose import diagnose, format_table

    cfg = _cfg(latent_store, tmp_path / "diag", ce_weight=0.5, kv_weight=2.0, cot_weight=0.25)
    result = diagnose(cfg, batches=2)
    with capsys.disabled():  # visible with pytest -s
        print("\n" + format_table(result))
    t = result["terms"]
    assert (
        result["mode"] == "latent"
        and result["batches"] == 2
        and result["ce_term"] == "ce_answer"
        and result["checkpoint"] is None
    )
    assert list(t) == ["ce_answer", "ce_cot", "codi", "kv_k", "kv_v", "kv"]
    for name, r in t.items():
        assert (
            np.isfinite([r["value"], r["grad_student"], r["grad_head"], r["grad_adapters"]]).all()
            and r["grad_student"] > 0
        ), name
        assert r["weighted_grad_student"] == pytest.approx(abs(r["weight"]) * r["grad_student"]), name
        assert -1 <= r["cos_ce"] <= 1 + 1e-9, name
    assert (t["ce_answer"]["weight"], t["ce_cot"]["weight"], t["codi"]["weight"], t["kv"]["weight"]) == (
        0.5,
        0.25,
        10.0,
        2.0,
    )
    assert t["ce_answer"]["cos_ce"] == 1.0
    # What reaches what: the written chain never sees the latents; answer CE reaches the head but no
    # adapter or CODI map; CODI and the slot K/V reach the head and their own maps.
    assert t["ce_cot"]["grad_head"] == 0 and t["ce_cot"]["grad_adapters"] == 0
    assert t["ce_answer"]["grad_head"] > 0 and t["ce_answer"]["grad_adapters"] == 0
    for name in ("codi", "kv_k", "kv_v", "kv"):
        assert t[name]["grad_head"] > 0 and t[name]["grad_adapters"] > 0, name
    assert t["kv"]["value"] == pytest.approx(t["kv_k"]["value"] + t["kv_v"]["value"])
    assert t["kv"]["grad_student"] <= t["kv_k"]["grad_student"] + t["kv_v"]["grad_student"] + 1e-9
    ce_ref = 0.5 * t["ce_answer"]["grad_student"]
    sug = result["suggested"]
    assert set(sug) == {"kv_weight", "codi_weight", "cot_weight"}
    for field, term in (("kv_weight", "kv"), ("codi_weight", "codi"), ("cot_weight", "ce_cot")):
        assert sug[field] * t[term]["grad_student"] == pytest.approx(ce_ref), field
        assert t[term]["vs_ce"] == pytest.approx(t[term]["weighted_grad_student"] / ce_ref), term
    table = format_table(result)
    assert (
        all(name in table for name in t) and "|grad| head" in table and "codi_weight" in table and "cos(CE)" in table
    )
    assert not (tmp_path / "diag").exists()  # nothing trained, nothing written


def test_latent_diagnose_leaves_out_terms_whose_weight_is_0_as_train_does(latent_store, tmp_path):
    from kvdistill.train.diagnose import diagnose

    result = diagnose(_cfg(latent_store, tmp_path / "d", kv_weight=0.0, cot_weight=0.0), batches=1)
    assert list(result["terms"]) == ["ce_answer", "codi"] and set(result["suggested"]) == {"codi_weight"}
    assert result["terms"]["codi"]["grad_adapters"] > 0  # the CODI maps (no KV adapter is built)


def test_diagnose_at_a_trained_checkpoint_loads_its_weights_and_differs_from_init(latent_run, tmp_path, capsys):
    from kvdistill.core.models import pad_token_id
    from kvdistill.schemas import ConfigError
    from kvdistill.train.diagnose import diagnose, load_trained
    from kvdistill.train.latent import latent_mode
    from kvdistill.train.student import load_student

    out, _ = latent_run
    cfg = TrainConfig.load(out / "train_config.yaml")
    tokenizer, student, spec, teachers = load_student(cfg)
    mode = latent_mode(cfg, student, spec, teachers, pad_token_id(tokenizer))
    assert load_trained(mode, cfg, out) == out / "final"
    state = torch.load(out / "final" / "latent.pt")
    for part, module in (("head", mode.model.head), ("adapters", mode.model.adapters), ("codi", mode.model.codi)):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state[part].items()), part
    final = transformers.AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(mode.model.student.state_dict()[k], v) for k, v in final.items())

    init, trained = diagnose(cfg, batches=2), diagnose(cfg, batches=2, checkpoint=out)
    assert trained["checkpoint"] == str(out / "final") and list(trained["terms"]) == list(init["terms"])
    for name in ("ce_answer", "ce_cot", "codi", "kv_k", "kv_v"):  # 12 steps on these samples lower every term
        assert trained["terms"][name]["value"] < 0.95 * init["terms"][name]["value"], name
    assert trained["terms"]["kv"]["grad_student"] != init["terms"]["kv"]["grad_student"]

    with pytest.raises(ConfigError, match=r"kv_weight > 0 = True, this config has False.*--config"):
        diagnose(TrainConfig.from_dict({**cfg.to_dict(), "kv_weight": 0.0}), batches=1, checkpoint=out)

    # the CLI: the run's own config, the table, then its loss curve, and --json
    capsys.readouterr()
    assert (
        main(["train", "diagnose", "--checkpoint", str(out), "--batches", "2", "--json", str(tmp_path / "d.json")])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        f"loss terms at {out / 'final'}, mode latent" in printed and "kv_k[iter 3]" in printed and "falls" in printed
    )
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["terms"]["kv"]["value"] == pytest.approx(trained["terms"]["kv"]["value"])
    assert saved["curve"]["terms"]["kv_k"]["trend"] == "falls"


def test_diagnose_reads_a_lora_run_the_same_from_final_and_from_its_last_training_checkpoint(latent_store, tmp_path):
    """final/ holds the merged student and the LoRA adapter (loaded onto the base student);
    checkpoints/step-N the whole module: at the same step both give the same numbers."""
    from kvdistill.train.diagnose import diagnose

    out = tmp_path / "lora"
    cfg = _cfg(latent_store, out, max_steps=2, save_every=2, lora_r=4, lora_alpha=8)
    train(cfg, progress=False)
    init = diagnose(cfg, batches=1)
    a = diagnose(cfg, batches=1, checkpoint=out)
    b = diagnose(cfg, batches=1, checkpoint=out / "checkpoints" / "step-0000002")
    assert a["checkpoint"] == str(out / "final") and b["checkpoint"] == str(out / "checkpoints" / "step-0000002")
    for name, r in a["terms"].items():
        for key in ("value", "grad_student", "grad_head", "grad_adapters"):
            assert r[key] == pytest.approx(b["terms"][name][key], rel=1e-4), (name, key)
    assert a["terms"]["ce_answer"]["value"] != init["terms"]["ce_answer"]["value"]
