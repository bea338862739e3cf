"""RoPE: the captured pre-RoPE key, rotated with the model's own rotary embedding (every
rope_scaling variant), is the cache key; derotate inverts rotate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from kvdistill.align.rope import derotate, rotate
from kvdistill.core.capture import forward_kv, kv_geometry

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_captured_key_rotated_with_the_models_rope_is_the_cache_key(make_model, tokenizer, arch, scaling):
    extra = {} if SCALINGS[scaling] is None else {"rope_scaling": SCALINGS[scaling]}
    path = make_model(arch, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, max_positions=64, **extra)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = kv_geometry(model.config)
    text = "Question: Mia has 7 apples. She buys 15 more apples. How many apples does Mia have now?\nReasoning:\n"
    ids = torch.tensor([tokenizer(text * 2, add_special_tokens=False)["input_ids"]])  # > 32 tokens: scaling is active
    T = ids.shape[1]
    with torch.no_grad():
        k, _ = forward_kv(model, ids, torch.ones_like(ids))  # [1, T, L, D]
        cache = model(ids, use_cache=True).past_key_values
        cos, sin = model.model.rotary_emb(k, torch.arange(T)[None])  # [1, T, d]
    for layer in range(g.num_layers):
        pre = k[0, :, layer].reshape(T, g.num_kv_heads, g.head_dim).transpose(0, 1)  # [H, T, d]
        post = cache.layers[layer].keys[0]  # [H, T, d]
        torch.testing.assert_close(rotate(pre, cos, sin), post, rtol=0, atol=1e-6)
        torch.testing.assert_close(derotate(post, cos, sin), pre, rtol=1e-5, atol=1e-5)


@settings(deadline=None, max_examples=50)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(0.25, 4.0),
    d=st.sampled_from([2, 8, 16, 64]),
)
def test_derotate_inverts_rotate_even_with_a_folded_attention_scale(seed, scale, d):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(3, 10, d, generator=g, dtype=torch.float64)
    theta = torch.rand(10, d // 2, generator=g, dtype=torch.float64) * 100
    angles = torch.cat([theta, theta], dim=-1)
    cos, sin = scale * angles.cos(), scale * angles.sin()
    torch.testing.assert_close(derotate(rotate(k, cos, sin), cos, sin), k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rotate(derotate(k, cos, sin), cos, sin), k, rtol=1e-10, atol=1e-10)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        rotate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
