"""The student plus what turns stored teacher K/V into its targets: per-teacher, per-layer
adapters (flat or head-wise), fusion over teachers (fixed, similarity or a learned router),
and the losses. One module, so DDP / FSDP wrap one forward."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvdistill.core.capture import attention_layout, capture_kv, rope_heads

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
    masked_ce,
    masked_kv_loss,
    moment_std,
    standardize,
    warmup_mix,
)
from .mode import Mode
from .quant import kv_to_device
from .stream import shuffle_kv
from .zspace import ZSpace, save_sample

__all__ = [
    "fixed_weights",
    "KVAdapter",
    "HeadwiseAdapter",
    "Router",
    "Distiller",
    "build_distiller",
    "head_mixer_init",
    "LOSS_TERMS",
    "adapter_key",
    "cot_mode",
    "cot_counts",
]

# Every scalar loss term forward() may return (besides the total "loss").
LOSS_TERMS = ("ce", "kv_k", "kv_v", "cka", "router_entropy", "attn_kl", "z")


def fixed_weights(teacher_weights: dict[str, float] | None, teachers: list[str]) -> dict[str, float]:
    """Fixed fusion weights over `teachers`, normalised to sum 1 (default: equal)."""
    w = teacher_weights or dict.fromkeys(teachers, 1.0)
    unknown = sorted(set(w) - set(teachers))
    if unknown or not any(w.get(t, 0) > 0 for t in teachers):
        raise ValueError(f"teacher_weights {w} must name only teachers {teachers} with some weight > 0")
    total = sum(w.get(t, 0.0) for t in teachers)
    return {t: w.get(t, 0.0) / total for t in teachers}


class KVAdapter(nn.Module):
    """Per-layer linear map D_t -> D_s on x [B, T, L, D_t]; identity (no parameters) when equal."""

    def __init__(self, num_layers: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        if d_in == d_out:
            self.weight = None
        else:
            w = torch.empty(num_layers, d_in, d_out)
            for layer in w:  # semi-orthogonal: preserves the teacher's geometry at init
                nn.init.orthogonal_(layer)
            self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return x
        return torch.einsum("btld,lde->btle", x.to(self.weight.dtype), self.weight)


def head_mixer_init(h_t: int, h_s: int) -> torch.Tensor:
    """[H_s, H_t] row-stochastic: student head j averages the teacher heads whose slice of
    [0, 1) (head i covers [i / H_t, (i + 1) / H_t)) overlaps its own, weighted by the overlap.
    H_t a multiple of H_s: the plain group average of its H_t / H_s teacher heads (the GQA
    grouping); H_s a multiple of H_t: a copy of the one teacher head it lies in."""
    edges_t = torch.arange(h_t + 1, dtype=torch.float64) / h_t
    edges_s = torch.arange(h_s + 1, dtype=torch.float64) / h_s
    lo = torch.maximum(edges_s[:-1, None], edges_t[None, :-1])
    hi = torch.minimum(edges_s[1:, None], edges_t[None, 1:])
    overlap = (hi - lo).clamp_min(0)  # [H_s, H_t]
    return (overlap / overlap.sum(dim=1, keepdim=True)).float()


class HeadwiseAdapter(nn.Module):
    """Keeps the head structure: x [B, T, L, H_t * d_t] -> [B, T, L, H_s * d_s] by a per-layer
    head mixer [L, H_s, H_t] (init `head_mixer_init`), then a per-(layer, student head) linear
    map d_t -> d_s (identity when d_t == d_s, semi-orthogonal otherwise).
    L * H_s * (H_t + d_t * d_s) parameters instead of the flat L * H_t * d_t * H_s * d_s."""

    def __init__(self, num_layers: int, teacher_heads: tuple[int, int], student_heads: tuple[int, int]) -> None:
        super().__init__()
        (self.h_t, self.d_t), (self.h_s, self.d_s) = teacher_heads, student_heads
        self.mix = nn.Parameter(head_mixer_init(self.h_t, self.h_s).repeat(num_layers, 1, 1))  # [L, H_s, H_t]
        proj = torch.empty(num_layers, self.h_s, self.d_t, self.d_s)
        for m in proj.view(-1, self.d_t, self.d_s):
            if self.d_t == self.d_s:
                nn.init.eye_(m)
            else:
                nn.init.orthogonal_(m)
        self.proj = nn.Parameter(proj)  # [L, H_s, d_t, d_s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, L, _ = x.shape
        x = x.to(self.proj.dtype).view(B, T, L, self.h_t, self.d_t)
        mixed = torch.einsum("btlhd,ljh->btljd", x, self.mix)  # [B, T, L, H_s, d_t]
        return torch.einsum("btljd,ljde->btlje", mixed, self.proj).reshape(B, T, L, self.h_s * self.d_s)


class Router(nn.Module):
    """Teacher weights per sample from the student's pooled last hidden state: an MLP
    hidden -> GELU -> groups * N logits, softmax over the N teachers. The last layer starts
    at zero weight and bias log(initial weights), so the router begins as the fixed fusion.
    groups 3: one weight vector per shallow / middle / deep third of the student layers
    (layer l is in group floor(3 l / L))."""

    def __init__(
        self, hidden_size: int, init_weights: list[float], num_layers: int, groups: int = 1, width: int = 64
    ) -> None:
        super().__init__()
        if groups not in (1, 3):
            raise ValueError(f"router groups must be 1 or 3, got {groups}")
        if num_layers < groups:
            raise ValueError(
                f"router_groups {groups} needs at least {groups} student layers, the student has {num_layers}; use router_groups 1"
            )
        self.n, self.groups = len(init_weights), groups
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, groups * self.n))
        nn.init.zeros_(self.mlp[2].weight)
        with torch.no_grad():
            self.mlp[2].bias.copy_(torch.tensor([math.log(w) for w in init_weights]).repeat(groups))
        self.register_buffer("layer_group", torch.arange(num_layers) * groups // num_layers, persistent=False)  # [L]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, hidden] -> teacher weights [B, G, N] (rows sum to 1)."""
        return torch.softmax(self.mlp(pooled).view(len(pooled), self.groups, self.n), dim=-1)


def adapter_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)  # nn.ModuleDict keys may not hold "."


def _make_adapter(num_layers: int, width: int, student_width: int, heads_t, heads_s) -> nn.Module:
    if heads_t is None:
        return KVAdapter(num_layers, width, student_width)
    return HeadwiseAdapter(num_layers, heads_t, heads_s)


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
    ramp is 0."""

    def __init__(
        self,
        student: nn.Module,
        teacher_widths: dict[str, int],
        num_layers: int,
        student_width: int,
        *,
        teacher_weights: dict[str, float] | None = None,
        kv_weight: float = 1.0,
        ce_weight: float = 1.0,
        kv_norm: str = "layer_std",
        kv_loss: str = "mse",
        fusion: str = "fixed",
        temperature: float = 0.1,
        adapter: str = "flat",
        teacher_heads: dict[str, tuple[int, int]] | None = None,
        student_heads: tuple[int, int] | None = None,
        router_groups: int = 1,
        router_hidden: int = 64,
        router_entropy_weight: float = 0.0,
        hidden_size: int | None = None,
        kv_attn_weight: str = "none",
        kv_attn_warmup_steps: int = 1000,
        cka_weight: float = 0.0,
        cka_layers: str | list[int] = "middle",
        layer_anneal_steps: int = 0,
        z_dim: int = 0,
        z_loss: str = "mse",
        z_teacher_maps: str = "fixed",
        z_offdiag_weight: float = 0.005,
        attn_kl_weight: float = 0.0,
        attn_kl_warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.student = student
        self.teachers = list(teacher_widths)
        self.fusion = fixed_weights(teacher_weights, self.teachers)
        self.active = [t for t in self.teachers if self.fusion[t] > 0]
        self.kv_weight, self.ce_weight, self.kv_norm, self.kv_loss = kv_weight, ce_weight, kv_norm, kv_loss
        if fusion not in ("fixed", "similarity", "router"):
            raise ValueError(f"unknown fusion {fusion!r}; choose fixed, similarity or router")
        if adapter not in ("flat", "headwise"):
            raise ValueError(f"unknown adapter {adapter!r}; choose flat or headwise")
        if kv_attn_weight not in ("none", "student"):
            raise ValueError(f"unknown kv_attn_weight {kv_attn_weight!r}; choose none or student")
        self.fusion_mode, self.temperature = fusion, temperature
        self.num_layers = num_layers
        self.router_entropy_weight = router_entropy_weight
        self.kv_attn_weight, self.kv_attn_warmup_steps = kv_attn_weight, kv_attn_warmup_steps
        self.cka_weight, self.layer_anneal_steps = cka_weight, layer_anneal_steps
        self.cka_layers = self._resolve_layers(cka_layers, num_layers)
        if attn_kl_weight > 0 and kv_weight == 0:
            raise ValueError(
                "attn_kl_weight > 0 compares attention over the teacher keys, which kv_weight 0 does not read; set kv_weight > 0"
            )
        self.attn_kl_weight, self.attn_kl_warmup_steps = attn_kl_weight, attn_kl_warmup_steps
        self.attn_layout = (
            attention_layout(student) if attn_kl_weight > 0 else None
        )  # per layer: heads, scaling, window
        self.adapters = nn.ModuleDict()
        self.router: Router | None = None
        self.zspace: ZSpace | None = None
        if kv_weight > 0 and z_dim > 0:  # Z space (train/zspace.py): its maps replace the adapters
            if adapter != "flat" or kv_attn_weight != "none" or attn_kl_weight > 0:
                raise ValueError(
                    "z_dim > 0 has no adapters, token weights or student-space teacher keys: use adapter flat, kv_attn_weight none, attn_kl_weight 0"
                )
            self.zspace = ZSpace(
                dict(teacher_widths),
                student_width,
                num_layers,
                z_dim,
                loss=z_loss,
                teacher_maps=z_teacher_maps,
                offdiag_weight=z_offdiag_weight,
                kv_norm=kv_norm,
            )
        if kv_weight > 0:
            for t, width in teacher_widths.items() if self.zspace is None else ():
                heads_t = None
                if adapter == "headwise":
                    if not teacher_heads or t not in teacher_heads or student_heads is None:
                        raise ValueError(
                            f"adapter 'headwise' needs teacher_heads[{t!r}] and student_heads as (num_kv_heads, head_dim)"
                        )
                    heads_t = teacher_heads[t]
                    if heads_t[0] * heads_t[1] != width or student_heads[0] * student_heads[1] != student_width:
                        raise ValueError(
                            f"teacher {t}: heads {heads_t} do not make its width {width}, or student heads {student_heads} not {student_width}"
                        )
                self.adapters[adapter_key(t)] = nn.ModuleDict(
                    {p: _make_adapter(num_layers, width, student_width, heads_t, student_heads) for p in ("k", "v")}
                )
            if fusion == "router":
                hidden = hidden_size or student.config.hidden_size
                self.router = Router(
                    hidden, [self.fusion[t] for t in self.active], num_layers, router_groups, router_hidden
                )
            if kv_attn_weight == "student":
                _use_eager_attention(student)
        # kv_norm "layer_std": each side's K and V are standardised per layer by the statistics
        # of the previous optimizer step's whole window (every micro-batch and rank; `update_norm`),
        # fixed within a step, so a step's loss does not depend on how its batch is split. Saved
        # in checkpoints. [K|V, student + active teachers, (sum, sum of squares, count), L].
        self.register_buffer("norm_moments", torch.zeros(2, 1 + len(self.active), 3, num_layers, dtype=torch.float64))

    @staticmethod
    def _resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
        if spec == "middle":
            return [num_layers // 2]
        if spec == "last":
            return [num_layers - 1]
        if isinstance(spec, str):
            raise ValueError(f"unknown cka_layers {spec!r}; choose middle, last or a list of layer indices")
        bad = [i for i in spec if not 0 <= i < num_layers]
        if bad or not spec:
            raise ValueError(
                f"cka_layers {list(spec)}: indices must lie in 0..{num_layers - 1} (the student has {num_layers} layers)"
            )
        return sorted(set(spec))

    def route(
        self, z_s: torch.Tensor, z_t: torch.Tensor, teachers: list[str], router_w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fusion weights over teachers. fixed: the configured weights. similarity: per token
        and layer, softmax over teachers of cosine(student, adapted teacher) / temperature,
        detached (routing picks the target; it is not itself trained). router: the router's
        per-sample weights router_w [B, G, N] spread over each group's layers -> [N, B, 1, L]
        (trained through the KV loss)."""
        if self.fusion_mode == "fixed":
            return torch.tensor([self.fusion[t] for t in teachers], dtype=z_t.dtype, device=z_t.device).view(
                -1, 1, 1, 1
            )
        if self.fusion_mode == "router":
            return router_w[:, self.router.layer_group].permute(2, 0, 1)[:, :, None, :]  # [N, B, 1, L]
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(z_s[None], z_t, dim=-1)  # [N, B, T, L]
            return torch.softmax(cos / self.temperature, dim=0)

    @property
    def exact_kv(self) -> bool:
        """The K/V terms are computed from the whole step's summed statistics (exact however the
        step is split): layer_std + mse without token weights (Z space standardises on its own).
        Else per micro-batch."""
        return (
            self.kv_norm == "layer_std"
            and self.kv_weight > 0
            and self.zspace is None
            and self.kv_loss == "mse"
            and self.kv_attn_weight == "none"
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
        layer_w = layer_anneal_weights(self.num_layers, step, self.layer_anneal_steps).double()
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
            loss = loss + self.cka_weight * out["cka"]
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
    ):
        """shares (the trainer's step): {unit: this micro-batch's share of the step's count, x the
        number of processes}, scaling each term by what it is a mean over (`UNITS`), so the
        step's gradient is the one of its whole global batch; with them also "sums" (CKA's
        statistics, `window`) and "moments" (the standardisation's, `update_norm`), which the
        trainer sums over the step. Without (a batch on its own): CKA is the batch's and in "loss".
        Terms are returned unscaled."""
        mask = attention_mask.bool()
        share = _shares(shares)
        if self.kv_weight == 0:
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
            out = {"ce": masked_ce(logits, input_ids, loss_mask)}
            out["loss"] = self.ce_weight * out["ce"] * share["ce_tokens"]
            return out
        extra = {}
        if self.router is not None:
            extra["output_hidden_states"] = True  # the pooled state comes from this same forward
        if self.kv_attn_weight == "student":
            extra["output_attentions"] = True
        with capture_kv(self.student, queries=self.attn_kl_weight > 0) as cap:
            res = self.student(input_ids=input_ids, attention_mask=attention_mask, **extra)
        logits = res.logits
        student_kv = {"k": torch.stack(cap["k"], dim=2), "v": torch.stack(cap["v"], dim=2)}  # [B, T, L, D_s]
        out = {"ce": masked_ce(logits, input_ids, loss_mask)}
        sums: dict[str, torch.Tensor] = {}  # window statistics (CKA): summed over the window by the trainer
        moments: dict[str, torch.Tensor] = {}
        loss = self.ce_weight * out["ce"] * share["ce_tokens"]
        teachers = self.active
        router_w = None
        if self.router is not None:
            h = res.hidden_states[-1]  # [B, T, hidden]
            n = mask.sum(dim=1, keepdim=True).clamp_min(1)
            pooled = torch.where(mask[..., None], h, 0.0).sum(dim=1) / n  # [B, hidden]; mean over real tokens
            # [B, G, N]; detached: the router learns, the student is not pushed around by it
            router_w = self.router(pooled.detach().to(self.router.mlp[0].weight.dtype))
            entropy = -(router_w * torch.log(router_w.clamp_min(1e-12))).sum(-1).mean()
            out["router_entropy"] = entropy
            if self.router_entropy_weight:
                loss = loss - self.router_entropy_weight * entropy * share["samples"]
        tok_w = None
        if self.kv_attn_weight == "student":
            tok_w = warmup_mix(attention_key_weights(res.attentions, mask), step, self.kv_attn_warmup_steps).to(
                logits.dtype
            )
        layer_w = layer_anneal_weights(self.num_layers, step, self.layer_anneal_steps).to(
            device=logits.device, dtype=logits.dtype
        )
        if self.zspace is not None:  # Z space (train/zspace.py): fusion and the loss in Z replace kv_k / kv_v
            zo = self.zspace(
                (student_kv["k"], student_kv["v"]),
                {t: kv[t] for t in teachers},
                mask,
                lambda z_s, z_t: self.route(z_s, z_t, teachers, router_w),
            )
            out["z"], out["z_layers"], out["z_std"], out["z_erank"] = (
                (layer_w * zo.per_layer).mean(),
                zo.per_layer.detach(),
                zo.std,
                zo.erank,
            )
            if self.fusion_mode != "fixed":
                for t, wt in zip(teachers, zo.weights, strict=True):
                    out[f"route_z_{t}"] = wt.expand(mask.shape + wt.shape[2:])[mask].mean().detach()
            loss = loss + self.kv_weight * out["z"] * share["tokens"]
            if self.cka_weight > 0:
                sums.update(self._cka_sums("z", zo.student, zo.target, mask))
        for i, part in enumerate(("k", "v") if self.zspace is None else ()):
            raw_s = student_kv[part]  # [B, T, L, D_s]
            adapted = [self.adapters[adapter_key(t)][part](kv[t][i].to(logits.dtype)) for t in teachers]
            if self.exact_kv:  # the window's statistics (`window`): sums here, the loss from their totals
                x, a = (
                    raw_s[mask].double(),
                    torch.stack([t[mask] for t in adapted]).double(),
                )  # [M, L, D], [N, M, L, D]
                own = torch.stack([layer_moments(x), *(layer_moments(t) for t in a)])  # [1 + N, 3, L], with graph
                moments[part] = own.detach()  # the next step's reference
                # the reference the similarity routing and CKA's teacher mix standardise by (detached):
                # the previous step's whole batch; a batch on its own before any: its own
                ref = self.norm_moments[i] if self._norm_ready() else own.detach()
                w = self.route(
                    standardize(raw_s, ref[0]).detach(),
                    torch.stack([standardize(t, ref[1 + j]) for j, t in enumerate(adapted)]).detach(),
                    teachers,
                    router_w,
                )
                sums.update(
                    _mse_sums(part, x, a, own, w.expand(w.shape[0], *mask.shape, w.shape[-1])[:, mask].double())
                )
                z_s = raw_s  # CKA is blind to the student side's standardisation
                target = (
                    w[..., None]
                    * torch.stack([t / moment_std(ref[1 + j])[1].to(t.dtype)[:, None] for j, t in enumerate(adapted)])
                ).sum(0)
            else:  # per micro-batch (README: approximate under accumulation / several processes)
                z_s = layer_std_norm(raw_s, mask) if self.kv_norm == "layer_std" else raw_s
                z_t = torch.stack(
                    [layer_std_norm(a, mask) if self.kv_norm == "layer_std" else a for a in adapted]
                )  # [N, B, T, L, D_s]
                w = self.route(z_s, z_t, teachers, router_w)  # [N, B, T, L], [N, B, 1, L] or [N, 1, 1, 1]
                target = (w[..., None] * z_t).sum(0)
                _, per_layer = masked_kv_loss(z_s, target, mask, self.kv_loss, weights=tok_w)
                term = (layer_w * per_layer).mean()
                out[f"kv_{part}"], out[f"kv_{part}_layers"] = term, per_layer.detach()
                loss = loss + self.kv_weight * term * share["tokens"]
            if part == "k" and self.attn_kl_weight > 0:
                # A_t's keys: the same fusion, each teacher's adapted keys first put on the student's
                # own per-sample, per-layer key mean and std (detached). Not the raw adapter outputs:
                # the layer_std KV loss is blind to an adapter's scale (and attention KL does not
                # train it), so their norm, hence A_t's sharpness, would drift freely (issue 26).
                # The student's scale is the reference because it sets A_s's temperature and no
                # adapter can move it; when the adapted keys already have it, nothing changes.
                k_target = attention_target_keys(
                    raw_s.detach(), torch.stack(adapted).detach(), w.detach(), mask
                )  # [B, T, L, D_s]
            if self.fusion_mode != "fixed":  # mean routing weight per teacher, over real tokens
                for t, wt in zip(teachers, w, strict=True):
                    out[f"route_{part}_{t}"] = wt.expand(mask.shape + wt.shape[2:])[mask].mean().detach()
            if self.cka_weight > 0:
                sums.update(self._cka_sums(part, z_s, target, mask))
        if self.attn_kl_weight > 0:
            per_layer = self._attn_kl_layers(cap, student_kv["k"], k_target, mask)
            out["attn_kl"], out["attn_kl_layers"] = per_layer.mean(), per_layer.detach()
            loss = (
                loss
                + self.attn_kl_weight * linear_ramp(step, self.attn_kl_warmup_steps) * out["attn_kl"] * share["tokens"]
            )
        out["loss"] = loss
        if shares is None:  # a batch on its own (no trainer window): its window terms are the batch's
            if sums:
                window = self.window(sums, step)
                out.update(
                    {
                        k: v.to(loss.dtype) if k == "loss" or v.dim() == 0 else v.detach().float()
                        for k, v in window.items()
                    }
                )
                out["loss"] = loss + window["loss"].to(loss.dtype)
            return out
        if sums:  # the trainer sums them over the window (train/loop.py optimizer_step)
            out["sums"] = sums
        if moments:
            out["moments"] = moments
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
    return {"ce": "ce_tokens", "router_entropy": "samples"}.get(term, "tokens")


def _cot_step(
    model, batch: dict[str, Any], device, step: int, shares: dict[str, float] | None
) -> dict[str, torch.Tensor]:
    kv = kv_to_device(batch["kv"], device)  # int8 / int4 dequantised there
    return model(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["loss_mask"].to(device),
        kv,
        step=step,
        shares=shares,
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


def cot_mode(cfg, student: nn.Module, spec, teachers: dict) -> Mode:
    """The written-chain mode: a Distiller over `student`, K/V read per token."""
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
        control=shuffle_kv,
        step=_cot_step,
        counts=cot_counts,
        unit_of=_cot_unit,
        save_extra=_cot_save,
        finite=LOSS_TERMS,
        postfix=("ce", "kv_k", "kv_v", "z"),
        summary={"ce": "ce", "kv_k": "kv_k", "kv_v": "kv_v", **({"z": "z"} if model.zspace is not None else {})},
        window=model.window if model.kv_weight > 0 and (model.cka_weight > 0 or model.exact_kv) else None,
        norm_missing=model.norm_missing,
        update_norm=model.update_norm,
    )


def build_distiller(cfg, student: nn.Module, spec, teachers: dict) -> Distiller:
    """The Distiller `train` builds from a TrainConfig, the store's StoreSpec and the chosen
    TeacherSpecs. Refuses the head-wise adapter for a teacher stored through a PCA projection."""
    heads = None
    if cfg.adapter == "headwise" and cfg.kv_weight > 0:
        for name, t in teachers.items():
            if t.projection is not None or t.width != t.geometry.width:
                raise ValueError(
                    f"teacher {name}: stored through a PCA projection (width {t.width}, its own K/V are "
                    f"{t.geometry.num_kv_heads} heads x {t.geometry.head_dim}), so its head structure is gone and "
                    "adapter 'headwise' cannot map heads; use --adapter flat, or re-dump this teacher without align.projection"
                )
        heads = {name: (t.geometry.num_kv_heads, t.geometry.head_dim) for name, t in teachers.items()}
    return Distiller(
        student,
        {t: s.width for t, s in teachers.items()},
        spec.geometry.num_layers,
        spec.geometry.width,
        teacher_weights=cfg.teacher_weights,
        kv_weight=cfg.kv_weight,
        ce_weight=cfg.ce_weight,
        kv_norm=cfg.kv_norm,
        kv_loss=cfg.kv_loss,
        fusion=cfg.fusion,
        temperature=cfg.fusion_temperature,
        adapter=cfg.adapter,
        teacher_heads=heads,
        student_heads=(spec.geometry.num_kv_heads, spec.geometry.head_dim),
        router_groups=cfg.router_groups,
        router_hidden=cfg.router_hidden,
        router_entropy_weight=cfg.router_entropy_weight,
        kv_attn_weight=cfg.kv_attn_weight,
        kv_attn_warmup_steps=cfg.kv_attn_warmup_steps,
        cka_weight=cfg.cka_weight,
        cka_layers=cfg.cka_layers,
        layer_anneal_steps=cfg.layer_anneal_steps,
        z_dim=cfg.z_dim,
        z_loss=cfg.z_loss,
        z_teacher_maps=cfg.z_teacher_maps,
        z_offdiag_weight=cfg.z_offdiag_weight,
        attn_kl_weight=cfg.attn_kl_weight,
        attn_kl_warmup_steps=cfg.attn_kl_warmup_steps,
    )
