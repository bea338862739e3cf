"""The trainer's menu: head-wise adapters, the learned router, attention-weighted KV loss, the
CKA term, layer annealing, and `kvdistill train diagnose`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from kvdistill.align.cka import linear_cka
from kvdistill.schemas import ModelSpec, TrainConfig
from kvdistill.store import open_specs
from kvdistill.train.distiller import (
    Distiller,
    HeadwiseAdapter,
    KVAdapter,
    KVShapes,
    Router,
    build_distiller,
    head_mixer_init,
)
from kvdistill.train.loop import train
from kvdistill.train.losses import (
    attention_key_weights,
    debiased_cka,
    layer_anneal_weights,
    masked_cka_loss,
    warmup_mix,
)
from kvdistill.train.stream import KVStream, collate

TEACHERS = {"teacher-a": 64, "teacher-b": 16}  # conftest: a is 2 kv heads x 32, b is 1 x 16; student 2 x 16
HEADS = {"teacher-a": (2, 32), "teacher-b": (1, 16)}


def _cfg(tiny_store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(out),
        batch_size=8,
        max_steps=12,
        warmup_steps=2,
        log_every=1,
        device="cpu",
        shuffle_buffer=16,
    )
    return TrainConfig(**{**base, **kw})


def _student(tiny_store):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_store["student"].name_or_path)


def _batch(tiny_store, n=6):
    samples = list(KVStream(tiny_store["store"], list(TEACHERS), shuffle_buffer=1))[:n]
    return collate(samples, pad_id=0)


# ----------------------------------------------------------------------------- head-wise adapter


def test_head_mixer_init_is_the_group_average_and_an_overlap_average_otherwise():
    assert torch.equal(head_mixer_init(4, 2), torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))
    assert torch.equal(head_mixer_init(1, 2), torch.tensor([[1.0], [1.0]]))  # MQA teacher: copied to every head
    torch.testing.assert_close(head_mixer_init(3, 2), torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]]))
    for h_t, h_s in [(5, 3), (2, 7), (8, 8)]:
        torch.testing.assert_close(head_mixer_init(h_t, h_s).sum(1), torch.ones(h_s))


def test_headwise_adapter_at_init_outputs_the_group_average_of_teacher_heads_with_far_fewer_parameters():
    torch.manual_seed(0)
    L, B, T, h_t, h_s, d = 3, 2, 5, 4, 2, 8
    a = HeadwiseAdapter(L, (h_t, d), (h_s, d))
    x = torch.randn(B, T, L, h_t * d)
    heads = x.view(B, T, L, h_t, d)
    expected = torch.cat(
        [(heads[..., 0, :] + heads[..., 1, :]) / 2, (heads[..., 2, :] + heads[..., 3, :]) / 2], dim=-1
    )
    assert torch.equal(a(x), expected)  # exact: halves of sums, identity maps
    # GQA teacher 8 heads x 64 -> student 2 x 32: far fewer parameters than one flat map
    hw, flat = HeadwiseAdapter(L, (8, 64), (2, 32)), KVAdapter(L, 512, 64)
    n_hw, n_flat = (sum(p.numel() for p in m.parameters()) for m in (hw, flat))
    assert n_hw == L * 2 * (8 + 64 * 32) and n_flat == L * 512 * 64 and 6 * n_hw < n_flat
    assert hw(torch.randn(1, 3, L, 512)).shape == (1, 3, L, 64)


def test_headwise_adapter_is_refused_for_a_pca_projected_teacher(tiny_store):
    spec, teachers = open_specs(tiny_store["store"])
    pca = dict(teachers)
    pca["teacher-a"] = dataclasses.replace(
        teachers["teacher-a"], width=8, projection={"dim": 8, "explained_variance": 0.9}
    )
    cfg = _cfg(tiny_store, "unused", adapter="headwise")
    build_distiller(cfg, _student(tiny_store), spec, teachers)  # the stored heads are intact: fine
    with pytest.raises(ValueError, match=r"teacher teacher-a: stored through a PCA projection.*--adapter flat"):
        build_distiller(cfg, _student(tiny_store), spec, pca)
    build_distiller(_cfg(tiny_store, "unused"), _student(tiny_store), spec, pca)  # flat handles any width


# ----------------------------------------------------------------------------- every mode trains


@pytest.mark.parametrize("adapter", ["flat", "headwise"])
@pytest.mark.parametrize("fusion", ["fixed", "similarity", "router"])
def test_each_fusion_and_adapter_trains_with_a_finite_falling_loss(tiny_store, fusion, adapter):
    """The Distiller `train` builds, fitted for a few Adam steps on one batch (every term on)."""
    torch.manual_seed(0)
    spec, teachers = open_specs(tiny_store["store"])
    cfg = _cfg(tiny_store, "unused", fusion=fusion, adapter=adapter, router_entropy_weight=0.01)
    model = build_distiller(cfg, _student(tiny_store), spec, teachers).train()
    batch = _batch(tiny_store, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = []
    for step in range(6):
        out = model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["kv"], step=step)
        rows.append({k: v.item() for k, v in out.items() if v.dim() == 0})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    loss, kv = np.array([r["loss"] for r in rows]), np.array([r["kv_k"] + r["kv_v"] for r in rows])
    assert all(np.isfinite(list(r.values())).all() for r in rows) and "cka" in rows[0]
    assert loss[-2:].mean() < 0.8 * loss[:2].mean() and kv[-2:].mean() < 0.8 * kv[:2].mean(), (loss, kv)
    if fusion != "fixed":
        assert all(abs(r["route_k_teacher-a"] + r["route_k_teacher-b"] - 1) < 1e-5 for r in rows)
    assert ("router_entropy" in rows[0]) == (fusion == "router")


def test_a_router_run_with_attention_weights_and_annealing_logs_every_term_and_saves_the_router(tiny_store, tmp_path):
    out = tmp_path / "router"
    cfg = _cfg(
        tiny_store,
        out,
        fusion="router",
        adapter="headwise",
        kv_attn_weight="student",
        kv_attn_warmup_steps=3,
        layer_anneal_steps=4,
        max_steps=6,
        save_every=4,
    )
    train(cfg, progress=False)
    ckpt = safetensors.torch.load_file(out / "checkpoints" / "step-0000004" / "model.safetensors")
    assert any(k.startswith("router.") for k in ckpt) and any(
        ".mix" in k for k in ckpt
    )  # the checkpoint holds router and adapters
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert len(rows) == 6
    for r in rows:
        assert {"ce", "kv_k", "kv_v", "cka", "router_entropy", "loss"} <= r.keys() and np.isfinite(r["loss"])
        assert abs(r["route_k_teacher-a"] + r["route_k_teacher-b"] - 1) < 1e-5
    # step 0 (first row): only layer 0 is annealed in, so kv_k = per-layer[0] / 2; from step 4 on both count
    assert abs(rows[0]["kv_k"] - rows[0]["kv_k_layers"][0] / 2) < 1e-5
    assert abs(rows[-1]["kv_k"] - np.mean(rows[-1]["kv_k_layers"])) < 1e-5
    spec, teachers = open_specs(tiny_store["store"])
    fresh = build_distiller(cfg, _student(tiny_store), spec, teachers).router.state_dict()
    saved = torch.load(out / "final" / "router.pt")
    assert saved.keys() == fresh.keys() and not all(torch.equal(saved[k], fresh[k]) for k in saved)  # trained, saved


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("fusion,adapter", [("router", "flat"), ("similarity", "headwise"), ("fixed", "headwise")])
def test_padding_contributes_exactly_nothing_to_any_term_attention_weighted_and_cka_included(
    tiny_store, fusion, adapter
):
    torch.manual_seed(0)
    cfg = _cfg(
        tiny_store,
        "unused",
        fusion=fusion,
        adapter=adapter,
        router_entropy_weight=0.1,
        kv_attn_weight="student",
        kv_attn_warmup_steps=10,
        cka_weight=0.5,
        cka_layers=[0, 1],
        layer_anneal_steps=8,
    )
    model = Distiller(cfg, _student(tiny_store).eval(), KVShapes(TEACHERS, 2, 32, HEADS, (2, 16)))
    assert model.student.config._attn_implementation == "eager"
    batch = _batch(tiny_store)
    pad = ~batch["attention_mask"].bool()
    assert pad.any()

    def losses(b):
        with torch.no_grad():
            out = model(
                b["input_ids"], b["attention_mask"], b["loss_mask"], b["kv"], step=4
            )  # mid warm-up, mid annealing
        return {k: v for k, v in out.items() if v.dim() == 0}

    before = losses(batch)
    kv = {
        t: (k.masked_fill(pad[:, :, None, None], float("nan")), v.masked_fill(pad[:, :, None, None], float("nan")))
        for t, (k, v) in batch["kv"].items()
    }
    after = losses({**batch, "input_ids": batch["input_ids"].masked_fill(pad, 7), "kv": kv})
    terms = {"ce", "kv_k", "kv_v", "cka", "loss"} | ({"router_entropy"} if fusion == "router" else set())
    assert terms <= before.keys() and before.keys() == after.keys()
    for name in before:
        assert torch.isfinite(before[name]) and torch.equal(before[name], after[name]), name


# ----------------------------------------------------------------------------- CKA


def test_cka_loss_equals_one_minus_align_cka_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 9, 2, 12, generator=g, dtype=torch.float64)
    b = a @ torch.randn(12, 20, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        3, 9, 2, 20, generator=g, dtype=torch.float64
    )
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 4:] = False
    for layer in (0, 1):
        ref = linear_cka(a[mask][:, layer], b[mask][:, layer])
        assert abs(float(debiased_cka(a[mask][:, layer], b[mask][:, layer])) - ref) < 1e-9
    ref = np.mean([1 - linear_cka(a[mask][:, i].float(), b[mask][:, i].float()) for i in (0, 1)])
    a32 = a.float().requires_grad_()
    loss = masked_cka_loss(a32, b.float(), mask, [0, 1])
    assert abs(loss.item() - ref) < 1e-6 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(a32.grad).all() and a32.grad[~mask].abs().sum() == 0 and a32.grad[mask].abs().sum() > 0
    # identical representations up to rotation and scale: CKA 1, loss 0
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert abs(float(masked_cka_loss(a, 3 * a @ q, mask, [0, 1]))) < 1e-12


def test_cka_layers_resolve_to_student_layers_and_bad_indices_are_refused():
    def cka_layers(layers):  # of a Distiller over a 4-layer student
        cfg = TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", cka_layers=layers)
        return Distiller(cfg, torch.nn.Linear(1, 1), KVShapes({"a": 8}, 4, 8)).cka_layers

    assert cka_layers("middle") == [2]
    assert cka_layers("last") == [3]
    assert cka_layers([3, 0]) == [0, 3]
    with pytest.raises(ValueError, match="0..3"):
        cka_layers([4])


# ----------------------------------------------------------------------------- router


def test_router_weights_sum_to_one_start_at_the_fixed_fusion_and_groups_split_layers_in_thirds():
    torch.manual_seed(0)
    r = Router(16, [0.75, 0.25], num_layers=6, groups=3)
    w = r(torch.randn(5, 16))
    assert w.shape == (5, 3, 2)
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]).expand(5, 3, 2))  # zero last layer: the fixed weights
    assert r.layer_group.tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        r.mlp[2].weight.normal_()
    w = r(torch.randn(5, 16))
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 3))
    assert (w[:, 0] != w[:, 2]).any()  # groups are separate weight vectors
    with pytest.raises(ValueError, match="router_groups 3 needs at least 3 student layers"):
        Router(16, [0.5, 0.5], num_layers=2, groups=3)


def test_router_entropy_term_rewards_entropy(tiny_store):
    """loss = ... - router_entropy_weight * H: the weight lowers the loss by exactly w * H, and a
    gradient step on that term alone spreads the router's weights (raises H)."""
    batch = _batch(tiny_store)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["kv"])
    torch.manual_seed(0)
    cfg = _cfg(
        tiny_store,
        "unused",
        fusion="router",
        teacher_weights={"teacher-a": 0.9, "teacher-b": 0.1},
        cka_weight=0.0,
        router_entropy_weight=0.0,
    )
    m0 = Distiller(cfg, _student(tiny_store).eval(), KVShapes(TEACHERS, 2, 32))
    torch.manual_seed(0)
    m1 = Distiller(
        dataclasses.replace(cfg, router_entropy_weight=0.5), _student(tiny_store).eval(), KVShapes(TEACHERS, 2, 32)
    )
    o0, o1 = m0(*args), m1(*args)
    h = o1["router_entropy"]
    torch.testing.assert_close(h, torch.tensor(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)), dtype=torch.float32))
    torch.testing.assert_close(o1["loss"], o0["loss"] - 0.5 * h, rtol=0, atol=1e-6)
    opt = torch.optim.SGD(m1.router.parameters(), lr=0.5)
    (-0.5 * h).backward()
    opt.step()
    assert m1(*args)["router_entropy"] > h


# ----------------------------------------------------------------------------- schedules


def test_layer_anneal_schedule_at_hand_picked_steps():
    expect = {
        0: [1.0, 0, 0],
        25: [1.0, 0.5, 0],
        50: [1.0, 1, 0],
        60: [1.0, 1, 0.2],
        100: [1.0, 1, 1],
        500: [1.0, 1, 1],
    }
    for step, w in expect.items():
        torch.testing.assert_close(layer_anneal_weights(3, step, 100), torch.tensor(w), msg=f"step {step}")
    assert torch.equal(layer_anneal_weights(3, 7, 0), torch.ones(3)) and torch.equal(
        layer_anneal_weights(3, None, 100), torch.ones(3)
    )


def test_attention_weight_warmup_goes_linearly_from_uniform_to_the_attention_weights():
    w = torch.tensor([[[2.0], [0.5], [0.5]]])  # [B, T, L]
    assert torch.equal(warmup_mix(w, 0, 1000), torch.ones_like(w))
    torch.testing.assert_close(warmup_mix(w, 250, 1000), torch.tensor([[[1.25], [0.875], [0.875]]]))
    assert torch.equal(warmup_mix(w, 1000, 1000), w) and torch.equal(warmup_mix(w, 5, 0), w)


def test_attention_key_weights_by_hand():
    """One head, T=3, the third token padded: real queries 0 and 1 put [1, 0, 0] and
    [0.25, 0.75, 0] on the keys; mean over real queries [0.625, 0.375, 0], mean-1 normalised
    over the 2 real tokens [1.25, 0.75, 0]. The padded query's row (NaN) cannot leak in."""
    p = torch.tensor([[[[1.0, 0, 0], [0.25, 0.75, 0], [float("nan")] * 3]]])  # [B, H, T_q, T_k]
    mask = torch.tensor([[True, True, False]])
    w = attention_key_weights([p, p.flip(1)], mask)
    assert w.shape == (1, 3, 2)
    torch.testing.assert_close(w[0, :, 0], torch.tensor([1.25, 0.75, 0.0]))
    two_heads = torch.cat(
        [p, torch.tensor([[[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1]]]])], dim=1
    )  # second head: all on key 0
    torch.testing.assert_close(
        attention_key_weights([two_heads], mask)[0, :, 0], torch.tensor([1.625, 0.375, 0.0]) / 1.0
    )


# ----------------------------------------------------------------------------- diagnose


def test_diagnose_reports_every_term_with_gradient_norms_and_suggested_weights(tiny_store, tmp_path, capsys):
    from kvdistill.cli import main
    from kvdistill.train.diagnose import diagnose, format_table

    cfg = _cfg(
        tiny_store,
        tmp_path / "diag",
        fusion="router",
        router_entropy_weight=0.1,
        kv_weight=2.0,
        teacher_weights={"teacher-a": 3.0, "teacher-b": 1.0},
        batch_size=4,
    )
    result = diagnose(cfg, batches=2)
    with capsys.disabled():  # visible with pytest -s
        print("\n" + format_table(result))
    assert result["batches"] == 2
    assert set(result["terms"]) == {"ce", "kv_k", "kv_v", "kv", "cka", "router_entropy"}
    t = result["terms"]
    for name, r in t.items():
        assert np.isfinite(r["value"]) and r["grad_student"] >= 0 and np.isfinite(r["grad_adapters"]), name
    assert t["ce"]["grad_student"] > 0 and t["ce"]["grad_adapters"] == 0  # CE never reaches adapters or router
    assert t["router_entropy"]["grad_student"] == 0 and t["router_entropy"]["grad_adapters"] > 0
    assert t["kv"]["weight"] == 2.0 and t["router_entropy"]["weight"] == -0.1
    sug = result["suggested"]
    assert sug["kv_weight"] * t["kv"]["grad_student"] == pytest.approx(t["ce"]["grad_student"])
    assert sug["cka_weight"] * t["cka"]["grad_student"] == pytest.approx(t["ce"]["grad_student"])
    table = format_table(result)
    assert all(name in table for name in t) and "kv_weight" in table
    assert not (tmp_path / "diag").exists()  # nothing trained, nothing written
    cfg.save(tmp_path / "c.yaml")
    assert main(["train", "diagnose", "--config", str(tmp_path / "c.yaml"), "--batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "router_entropy" in printed and "suggested weights" in printed


def test_loss_curve_compares_the_first_logged_value_with_the_mean_of_the_last_20_per_term_and_iteration(
    tmp_path, capsys
):
    from kvdistill.cli import main
    from kvdistill.train.diagnose import format_curve, loss_curve

    rows = []
    for i in range(30):  # kv_k falls 2.0 -> 0.55, kv_v flat at 1, codi rises 1 -> 1.29; steps 10..300
        row = {
            "step": 10 * (i + 1),
            "epoch": 0,
            "lr": 1e-3,
            "tokens": 100 * i,
            "loss": 5.0 - 0.1 * i,
            "kv_k": 2.0 - 0.05 * i,
            "kv_v": 1.0,
            "codi": 1.0 + 0.01 * i,
            "kv_k_iters": [3.0, 2.0 - 0.05 * i],
            "kv_k_layers": [1.0, 2.0],
            "route_k_a": 0.5,
        }
        if i % 10 == 9:
            row["val_kv_k"] = 9.0
        rows.append(json.dumps(row))
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(rows) + '\n{"step": 310, "kv_k": 0.'
    )  # a killed run's cut-off row
    curve = loss_curve(tmp_path)
    assert curve["steps"] == [10, 300] and curve["window"] == 20
    assert list(curve["terms"]) == [
        "loss",
        "kv_k",
        "kv_v",
        "codi",
        "kv_k[iter 1]",
        "kv_k[iter 2]",
    ]  # no val_, route_, layers, step...
    kv_k = curve["terms"]["kv_k"]
    last20 = sum(2.0 - 0.05 * i for i in range(10, 30)) / 20  # 1.025
    assert kv_k["n"] == 30 and kv_k["first"] == 2.0 and kv_k["mean_last"] == pytest.approx(last20)
    assert kv_k["change"] == pytest.approx((last20 - 2.0) / 2.0) and kv_k["trend"] == "falls"
    assert curve["terms"]["kv_v"]["change"] == 0 and curve["terms"]["kv_v"]["trend"] == "flat"
    assert curve["terms"]["codi"]["trend"] == "rises" and curve["terms"]["kv_k[iter 1]"]["trend"] == "flat"
    assert curve["terms"]["kv_k[iter 2]"]["mean_last"] == pytest.approx(last20)
    assert loss_curve(tmp_path, window=5)["terms"]["kv_k"]["mean_last"] == pytest.approx(
        sum(2.0 - 0.05 * i for i in range(25, 30)) / 5
    )
    table = format_curve(curve)
    assert "kv_k[iter 2]" in table and "-48.8%" in table
    assert (
        main(["train", "diagnose", "--run", str(tmp_path), "--json", str(tmp_path / "c.json")]) == 0
    )  # no store, no model
    assert "kv_k[iter 2]" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["curve"]["terms"]["kv_k"]["trend"] == "falls"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        loss_curve(tmp_path)
    with pytest.raises(FileNotFoundError, match="training run directory"):
        loss_curve(tmp_path / "nowhere")


def test_a_non_finite_cka_term_stops_training_and_is_named(tiny_store, tmp_path, monkeypatch):
    from kvdistill.train import distiller

    monkeypatch.setattr(distiller, "cka_from_sums", lambda s: torch.tensor(float("nan"), dtype=torch.float64))
    with pytest.raises(FloatingPointError, match=r"step 1: loss term cka is nan"):
        train(_cfg(tiny_store, tmp_path / "nan", max_steps=2), progress=False)
