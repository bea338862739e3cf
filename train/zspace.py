"""The common Z space: the method's optional last phase, for teachers too different for a
per-teacher map into the student's own K/V space (other families, widths, depths).

Per layer l, a token's [K, V] (its key and value concatenated, each first standardised per
layer as kv_norm says) is mapped into a z_dim-wide space Z: teacher i by g_i, the student by
h_s, each one linear map per layer. Fusion over teachers (fixed / similarity / router
weights, `Distiller.route`) and the loss are computed there:

    z_s = std(h_s([K_s, V_s]))              z_i = std(g_i([K_i, V_i]))      # [B, T, L, Z]
    target = std(sum_i w_i z_i)             Z term = mean_l a_l(step) * loss_l(z_s, target)

with std the per-(layer, dimension) standardisation over the batch's real tokens (`standardize`)
and loss_l one of (`z_loss`, per layer, over the N real tokens):

- mse:    mean over tokens and dims of (z_s - target)^2.
- cosine: mean over tokens of 1 - cos(z_s, target) (norms floored at COS_FLOOR).
- barlow: Barlow Twins (Zbontar et al. 2021): C = z_s^T target / N, the [Z, Z] cross-correlation
  of the standardised sides; [sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2] / Z.
- cca:    soft-decorrelated CCA (after Chang et al. 2018, "Scalable and effective deep CCA via
  soft decorrelation"): maximise the per-dimension correlations C_ii, CCA's whitening constraint
  as a soft penalty on the off-diagonal of each side's own correlation matrix:
  [sum_i (1 - C_ii) + lambda (sum_{i != j} (C_ss)_ij^2 + sum_{i != j} (C_tt)_ij^2)] / Z.
barlow and cca standardise their inputs themselves (it is part of their definition); the /Z
puts every loss on the same scale (~0 for identical, decorrelated sides; 1 for a collapsed one).
With learned teacher maps (`whiten`) barlow and cca read C off the whitened sides instead:
C = L_s^-1 C_st L_t^-T, with L L^T = C_ss + RIDGE I (Cholesky whitening, as in Ermolov et al.
2021, "Whitening for self-supervised representation learning"; the Z x Z matrices only, in
float64); barlow's off-diagonal term reads the whitened C too, cca's soft penalty stays on
each side's own (unwhitened) correlations. cca is then CCA proper (each side
constrained to Z^T Z / N = I): at its optimum sum_i C_ii is the sum of the top Z canonical
correlations of the two sides. Like any CCA it needs N well above Z real tokens per micro-batch:
sample canonical correlations are biased up by ~Z / N, and with N - 1 <= Z the two whitened
sides span the same directions whatever they hold.

Collapse (both sides mapping every token to one point, or every dimension to one direction)
is the trivial way to a low loss once both sides are trained; it is guarded three ways:
1. Z is anchored by the teachers: by default (teacher_maps "fixed") each g_i is a frozen random
   semi-orthogonal projection (a buffer, not a parameter): the target is the teachers' data
   seen through a fixed lens and cannot move towards the student. "learned" g_i are allowed
   only with barlow / cca (TrainConfig.validate), and only whitened (guard 3).
2. Every Z is standardised per dimension over real tokens: the loss is blind to the maps'
   scale (no gradient towards shrinking; the learned maps get no weight decay), and a Z
   constant over the tokens standardises to exactly 0. Against a non-constant other side it
   scores mse = mean_d var_d / (var_d + eps) ~ 1, cosine 1, barlow >= 1, cca >= 1 (C_ii = 0;
   for cosine, barlow and cca whatever the other side): the score of a student that has
   learned nothing, above any whose Z correlates rho > 0 per dimension with the target
   (cosine ~ 1 - rho, barlow ~ (1 - rho)^2, cca ~ 1 - rho; mse 2 - 2 rho, below 1 once rho > 1/2).
3. Dimensional collapse (every dimension on one direction, or on r << Z of them). A fixed
   target keeps its own spread: a student of rank 1 reaches at most sum_i C_ii <=
   sqrt(Z lambda_max) of Z, lambda_max the largest eigenvalue of the target's correlation
   matrix (Z only for a target collapsed itself). With both sides
   learned, the soft penalties alone do not stop it: all Z dimensions of both sides on one
   shared direction make every C_ii ~ 1 and cost only lambda (Z - 1) under barlow and
   2 lambda (Z - 1) under cca (0.155 / 0.31 at Z 32, lambda 0.005), less than an honest
   solution's miss wherever teacher and student share a few strong factors and many weak
   ones (then optimised maps fall to rank ~4 of 8; tests/test_zspace.py). Whitened, a side of
   rank r has at most r unit directions: the whitened C has singular values <= 1 and rank <= r,
   so sum_i C_ii <= r, and the collapse costs at least (Z - r) / Z under cca and
   ((Z - r) / Z)^2 under barlow, whatever lambda; as canonical correlations are >= 0, a
   further dimension never raises cca's optimum. Whitening is blind to the maps' conditioning,
   which the ridge (a direction of variance v << RIDGE counts only v / (v + RIDGE)) and, for cca,
   the soft penalty on each side's own correlations keep from degenerating. Fixed teacher maps
   keep the plain (unwhitened) barlow / cca, unchanged.
The student's collapse statistics are logged every step (`collapse_stats`): "z_std", the
mean per-dimension std of its raw Z over real tokens (-> 0: collapse to a point), and
"z_erank", the effective rank (Roy & Vetterli 2007) of its Z's correlation matrix, mean over
layers (-> 1: every dimension on one direction; 0: constant).

Gradient accumulation weighs the Z term by real tokens, like the K/V terms; barlow and cca are
batch statistics (correlations over the micro-batch's tokens), so an accumulated window is an
approximation of one large batch for them, as for CKA.

The last training batch's standardised Z (up to SAMPLE_TOKENS real tokens, every source: each
teacher, the fused target, the student) is kept on the module (`ZSpace.sample`) and written
with the checkpoint (`save_sample`) for `kvdistill report`'s PCA picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kvdistill.schemas import TrainConfig

from .adapters import KVShapes
from .losses import layer_std_norm
from .report import ZSPACE_SAMPLE

__all__ = [
    "Z_LOSSES",
    "SAMPLE_TOKENS",
    "ZMap",
    "ZSpace",
    "ZOut",
    "standardize",
    "z_loss",
    "collapse_stats",
    "save_sample",
]

Z_LOSSES = ("mse", "cosine", "barlow", "cca")
SAMPLE_TOKENS = 512  # real tokens per source in the Z sample the report draws
EPS = 1e-5
COS_FLOOR = 0.1
RIDGE = 1e-3  # added to each side's [Z, Z] correlation matrix before it is whitened


class ZMap(nn.Module):
    """Per-layer linear map of [K, V] into Z: (k, v) [B, T, L, D] each -> [B, T, L, Z], weight
    [L, 2D, Z] semi-orthogonal at init. learned False: a frozen buffer (saved, never trained)."""

    def __init__(self, num_layers: int, width: int, z_dim: int, learned: bool) -> None:
        super().__init__()
        w = torch.empty(num_layers, 2 * width, z_dim)
        for layer in w:
            nn.init.orthogonal_(layer)
        if learned:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = torch.cat([k, v], dim=-1).to(self.weight.dtype)  # [B, T, L, 2D]
        return torch.einsum("btld,ldz->btlz", x, self.weight)


def standardize(z: torch.Tensor, mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """z [B, T, L, Z] with zero mean and unit variance per (layer, dimension) over the real
    tokens of mask [B, T] (padded positions take no part in the statistics). A dimension
    constant over the tokens becomes exactly 0."""
    m = mask[:, :, None, None]
    n = mask.sum().clamp_min(1)
    mean = torch.where(m, z, 0.0).sum(dim=(0, 1), keepdim=True) / n  # [1, 1, L, Z]
    var = torch.where(m, (z - mean) ** 2, 0.0).sum(dim=(0, 1), keepdim=True) / n
    return (z - mean) / (var + eps).sqrt()


def _std_rows(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x [N, L, Z] standardised per (layer, dimension) over its N rows."""
    x = x - x.mean(dim=0)
    return x / (x.pow(2).mean(dim=0) + eps).sqrt()


def _offdiag_sq(c: torch.Tensor) -> torch.Tensor:
    """sum of the squared off-diagonal entries of c [L, Z, Z] -> [L]."""
    return c.pow(2).sum(dim=(-2, -1)) - c.diagonal(dim1=-2, dim2=-1).pow(2).sum(-1)


def _whitened_cross(c_ab: torch.Tensor, c_aa: torch.Tensor, c_bb: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """The cross-correlation of the Cholesky-whitened sides, L_a^-1 C_ab L_b^-T with
    L L^T = C + ridge I (all [L, Z, Z]), in float64: a [Z, Z] sum, never an [N, Z] solve."""
    eye = ridge * torch.eye(c_aa.shape[-1], dtype=torch.float64, device=c_aa.device)
    la, lb = (torch.linalg.cholesky(c.double() + eye) for c in (c_aa, c_bb))
    x = torch.linalg.solve_triangular(la, c_ab.double(), upper=False)  # L_a^-1 C_ab
    return torch.linalg.solve_triangular(lb, x.mT, upper=False).mT.to(c_ab.dtype)  # (L_b^-1 (L_a^-1 C_ab)^T)^T


def z_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "mse",
    offdiag_weight: float = 0.005,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss in Z (module docstring) between a, b [B, T, L, Z] over the real tokens of mask
    [B, T] (padded positions are selected away: even NaN there cannot leak in).
    offdiag_weight: lambda of barlow / cca. whiten: barlow / cca on the whitened sides (the
    guard of learned teacher maps; mse / cosine ignore it). Returns (scalar, per-layer loss [L])."""
    if kind not in Z_LOSSES:
        raise ValueError(f"unknown z_loss {kind!r}; choose one of {list(Z_LOSSES)}")
    a, b = a[mask].float(), b[mask].float()  # [N, L, Z]; float32: correlations in bf16 are too coarse
    n, _, z_dim = a.shape
    if n == 0:
        per_layer = a.new_zeros(a.shape[1])
    elif kind == "mse":
        per_layer = ((a - b) ** 2).mean(dim=(0, 2))
    elif kind == "cosine":
        # norms floored at COS_FLOOR (a standardised token's is ~sqrt(Z)): a collapsed side,
        # standardised to ~0, scores cos 0, not the cosine of its rounding noise
        norms = a.norm(dim=-1).clamp_min(COS_FLOOR) * b.norm(dim=-1).clamp_min(COS_FLOOR)  # [N, L]
        per_layer = (1 - (a * b).sum(-1) / norms).mean(dim=0)
    else:
        a, b = _std_rows(a), _std_rows(b)
        c = torch.einsum("nli,nlj->lij", a, b) / n  # [L, Z, Z] cross-correlation
        if kind == "cca" or whiten:
            c_aa = torch.einsum("nli,nlj->lij", a, a) / n  # [L, Z, Z] each side's own correlation
            c_bb = torch.einsum("nli,nlj->lij", b, b) / n
        cw = _whitened_cross(c, c_aa, c_bb) if whiten else c
        diag = cw.diagonal(dim1=-2, dim2=-1)  # [L, Z]
        if kind == "barlow":
            per_layer = ((1 - diag) ** 2).sum(-1) + offdiag_weight * _offdiag_sq(cw)
        else:
            per_layer = (1 - diag).sum(-1) + offdiag_weight * (_offdiag_sq(c_aa) + _offdiag_sq(c_bb))
        per_layer = per_layer / z_dim
    return per_layer.mean(), per_layer


@torch.no_grad()
def collapse_stats(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-dimension std of z [B, T, L, Z] over real tokens, effective rank of its
    correlation matrix: exp(entropy of its normalised eigenvalues), in [1, Z], 0 for a Z constant
    over the tokens; both means over layers), detached 0-d float32 tensors."""
    x = z[mask].double()  # [N, L, Z]
    if len(x) < 2:
        zero = z.new_zeros((), dtype=torch.float32)
        return zero, zero
    std = x.std(dim=0, unbiased=False).mean()
    xs = _std_rows(x)
    ev = torch.linalg.eigvalsh(torch.einsum("nli,nlj->lij", xs, xs) / len(xs)).clamp_min(0)  # [L, Z]
    total = ev.sum(-1, keepdim=True)
    p = ev / total.clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    erank = torch.where(total.squeeze(-1) > 1e-6, entropy.exp(), 0.0).mean()
    return std.float(), erank.float()


@dataclass
class ZOut:
    student: torch.Tensor  # [B, T, L, Z] the student's standardised Z
    target: torch.Tensor  # [B, T, L, Z] the fused target
    weights: torch.Tensor  # the routing weights over teachers: [N, B, T, L], [N, B, 1, L] or [N, 1, 1, 1]
    per_layer: torch.Tensor  # [L] the loss per layer
    std: torch.Tensor  # collapse statistics of the student's Z (`collapse_stats`)
    erank: torch.Tensor


class ZSpace(nn.Module):
    """The maps into Z and the loss there (module docstring): g_i per teacher (in
    `shapes.teacher_widths` order: `teacher_maps[i]`), h_s for the student (`student_map`).

    From the TrainConfig (validated there): z_dim, z_loss (one of Z_LOSSES), z_teacher_maps
    ("fixed": frozen random semi-orthogonal, the default guard; or "learned"), z_offdiag_weight
    (lambda of barlow / cca), kv_norm ("layer_std" standardises K and V per layer before the
    maps). standardize False drops the per-dimension standardisation of every Z (the collapse
    guard 2; tests switch it off to show the collapse it prevents). whiten: barlow / cca on the
    whitened sides (guard 3), None: on with learned teacher maps, off with fixed ones (tests
    switch it off with learned maps to show the dimensional collapse it prevents)."""

    def __init__(
        self, cfg: TrainConfig, shapes: KVShapes, *, standardize: bool = True, whiten: bool | None = None
    ) -> None:
        super().__init__()
        learned = cfg.z_teacher_maps == "learned"
        self.teachers = list(shapes.teacher_widths)
        self.cfg = cfg
        self.standardize = standardize
        self.whiten = learned if whiten is None else whiten
        L, Z = shapes.num_layers, cfg.z_dim
        self.student_map = ZMap(L, shapes.student_width, Z, learned=True)
        self.teacher_maps = nn.ModuleList(ZMap(L, w, Z, learned=learned) for w in shapes.teacher_widths.values())
        self.sample: dict[str, torch.Tensor] | None = None  # the last training batch's Z, per source [n, L, Z]

    def _in(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = layer_std_norm(x, mask) if self.cfg.kv_norm == "layer_std" else x
        return torch.where(mask[:, :, None, None], x, 0.0)  # padding (even NaN) reaches no map, nor its gradient

    def _std(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return standardize(z, mask) if self.standardize else z

    def embed(
        self, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, teacher: str | None = None
    ) -> torch.Tensor:
        """The raw Z [B, T, L, Z] of (k, v) [B, T, L, D]: the student's (teacher None) or a teacher's."""
        zmap = self.student_map if teacher is None else self.teacher_maps[self.teachers.index(teacher)]
        return zmap(self._in(kv[0], mask), self._in(kv[1], mask))

    def forward(
        self,
        student_kv: tuple[torch.Tensor, torch.Tensor],
        teacher_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        route: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> ZOut:
        """student_kv (k, v) [B, T, L, D_s]; teacher_kv: teacher -> (k, v) [B, T, L, D_t] (the ones
        fused, in order); route(z_s, z_t [N, B, T, L, Z]) -> fusion weights (None: equal)."""
        raw_s = self.embed(student_kv, mask)
        z_s = self._std(raw_s, mask)
        z_t = torch.stack(
            [self._std(self.embed(kv, mask, t), mask) for t, kv in teacher_kv.items()]
        )  # [N, B, T, L, Z]
        w = route(z_s, z_t) if route is not None else z_t.new_full((len(z_t), 1, 1, 1), 1 / len(z_t))
        target = self._std((w[..., None] * z_t).sum(0), mask)
        _, per_layer = z_loss(z_s, target, mask, self.cfg.z_loss, self.cfg.z_offdiag_weight, self.whiten)
        std, erank = collapse_stats(raw_s, mask)
        if self.training:
            self.sample = _pick(
                mask, {**dict(zip(teacher_kv, z_t, strict=True)), "fused target": target, "student": z_s}
            )
        return ZOut(z_s, target, w, per_layer, std, erank)


@torch.no_grad()
def _pick(mask: torch.Tensor, zs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Up to SAMPLE_TOKENS real tokens, evenly spread over the batch, of each [B, T, L, Z]."""
    pos = mask.flatten().nonzero().squeeze(1)
    pos = pos[torch.linspace(0, len(pos) - 1, min(len(pos), SAMPLE_TOKENS), device=pos.device).round().long()]
    return {name: z.detach().flatten(0, 1)[pos] for name, z in zs.items()}  # [n, L, Z] each, left on the device


def save_sample(sample: dict[str, torch.Tensor], out: Path) -> Path:
    """OUT/zspace_sample.npz: "z" [S, n, L, Z] float32 and "sources" [S] (teachers, the fused
    target, the student), the picture `kvdistill report` draws."""
    path = Path(out) / ZSPACE_SAMPLE
    np.savez(path, z=np.stack([z.float().cpu().numpy() for z in sample.values()]), sources=np.array(list(sample)))
    return path
