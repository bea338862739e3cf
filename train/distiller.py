"""The student plus what turns stored teacher K/V into its targets, built from the TrainConfig
and the store's `KVShapes`: per-teacher, per-layer adapters (train/adapters.py), fusion over
teachers (train/fusion.py) or the common Z space (train/zspace.py), and the loss terms (here;
their math in train/losses.py). One module, so DDP / FSDP wrap one forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvdistill.core.capture import attention_layout, capture_kv, rope_heads
from kvdistill.schemas import ConfigError, TrainConfig

from .adapters import HeadwiseAdapter, KVAdapter, KVShapes, adapter_key, head_mixer_init, make_adapters
from .fusion import Router, fixed_weights, fusion_weights, router_entropy
from .losses import (
    attention_key_weights,
    attention_kl,
    attention_target_keys,
    cka_from_sums,
    cka_sums,
    layer_anneal_weights,
    layer_moments,
    layer_std_norm,
    linear_ramp,
    masked_kv_loss,
    moment_std,
    rows_ce,
    standardize,
    topk_kl,
    warmup_mix,
)
from .mode import Mode
from .quant import kv_to_device
from .stream import shuffle_kv
from .zspace import ZSpace, save_sample

__all__ = [
    "Distiller",
    "KVShapes",
    "build_distiller",
    "LOSS_TERMS",
    "cot_mode",
    "cot_counts",
    # the parts, importable from here too (they live in train/adapters.py and train/fusion.py)
    "KVAdapter",
    "HeadwiseAdapter",
    "head_mixer_init",
    "adapter_key",
    "Router",
    "fixed_weights",
]

# Every scalar loss term forward() may return (besides the total "loss").
LOSS_TERMS = ("ce", "kv_k", "kv_v", "cka", "router_entropy", "attn_kl", "z", "logits")


def _use_eager_attention(student: nn.Module) -> None:
    """Attention probabilities are only returned by the eager kernel (sdpa / flash fuse them)."""
    base = student.get_base_model() if hasattr(student, "get_base_model") else student  # peft
    if not hasattr(base, "set_attn_implementation"):
        raise TypeError(f"kv_attn_weight 'student' needs a transformers model; got {type(base).__name__}")
    base.set_attn_implementation("eager")
    if base.config._attn_implementation != "eager":
        raise ValueError(
            f"could not switch {type(base).__name__} to eager attention; kv_attn_weight 'student' needs it"
        )


def _cka_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """cfg.cka_layers as student layer indices (TrainConfig checked the rest; the layer count is the store's)."""
    if layers == "middle":
        return [num_layers // 2]
    if layers == "last":
        return [num_layers - 1]
    if any(i >= num_layers for i in layers):
        raise ValueError(
            f"cka_layers {list(layers)}: indices must lie in 0..{num_layers - 1} (the student has {num_layers} layers)"
        )
    return sorted(set(layers))


class Distiller(nn.Module):
    """forward(batch, step) -> {"loss", "ce", "kv_k", "kv_v", "kv_k_layers", "kv_v_layers",
    "cka" (cka_weight > 0), "router_entropy" (fusion router), "route_{k|v}_{teacher}"}.

    loss = ce_weight * CE(reasoning + answer) + kv_weight * (KV_K + KV_V) + cka_weight * CKA
           - router_entropy_weight * H(router weights)
    with the KV target the fusion over teachers of adapter(teacher K/V), every term masked to
    real tokens, and (kv_norm="layer_std") each layer standardised on both sides first.
    KV_K = mean over layers l of a_l(step) * loss_l, loss_l the (attention-weighted, when
    kv_attn_weight="student") per-token loss of layer l and a_l the annealing weights
    (`layer_anneal_weights`; 1 when off). CKA = mean over K and V and over `cka_layers` of
    1 - debiased linear CKA(student K|V, fused target) over the batch's real tokens; K|V
    rather than the layer output since the target lives in K/V space. The entropy term
    rewards entropy (a positive weight lowers the loss as the weights spread), against the
    router collapsing onto one teacher. step None: every schedule is complete.

    z_dim > 0, the common Z space (train/zspace.py: maps, losses, collapse guard): the student's
    and each teacher's [K, V] are mapped into Z per layer, fused there with the same weights
    (`route` on Z), and "z" = mean over layers l of a_l(step) * z_loss_l replaces KV_K + KV_V
    (weighted by kv_weight; also "z_layers", and the student's collapse statistics "z_std",
    "z_erank", "route_z_{teacher}"); CKA compares the student's Z with the fused Z target. No
    adapters then.

    attn_kl_weight > 0 adds attn_kl_weight * ramp(step) * ATTN_KL ("attn_kl", "attn_kl_layers"),
    ramp 0 -> 1 linearly over attn_kl_warmup_steps (`linear_ramp`): per student layer, the mean
    over real query tokens and query heads of KL(A_t || A_s) (`attention_kl`), A_s the student's
    attention (its RoPE-rotated queries over its own keys, causal + padding mask, as eager
    attention computes it), A_t the same queries over the fused adapted teacher keys, each
    teacher's put on the student's own key mean and std per sample and layer first
    (`attention_target_keys`: logits need a scale, and the adapters' is one no loss holds), rotated
    by the student's own RoPE at its positions. A_t is the detached target; the term trains the
    student only (not adapters or router). Computed whenever the weight is > 0, also while the
    ramp is 0.

    logits_weight > 0 adds logits_weight * LOGITS ("logits"), the offline logits distillation
    (`dump --logits-top-k K`): on the CE positions, the mean of `topk_kl` between each teacher's
    stored top-K next-token log-probs and the student's logits at logits_temperature, mixed over
    the teachers that store them by their teacher_weights. With kv_weight 0 it is the offline-logits
    baseline (no K/V read); with both, K/V and logits from the same store.

    Every option is read from `cfg` (a TrainConfig, validated when it was made) where it is
    used; what needs the store's `KVShapes` or the student is checked where it is built, once:
    the teachers of teacher_weights (`fixed_weights`), cka_layers (`_cka_layers`), head-wise
    adapters (`make_adapters`), router_groups (`Router`), eager attention."""

    def __init__(self, cfg: TrainConfig, student: nn.Module, shapes: KVShapes) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.kv_weight = cfg.kv_weight  # the one in force: --kv-weight-schedule sets it per step (train/loop.py)
        self.num_layers = shapes.num_layers
        self.teachers = list(shapes.teacher_widths)
        self.weights = fixed_weights(cfg.teacher_weights, self.teachers)
        self.active = [t for t in self.teachers if self.weights[t] > 0]  # the teachers fused, in order
        self.cka_layers = _cka_layers(cfg.cka_layers, shapes.num_layers)
        self.attn_layout = attention_layout(student) if cfg.attn_kl_weight > 0 else None  # per layer: heads, ...
        # Registered in this order, the state dict's and parameters()': student, adapters, zspace, router.
        self.adapters = nn.ModuleDict()  # adapter_key(teacher) -> {"k", "v": adapter}
        self.zspace: ZSpace | None = None
        self.router: Router | None = None
        if cfg.kv_weight > 0:
            self._build_targets(shapes)
        # kv_norm "layer_std": each side's K and V are standardised per layer by the statistics
        # of the previous optimizer step's whole window (every micro-batch and rank; `update_norm`),
        # fixed within a step, so a step's loss does not depend on how its batch is split. Saved
        # in checkpoints. [K|V, student + active teachers, (sum, sum of squares, count), L].
        self.register_buffer(
            "norm_moments", torch.zeros(2, 1 + len(self.active), 3, shapes.num_layers, dtype=torch.float64)
        )

    def _build_targets(self, shapes: KVShapes) -> None:
        """What turns teacher K/V into targets, in the order their random init draws: the Z
        space's maps or the adapters, then the router."""
        cfg = self.cfg
        if cfg.z_dim > 0:  # Z space (train/zspace.py): its maps replace the adapters
            self.zspace = ZSpace(cfg, shapes)
        else:
            self.adapters.update(make_adapters(cfg.adapter, shapes))
        if cfg.fusion == "router":
            init = [self.weights[t] for t in self.active]
            hidden = self.student.config.hidden_size
            self.router = Router(hidden, init, shapes.num_layers, cfg.router_groups, cfg.router_hidden)
        if cfg.kv_attn_weight == "student":
            _use_eager_attention(self.student)

    def route(
        self, z_s: torch.Tensor, z_t: torch.Tensor, teachers: list[str], router_w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`fusion_weights` over `teachers` (their fixed weights, and the router's layer groups)."""
        groups = None if self.router is None else self.router.layer_group
        return fusion_weights(self.cfg, z_s, z_t, [self.weights[t] for t in teachers], router_w, groups)

    @property
    def exact_kv(self) -> bool:
        """The K/V terms are computed from the whole step's summed statistics (exact however the
        step is split): layer_std + mse without token weights (Z space standardises on its own).
        Else per micro-batch."""
        return (
            self.cfg.kv_norm == "layer_std"
            and self.kv_weight > 0
            and self.zspace is None
            and self.cfg.kv_loss == "mse"
            and self.cfg.kv_attn_weight == "none"
        )

    def _norm_ready(self) -> bool:
        """Reference statistics are there (measured, or loaded with a checkpoint). Checked on the
        device until true once, then remembered: no device sync per forward."""
        if not getattr(self, "_ready", False):
            self._ready = bool(self.norm_moments[:, :, 2].gt(0).all())
        return self._ready

    def norm_missing(self) -> bool:
        """No reference statistics yet (a fresh run before its first step): the trainer measures them first."""
        return self.exact_kv and not self._norm_ready()

    def update_norm(self, moments: dict[str, torch.Tensor]) -> None:
        """Take a step's summed `layer_moments` ({"k", "v": [1 + N, 3, L]}, every rank's)."""
        with torch.no_grad():
            self.norm_moments.copy_(torch.stack([moments["k"], moments["v"]]).to(self.norm_moments))
        self._ready = True

    def window(self, sums: dict[str, torch.Tensor], step: int | None = None) -> dict[str, torch.Tensor]:
        """The terms computed from a whole step's summed statistics (every micro-batch and rank),
        and their part of the loss: "kv_k", "kv_v" (+ per layer) = the MSE of the layer_std
        standardised student and fused target K|V, in closed form from `_mse_sums` (equal to
        standardising by the step's mean and std, gradient through them included); "cka" = mean
        over K|V (or Z) and cka_layers of 1 - debiased CKA."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in sums.items():
            name, stat = key.rsplit(".", 1)
            groups.setdefault(name, {})[stat] = v
        out: dict[str, torch.Tensor] = {}
        loss = 0.0
        layer_w = layer_anneal_weights(self.num_layers, step, self.cfg.layer_anneal_steps).double()
        for part in ("k", "v"):
            if f"kv.{part}" in groups:
                per_layer = _mse_from_sums(groups[f"kv.{part}"])
                out[f"kv_{part}"], out[f"kv_{part}_layers"] = (
                    (layer_w.to(per_layer.device) * per_layer).mean(),
                    per_layer.detach(),
                )
                loss = loss + self.kv_weight * out[f"kv_{part}"]
        cka = [1 - cka_from_sums(g) for name, g in sorted(groups.items()) if name.startswith("cka.")]
        if cka:
            out["cka"] = torch.stack(cka).mean()
            loss = loss + self.cfg.cka_weight * out["cka"]
        out["loss"] = loss
        return out

    def forward(
        self,
        input_ids,
        attention_mask,
        loss_mask,
        kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
        step: int | None = None,
        shares: dict[str, float] | None = None,
        logits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        """shares (the trainer's step): {unit: this micro-batch's share of the step's count, x the
        number of processes}, scaling each term by what it is a mean over (`UNITS`), so the
        step's gradient is the one of its whole global batch; with them also "sums" (CKA's
        statistics, `window`) and "moments" (the standardisation's, `update_norm`), which the
        trainer sums over the step. Without (a batch on its own): CKA is the batch's and in "loss".
        logits: the teachers' stored top-K {teacher: (ids, lp) [B, T, K]} (logits_weight > 0).
        Terms are returned unscaled."""
        cfg, mask, share = self.cfg, attention_mask.bool(), _shares(shares)
        if self.kv_weight == 0:  # the CE-only baseline: no K/V captured
            student_logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
            out, out["loss"] = self._ce_terms(student_logits, input_ids, loss_mask, logits, share)
            return out
        res, cap, student_kv = self._student_forward(input_ids, attention_mask)
        dtype = res.logits.dtype
        out, loss = self._ce_terms(res.logits, input_ids, loss_mask, logits, share)
        sums: dict[str, torch.Tensor] = {}  # window statistics (CKA, exact K/V): summed over the window by the trainer
        moments: dict[str, torch.Tensor] = {}  # the standardisation's, for `update_norm`
        router_w = None
        if self.router is not None:
            router_w = self._router_weights(res.hidden_states[-1], mask)  # [B, G, N]
            out["router_entropy"] = router_entropy(router_w)
            if cfg.router_entropy_weight:
                loss = loss - cfg.router_entropy_weight * out["router_entropy"] * share["samples"]
        tok_w = None  # [B, T, L] token weights of the per-token K/V loss
        if cfg.kv_attn_weight == "student":
            tok_w = warmup_mix(attention_key_weights(res.attentions, mask), step, cfg.kv_attn_warmup_steps).to(dtype)
        layer_w = layer_anneal_weights(self.num_layers, step, cfg.layer_anneal_steps).to(res.logits.device, dtype)
        if self.zspace is not None:  # Z space (train/zspace.py): fusion and the loss in Z replace kv_k / kv_v
            zo, z_terms = self._z_terms(student_kv, kv, mask, router_w, layer_w)
            out.update(z_terms)
            loss = loss + self.kv_weight * out["z"] * share["tokens"]
            if cfg.cka_weight > 0:
                sums.update(self._cka_sums("z", zo.student, zo.target, mask))
        for i, part in enumerate(("k", "v") if self.zspace is None else ()):
            raw_s = student_kv[part]  # [B, T, L, D_s]
            adapted = [self.adapters[adapter_key(t)][part](kv[t][i].to(dtype)) for t in self.active]  # N x raw_s
            if self.exact_kv:  # the window's statistics (`window`): sums here, the loss from their totals
                part_sums, moments[part], w, target = self._kv_sums(i, part, raw_s, adapted, mask, router_w)
                sums.update(part_sums)
                z_s = raw_s  # CKA is blind to the student side's standardisation
            else:  # per micro-batch (README: approximate under accumulation / several processes)
                per_layer, w, z_s, target = self._kv_batch(raw_s, adapted, mask, router_w, tok_w)
                out[f"kv_{part}"], out[f"kv_{part}_layers"] = (layer_w * per_layer).mean(), per_layer.detach()
                loss = loss + self.kv_weight * out[f"kv_{part}"] * share["tokens"]
            if part == "k" and cfg.attn_kl_weight > 0:
                k_target = self._attn_target_keys(raw_s, adapted, w, mask)  # [B, T, L, D_s]
            out.update(self._route_means(part, w, mask))
            if cfg.cka_weight > 0:
                sums.update(self._cka_sums(part, z_s, target, mask))
        if cfg.attn_kl_weight > 0:
            per_layer = self._attn_kl_layers(cap, student_kv["k"], k_target, mask)
            out["attn_kl"], out["attn_kl_layers"] = per_layer.mean(), per_layer.detach()
            ramp = linear_ramp(step, cfg.attn_kl_warmup_steps)
            loss = loss + cfg.attn_kl_weight * ramp * out["attn_kl"] * share["tokens"]
        out["loss"] = loss
        if shares is None:  # a batch on its own (no trainer window): its window terms are the batch's
            return self._with_window(out, sums, step)
        if sums:  # the trainer sums them over the window (train/loop.py optimizer_step)
            out["sums"] = sums
        if moments:
            out["moments"] = moments
        return out

    def _ce_terms(self, student_logits, input_ids, loss_mask, logits, share) -> tuple[dict, torch.Tensor]:
        """CE and, with logits_weight, the offline logits term, both over the positions whose
        target token is in loss_mask (reasoning + answer; position t predicts token t + 1), on the
        student's logits rows gathered once for both. Returns (terms, their weighted loss)."""
        keep = loss_mask[:, 1:].bool()  # [B, T - 1]
        rows = student_logits[:, :-1][keep]  # [N, V]
        out = {"ce": rows_ce(rows, input_ids[:, 1:][keep])}
        loss = self.cfg.ce_weight * out["ce"] * share["ce_tokens"]
        if self.cfg.logits_weight > 0:
            out["logits"] = self._logits_term(rows, keep, logits)
            loss = loss + self.cfg.logits_weight * out["logits"] * share["ce_tokens"]
        return out, loss

    def _logits_term(self, s, keep, logits) -> torch.Tensor:
        """The offline logits term: per teacher that stores them, the mean `topk_kl` over the CE
        positions keep [B, T - 1] (row t of the store predicts token t + 1, as the student's
        logits at t do; s [N, V] the student's logits there), mixed by the teachers' fixed weights
        renormalised over those teachers."""
        if not logits:
            raise ValueError("logits_weight > 0 needs the teachers' stored logits in the batch (read_logits)")
        w = {t: self.weights[t] for t in logits if self.weights.get(t, 0) > 0}
        total = sum(w.values())
        term = s.new_zeros((), dtype=torch.float32)
        for t, wt in w.items():
            ids, lp = logits[t]
            kl = topk_kl(s, ids[:, :-1][keep], lp[:, :-1][keep], self.cfg.logits_temperature)
            term = term + (wt / total) * kl.sum() / keep.sum().clamp_min(1)
        return term

    def _student_forward(self, input_ids, attention_mask) -> tuple[Any, dict, dict[str, torch.Tensor]]:
        """The student's output (hidden states for the router, attentions for token weights), what
        `capture_kv` caught (queries too for attention KL) and its K/V {"k", "v": [B, T, L, D_s]}."""
        extra = {}
        if self.router is not None:
            extra["output_hidden_states"] = True  # the pooled state comes from this same forward
        if self.cfg.kv_attn_weight == "student":
            extra["output_attentions"] = True
        with capture_kv(self.student, queries=self.cfg.attn_kl_weight > 0) as cap:
            res = self.student(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return res, cap, {"k": torch.stack(cap["k"], dim=2), "v": torch.stack(cap["v"], dim=2)}

    def _router_weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The router's teacher weights [B, G, N] from the last hidden state h [B, T, hidden],
        mean-pooled over real tokens and detached: the router learns, the student is not pushed
        around by it."""
        n = mask.sum(dim=1, keepdim=True).clamp_min(1)
        pooled = torch.where(mask[..., None], h, 0.0).sum(dim=1) / n  # [B, hidden]
        return self.router(pooled.detach().to(self.router.mlp[0].weight.dtype))

    def _z_terms(self, student_kv, kv, mask, router_w, layer_w) -> tuple[Any, dict[str, torch.Tensor]]:
        """The Z space's output (`ZOut`) and its terms: "z" (annealed over layers), "z_layers",
        the student's collapse statistics, and the routing means."""
        zo = self.zspace(
            (student_kv["k"], student_kv["v"]),
            {t: kv[t] for t in self.active},
            mask,
            lambda z_s, z_t: self.route(z_s, z_t, self.active, router_w),
        )
        terms = {"z": (layer_w * zo.per_layer).mean(), "z_layers": zo.per_layer.detach()}
        terms["z_std"], terms["z_erank"] = zo.std, zo.erank
        return zo, {**terms, **self._route_means("z", zo.weights, mask)}

    def _kv_sums(
        self, i, part, raw_s, adapted, mask, router_w
    ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """K|V (part, index i) for `window`: this batch's `_mse_sums`, its `layer_moments` [1 + N, 3, L]
        (detached: the next step's reference), the fusion weights and the fused target CKA compares
        (each teacher on its reference std). raw_s [B, T, L, D_s], adapted N x raw_s."""
        x, a = raw_s[mask].double(), torch.stack([t[mask] for t in adapted]).double()  # [M, L, D], [N, M, L, D]
        own = torch.stack([layer_moments(x), *(layer_moments(t) for t in a)])  # [1 + N, 3, L], with graph
        # the reference the similarity routing and CKA's teacher mix standardise by (detached):
        # the previous step's whole batch; a batch on its own before any: its own
        ref = self.norm_moments[i] if self._norm_ready() else own.detach()
        w = self.route(
            standardize(raw_s, ref[0]).detach(),
            torch.stack([standardize(t, ref[1 + j]) for j, t in enumerate(adapted)]).detach(),
            self.active,
            router_w,
        )
        sums = _mse_sums(part, x, a, own, w.expand(w.shape[0], *mask.shape, w.shape[-1])[:, mask].double())
        on_ref = torch.stack([t / moment_std(ref[1 + j])[1].to(t.dtype)[:, None] for j, t in enumerate(adapted)])
        return sums, own.detach(), w, (w[..., None] * on_ref).sum(0)

    def _kv_batch(self, raw_s, adapted, mask, router_w, tok_w) -> tuple[torch.Tensor, ...]:
        """K|V per micro-batch: the per-layer loss [L] of the (kv_norm) standardised student and
        fused target, the fusion weights, and the student side and target CKA compares."""
        z_s = layer_std_norm(raw_s, mask) if self.cfg.kv_norm == "layer_std" else raw_s
        z_t = torch.stack(
            [layer_std_norm(a, mask) if self.cfg.kv_norm == "layer_std" else a for a in adapted]
        )  # [N, B, T, L, D_s]
        w = self.route(z_s, z_t, self.active, router_w)  # [N, B, T, L], [N, B, 1, L] or [N, 1, 1, 1]
        target = (w[..., None] * z_t).sum(0)
        _, per_layer = masked_kv_loss(z_s, target, mask, self.cfg.kv_loss, weights=tok_w)
        return per_layer, w, z_s, target

    @staticmethod
    def _attn_target_keys(raw_s, adapted, w, mask) -> torch.Tensor:
        """A_t's keys [B, T, L, D_s]: the same fusion, each teacher's adapted keys first put on the
        student's own per-sample, per-layer key mean and std (detached). Not the raw adapter outputs:
        the layer_std KV loss is blind to an adapter's scale (and attention KL does not train it), so
        their norm, hence A_t's sharpness, would drift freely (issue 26). The student's scale is the
        reference because it sets A_s's temperature and no adapter can move it; when the adapted keys
        already have it, nothing changes."""
        return attention_target_keys(raw_s.detach(), torch.stack(adapted).detach(), w.detach(), mask)

    def _route_means(self, part: str, w: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """ "route_{part}_{teacher}": each teacher's mean fusion weight over real tokens; none for fixed fusion."""
        if self.cfg.fusion == "fixed":
            return {}
        return {
            f"route_{part}_{t}": wt.expand(mask.shape + wt.shape[2:])[mask].mean().detach()
            for t, wt in zip(self.active, w, strict=True)
        }

    def _with_window(self, out: dict, sums: dict[str, torch.Tensor], step: int | None) -> dict:
        """A batch on its own: the terms `window` computes from its sums, their loss added to out's."""
        if not sums:
            return out
        loss, window = out["loss"], self.window(sums, step)
        out.update(
            {k: v.to(loss.dtype) if k == "loss" or v.dim() == 0 else v.detach().float() for k, v in window.items()}
        )
        out["loss"] = loss + window["loss"].to(loss.dtype)
        return out

    def _cka_sums(self, part: str, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """`cka_sums` of a, b [B, T, L, D] over real tokens, per CKA layer, keyed "cka.<part>.<layer>.<stat>"."""
        return {
            f"cka.{part}.{i}.{k}": v
            for i in self.cka_layers
            for k, v in cka_sums(a[:, :, i][mask], b[:, :, i][mask]).items()
        }

    def _attn_kl_layers(self, cap: dict, k_s: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per layer [L]: the mean over the batch's real query tokens of `attention_kl` between the
        student's attention over its keys k_s and over target keys k_t ([B, T, L, D_s] pre-RoPE),
        every side rotated by the (cos, sin) the student's attention was handed in this forward."""
        n = mask.sum().clamp_min(1)
        per_layer = []
        for i, spec in enumerate(self.attn_layout):
            rope = cap["rope"][i]
            q = rope_heads(cap["q"][i], rope, spec["heads"])  # [B, H_q, T, d]
            ks, kt = (rope_heads(k[:, :, i], rope, spec["kv_heads"]) for k in (k_s, k_t))  # [B, H_kv, T, d]
            per_layer.append(attention_kl(q, ks, kt, mask, spec["scaling"], spec["sliding_window"]).sum() / n)
        return torch.stack(per_layer)


def _mse_sums(
    part: str, x: torch.Tensor, a: torch.Tensor, own: torch.Tensor, wt: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over the real tokens (float64, with graph) from which `_mse_from_sums` computes, per
    layer, mean over tokens and channels of (std(s) - sum_n w_n std(a_n))^2, std(x) = (x - mean)
    / sqrt(var + eps) with the mean and var of all the summed tokens: x [M, L, D] the student's
    K|V at its M real tokens, a [N, M, L, D] the teachers', own [1 + N, 3, L] their
    `layer_moments`, wt [N, M, L] the fusion weights per token. Any split of the tokens sums to
    the same."""
    sa = a.sum(-1)  # [N, M, L] = 1^T a_n per token
    pair = torch.einsum("nmld,kmld->nkml", a, a)  # [N, N, M, L] a_n . a_k
    ww = wt[:, None] * wt[None]  # [N, N, M, L]
    out = {
        "n": x.new_tensor(float(x.shape[0])),
        "nd": own[0, 2, 0],
        "s1": own[0, 0],
        "s2": own[0, 1],
        "a1": own[1:, 0],
        "a2": own[1:, 1],  # [L], [L], [N, L], [N, L]
        "w": wt.sum(1),
        "ws": (wt * x.sum(-1)).sum(1),
        "wa": (wt * sa).sum(1),
        "wsa": (wt * torch.einsum("mld,nmld->nml", x, a)).sum(1),  # [N, L]
        "ww": ww.sum(2),
        "wwa": (ww * sa[:, None]).sum(2),
        "wwaa": (ww * pair).sum(2),  # [N, N, L]; wwa[n, k] = sum w_n w_k 1^T a_n
    }
    return {f"kv.{part}.{k}": v for k, v in out.items()}


def _mse_from_sums(g: dict[str, torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Per layer [L]: the standardised MSE of `_mse_sums` from their totals, expanded:
    |s^ - sum w_n a^_n|^2 = |s^|^2 - 2 sum_n w_n s^.a^_n + sum_nk w_n w_k a^_n.a^_k, each a
    polynomial in the sums once the means and stds (of the same totals) are known."""
    nd = g["nd"].clamp_min(1)
    d = nd / g["n"].clamp_min(1)
    mu_s, mu_a = g["s1"] / nd, g["a1"] / nd  # [L], [N, L]
    sd_s = ((g["s2"] / nd - mu_s**2).clamp_min(0) + eps).sqrt()
    sd_a = ((g["a2"] / nd - mu_a**2).clamp_min(0) + eps).sqrt()
    ss = (g["s2"] - 2 * mu_s * g["s1"] + nd * mu_s**2) / sd_s**2
    sa = (g["wsa"] - mu_a * g["ws"] - mu_s * g["wa"] + d * mu_s * mu_a * g["w"]) / (sd_s * sd_a)  # [N, L]
    aa = (
        g["wwaa"]
        - mu_a[None] * g["wwa"]
        - mu_a[:, None] * g["wwa"].transpose(0, 1)
        + d * mu_a[:, None] * mu_a[None] * g["ww"]
    ) / (sd_a[:, None] * sd_a[None])
    return (ss - 2 * sa.sum(0) + aa.sum((0, 1))) / nd


# What each term of Distiller.forward is a mean over: "ce_tokens" (positions whose target is in
# loss_mask), "samples" (router entropy), "tokens" (real tokens: K/V terms, CKA, attention KL, routing means).
UNITS = ("ce_tokens", "tokens", "samples")


def _shares(shares: dict[str, float] | None) -> dict[str, float]:
    return dict.fromkeys(UNITS, 1.0) if shares is None else shares


def cot_counts(batch: dict[str, Any]) -> dict[str, float]:
    """How many of each unit a batch holds (see UNITS)."""
    return {
        "ce_tokens": float(batch["loss_mask"][:, 1:].sum()),
        "tokens": float(batch["attention_mask"].sum()),
        "samples": float(len(batch["input_ids"])),
    }


def _cot_unit(term: str) -> str:
    return {"ce": "ce_tokens", "logits": "ce_tokens", "router_entropy": "samples"}.get(term, "tokens")


def _cot_step(
    model, batch: dict[str, Any], device, step: int, shares: dict[str, float] | None
) -> dict[str, torch.Tensor]:
    kv = kv_to_device(batch["kv"], device)  # int8 / int4 dequantised there
    logits = {t: (ids.to(device), lp.to(device)) for t, (ids, lp) in batch.get("logits", {}).items()}
    return model(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["loss_mask"].to(device),
        kv,
        step=step,
        shares=shares,
        logits=logits or None,
    )


def _cot_save(unwrapped: Distiller, state: dict, out: Path) -> None:
    torch.save(
        {k.removeprefix("adapters."): v for k, v in state.items() if k.startswith("adapters.")}, out / "adapters.pt"
    )
    if unwrapped.router is not None:
        torch.save(
            {k.removeprefix("router."): v for k, v in state.items() if k.startswith("router.")}, out / "router.pt"
        )
    if unwrapped.zspace is not None:  # its maps (the fixed ones too: buffers) and the last batch's Z for the report
        maps = {k.removeprefix("zspace."): v for k, v in state.items() if k.startswith("zspace.")}
        torch.save({"teachers": unwrapped.zspace.teachers, **maps}, out / "zspace.pt")
        if unwrapped.zspace.sample is not None:
            save_sample(unwrapped.zspace.sample, out)


def cot_mode(cfg: TrainConfig, student: nn.Module, spec, teachers: dict) -> Mode:
    """The written-chain mode: a Distiller over `student`, K/V (and the teachers' stored logits,
    logits_weight > 0) read per token."""
    if cfg.logits_weight > 0:
        _check_logits(cfg, teachers)
    model = build_distiller(cfg, student, spec, teachers)
    groups = [
        {"params": model.student.parameters(), "lr": cfg.lr},
        {"params": model.adapters.parameters(), "lr": cfg.adapter_lr},
    ]
    if model.router is not None:
        groups.append({"params": model.router.parameters(), "lr": cfg.router_lr})
    if (
        model.zspace is not None
    ):  # the learned maps into Z (fixed teacher maps are buffers); the loss is blind to their
        # scale (standardised Z), so weight decay would only shrink them towards the standardisation's eps floor
        groups.append({"params": model.zspace.parameters(), "lr": cfg.adapter_lr, "weight_decay": 0.0})
    return Mode(
        name="cot",
        model=model,
        param_groups=groups,
        read_kv=cfg.kv_weight > 0,
        read_latent=False,
        read_logits=cfg.logits_weight > 0,
        control=shuffle_kv,
        step=_cot_step,
        counts=cot_counts,
        unit_of=_cot_unit,
        save_extra=_cot_save,
        finite=LOSS_TERMS,
        postfix=("ce", "kv_k", "kv_v", "z", "logits"),
        summary={
            "ce": "ce",
            "kv_k": "kv_k",
            "kv_v": "kv_v",
            **({"z": "z"} if model.zspace is not None else {}),
            **({"logits": "logits"} if cfg.logits_weight > 0 else {}),
        },
        window=model.window if cfg.kv_weight > 0 and (cfg.cka_weight > 0 or model.exact_kv) else None,
        norm_missing=model.norm_missing,
        update_norm=model.update_norm,
    )


def _check_logits(cfg: TrainConfig, teachers: dict) -> None:
    """logits_weight > 0 needs a weighted teacher that stores logits (their ids are the student's
    vocabulary: the dump stores logits only for a teacher with the store's student tokenizer)."""
    weights = fixed_weights(cfg.teacher_weights, list(teachers))
    if not any(s.logits_top_k > 0 and weights[t] > 0 for t, s in teachers.items()):
        raise ConfigError(
            f"logits_weight {cfg.logits_weight}: none of the teachers {sorted(teachers)} with weight > 0 stores"
            " logits; re-dump one with `kvdistill dump --logits-top-k 64`, or set logits_weight 0"
        )


def build_distiller(cfg: TrainConfig, student: nn.Module, spec, teachers: dict) -> Distiller:
    """The Distiller `train` builds from a TrainConfig, the store's StoreSpec and the chosen
    TeacherSpecs."""
    return Distiller(cfg, student, KVShapes.of_store(spec, teachers))
