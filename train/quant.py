"""K/V batches as stored, made float32 on the trainer's device.

float16 / bfloat16 batches are moved in 16 bits and cast there (`kv_to_device`).

For an int8 / int4 teacher the stream yields each sample's K and V as stored
(`store.codecs.QuantRows`: codes plus their scale / zero rows). `collate` pads them into a
`QuantKV` and the trainer moves that to its device and dequantises there (`kv_to_device`).
An element then costs 1 byte (int8) or 1/2 byte (int4) plus ~1/16 byte of scales to read,
collate and copy to the GPU, instead of the 4 bytes of float32: the store's read stays at the
speed of its compressed bytes (bench/store.py), and the multiply runs where it is nearly free.

Dequantisation is `store.codecs.decode` in torch, bit for bit (float32 multiply, then add):

    int8  x = scale * q                       int4  x = zero + scale * q,  q = nibble 0..15

with key scales per channel over groups of GROUP rows aligned to the shard's rows (so each
sample records which group each of its rows uses) and value scales per token over GROUP
channels. Padding rows dequantise to exact zeros, as a padded float batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from kvdistill.store.codecs import GROUP, QuantRows

__all__ = ["QuantKV", "collate_quant", "kv_as_stored", "kv_to_device"]


@dataclass(frozen=True, eq=False)  # tensors: compare with torch.equal
class QuantKV:
    """A padded batch of one teacher's K or V as stored. dequantise() -> float32 [B, T, L, D]."""

    codec: str  # int8 | int4
    part: str  # k | v
    width: int  # D
    codes: torch.Tensor  # [B, T, L, D] int8 or [B, T, L, ceil(D/2)] uint8 (two int4 codes a byte)
    scale: (
        torch.Tensor
    )  # float16; k: [B, G + 1, L, D] (group G is all zeros: padding rows), v: [B, T, L, ceil(D/GROUP)]
    zero: torch.Tensor | None  # int4: shaped like scale
    group: torch.Tensor | None  # k: [B, T] long, the scale group of every row (G for padding)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, T, L, _ = self.codes.shape
        return (B, T, L, self.width)

    def to(self, device, non_blocking: bool = False) -> QuantKV:
        move = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self, codes=move(self.codes), scale=move(self.scale), zero=move(self.zero), group=move(self.group)
        )

    def dequantise(self) -> torch.Tensor:
        """float32 [B, T, L, D] on the tensors' device."""
        q = self.codes
        if self.codec == "int4":  # channel 2j in the low nibble, 2j + 1 in the high one
            q = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)[..., : self.width]
        if self.part == "k":  # per channel, the row's group
            rows = torch.arange(q.shape[0], device=q.device)[:, None]
            expand = lambda p: p[rows, self.group]  # noqa: E731  [B, T, L, D]
        else:  # per token, GROUP channels a scale
            expand = lambda p: p.repeat_interleave(GROUP, dim=-1)[..., : self.width]  # noqa: E731
        # In place, the float16 parameters promoted exactly by the ops: 6 bytes an element at
        # the peak (the output + one expanded parameter) instead of 14 with float32 copies.
        x = q.to(torch.float32).mul_(expand(self.scale))
        if self.zero is not None:
            x.add_(expand(self.zero))
        return x


def collate_quant(rows: list[QuantRows], T: int) -> QuantKV:
    """Samples' stored rows (one teacher, one part) -> a batch right-padded to T rows."""
    head = rows[0]
    if any(
        (r.codec, r.part, r.width, r.codes.shape[1:]) != (head.codec, head.part, head.width, head.codes.shape[1:])
        for r in rows
    ):
        raise ValueError(
            f"samples of one teacher's {head.part} hold differently stored rows; was the teacher dumped into one store"
            " with one codec?"
        )
    B = len(rows)
    codes = torch.zeros((B, T, *head.codes.shape[1:]), dtype=torch.from_numpy(head.codes[:0]).dtype)
    params = ("scale", "zero") if head.zero is not None else ("scale",)
    if head.part == "k":
        G = max(len(r.scale) for r in rows)
        out = {n: torch.zeros((B, G + 1, *head.scale.shape[1:]), dtype=torch.float16) for n in params}
        group = torch.full((B, T), G, dtype=torch.long)  # padding rows read group G: zeros
    else:
        out = {n: torch.zeros((B, T, *head.scale.shape[1:]), dtype=torch.float16) for n in params}
        group = None
    for i, r in enumerate(rows):
        n = len(r)
        codes[i, :n] = torch.from_numpy(r.codes)
        for name in params:
            x = getattr(r, name)
            out[name][i, : len(x)] = torch.from_numpy(x)
        if group is not None:  # row j of the sample is shard row first_row + j
            group[i, :n] = torch.from_numpy((r.first_row % GROUP + np.arange(n)) // GROUP)
    return QuantKV(head.codec, head.part, head.width, codes, out["scale"], out.get("zero"), group)


def kv_to_device(kv: dict[str, tuple], device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A batch's {teacher: (k, v)} on `device` as float32: moved as stored (16-bit floats, or
    int8 / int4 `QuantKV`), then cast or dequantised there."""
    out = {}
    for t, pair in kv.items():
        out[t] = tuple(
            x.to(device).dequantise() if isinstance(x, QuantKV) else x.to(device).to(torch.float32) for x in pair
        )
    return out


def kv_as_stored(kv_transfer: str, device: torch.device) -> bool:
    """TrainConfig.kv_transfer for a trainer on `device`: hand K/V over as stored? ("auto": on an
    accelerator yes; on the CPU no, the reader threads decode while the step runs)."""
    if kv_transfer not in ("auto", "stored", "decoded"):
        raise ValueError(f"kv_transfer must be auto, stored or decoded, got {kv_transfer!r}")
    return kv_transfer == "stored" or (kv_transfer == "auto" and torch.device(device).type != "cpu")
