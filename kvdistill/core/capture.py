"""Capture a model's per-layer keys and values during its own forward pass.

Keys are captured *before RoPE* (rotated keys carry the teacher's absolute positions, wrong for
the student once time is resampled or the tokenizer differs): the output of `k_proj`, or
of `k_norm` where the architecture normalises keys before rotating them (Qwen3). Values are
`v_proj` outputs. Both are head-flattened to D = H_kv * d. The same code serves the teacher
at dump time (under inference_mode) and the student at train time (with gradients)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch

from kvdistill.align import flatten_heads, rotate, unflatten_heads
from kvdistill.schemas import KVGeometry

__all__ = [
    "kv_geometry",
    "decoder",
    "cache_kwarg",
    "output_cache",
    "capture_kv",
    "rope_heads",
    "attention_layout",
    "forward_kv",
    "KVBuffer",
    "forward_kv_packed",
    "forward_kv_importance",
    "output_head",
    "head_mismatch",
    "top_log_probs",
]


def kv_geometry(config) -> KVGeometry:
    """KV geometry from a transformers config: GQA / MQA aware, explicit head_dim honoured."""
    heads = config.num_attention_heads
    return KVGeometry(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def cache_kwarg(model) -> str:
    """The name `model.forward` takes its KV cache by: `cache` in current transformers 5
    releases, `past_key_values` in earlier ones (deprecated there, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name (see `cache_kwarg`)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def decoder(model):
    """The decoder stack (no LM head) of a causal LM, a peft wrapper of one, or the stack itself."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    if hasattr(model, "layers"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


@contextmanager
def capture_kv(model, queries: bool = False):
    """Within the block, every forward of `model` fills out["k"], out["v"]: lists (one per layer)
    of [B, T, D] tensors. Hooks are removed on exit, also on error.

    queries=True also fills out["q"] ([B, T, H_q * d] pre-RoPE queries: `q_proj`, or `q_norm`
    where keys have `k_norm`) and out["rope"] (the (cos, sin) [B or 1, T, d] each attention layer
    was handed, i.e. the model's own rotary embedding at the positions it used for this batch),
    what it takes to rebuild the attention logits (`rotated_heads`). Off by default: only the
    attention KL term pays for the extra hooks."""
    out: dict[str, list] = {}
    handles = []
    layers = decoder(model).layers
    out["k"] = [None] * len(layers)
    out["v"] = [None] * len(layers)
    if queries:
        out["q"] = [None] * len(layers)
        out["rope"] = [None] * len(layers)

    def hook(kind: str, i: int, heads: bool):
        def fn(_module, _inp, output):
            out[kind][i] = flatten_heads(output) if heads else output

        return fn

    def rope_hook(i: int):
        def fn(module, _args, kwargs):
            rope = kwargs.get("position_embeddings")
            if rope is None:
                raise TypeError(
                    f"layer {i}: {type(module).__name__} was not handed position_embeddings=(cos, sin) by its decoder"
                    " layer, so the attention KL term cannot rebuild its RoPE; it supports Llama / Qwen2 /"
                    " Qwen3-style attention. Set attn_kl_weight 0 for this student"
                )
            out["rope"][i] = rope

        return fn

    try:
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            k_norm = getattr(attn, "k_norm", None)
            if isinstance(k_norm, torch.nn.Module):  # Qwen3: key = rope(k_norm(k_proj(x) as heads))
                handles.append(k_norm.register_forward_hook(hook("k", i, heads=True)))
            else:
                handles.append(attn.k_proj.register_forward_hook(hook("k", i, heads=False)))
            handles.append(attn.v_proj.register_forward_hook(hook("v", i, heads=False)))
            if queries:
                if isinstance(k_norm, torch.nn.Module):  # Qwen3: query = rope(q_norm(q_proj(x) as heads))
                    handles.append(attn.q_norm.register_forward_hook(hook("q", i, heads=True)))
                else:
                    handles.append(attn.q_proj.register_forward_hook(hook("q", i, heads=False)))
                handles.append(attn.register_forward_pre_hook(rope_hook(i), with_kwargs=True))
        yield out
    finally:
        for h in handles:
            h.remove()


def rope_heads(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], num_heads: int) -> torch.Tensor:
    """x [B, T, H * d] pre-RoPE (captured q / k, or a target in the student's key space) ->
    [B, H, T, d] float32, rotated as the attention rotates its own, by the (cos, sin) it was
    handed (`capture_kv(..., queries=True)["rope"][layer]`)."""
    cos, sin = rope  # [B or 1, T, d]
    x = unflatten_heads(x, num_heads).transpose(1, 2).float()  # [B, H, T, d]
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"RoPE over {cos.shape[-1]} of {x.shape[-1]} head dims (partial rotary) is not supported by the attention"
            " KL term"
        )
    return rotate(x, cos[:, None].float(), sin[:, None].float())


def attention_layout(model) -> list[dict]:
    """Per decoder layer what its attention does besides q k^T: {"heads": H_q, "kv_heads": H_kv,
    "scaling": the logit scale (1 / sqrt(d) unless the model says otherwise), "sliding_window":
    None or the window of a sliding-window layer (Qwen2 `use_sliding_window`)}."""
    geo = kv_geometry(model.config)
    return [
        {
            "heads": model.config.num_attention_heads,
            "kv_heads": geo.num_kv_heads,
            "scaling": getattr(layer.self_attn, "scaling", geo.head_dim**-0.5),
            "sliding_window": getattr(layer.self_attn, "sliding_window", None),
        }
        for layer in decoder(model).layers
    ]


def forward_kv(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder stack only (the LM head is not needed) and return
    k, v: [B, T, L, D] pre-RoPE keys and values of every layer."""
    with capture_kv(model) as cap:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return torch.stack(cap["k"], dim=2), torch.stack(cap["v"], dim=2)


class KVBuffer:
    """Memory that `forward_kv_packed` writes K and V into, kept from batch to batch.

    Why: `forward_kv` keeps every layer's projection outputs alive until it stacks them (and the
    dump then concatenated K and V), so each batch held its K/V three times over in memory
    allocated afresh, two full copies of it made. On a CPU, glibc returns such memory to the
    kernel when it is freed and the next batch faults it in again page by page: on SmolLM2-135M
    (48 GSM8K rows, two batches) that was 0.4-1.3 million more page faults per pass than the bare
    forward (2-6 us each on the 2-core VM; BENCHMARKS.md). Written in place, each projection
    output is freed at once as in the bare forward, and the buffer, sized for the largest batch
    (`numel`), is allocated once."""

    def __init__(self, numel: int = 0) -> None:
        self.numel = numel
        self._flat: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of `shape`, its contents undefined: a view of the buffer, valid
        until the next `take` (reallocated when it is too small or of another dtype / device)."""
        n = math.prod(shape)
        flat = self._flat
        if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != device:
            self._flat = None  # free the old one first: never both at once
            self._flat = flat = torch.empty(max(n, self.numel), dtype=dtype, device=device)
        return flat[:n].view(shape)


def forward_kv_packed(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    buffer: KVBuffer | None = None,
    hidden: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`forward_kv` with K and V side by side: kv [B, T, L, 2D], K in [..., :D], V in [..., D:],
    the same values bit for bit. Each layer's projection output is copied into place by its hook
    and freed, no stack at the end; with `buffer` the memory is reused across calls, so the
    result is only valid until the next call with that buffer. Inference only (the copies cut
    the autograd graph). hidden=True: (kv, the final-norm hidden states [B, T, H]), what
    `output_head` turns into logits."""
    layers = decoder(model).layers
    L = len(layers)
    state: dict = {"kv": None, "filled": 0}

    def hook(part: int, i: int, heads: bool):
        def fn(_module, _inp, output):
            x = flatten_heads(output) if heads else output  # [B, T, D]
            if state["kv"] is None:
                B, T, D = x.shape
                shape = (B, T, L, 2 * D)
                state["kv"] = (
                    buffer.take(shape, x.dtype, x.device)
                    if buffer is not None
                    else torch.empty(shape, dtype=x.dtype, device=x.device)
                )
            D = x.shape[-1]
            state["kv"][:, :, i, part * D : (part + 1) * D].copy_(x)
            state["filled"] += 1

        return fn

    handles = []
    try:
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            k_norm = getattr(attn, "k_norm", None)
            if isinstance(k_norm, torch.nn.Module):  # Qwen3: key = rope(k_norm(k_proj(x) as heads)); as capture_kv
                handles.append(k_norm.register_forward_hook(hook(0, i, heads=True)))
            else:
                handles.append(attn.k_proj.register_forward_hook(hook(0, i, heads=False)))
            handles.append(attn.v_proj.register_forward_hook(hook(1, i, heads=False)))
        out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if state["filled"] != 2 * L:  # a buffer left partly unwritten would hand on stale K/V
        raise RuntimeError(
            f"captured {state['filled']} of {2 * L} K/V projections of {type(model).__name__}'s {L} layers in one"
            " forward"
        )
    return (state["kv"], out.last_hidden_state) if hidden else state["kv"]


def forward_kv_importance(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward_kv` plus what R-KV compression needs (KaVa latent mode, align/rkv.py):
    k, v [B, T, L, D]; importance [B, L, H_kv, T], the attention the `queries` [B, T] bool pay
    each key per KV head; hidden [B, T, hidden] the last layer's output after the final norm.

    The model must run eager attention (`model.set_attn_implementation("eager")`): only eager
    returns the probabilities. Each layer's [B, H_q, T, T] map is reduced in a hook as soon as
    it exists, so the extra memory is one layer's T^2 map, not L of them."""
    from kvdistill.align.rkv import importance_from_attention

    H_kv = kv_geometry(model.config).num_kv_heads
    layers = decoder(model).layers
    imp: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i: int):
        def fn(_module, _inp, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"layer {i} returned no attention probabilities (attention implementation "
                    f"{model.config._attn_implementation!r}); latent mode needs eager attention"
                )
            imp[i] = importance_from_attention(weights, queries, H_kv)

        return fn

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with capture_kv(model) as cap:
            out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    k, v = torch.stack(cap["k"], dim=2), torch.stack(cap["v"], dim=2)
    return k, v, torch.stack(imp, dim=1), out.last_hidden_state


# --- the output head: top-K log-probs of the teacher (the offline-logits store) -------------------

LOGITS_CHUNK_BYTES = 1 << 28  # float32 logits of one chunk of positions: 256 MiB (~450 rows of a 150k vocabulary)


def output_head(model) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(head, V): head maps hidden [N, H] (the decoder's final-norm output) to logits [N, V] as the
    model's own forward makes them: its output embedding, then the post-processing some families
    apply (Cohere's logit_scale, Granite's logits_scaling, Gemma 2 / 3's final_logit_softcapping).
    Any other head is caught by `head_mismatch` on a probe, never guessed."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    linear, config = model.get_output_embeddings(), model.config
    if linear is None:
        raise TypeError(f"{type(model).__name__} has no output head (a causal LM's lm_head)")
    scale = getattr(model, "logit_scale", None)  # Cohere: logits * logit_scale
    divide = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3: cap * tanh(logits / cap)

    def head(h: torch.Tensor) -> torch.Tensor:
        x = linear(h)
        if scale is not None:
            x = x * scale
        if divide is not None:
            x = x / divide
        if cap is not None:
            x = torch.tanh(x / cap) * cap
        return x

    return head, linear.weight.shape[0]


@torch.inference_mode()
def head_mismatch(model, head, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """max |model(...).logits - head(decoder(...))| on a probe batch [B, T], relative to the
    largest logit: ~0 when `head` is the model's own (the same operations in the same dtype)."""
    want = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()  # [B, T, V]
    h = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    got = head(h).float()
    return float((want - got).abs().max() / want.abs().max().clamp_min(1e-6))


def top_log_probs(
    head, V: int, hidden: torch.Tensor, k: int, chunk_bytes: int = LOGITS_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] -> (ids [N, k] int64, log-probs [N, k] float32) of the k most likely next
    tokens at each position, descending: log_softmax at temperature 1 over the full vocabulary
    (`output_head`'s V), in float32. Chunks of positions, never all N x V logits at once (150k x
    16k positions would be 10 GB)."""
    rows = max(1, chunk_bytes // (4 * V))
    ids, lps = [], []
    for a in range(0, hidden.shape[0], rows):
        x = head(hidden[a : a + rows]).float()  # [n, V]
        top, idx = x.topk(k, dim=-1)  # sorted, descending
        lps.append(top - torch.logsumexp(x, dim=-1, keepdim=True))  # log_softmax is x - logsumexp(x)
        ids.append(idx)
    if not ids:
        return hidden.new_zeros((0, k), dtype=torch.int64), hidden.new_zeros((0, k), dtype=torch.float32)
    return torch.cat(ids), torch.cat(lps)
