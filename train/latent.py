"""KaVa latent mode: the student answers from M latent slots instead of a written chain.

    train(TrainConfig(store="out.zarr", student=..., out="runs/lat", mode="latent"))  # train/loop.py

Sequence layout (every forward): [left padding, question (P), latent slots (M), answer].
Questions are left-padded so the slots sit at the same columns P..P+M-1 in every row;
position ids are cumsum(attention_mask) - 1, so padding shifts nothing.

Jacobi refinement (T iterations, all M slots updated in parallel):
  iteration 1 inputs: e^0_m = init_m, a learned vector per slot (no extra forward);
  forward i (i = 1..T) runs the decoder on question + latents with inputs e^{i-1} and gives
  h^i (the final-norm hidden states) and, captured pre-RoPE, the slots' K/V of every layer;
  then e^i_1 = proj(h^i at the last question token), e^i_m = proj(h^i at slot m-1).
  Slot m's new input depends only on slots < m of the previous iteration, so the inputs e^i
  of slots 1..i equal the sequential (Coconut) chain's (s_1 = proj(h at the last question
  token), s_m = proj(h at slot m-1)), and T = M + 1 reproduces that chain exactly.
  Forward T is the answer forward: it reads e^{T-1}; in training the answer tokens ride
  along in it (causal: they change nothing at the slots), at eval its KV cache and its
  logits at the last slot start greedy decoding. Forward passes: training T + 1 (the
  +1 is the teacher-mode CE on the written chain); eval T + (G - 1) for G generated tokens
  (the first answer token comes from forward T, the last one needs no forward).

Loss = answer_weight * CE(answer | question, latents) + cot_weight * CE(reasoning + answer |
question) + codi_weight * CODI + kv_weight * (KV_K + KV_V), with
  CODI = smooth-L1(P_t(h_s), h_t) / std(h_t): h_s the student's final-norm hidden state at the
    last slot (the token before the answer), h_t the stored teacher `codi_hidden`, P_t a
    learned linear map H_s -> H_t (identity when equal; on the student side, so the fixed
    target cannot be shrunk), std over the batch's teacher hiddens (CODI's normalisation);
  KV_K = mean over the T iterations of masked_kv_loss(norm(K_s^i), norm(A_t(K_t))) over slots
    with latent_mask, every layer, norm = per-layer std standardisation, A_t = KVAdapter;
  teachers combine with the fixed teacher weights; teacher tensors are never differentiated.

Trained by train/loop.py through `latent_mode` (one loop for both modes). Saved: RUN_DIR/final
as in mode cot (merged student, tokenizer, train_config.yaml), plus final/latent.pt (slots,
iterations, widths, the latent head, adapters, CODI maps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvdistill.core.capture import cache_kwarg, capture_kv, decoder, output_cache
from kvdistill.schemas import TrainConfig
from kvdistill.store import StoreError

from .adapters import KVAdapter, KVShapes, adapter_key
from .fusion import fixed_weights
from .losses import layer_std_norm, masked_ce, masked_kv_loss, rows_ce
from .mode import Mode
from .stream import KVStream, shuffle_latent

__all__ = [
    "LatentHead",
    "LatentStudent",
    "jacobi",
    "latent_generate",
    "split_segments",
    "load_latent",
    "latent_mode",
    "latent_counts",
]

LATENT_FILE = "latent.pt"


class LatentHead(nn.Module):
    """The latent slots' inputs: `init` [M, H] (iteration-1 inputs) and `proj`, hidden [.., H]
    -> input embedding [.., H] (CODI's MLP: Linear, GELU, Linear, LayerNorm)."""

    def __init__(self, hidden: int, slots: int, scale: float = 0.02) -> None:
        super().__init__()
        self.hidden, self.slots = hidden, slots
        self.init = nn.Parameter(torch.randn(slots, hidden) * scale)
        self.proj = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        )
        with torch.no_grad():  # start at the scale of the token embeddings
            self.proj[-1].weight.fill_(scale)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _run(student, embeds, mask, *, past=None, positions=None, use_cache=False):
    """One decoder forward on input embeddings: (final-norm hidden [B, S, H], logits, cache)."""
    pos = _positions(mask)[:, -embeds.shape[1] :] if positions is None else positions
    stack = decoder(student)
    out = stack(
        inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=use_cache, **{cache_kwarg(stack): past}
    )
    logits = student.get_output_embeddings()(out.last_hidden_state)
    return out.last_hidden_state, logits, output_cache(out)


def jacobi(
    student,
    head: LatentHead,
    q_ids: torch.Tensor,
    q_mask: torch.Tensor,
    iterations: int,
    *,
    tail_ids: torch.Tensor | None = None,
    tail_mask: torch.Tensor | None = None,
    capture: bool = False,
    use_cache: bool = False,
) -> dict[str, Any]:
    """T Jacobi iterations over question q_ids [B, P] (left-padded, q_mask [B, P]) + M slots
    (module docstring); tail tokens [B, A] (right-padded) ride along in the last forward.

    Returns {"hidden": [B, S, H], "logits": [B, S, V] of forward T, "cache" (use_cache),
    "mask": [B, S], "kv": [(k, v) [B, M, L, D] per iteration] (capture), "forwards": T}."""
    if iterations < 1:
        raise ValueError(f"latent iterations must be >= 1, got {iterations}")
    B, P = q_ids.shape
    M = head.slots
    emb = student.get_input_embeddings()
    q_emb = emb(q_ids)  # [B, P, H]
    slots = head.init.to(q_emb.dtype)[None].expand(B, M, -1)  # e^0 [B, M, H]
    mask = torch.cat([q_mask.long(), q_mask.new_ones(B, M, dtype=torch.long)], dim=1)  # [B, P + M]
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(1, iterations + 1):
        embeds, m = torch.cat([q_emb, slots], dim=1), mask
        last = i == iterations
        if last and tail_ids is not None:
            embeds = torch.cat([embeds, emb(tail_ids)], dim=1)
            m = torch.cat([mask, tail_mask.long()], dim=1)
        if capture:
            with capture_kv(student) as cap:
                hidden, logits, cache = _run(student, embeds, m, use_cache=use_cache and last)
            kv.append(
                (torch.stack(cap["k"], dim=2)[:, P : P + M], torch.stack(cap["v"], dim=2)[:, P : P + M])
            )  # [B, M, L, D]
        else:
            hidden, logits, cache = _run(student, embeds, m, use_cache=use_cache and last)
        if not last:
            slots = head.proj(hidden[:, P - 1 : P + M - 1])  # e^i_m = proj(h^i at the column before slot m)
    return {"hidden": hidden, "logits": logits, "cache": cache, "mask": m, "kv": kv, "forwards": iterations}


@torch.no_grad()
def latent_generate(
    student, head, q_ids, q_mask, iterations: int, max_new_tokens: int, eos_id: int, pad_id: int
) -> dict[str, Any]:
    """Greedy answers after T Jacobi iterations, with the KV cache.

    Returns {"tokens": [B, G] (pad after EOS), "lengths": [B] tokens generated up to and
    including EOS, "forwards": decoder calls made for the batch, "forwards_per_row": [B]
    = T + lengths - 1, the calls that row alone would need}."""
    out = jacobi(student, head, q_ids, q_mask, iterations, use_cache=True)
    cache, mask = out["cache"], out["mask"]
    pos = _positions(mask)[:, -1:]  # [B, 1]
    nxt = out["logits"][:, -1].argmax(-1)  # [B]
    B = q_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=q_ids.device)
    lengths = torch.zeros(B, dtype=torch.long, device=q_ids.device)
    tokens, forwards = [], iterations
    emb = student.get_input_embeddings()
    for step in range(max_new_tokens):
        tok = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(tok)
        lengths += (~done).long()
        done = done | (nxt == eos_id)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        _, logits, cache = _run(student, emb(tok[:, None]), mask, past=cache, positions=pos, use_cache=True)
        forwards += 1
        nxt = logits[:, -1].argmax(-1)
    return {
        "tokens": torch.stack(tokens, dim=1),
        "lengths": lengths,
        "forwards": forwards,
        "forwards_per_row": iterations + lengths - 1,
    }


def split_segments(input_ids: torch.Tensor, segment_ids: torch.Tensor, pad_id: int):
    """Right-padded [B, T] ids + segment ids (0 question, 1 reasoning, 2 answer, -1 padding)
    -> question [B, P] left-padded + mask, answer [B, A] right-padded + mask."""
    q_rows = [ids[seg == 0] for ids, seg in zip(input_ids, segment_ids, strict=True)]
    a_rows = [ids[seg == 2] for ids, seg in zip(input_ids, segment_ids, strict=True)]
    empty = [i for i, (q, a) in enumerate(zip(q_rows, a_rows, strict=True)) if not len(q) or not len(a)]
    if empty:
        raise ValueError(
            f"batch rows {empty} have no question or no answer tokens (segment_ids 0 / 2); latent mode needs both"
        )
    P, A = max(len(q) for q in q_rows), max(len(a) for a in a_rows)
    B = len(q_rows)
    q = input_ids.new_full((B, P), pad_id)
    qm = torch.zeros(B, P, dtype=torch.long, device=input_ids.device)
    a = input_ids.new_full((B, A), pad_id)
    am = torch.zeros(B, A, dtype=torch.long, device=input_ids.device)
    for i, (qr, ar) in enumerate(zip(q_rows, a_rows, strict=True)):
        q[i, P - len(qr) :], qm[i, P - len(qr) :] = qr, 1
        a[i, : len(ar)], am[i, : len(ar)] = ar, 1
    return q, qm, a, am


class LatentStudent(nn.Module):
    """forward(batch) -> {"loss", "ce_answer", "ce_cot", "codi", "kv_k", "kv_v", per-iteration
    "kv_k_iters" / "kv_v_iters" [T], per-layer "kv_k_layers" / "kv_v_layers" [L]}; the loss
    is the one in the module docstring. One module, so DDP wraps one forward."""

    def __init__(
        self,
        cfg: TrainConfig,
        student: nn.Module,
        shapes: KVShapes,
        slots: int,
        teacher_hidden: dict[str, int | None],
        *,
        pad_id: int,
    ) -> None:
        """From the TrainConfig (validated there): latent_iterations T, teacher_weights, kv_weight,
        codi_weight, ce_weight (on the answer), cot_weight, kv_norm, kv_loss."""
        super().__init__()
        self.student = student
        emb = student.get_input_embeddings().weight
        hidden = emb.shape[1]
        self.head = LatentHead(hidden, slots, scale=float(emb.detach().std()))
        self.iterations, self.pad_id = cfg.latent_iterations, pad_id
        self.teachers = list(shapes.teacher_widths)
        self.weights = fixed_weights(cfg.teacher_weights, self.teachers)
        self.cfg = cfg
        self.kv_weight = cfg.kv_weight  # the one in force: --kv-weight-schedule sets it per step (train/loop.py)
        self.adapters = nn.ModuleDict()
        if cfg.kv_weight > 0:
            L, D_s = shapes.num_layers, shapes.student_width
            for t, width in shapes.teacher_widths.items():
                self.adapters[adapter_key(t)] = nn.ModuleDict(
                    {"k": KVAdapter(L, width, D_s), "v": KVAdapter(L, width, D_s)}
                )
        self.codi = nn.ModuleDict()
        if cfg.codi_weight > 0:
            for t, h_t in teacher_hidden.items():
                if h_t is None:
                    raise StoreError(
                        f"teacher {t!r} was dumped without codi_hidden; re-dump it with latent.codi_hidden: true "
                        "or train with --codi-weight 0"
                    )
                self.codi[adapter_key(t)] = nn.Identity() if h_t == hidden else nn.Linear(hidden, h_t, bias=False)

    def _norm(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer_std_norm(x, mask) if self.cfg.kv_norm == "layer_std" else x

    def kv_terms(
        self, student_kv: list[tuple[torch.Tensor, torch.Tensor]], latent: dict[str, dict]
    ) -> dict[str, torch.Tensor]:
        """KV losses of the T iterations' slot K/V [B, M, L, D_s] against every teacher's
        stored latent K/V [B, M, L, D_t], over slots with latent_mask."""
        out: dict[str, torch.Tensor] = {}
        T = len(student_kv)
        for i, part in enumerate(("k", "v")):
            iters, layers = [], 0.0
            for z in student_kv:
                loss_i = 0.0
                for t in self.teachers:
                    if self.weights[t] == 0:
                        continue
                    mask = latent[t]["mask"].bool()
                    target = self._norm(self.adapters[adapter_key(t)][part](latent[t][part].to(z[i].dtype)), mask)
                    loss, per_layer = masked_kv_loss(self._norm(z[i], mask), target, mask, self.cfg.kv_loss)
                    loss_i = loss_i + self.weights[t] * loss
                    layers = layers + self.weights[t] * per_layer.detach() / T
                iters.append(loss_i)
            out[f"kv_{part}_iters"] = torch.stack(iters).detach()
            out[f"kv_{part}"] = torch.stack(iters).mean()
            out[f"kv_{part}_layers"] = layers
        return out

    def codi_term(self, h_s: torch.Tensor, latent: dict[str, dict]) -> torch.Tensor:
        """CODI distance of the student hidden h_s [B, H_s] to each teacher's stored hidden."""
        loss = 0.0
        for t in self.teachers:
            if self.weights[t] == 0:
                continue
            h_t = latent[t]["hidden"].to(h_s.dtype)  # [B, H_t]
            loss = loss + self.weights[t] * F.smooth_l1_loss(
                self.codi[adapter_key(t)](h_s), h_t
            ) / h_t.std().clamp_min(1e-6)
        return loss

    def forward(
        self,
        input_ids,
        attention_mask,
        loss_mask,
        segment_ids,
        latent: dict[str, dict],
        shares: dict[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """shares: as Distiller.forward's (gradient accumulation), over LATENT_UNITS."""
        share = dict.fromkeys(LATENT_UNITS, 1.0) if shares is None else shares
        q, qm, a, am = split_segments(input_ids, segment_ids, self.pad_id)
        P, M = q.shape[1], self.head.slots
        run = jacobi(
            self.student, self.head, q, qm, self.iterations, tail_ids=a, tail_mask=am, capture=self.kv_weight > 0
        )
        logits = run["logits"][:, P + M - 1 : -1]  # predicts answer tokens 0..A-1
        out = {"ce_answer": rows_ce(logits, a, am)}
        loss = self.cfg.ce_weight * out["ce_answer"] * share["answer_tokens"]
        if self.cfg.cot_weight > 0:  # teacher mode: the written chain, same backbone
            chain = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
            out["ce_cot"] = masked_ce(chain, input_ids, loss_mask)
            loss = loss + self.cfg.cot_weight * out["ce_cot"] * share["ce_tokens"]
        if self.cfg.codi_weight > 0:
            out["codi"] = self.codi_term(run["hidden"][:, P + M - 1], latent)
            loss = loss + self.cfg.codi_weight * out["codi"] * share["samples"]
        if self.kv_weight > 0:
            out.update(self.kv_terms(run["kv"], latent))
            loss = loss + self.kv_weight * (out["kv_k"] + out["kv_v"]) * share["slots"]
        out["loss"] = loss
        return out


def save_latent(model: LatentStudent, path: Path) -> None:
    torch.save(
        {
            "slots": model.head.slots,
            "iterations": model.iterations,
            "hidden": model.head.hidden,
            "head": model.head.state_dict(),
            "adapters": model.adapters.state_dict(),
            "codi": model.codi.state_dict(),
        },
        path,
    )


def load_latent(checkpoint: str | Path) -> tuple[LatentHead, int]:
    """(latent head, trained Jacobi iterations) from a checkpoint dir holding latent.pt."""
    path = Path(checkpoint) / LATENT_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{checkpoint} has no {LATENT_FILE}; it is not a latent-mode checkpoint (train with --mode latent)"
        )
    state = torch.load(path, map_location="cpu")
    head = LatentHead(state["hidden"], state["slots"])
    head.load_state_dict(state["head"])
    return head.eval(), state["iterations"]


def latent_shapes(cfg: TrainConfig, teachers: dict[str, Any]) -> tuple[int, dict[str, int | None]]:
    """M and each teacher's stored hidden width, from the store (one sample)."""
    no_latent = [t for t, s in teachers.items() if getattr(s, "latent", None) is None]
    if no_latent:
        raise StoreError(
            f"store {cfg.store}: teacher(s) {no_latent} were dumped without latent compression; re-dump them "
            "with `latent: {slots: 24}` in the dump task (DumpTask.latent) to train in latent mode"
        )
    slots = {t: s.latent.slots for t, s in teachers.items()}
    if len(set(slots.values())) != 1:
        raise StoreError(
            f"store {cfg.store}: teachers hold different latent slot counts {slots}; dump them with one"
            " LatentSpec.slots"
        )
    sample = next(iter(KVStream(cfg.store, list(teachers), shuffle_buffer=1, read_kv=False, read_latent=True)))
    hidden = {
        t: None if lat.get("hidden") is None else int(lat["hidden"].shape[-1]) for t, lat in sample["latent"].items()
    }
    return next(iter(slots.values())), hidden


# What each latent term is a mean over: answer tokens (ce_answer), positions whose target is in
# loss_mask (ce_cot), samples (CODI), the first teacher's kept slots (the K/V terms; teachers
# whose chains are shorter than M keep fewer, so with several teachers this share is approximate).
LATENT_UNITS = ("answer_tokens", "ce_tokens", "samples", "slots")


def latent_counts(batch: dict[str, Any]) -> dict[str, float]:
    first = next(iter(batch["latent"].values()))
    return {
        "answer_tokens": float((batch["segment_ids"] == 2).sum()),
        "ce_tokens": float(batch["loss_mask"][:, 1:].sum()),
        "samples": float(len(batch["input_ids"])),
        "slots": float(first["mask"].sum()),
    }


def _latent_unit(term: str) -> str:
    return {"ce_answer": "answer_tokens", "ce_cot": "ce_tokens", "codi": "samples"}.get(term, "slots")


def _latent_step(
    model, batch: dict[str, Any], device, step: int, shares: dict[str, float] | None
) -> dict[str, torch.Tensor]:
    latent = {
        t: {k: None if x is None else x.to(device) for k, x in lat.items()} for t, lat in batch["latent"].items()
    }
    return model(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["loss_mask"].to(device),
        batch["segment_ids"].to(device),
        latent,
        shares=shares,
    )


def _latent_save(unwrapped: LatentStudent, state: dict, out: Path) -> None:
    save_latent(unwrapped, out / LATENT_FILE)


def latent_mode(cfg: TrainConfig, student: nn.Module, spec, teachers: dict[str, Any], pad_id: int) -> Mode:
    """KaVa latent mode: a LatentStudent over `student`, the stream reading compressed K/V."""
    slots, teacher_hidden = latent_shapes(cfg, teachers)
    model = LatentStudent(cfg, student, KVShapes.of_store(spec, teachers), slots, teacher_hidden, pad_id=pad_id)
    groups = [
        {"params": [p for p in model.student.parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.lr},
        {"params": [*model.adapters.parameters(), *model.codi.parameters()], "lr": cfg.adapter_lr},
    ]
    return Mode(
        name="latent",
        model=model,
        param_groups=groups,
        read_kv=False,
        read_latent=True,
        control=shuffle_latent,
        step=_latent_step,
        counts=latent_counts,
        unit_of=_latent_unit,
        save_extra=_latent_save,
        finite=("ce_answer", "ce_cot", "codi", "kv_k", "kv_v"),
        postfix=("ce_answer", "codi", "kv_k"),
        summary={"ce": "ce_answer", "ce_cot": "ce_cot", "codi": "codi", "kv_k": "kv_k", "kv_v": "kv_v"},
        result={"mode": "latent", "slots": slots, "iterations": cfg.latent_iterations},
    )
