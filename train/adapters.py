"""Adapters: each teacher's stored K/V [B, T, L, D_t] onto the student's width D_s, one map per
layer (flat, or head-wise to keep the kv-head structure), sized by the `KVShapes` the store
holds. Identity (no parameters) where a teacher's width already is the student's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["KVShapes", "KVAdapter", "HeadwiseAdapter", "head_mixer_init", "adapter_key", "make_adapters"]


@dataclass(frozen=True)
class KVShapes:
    """The K/V shapes the Distiller's parts are sized by, as the store holds them (`of_store`):
    every teacher's K/V aligned onto the student's L_s layers at its stored width D_t (the PCA
    dimension when projected), the student's width D_s. Only adapter "headwise" reads the heads:
    the student's (H_s, d_s), and (H_t, d_t) of each teacher whose heads are intact (no entry:
    stored through a PCA projection)."""

    teacher_widths: dict[str, int]
    num_layers: int  # L_s
    student_width: int  # D_s = H_s * d_s
    teacher_heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    student_heads: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        given = [(f"teacher {t}", heads, self.teacher_widths.get(t)) for t, heads in self.teacher_heads.items()]
        for who, heads, width in [*given, ("the student", self.student_heads, self.student_width)]:
            if heads is not None and heads[0] * heads[1] != width:
                raise ValueError(f"{who}: {heads[0]} kv-heads x {heads[1]} do not make its K/V width {width}")

    @classmethod
    def of_store(cls, spec, teachers: dict) -> KVShapes:
        """From the store's StoreSpec and the chosen TeacherSpecs (`store.open_specs`)."""
        s = spec.geometry
        return cls(
            {name: t.width for name, t in teachers.items()},
            s.num_layers,
            s.width,
            {
                name: (t.geometry.num_kv_heads, t.geometry.head_dim)
                for name, t in teachers.items()
                if t.projection is None and t.width == t.geometry.width
            },
            (s.num_kv_heads, s.head_dim),
        )


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


def adapter_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)  # nn.ModuleDict keys may not hold "."


def make_adapters(kind: str, shapes: KVShapes) -> nn.ModuleDict:
    """{adapter_key(teacher): {"k", "v": adapter}} for every teacher of `shapes`, in their order
    (the init's random draws follow it: K then V per teacher). kind "flat" (`KVAdapter`) or
    "headwise" (`HeadwiseAdapter`), which needs the teacher's kv-heads intact in the store."""
    adapters = nn.ModuleDict()
    for name, width in shapes.teacher_widths.items():
        if kind == "flat":
            pair = {p: KVAdapter(shapes.num_layers, width, shapes.student_width) for p in ("k", "v")}
        elif shapes.student_heads is None:
            raise ValueError("adapter 'headwise' needs the student's (num_kv_heads, head_dim): KVShapes.student_heads")
        elif name not in shapes.teacher_heads:
            raise ValueError(
                f"teacher {name}: stored through a PCA projection (width {width}), so its head structure is gone and"
                " adapter 'headwise' cannot map heads; use --adapter flat, or re-dump this teacher without"
                " align.projection"
            )
        else:
            heads = shapes.teacher_heads[name]
            pair = {p: HeadwiseAdapter(shapes.num_layers, heads, shapes.student_heads) for p in ("k", "v")}
        adapters[adapter_key(name)] = nn.ModuleDict(pair)
    return adapters
