"""Latent mode (KaVa), train / eval side: Jacobi refinement, the latent KV and CODI losses,
training, checkpoint reload and the cost numbers eval reports. Hand-made batches follow the
store contract: latent[teacher] = {"k", "v": [B, M, L_s, D_t], "mask": [B, M], "hidden": [B, H_t]}."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvdistill.dump.capture import decoder
from kvdistill.dump.prompts import encode, pad_batch
from kvdistill.schemas import DEFAULT_TEMPLATE
from kvdistill.train.latent import LatentStudent, jacobi, latent_generate, split_segments

M = 5


@pytest.fixture(scope="module")
def student_path(make_model):
    return make_model("qwen2", layers=2, hidden=32, heads=2, kv_heads=2, head_dim=16, seed=1)  # D_s = 32


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
        out[t] = {"k": torch.randn(B, M, 2, d, generator=g), "v": torch.randn(B, M, 2, d, generator=g), "mask": mask, "hidden": torch.randn(B, hidden[t], generator=g)}
    return out


def _model(path, tokenizer, iterations=3, widths=None, hidden=None, **kw):
    widths = widths or {"t": 32}
    hidden = hidden or {t: 48 for t in widths}
    torch.manual_seed(0)
    return LatentStudent(_student(path), M, iterations, widths, hidden, 2, 32, pad_id=tokenizer.pad_token_id, **kw).eval()


class _Calls:
    """Counts forward calls of the decoder stack (one per forward pass of the student)."""

    def __init__(self, model):
        self.n = 0
        self.handle = decoder(model).register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize("iterations", [1, 3, 4])
def test_jacobi_makes_exactly_T_forwards_training_T_plus_1_and_generation_T_plus_G_minus_1(student_path, tokenizer, examples, iterations):
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
        gen = latent_generate(model.student, model.head, q[:1], qm[:1], iterations, budget, tokenizer.eos_token_id, tokenizer.pad_token_id)
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
            out = decoder(model.student)(inputs_embeds=torch.cat([embeds, slots], 1), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
            slots = torch.cat([slots, model.head.proj(out.last_hidden_state[:, -1:])], 1)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        seq = decoder(model.student)(inputs_embeds=torch.cat([embeds, slots], 1), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state
        par = jacobi(model.student, model.head, q, qm, M + 1)["hidden"]
        short = jacobi(model.student, model.head, q, qm, M)["hidden"]
    torch.testing.assert_close(par[:, P:], seq[:, P:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(short[:, -1], seq[:, -1], atol=1e-3)  # one iteration short: the last slot is not there yet
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


def test_kv_loss_on_latent_slots_is_exactly_zero_when_the_student_latent_kv_is_the_stored_teacher_kv(student_path, tokenizer, examples):
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


def test_latent_student_trains_with_finite_falling_loss_on_a_hand_made_batch(student_path, tokenizer, examples):
    widths, hidden = {"a": 64, "b": 32}, {"a": 48, "b": 32}
    model = _model(student_path, tokenizer, widths=widths, hidden=hidden).train()
    b = _batch(tokenizer, examples, n=8)
    lat = _latent(8, widths, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = []
    for _ in range(12):
        out = model(b["input_ids"], b["attention_mask"], b["loss_mask"], b["segment_ids"], lat)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        rows.append({k: v.item() for k, v in out.items() if v.dim() == 0})
    for k in ("loss", "ce_answer", "codi", "kv_k", "kv_v"):
        assert all(torch.isfinite(torch.tensor(r[k])) for r in rows)
        assert rows[-1][k] < 0.9 * rows[0][k], (k, rows[0][k], rows[-1][k])
    assert model.head.init.grad is not None and model.head.proj[0].weight.grad.abs().sum() > 0
