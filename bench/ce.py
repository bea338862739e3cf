"""What the layout of the CE loss costs a training step at a real vocabulary, side by side.

    OMP_NUM_THREADS=2 python bench/ce.py                      # the real pair's student shape, vocab 49,152
    OMP_NUM_THREADS=2 python bench/ce.py --vocab 151936       # Qwen2.5's vocabulary

Two ways to the same number (the mean next-token CE over the reasoning + answer positions):
  transposed  cross_entropy over [B, V, T - 1] (logits.transpose(1, 2)) on every position, masked
              after: what the trainer did before 2026-12-07
  rows        cross_entropy over [N, V], only the N positions that count (`train.losses.rows_ce`)

on the student of bench/real_pair.py's shape (SmolLM2-135M pruned to 8 layers: Llama, hidden 576,
9 q / 3 KV heads, tied embedding), random weights, one batch of 8 samples with GSM8K-like lengths
(120-260 tokens, the first quarter the prompt, padded to the longest). Per way: the loss alone
(forward + backward from fixed logits) and a whole optimizer step (student forward, loss, backward,
AdamW). The ways are interleaved over rounds (order alternating), medians over rounds; the ratio
is transposed / rows. Checks the two losses and the logits' gradients agree first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kvdistill.train.losses import masked_ce


def transposed_ce(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


WAYS = {"transposed": transposed_ce, "rows": masked_ce}


def batch(vocab: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(120, 261, (size,), generator=g)
    T = int(lengths.max())
    ids = torch.randint(0, vocab, (size, T), generator=g)
    attn = torch.arange(T)[None] < lengths[:, None]
    loss_mask = attn & (torch.arange(T)[None] >= (lengths[:, None] // 4))
    return ids, attn.long(), loss_mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids, attn, loss_mask = batch(args.vocab, args.batch_size, 0)
    n_rows = int(loss_mask[:, 1:].sum())
    print(
        f"student: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {args.vocab:,}; "
        f"batch {tuple(ids.shape)}, {int(attn.sum())} tokens, {n_rows} in the CE; "
        f"torch threads {torch.get_num_threads()}"
    )
    with torch.no_grad():
        fixed = model(input_ids=ids, attention_mask=attn).logits
    losses, grads = {}, {}
    for name, ce in WAYS.items():
        x = fixed.clone().requires_grad_()
        losses[name] = ce(x, ids, loss_mask)
        losses[name].backward()
        grads[name] = x.grad
    gap = ((grads["transposed"] - grads["rows"]).abs().max() / grads["rows"].abs().max()).item()
    t, r = losses["transposed"].item(), losses["rows"].item()
    print(f"loss transposed {t:.6f}, rows {r:.6f}; grad gap {gap:.1e} of its max")
    assert torch.allclose(losses["transposed"], losses["rows"], rtol=1e-5) and gap < 1e-5

    def loss_only(ce) -> float:
        x = fixed.clone().requires_grad_()
        t = time.perf_counter()
        ce(x, ids, loss_mask).backward()
        return time.perf_counter() - t

    def step(ce) -> float:
        t = time.perf_counter()
        loss = ce(model(input_ids=ids, attention_mask=attn).logits, ids, loss_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for what, fn in (("loss alone (fwd + bwd)", loss_only), ("optimizer step", step)):
        for ce in WAYS.values():  # warm-up
            fn(ce)
        times = {name: [] for name in WAYS}
        for r in range(args.rounds):
            for name in list(WAYS)[:: 1 if r % 2 == 0 else -1]:
                times[name].append(fn(WAYS[name]))
        med = {name: statistics.median(v) for name, v in times.items()}
        print(
            f"{what:<24} transposed {med['transposed']:.3f} s  rows {med['rows']:.3f} s  "
            f"transposed / rows {med['transposed'] / med['rows']:.2f}x"
        )


if __name__ == "__main__":
    main()
