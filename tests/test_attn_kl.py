"""The attention KL term (`--attn-kl-weight`): KL(A_t || A_s) of the student's queries over the
fused adapted teacher keys (A_t) against its own keys (A_s), per layer, over real tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvdistill.core.capture import attention_layout, capture_kv, forward_kv, rope_heads
from kvdistill.schemas import ConfigError, ModelSpec, TrainConfig
from kvdistill.train.distiller import Distiller, KVShapes
from kvdistill.train.losses import attention_kl, attention_log_probs, linear_ramp

CONFIGS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),  # q_norm / k_norm before RoPE
    "qwen2-sliding": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0},
    ),
}
LENGTHS = [9, 5, 7]  # a right-padded batch, as train/stream.py collate pads


def _model(arch: str = "qwen2", seed: int = 0):
    """2 layers, hidden 32, 4 query heads over 2 kv heads of 8 dims (GQA), eager attention.
    Weights drawn 5x wider than the default 0.02, so attention is not near uniform: A_t takes the
    student's key scale (issue 26), and at 0.02 both would be flat and the KL ~1e-4."""
    config_cls, model_cls, extra = CONFIGS[arch]
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        attn_implementation="eager",
        initializer_range=0.1,
        **extra,
    )
    torch.manual_seed(seed)
    return model_cls(config).float().eval()


def _batch(lengths=LENGTHS, seed: int = 0, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, 64, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n :] = 1
        else:
            mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _cfg(**kw) -> TrainConfig:
    """The loss options given; the CKA and router entropy terms off unless given."""
    kw = {"cka_weight": 0.0, "router_entropy_weight": 0.0, **kw}
    return TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", **kw)


def _distiller(student, widths, teacher_heads=None, student_heads=None, **kw):
    kw = {"kv_norm": "layer_std", "attn_kl_weight": 1.0, **kw}
    shapes = KVShapes(widths, student.config.num_hidden_layers, 16, teacher_heads or {}, student_heads)
    return Distiller(_cfg(**kw), student, shapes)  # D_s = 2 kv heads x 8


def _teacher_kv(widths, B, T, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {t: (torch.randn(B, T, 2, w, generator=g), torch.randn(B, T, 2, w, generator=g)) for t, w in widths.items()}


# ----------------------------------------------------------------------------- A_s is the model's attention


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("left", [False, True])
def test_student_attention_rebuilt_from_captured_queries_and_keys_equals_the_models_eager_attention(arch, left):
    model = _model(arch)
    ids, mask = _batch(left=left)
    with torch.no_grad(), capture_kv(model, queries=True) as cap:
        res = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    for i, spec in enumerate(attention_layout(model)):
        if arch == "qwen2-sliding":
            assert spec["sliding_window"] == 3
        q = rope_heads(cap["q"][i], cap["rope"][i], spec["heads"])  # [B, 4, T, 8]
        k = rope_heads(cap["k"][i], cap["rope"][i], spec["kv_heads"])  # [B, 2, T, 8]
        probs = (
            attention_log_probs(q, k, real, spec["scaling"], spec["sliding_window"]).exp().flatten(1, 2)
        )  # [B, 4, T, T]
        eager = res.attentions[i]
        assert eager.shape == probs.shape
        rows = real[:, None, :, None].expand_as(probs)  # left padding: a padded query row sees no key at all
        torch.testing.assert_close(probs[rows], eager[rows], rtol=0, atol=1e-6)
        if not left:  # right padding: every row, padded queries included, is the model's
            torch.testing.assert_close(probs, eager, rtol=0, atol=1e-6)


def test_queries_are_captured_only_when_asked():
    model = _model()
    ids, mask = _batch()
    with torch.no_grad(), capture_kv(model) as cap:
        model(input_ids=ids, attention_mask=mask)
    assert set(cap) == {"k", "v"}


# ----------------------------------------------------------------------------- the term


def _reference_kl(model, cap, k_t, lengths) -> list[float]:
    """Per sample, directly from the definition: HF's own RoPE, each sample's real tokens alone
    with a -inf causal mask, KL(A_t || A_s) summed over keys, meaned over query heads, tokens, layers;
    the target keys k_t (one teacher) first put on the student keys' mean and std over the
    sample's real tokens and channels, per layer (the target's fixed temperature, issue 26)."""
    out = []
    for b, n in enumerate(lengths):
        layers = []
        for i, spec in enumerate(attention_layout(model)):
            cos, sin = (x[:, :n] for x in cap["rope"][i])
            q = cap["q"][i][b : b + 1, :n].view(1, n, 4, 8).transpose(1, 2)
            ks = cap["k"][i][b : b + 1, :n].view(1, n, 2, 8).transpose(1, 2)
            kt = k_t[b : b + 1, :n, i]
            kt = ks.mean() + (kt - kt.mean()) * ks.std(unbiased=False) / kt.std(unbiased=False)
            kt = kt.view(1, n, 2, 8).transpose(1, 2)
            q, ks = apply_rotary_pos_emb(q, ks, cos, sin)
            _, kt = apply_rotary_pos_emb(q, kt, cos, sin)
            causal = torch.full((n, n), -math.inf).triu(1)
            log_s = torch.log_softmax(
                q @ ks.repeat_interleave(2, dim=1).transpose(2, 3) * spec["scaling"] + causal, dim=-1
            )
            log_t = torch.log_softmax(
                q @ kt.repeat_interleave(2, dim=1).transpose(2, 3) * spec["scaling"] + causal, dim=-1
            )
            p_t = log_t.exp()
            kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)  # [1, H_q, n]
            layers.append(kl.mean())
        out.append(float(torch.stack(layers).mean()))
    return out


def test_attention_kl_is_the_definition_per_sample_teacher_attention_as_the_target():
    """Identity adapter (teacher width = student width): the target keys are the stored ones,
    rescaled onto the student's (`_reference_kl`)."""
    model = _model()
    ids, mask = _batch()
    kv = _teacher_kv({"t": 16}, *ids.shape)
    dist = _distiller(model, {"t": 16})
    with torch.no_grad(), capture_kv(model, queries=True) as cap:
        model(input_ids=ids, attention_mask=mask)
        out = dist(ids, mask, mask, kv)
    per_sample = _reference_kl(model, cap, kv["t"][0], LENGTHS)
    want = sum(n * x for n, x in zip(LENGTHS, per_sample, strict=True)) / sum(LENGTHS)  # a mean over real tokens
    assert out["attn_kl"].item() == pytest.approx(want, rel=1e-5)
    assert out["attn_kl"].item() > 1e-3  # keys differ: positive
    assert out["attn_kl_layers"].shape == (2,)
    # The direction matters: KL(A_s || A_t) is another number.
    with torch.no_grad():
        i, spec = 0, attention_layout(model)[0]
        q = rope_heads(cap["q"][i], cap["rope"][i], 4)
        ks, kt = (rope_heads(k, cap["rope"][i], 2) for k in (cap["k"][i], kv["t"][0][:, :, i]))
        forward, backward = (
            attention_kl(q, ks, kt, mask.bool(), spec["scaling"]),
            attention_kl(q, kt, ks, mask.bool(), spec["scaling"]),
        )
    assert not torch.allclose(forward, backward, rtol=1e-2)


def test_attention_kl_is_zero_when_the_teacher_keys_are_the_students_own():
    model = _model()
    ids, mask = _batch()
    with torch.no_grad():
        k, v = forward_kv(model, ids, mask)  # [B, T, L, 16] pre-RoPE: what a self-dump stores
        out = _distiller(model, {"self": 16})(ids, mask, mask, {"self": (k, v)})
    assert abs(out["attn_kl"].item()) < 1e-6 and out["attn_kl_layers"].abs().max() < 1e-6


def test_the_batch_term_is_the_token_weighted_mean_of_each_sample_alone_and_padding_changes_nothing():
    widths = {"teacher-a": 24, "teacher-b": 8}  # flat adapters, fused with fixed weights
    model = _model()
    torch.manual_seed(3)
    dist = _distiller(model, widths, teacher_weights={"teacher-a": 3.0, "teacher-b": 1.0})
    ids, mask = _batch()
    kv = _teacher_kv(widths, *ids.shape)
    with torch.no_grad():
        batch = dist(ids, mask, mask, kv)
        alone = [
            dist(
                ids[b : b + 1, :n],
                mask[b : b + 1, :n],
                mask[b : b + 1, :n],
                {t: (k[b : b + 1, :n], v[b : b + 1, :n]) for t, (k, v) in kv.items()},
            )
            for b, n in enumerate(LENGTHS)
        ]
        want = sum(n * o["attn_kl_layers"] for n, o in zip(LENGTHS, alone, strict=True)) / sum(LENGTHS)
        torch.testing.assert_close(batch["attn_kl_layers"], want, rtol=1e-5, atol=1e-7)
        # Anything at padded positions, teacher keys and values (even NaN) and pad ids alike, changes nothing.
        pad = ~mask.bool()
        nan_kv = {
            t: (k.masked_fill(pad[:, :, None, None], float("nan")), v.masked_fill(pad[:, :, None, None], 1e4))
            for t, (k, v) in kv.items()
        }
        after = dist(ids.masked_fill(pad, 7), mask, mask, nan_kv)
    assert torch.isfinite(batch["attn_kl"]) and torch.equal(batch["attn_kl"], after["attn_kl"])


def test_the_term_trains_the_students_queries_and_keys_but_not_the_adapters():
    model = _model().train()
    dist = _distiller(model, {"t": 24})
    ids, mask = _batch()
    out = dist(ids, mask, mask, _teacher_kv({"t": 24}, *ids.shape))
    named = dict(dist.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(out["attn_kl"], list(named.values()), allow_unused=True), strict=True))
    for i in range(2):
        for proj in ("q_proj", "k_proj"):
            g = grads[f"student.model.layers.{i}.self_attn.{proj}.weight"]
            assert g is not None and g.abs().sum() > 0, (i, proj)
    assert all(grads[n] is None for n in named if n.startswith("adapters."))  # A_t is a detached target


def test_the_teacher_attention_is_a_constant_target_the_queries_are_trained_through_a_s_only():
    g = torch.Generator().manual_seed(0)
    q, k_s, k_t = (torch.randn(2, h, 6, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    gq, gks, gkt = torch.autograd.grad(
        attention_kl(q, k_s, k_t, mask, 8**-0.5).sum(), [q, k_s, k_t], allow_unused=True
    )
    assert gkt is None and gks.abs().sum() > 0
    # The same gradient as the cross-entropy against A_t held fixed.
    p_t = attention_log_probs(q, k_t, mask, 8**-0.5).exp().detach()
    ce = -(p_t * attention_log_probs(q, k_s, mask, 8**-0.5)).sum(-1).mean(dim=(1, 2))  # [B, T]
    (want,) = torch.autograd.grad(torch.where(mask, ce, 0.0).sum(), [q])
    torch.testing.assert_close(gq, want)


def test_gradient_checkpointing_gives_the_same_term_and_gradient():
    ids, mask = _batch()
    kv = _teacher_kv({"t": 24}, *ids.shape)
    got = []
    for ckpt in (False, True):
        model = _model().train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        dist = _distiller(model, {"t": 24})
        out = dist(ids, mask, mask, kv)
        (g,) = torch.autograd.grad(out["attn_kl"], [model.model.layers[0].self_attn.q_proj.weight])
        got.append((out["attn_kl"].detach(), g))
    torch.testing.assert_close(got[0][0], got[1][0])
    torch.testing.assert_close(got[0][1], got[1][1])


# ----------------------------------------------------------------------------- the target's temperature


def _target_attention(dist, model, ids, mask, kv, monkeypatch):
    """(out, A_t per layer [B, H_kv, G, T, T]): the forward's terms and the attention of the
    student's queries over the target keys the forward handed `_attn_kl_layers`."""
    seen = {}
    inner = dist._attn_kl_layers

    def spy(cap, k_s, k_t, m):
        seen["cap"], seen["k_t"] = cap, k_t
        return inner(cap, k_s, k_t, m)

    monkeypatch.setattr(dist, "_attn_kl_layers", spy)
    with torch.no_grad():
        out = dist(ids, mask, mask, kv)
    cap, real = seen["cap"], mask.bool()
    a_t = []
    for i, spec in enumerate(attention_layout(model)):
        q = rope_heads(cap["q"][i], cap["rope"][i], spec["heads"])
        kt = rope_heads(seen["k_t"][:, :, i], cap["rope"][i], spec["kv_heads"])
        a_t.append(attention_log_probs(q, kt, real, spec["scaling"], spec["sliding_window"]).exp())
    return out, a_t


ADAPTERS = {
    "flat": ({"t": 24}, {}),
    "headwise": ({"t": 24}, {"adapter": "headwise", "teacher_heads": {"t": (3, 8)}, "student_heads": (2, 8)}),
    "two-teachers": ({"teacher-a": 24, "teacher-b": 8}, {"teacher_weights": {"teacher-a": 3.0, "teacher-b": 1.0}}),
}


@pytest.mark.parametrize("adapters", list(ADAPTERS))
def test_the_target_attention_does_not_follow_the_k_adapters_scale_which_no_loss_controls(adapters, monkeypatch):
    """Issue 26: the layer_std KV loss is blind to a positive rescaling of the K adapter (per
    layer, per teacher), and attention KL does not train the adapter (A_t is detached), so
    nothing holds the adapter's scale; A_t must not change with it, or its sharpness (the
    target's temperature) would drift with a norm no loss sees. Each parameter of each K adapter
    (the adapters have no bias) scaled by 0.25, 1 and 4, uniformly and then differently per
    teacher and layer: kv_k stays (the symmetry is real), and so do A_t and attn_kl."""
    widths, kw = ADAPTERS[adapters]
    model = _model()
    ids, mask = _batch()
    kv = _teacher_kv(widths, *ids.shape)
    real = mask.bool()
    torch.manual_seed(3)
    dist = _distiller(model, widths, **kw)
    base = {n: p.detach().clone() for n, p in dist.adapters.named_parameters()}
    assert base and all(".k." in n or ".v." in n for n in base)

    def run(scale):  # scale(name, param) -> a positive factor per layer, broadcast over the layer's parameter
        with torch.no_grad():
            for n, p in dist.adapters.named_parameters():
                p.copy_(base[n] * scale(n).view(-1, *[1] * (p.dim() - 1)) if ".k." in n else base[n])
        return _target_attention(dist, model, ids, mask, kv, monkeypatch)

    ref, ref_a = run(lambda n: torch.ones(1))
    variants = {f"x{c}": lambda n, c=c: torch.tensor([c]) for c in (0.25, 4.0)}
    variants["per teacher and layer"] = lambda n: (
        torch.tensor([0.25, 4.0]) if "teacher_b" not in n else torch.tensor([3.0, 0.5])
    )
    for name, scale in variants.items():
        out, a_t = run(scale)
        assert out["kv_k"].item() == pytest.approx(ref["kv_k"].item(), rel=1e-3), name  # up to layer_std's eps
        for i, (got, want) in enumerate(zip(a_t, ref_a, strict=True)):
            rows = real[:, None, None, :, None].expand_as(got)
            torch.testing.assert_close(got[rows], want[rows], rtol=0, atol=1e-6, msg=f"{name}: A_t of layer {i}")
        torch.testing.assert_close(
            out["attn_kl_layers"], ref["attn_kl_layers"], rtol=0, atol=1e-6, msg=f"{name}: attn_kl"
        )
    assert ref["attn_kl"].item() > 1e-3


# ----------------------------------------------------------------------------- schedule and config


def test_the_weight_ramps_linearly_from_zero_over_its_warm_up():
    assert [linear_ramp(s, 10) for s in (0, 1, 5, 10, 25)] == [0.0, 0.1, 0.5, 1.0, 1.0]
    assert linear_ramp(0, 0) == 1.0 and linear_ramp(None, 10) == 1.0
    model = _model()
    ids, mask = _batch()
    kv = _teacher_kv({"t": 24}, *ids.shape)
    dist = _distiller(model, {"t": 24}, attn_kl_weight=0.5, attn_kl_warmup_steps=10)
    with torch.no_grad():
        for step, ramp in ((0, 0.0), (4, 0.4), (10, 1.0), (None, 1.0)):
            out = dist(ids, mask, mask, kv, step=step)
            rest = out["ce"] + out["kv_k"] + out["kv_v"]
            assert out["loss"].item() == pytest.approx((rest + 0.5 * ramp * out["attn_kl"]).item(), rel=1e-6), step


def test_off_by_default_and_then_costs_nothing():
    model = _model()
    ids, mask = _batch()
    out = Distiller(_cfg(), model, KVShapes({"t": 24}, 2, 16))(ids, mask, mask, _teacher_kv({"t": 24}, *ids.shape))
    assert (
        "attn_kl" not in out
        and TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o").attn_kl_weight == 0.0
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"attn_kl_weight": -0.1}, "attn_kl_weight: must be >= 0"),
        ({"attn_kl_warmup_steps": -1}, "attn_kl_warmup_steps: must be >= 0"),
        ({"attn_kl_weight": 0.1, "kv_weight": 0.0}, "set kv_weight > 0"),
        ({"attn_kl_weight": 0.1, "mode": "latent"}, "attn_kl_weight"),
    ],
)
def test_bad_attention_kl_settings_are_refused_naming_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(store="s", student=ModelSpec(name_or_path="x"), out="o", **kw)


# ----------------------------------------------------------------------------- end to end


def test_a_short_run_logs_a_finite_attention_kl_and_diagnose_reports_it(tiny_store, tmp_path):
    from kvdistill.train.diagnose import diagnose
    from kvdistill.train.loop import train

    cfg = TrainConfig(
        store=str(tiny_store["store"]),
        student=tiny_store["student"],
        out=str(tmp_path / "run"),
        batch_size=8,
        max_steps=4,
        warmup_steps=1,
        log_every=1,
        device="cpu",
        shuffle_buffer=16,
        attn_kl_weight=0.1,
        attn_kl_warmup_steps=2,
    )
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 4
    assert all(math.isfinite(r["attn_kl"]) and r["attn_kl"] > 0 and len(r["attn_kl_layers"]) == 2 for r in rows)
    terms = diagnose(cfg, batches=1)["terms"]
    assert (
        terms["attn_kl"]["weight"] == 0.1
        and terms["attn_kl"]["grad_student"] > 0
        and terms["attn_kl"]["grad_adapters"] == 0
    )
