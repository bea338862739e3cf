"""Alignment and capture: exact identities on real (tiny) transformers models, and property
tests of the layer map."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdistill.align import apply_layer_map, flatten_heads, ratio_layer_map, unflatten_heads
from kvdistill.core.capture import forward_kv, kv_geometry
from kvdistill.core.prompts import encode, prompt_text, render
from kvdistill.dump.run import run_dump
from kvdistill.schemas import DEFAULT_TEMPLATE, DumpConfig, ModelSpec
from kvdistill.store import ShardReader
from kvdistill.tiny import build_model


def _rotate(model, k: torch.Tensor) -> torch.Tensor:
    """k [T, H, d] pre-RoPE -> [1, H, T, d] rotated with the model's own rotary embedding."""
    apply_rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    k = k.transpose(0, 1)[None]  # [1, H, T, d]
    cos, sin = model.model.rotary_emb(k, torch.arange(k.shape[2])[None])
    return apply_rope(k, k, cos, sin)[0][0]


def _dump(tmp_path, data, teacher: str, student: str, batch_size: int, name: str = "t") -> ShardReader:
    cfg = DumpConfig(
        teacher=ModelSpec(name_or_path=teacher, name=name),
        student=ModelSpec(name_or_path=student),
        store=str(tmp_path / f"{name}-b{batch_size}.zarr"),
        data=data,
        batch_size=batch_size,
        kv_dtype="float32",
        device="cpu",
    )
    run_dump(cfg, progress=False)
    return ShardReader(cfg.store, name, 0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_identity_alignment_reproduces_teacher_kv_cache(tmp_path, make_model, tokenizer, examples, tiny_data, arch):
    """Student geometry = teacher geometry: stored keys, re-rotated with the model's RoPE, equal
    the DynamicCache keys; stored values equal the cache values (fp32)."""
    path = make_model(arch, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
    reader = _dump(tmp_path, tiny_data, str(path), str(path), batch_size=1)
    model = (
        type(build_model(arch, tokenizer, layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8))
        .from_pretrained(path)
        .eval()
    )
    H, d = 2, 16
    by_id = {ex.id: ex for ex in examples}
    worst_k = worst_v = 0.0
    for j, sid in enumerate(reader.sample_ids):
        rows = reader.rows(int(reader.offsets[j]), int(reader.offsets[j + 1]))
        ids = torch.as_tensor(encode(tokenizer, DEFAULT_TEMPLATE, by_id[sid]).input_ids, dtype=torch.long)[None]
        assert np.array_equal(rows["input_ids"], ids[0].numpy())
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            for layer in range(3):
                k = torch.from_numpy(rows["k"][:, layer]).reshape(-1, H, d)
                v = torch.from_numpy(rows["v"][:, layer]).reshape(-1, H, d).transpose(0, 1)
                worst_k = max(worst_k, (_rotate(model, k) - cache.layers[layer].keys[0]).abs().max().item())
                worst_v = max(worst_v, (v - cache.layers[layer].values[0]).abs().max().item())
    assert worst_k <= 1e-6, worst_k
    assert worst_v <= 1e-6, worst_v


def test_qwen3_key_is_captured_after_k_norm_and_before_rope(make_model, tokenizer):
    """Qwen3 normalises keys before rotating them: the captured key must be k_norm's output."""
    path = make_model("qwen3", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer("Question: Mia has 7 apples.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        k, _ = forward_kv(model, ids, torch.ones_like(ids))  # [1, T, L, D]
        cache = model(ids, use_cache=True).past_key_values
    for layer in range(2):
        rotated = _rotate(model, k[0, :, layer].reshape(-1, 2, 16))
        torch.testing.assert_close(rotated, cache.layers[layer].keys[0], rtol=0, atol=1e-6)


def test_gqa_teacher_stored_width_is_kv_heads_times_head_dim(tiny_store, make_model):
    widths = {"teacher-a": 2 * 32, "teacher-b": 1 * 16}  # GQA 2 kv heads x 32; MQA 1 x 16
    for name, width in widths.items():
        r = ShardReader(tiny_store["store"], name, 0)
        assert r.group["k"].shape[1:] == (2, width)
        assert r.group["v"].shape[1:] == (2, width)
    # head_dim given explicitly and != hidden / heads
    path = make_model("qwen2", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=24)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert kv_geometry(model.config).width == 48
    k, v = forward_kv(model, torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
    assert k.shape == v.shape == (1, 3, 2, 48)


def test_batched_dump_with_padding_matches_one_sample_at_a_time(tmp_path, make_model, tiny_data):
    teacher = str(make_model("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32))
    student = str(make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1))
    one = _dump(tmp_path, tiny_data, teacher, student, batch_size=1)
    many = _dump(tmp_path, tiny_data, teacher, student, batch_size=8)
    assert one.sample_ids == many.sample_ids
    assert np.array_equal(one.offsets, many.offsets)
    a, b = one.rows(0, int(one.offsets[-1])), many.rows(0, int(many.offsets[-1]))
    lengths = np.diff(one.offsets)
    assert lengths.min() < lengths.max(), "the batches must really be padded for this test to mean anything"
    for name in ("k", "v"):
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5)
    assert np.array_equal(a["input_ids"], b["input_ids"])


@given(L_t=st.integers(1, 48), L_s=st.integers(1, 48))
def test_ratio_layer_map_is_a_convex_interpolation_hitting_both_ends(L_t, L_s):
    W = ratio_layer_map(L_t, L_s)  # [L_s, L_t]
    assert W.shape == (L_s, L_t)
    assert (W >= 0).all()
    torch.testing.assert_close(W.sum(1), torch.ones(L_s, dtype=W.dtype))
    for s in range(L_s):
        nz = torch.nonzero(W[s]).flatten().tolist()
        assert 1 <= len(nz) <= 2 and (len(nz) == 1 or nz[1] == nz[0] + 1)  # neighbours only
        target = (L_t - 1) if L_s == 1 else s * (L_t - 1) / (L_s - 1)
        assert abs(float((W[s] * torch.arange(L_t)).sum()) - target) < 1e-9  # centre of mass
    assert W[-1, -1] == 1.0
    if L_s > 1:
        assert W[0, 0] == 1.0
    if L_s == L_t:
        assert torch.equal(W, torch.eye(L_t, dtype=W.dtype))


@settings(deadline=None, max_examples=30)
@given(L_t=st.integers(1, 12), L_s=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_apply_layer_map_equals_the_matrix_product_and_copies_one_hot_rows_bitwise(L_t, L_s, seed):
    x = torch.randn(5, L_t, 7, generator=torch.Generator().manual_seed(seed))  # [T, L_t, D]
    W = ratio_layer_map(L_t, L_s)
    out = apply_layer_map(W, x)
    assert out.shape == (5, L_s, 7)
    torch.testing.assert_close(out, torch.einsum("st,rtd->rsd", W.float(), x), rtol=1e-6, atol=1e-6)
    for s in range(L_s):
        (nz,) = torch.nonzero(W[s], as_tuple=True)
        if len(nz) == 1:
            assert torch.equal(out[:, s], x[:, nz.item()])


def test_apply_layer_map_rejects_a_map_for_another_depth():
    with pytest.raises(ValueError, match="expects 4 teacher layers"):
        apply_layer_map(ratio_layer_map(4, 2), torch.zeros(3, 5, 8))


@given(H=st.integers(1, 8), d=st.integers(1, 16))
def test_flatten_heads_is_inverted_by_unflatten_heads(H, d):
    x = torch.randn(2, 3, H, d)
    assert torch.equal(unflatten_heads(flatten_heads(x), H), x)


def test_segments_come_from_template_spans_and_prompt_tokens_prefix_the_full_sequence(tokenizer, examples):
    for ex in examples[:10]:
        r = render(DEFAULT_TEMPLATE, ex)
        assert r.text[slice(*r.spans["reasoning"])] == ex.reasoning
        assert r.text.startswith(prompt_text(DEFAULT_TEMPLATE, ex.question))
        assert r.spans["prompt"][1] == len(prompt_text(DEFAULT_TEMPLATE, ex.question))
        e = encode(tokenizer, DEFAULT_TEMPLATE, ex)
        assert e.input_ids[-1] == tokenizer.eos_token_id
        prompt_ids = tokenizer(prompt_text(DEFAULT_TEMPLATE, ex.question), add_special_tokens=False)["input_ids"]
        assert e.input_ids[: len(prompt_ids)].tolist() == prompt_ids
        assert not e.loss_mask[: len(prompt_ids)].any() and e.loss_mask[len(prompt_ids) :].all()
        assert tokenizer.decode(e.input_ids[e.segment_ids == 1]) == ex.reasoning


def test_template_substitution_is_literal_so_braces_in_data_are_safe(examples):
    ex = examples[0]
    odd = type(ex)(id="x", question="What is {answer}?", reasoning="{reasoning}", answer="3")
    r = render(DEFAULT_TEMPLATE, odd)
    assert r.text[slice(*r.spans["reasoning"])] == "{reasoning}"
    assert "What is {answer}?" in r.text
