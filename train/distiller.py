"""The student plus what turns stored teacher K/V into its targets: per-teacher, per-layer
adapters, fixed-weight fusion, and the losses. One module, so DDP / FSDP wrap one forward."""

from __future__ import annotations

import re

import torch
from torch import nn

from kvdistill.dump.capture import capture_kv

from .losses import layer_std_norm, masked_ce, masked_kv_loss

__all__ = ["KVAdapter", "Distiller"]


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
        return torch.einsum("btld,lde->btle", x, self.weight)


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)  # nn.ModuleDict keys may not hold "."


class Distiller(nn.Module):
    """forward(batch) -> {"loss", "ce", "kv_k", "kv_v", "kv_k_layers", "kv_v_layers"}.

    loss = ce_weight * CE(reasoning + answer) + kv_weight * (MSE_K + MSE_V), with the KV target
    the fixed-weight fusion over teachers of adapter(teacher K/V), every term masked to real
    tokens, and (kv_norm="layer_std") each layer standardised on both sides before the MSE."""

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
    ) -> None:
        super().__init__()
        self.student = student
        self.teachers = list(teacher_widths)
        w = teacher_weights or dict.fromkeys(self.teachers, 1.0)
        unknown = sorted(set(w) - set(self.teachers))
        if unknown or not any(w.get(t, 0) > 0 for t in self.teachers):
            raise ValueError(f"teacher_weights {w} must name only teachers {self.teachers} with some weight > 0")
        total = sum(w.get(t, 0.0) for t in self.teachers)
        self.fusion = {t: w.get(t, 0.0) / total for t in self.teachers}
        self.kv_weight, self.ce_weight, self.kv_norm, self.kv_loss = kv_weight, ce_weight, kv_norm, kv_loss
        if fusion not in ("fixed", "similarity"):
            raise ValueError(f"unknown fusion {fusion!r}; choose fixed or similarity")
        self.fusion_mode, self.temperature = fusion, temperature
        self.adapters = nn.ModuleDict()
        if kv_weight > 0:
            for t, width in teacher_widths.items():
                self.adapters[_key(t)] = nn.ModuleDict(
                    {"k": KVAdapter(num_layers, width, student_width), "v": KVAdapter(num_layers, width, student_width)}
                )

    def route(self, z_s: torch.Tensor, z_t: torch.Tensor, teachers: list[str]) -> torch.Tensor:
        """Fusion weights over teachers. fixed: the configured weights. similarity: per token
        and layer, softmax over teachers of cosine(student, adapted teacher) / temperature,
        detached (routing picks the target; it is not itself trained)."""
        if self.fusion_mode == "fixed":
            return torch.tensor([self.fusion[t] for t in teachers], dtype=z_t.dtype, device=z_t.device).view(-1, 1, 1, 1)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(z_s[None], z_t, dim=-1)  # [N, B, T, L]
            return torch.softmax(cos / self.temperature, dim=0)

    def _norm(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer_std_norm(x, mask) if self.kv_norm == "layer_std" else x

    def forward(self, input_ids, attention_mask, loss_mask, kv: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        if self.kv_weight > 0:
            with capture_kv(self.student) as cap:
                logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
            student_kv = {"k": torch.stack(cap["k"], dim=2), "v": torch.stack(cap["v"], dim=2)}  # [B, T, L, D_s]
        else:
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        out = {"ce": masked_ce(logits, input_ids, loss_mask)}
        loss = self.ce_weight * out["ce"]
        if self.kv_weight > 0:
            mask = attention_mask.bool()
            teachers = [t for t in self.teachers if self.fusion[t] > 0]
            for i, part in enumerate(("k", "v")):
                z_s = self._norm(student_kv[part], mask)  # [B, T, L, D_s]
                z_t = torch.stack([self._norm(self.adapters[_key(t)][part](kv[t][i].to(logits.dtype)), mask) for t in teachers])  # [N, B, T, L, D_s]
                w = self.route(z_s, z_t, teachers)  # [N, B, T, L] or [N, 1, 1, 1]
                target = (w[..., None] * z_t).sum(0)
                mse, per_layer = masked_kv_loss(z_s, target, mask, self.kv_loss)
                out[f"kv_{part}"], out[f"kv_{part}_layers"] = mse, per_layer.detach()
                if self.fusion_mode == "similarity":  # mean routing weight per teacher, over real tokens
                    for t, wt in zip(teachers, w, strict=True):
                        out[f"route_{part}_{t}"] = wt[mask].mean().detach()
                loss = loss + self.kv_weight * mse
        out["loss"] = loss
        return out
