"""How K / V rows are stored: four codecs that write plain integer / float arrays any zarr
reader can open and dequantise without kvdistill.

Pure numpy, no I/O. `encode(codec, part, x)` turns float32 rows x [n, L, D] into the arrays to
append to the shard (names relative to the part: "" is `k` / `v` itself, "scale" is `k_scale`,
and so on); `decode` turns a row slice of them back into float32 [n, L, D].

    codec     arrays of part p ("k" or "v")                     dequantised x [N, L, D]
    float16   p        float16 [N, L, D]                         x = p
    bfloat16  p        uint16  [N, L, D]  (bf16 bit patterns)    x = (p.astype(uint32) << 16).view(float32)
    int8      p        int8    [N, L, D]                         x = scale * p
              p_scale  float16 (see "scale groups")
    int4      p        uint8   [N, L, ceil(D/2)]  two codes a byte: channel 2j in the low nibble
                                                  (p & 15), channel 2j+1 in the high one (p >> 4)
              p_scale  float16 (see "scale groups")               x = zero + scale * q,  q in 0..15
              p_zero   float16 (same shape as p_scale)

Scale groups (KIVI: keys have outlier *channels*, values outlier *tokens*; GROUP = 32):

    k  per channel over 32 rows: k_scale [ceil(N/32), L, D]; row r uses k_scale[r // 32]
       (groups are aligned to the shard's absolute row index; the last one may be short)
    v  per token over 32 channels: v_scale [N, L, ceil(D/32)]; channel c uses v_scale[:, :, c // 32]

so, with numpy and zarr only, for rows [a, b) of an int8 key array:

    q = k[a:b].astype(np.float32)                                   # [n, L, D]
    s = k_scale[a // 32 : (b - 1) // 32 + 1].astype(np.float32)     # [groups, L, D]
    x = q * s[np.arange(a, b) // 32 - a // 32]

and for int4 values: q = unpacked codes [n, L, D], s / z = np.repeat(v_scale[a:b], 32, axis=2)[..., :D]
(likewise v_zero), x = z + s * q.

Quantisation: int8 is symmetric absmax (scale = absmax / 127, q = rint(x / scale) in
-127..127); int4 is asymmetric min / max (zero = group min, scale = (max - min) / 15,
q = rint((x - zero) / scale) in 0..15). On 16 levels absmax wastes range on the sign and on
offsets (K and V carry the projections' biases): on a trained teacher's K / V symmetric int4
loses 7.9% / 9.4%, asymmetric 5.3% / 7.4%; at int8 a zero point would cost 1/16 byte a value
for 0.43% -> 0.31%, so int8 stays symmetric. Scales are rounded *up* and zeros *down* to
float16, so no code clips: every element is within scale / 2 of its input. A group of zeros
has scale 0 and decodes to exact zeros; a constant group to within float16 rounding of it.

Relative Frobenius error on K / V of a trained tiny Qwen2 teacher (bench/store.py): int8
0.43% / 0.51%, int4 5.3% / 7.4%. float16 / bfloat16 round to nearest even, bit for bit as
numpy's and torch's casts. Inputs must be finite (NaN / Inf raise: quantisation would hide
them) and fit the codec's range: float16 and int4 hold values or zeros in float16 (|x| up to
about 65504), int8 holds absmax / 127 in float16 (|x| <= 65504 * 127); out of range raises and
names bfloat16, which holds the float32 range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CODECS",
    "GROUP",
    "QuantRows",
    "array_names",
    "bytes_per_row",
    "decode",
    "describe",
    "encode",
    "scale_rows",
    "stored_dtype",
]

CODECS = ("float16", "bfloat16", "int8", "int4")
GROUP = 32  # rows per key-scale group, channels per value-scale group
PARTS = ("k", "v")
F16_MAX = float(np.finfo(np.float16).max)  # 65504
_QMAX = {"int8": 127, "int4": 15}
_STORED = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "int4": np.uint8}
_NAMES = {"float16": ("",), "bfloat16": ("",), "int8": ("", "scale"), "int4": ("", "scale", "zero")}


def _check(codec: str, part: str | None = None) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown K/V codec {codec!r}; choose one of {', '.join(CODECS)}")
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be 'k' or 'v', got {part!r}")


def array_names(codec: str) -> tuple[str, ...]:
    """Names (relative to the part) of the arrays a codec stores: "" is `k` / `v` itself."""
    _check(codec)
    return _NAMES[codec]


def stored_dtype(codec: str) -> np.dtype:
    """dtype of the main array (`k` / `v`); scales and zeros are float16."""
    _check(codec)
    return np.dtype(_STORED[codec])


def bytes_per_row(codec: str, L: int, D: int, part: str | None = None) -> float:
    """Uncompressed bytes one token row takes: K and V together, or only `part`. Key scales
    are amortised over their GROUP rows."""
    _check(codec, part)
    if part is None:
        return bytes_per_row(codec, L, D, "k") + bytes_per_row(codec, L, D, "v")
    if codec in ("float16", "bfloat16"):
        return 2.0 * L * D
    data = L * D if codec == "int8" else L * -(-D // 2)
    params = 2 * (len(_NAMES[codec]) - 1)  # float16 scale (+ zero)
    per_row = L * D / GROUP if part == "k" else L * -(-D // GROUP)
    return float(data + params * per_row)


def scale_rows(codec: str, part: str, start: int, stop: int) -> tuple[int, int]:
    """Rows [lo, hi) of the scale (and zero) arrays that data rows [start, stop) need."""
    _check(codec, part)
    if codec not in ("int8", "int4"):
        raise ValueError(f"codec {codec} stores no scales; read rows [{start}, {stop}) of the data array alone")
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got [{start}, {stop})")
    if part == "v":
        return start, stop
    return start // GROUP, (-(-stop // GROUP) if stop > start else start // GROUP)


def describe(codec: str, part: str) -> dict:
    """JSON-able description for the array's attributes: what the integers mean."""
    _check(codec, part)
    out: dict = {"codec": codec, "stored_dtype": stored_dtype(codec).name}
    if codec == "float16":
        out["dequantise"] = "x = p"
    elif codec == "bfloat16":
        out["dequantise"] = "x = (p.astype(uint32) << 16).view(float32)  # bfloat16 bit patterns"
    else:
        out["group"] = GROUP
        out["scale_groups"] = (
            f"{part}_scale[r // {GROUP}] for row r (per channel, {GROUP} rows; aligned to the shard's rows)"
            if part == "k"
            else f"{part}_scale[:, :, c // {GROUP}] for channel c (per token, {GROUP} channels)"
        )
        out["dequantise"] = (
            "x = scale * p  (int8, symmetric)"
            if codec == "int8"
            else "x = zero + scale * q; q = codes 0..15, channel 2j in p & 15, channel 2j+1 in p >> 4"
        )
    return out


# --- float codecs ------------------------------------------------------------------------------


def _f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(np.float16)
    if np.isinf(out).any():  # |x| >= 65520 rounds to inf
        raise ValueError(
            f"float16: values up to {float(np.abs(x).max()):.4g} exceed float16's range (|x| <= {F16_MAX:.0f}); "
            "store this teacher as bfloat16 (--kv-dtype bfloat16), which holds the float32 range"
        )
    return out


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch: bias 0x7FFF + lsb)."""
    u = x.view(np.uint32)
    out = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    if ((out & 0x7FFF) == 0x7F80).any():  # finite input rounded to +-inf (|x| >= 3.3961e38)
        raise ValueError("bfloat16: values round to inf (|x| >= 3.39e38); rescale the K/V before storing")
    return out


# --- integer codecs ----------------------------------------------------------------------------


def _round_f16(a: np.ndarray, up: bool) -> np.ndarray:
    """float32 -> float16, rounded up (or down) so that the float16 value bounds `a`."""
    h = a.astype(np.float16)
    back = h.astype(np.float32)
    off = back < a if up else back > a
    if off.any():
        h[off] = np.nextafter(h[off], np.float16(np.inf if up else -np.inf))
    return h


def _groups(x: np.ndarray, part: str) -> np.ndarray:
    """x [n, L, D] -> [n_g, GROUP, L, D] (k: rows) or [n, L, n_g, GROUP] (v: channels); a short last
    group is padded with copies of its own last row / channel, which leave min and max alone."""
    n, _, D = x.shape
    if part == "k":
        pad = -n % GROUP
        xp = np.pad(x, ((0, pad), (0, 0), (0, 0)), mode="edge") if pad else x
        return xp.reshape(-(-n // GROUP), GROUP, *x.shape[1:])
    pad = -D % GROUP
    xp = np.pad(x, ((0, 0), (0, 0), (0, pad)), mode="edge") if pad else x
    return xp.reshape(n, x.shape[1], -(-D // GROUP), GROUP)


def _expand(p: np.ndarray, part: str, n: int, D: int, first_row: int = 0) -> np.ndarray:
    """Per-group parameters -> per-element [n, L, D] (float32)."""
    p = p.astype(np.float32)
    if part == "k":
        g0 = first_row // GROUP
        return p[np.arange(first_row, first_row + n) // GROUP - g0]
    return np.repeat(p, GROUP, axis=2)[:, :, :D]


def _quantise(codec: str, part: str, x: np.ndarray) -> dict[str, np.ndarray]:
    n, L, D = x.shape
    axis = 1 if part == "k" else 3
    g = _groups(x, part)
    qmax = _QMAX[codec]
    if codec == "int8":
        absmax = np.abs(g).max(axis=axis)  # [n_g, L, D] (k) or [n, L, n_g] (v)
        if absmax.size and float(absmax.max()) / qmax > F16_MAX:
            raise ValueError(
                f"int8: values up to {float(absmax.max()):.4g} need scales beyond float16 "
                f"(|x| <= {F16_MAX * qmax:.4g}); store this teacher as bfloat16"
            )
        scale = _round_f16(absmax / qmax, up=True)
        s = _expand(scale, part, n, D)
        q = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
        return {"": np.clip(np.rint(q), -qmax, qmax).astype(np.int8), "scale": scale}
    lo, hi = g.min(axis=axis), g.max(axis=axis)
    if lo.size and max(-float(lo.min()), float(hi.max())) > F16_MAX:
        raise ValueError(
            f"int4: values up to {max(-float(lo.min()), float(hi.max())):.4g} exceed the float16 "
            f"zero points (|x| <= {F16_MAX:.0f}); store this teacher as bfloat16"
        )
    zero = _round_f16(lo, up=False)
    scale = _round_f16((hi - zero.astype(np.float32)) / qmax, up=True)
    s, z = _expand(scale, part, n, D), _expand(zero, part, n, D)
    q = np.divide(x - z, s, out=np.zeros_like(x), where=s > 0)
    q = np.clip(np.rint(q), 0, qmax).astype(np.uint8)  # [n, L, D]
    if D % 2:
        q = np.concatenate([q, np.zeros((n, L, 1), np.uint8)], axis=2)
    return {"": q[:, :, 0::2] | (q[:, :, 1::2] << 4), "scale": scale, "zero": zero}


def encode(codec: str, part: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """float32 rows x [n, L, D] -> the arrays to append ("" is the part itself; see the module
    docstring). The rows must start at a multiple of GROUP in the shard (key-scale groups are
    aligned to it); only the final block of a shard may have n % GROUP != 0."""
    _check(codec, part)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"{codec} {part}: expected rows [n, L, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(
            f"{codec} {part}: non-finite value {x[tuple(bad)]} at row {bad[0]}, layer {bad[1]}, "
            f"channel {bad[2]}; the teacher produced NaN / Inf (check its dtype and inputs)"
        )
    if codec == "float16":
        return {"": _f16(x)}
    if codec == "bfloat16":
        return {"": _bf16_bits(x)}
    return _quantise(codec, part, x)


def decode(codec: str, part: str, arrays: dict[str, np.ndarray], first_row: int, D: int) -> np.ndarray:
    """The stored arrays for rows [first_row, first_row + n) -> float32 [n, L, D].

    arrays[""] is that row slice of the main array; arrays["scale"] / ["zero"] the rows
    `scale_rows(codec, part, first_row, first_row + n)` of theirs."""
    _check(codec, part)
    p = arrays[""]
    if codec == "float16":
        return p.astype(np.float32)
    if codec == "bfloat16":  # one pass into the output (astype, then a shift, is two)
        return np.left_shift(p, 16, out=np.empty(p.shape, np.uint32), dtype=np.uint32).view(np.float32)
    if codec == "int4":
        q = np.empty((*p.shape[:2], 2 * p.shape[2]), np.uint8)  # [n, L, 2 * ceil(D/2)] codes 0..15
        q[:, :, 0::2] = p & 15
        q[:, :, 1::2] = p >> 4
        p = q[:, :, :D]
    return _dequantise(p, arrays["scale"], arrays.get("zero"), part, first_row)


def _dequantise(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, part: str, first_row: int) -> np.ndarray:
    """x = (zero +) scale * q with the group parameters broadcast, not materialised per element:
    whole groups through a [.., GROUP, ..] view, a partial group at either end on its own."""
    n, L, D = q.shape
    out = np.empty((n, L, D), np.float32)
    s = scale.astype(np.float32)
    z = None if zero is None else zero.astype(np.float32)

    def fill(o, qq, ss, zz):
        np.multiply(qq, ss, out=o)
        if zz is not None:
            o += zz

    if part == "k":  # groups of GROUP rows, aligned to the shard's row index
        head = min(n, -first_row % GROUP)  # rows before the first group boundary
        full = (n - head) // GROUP
        g = 1 if head else 0
        if head:
            fill(out[:head], q[:head], s[0], None if z is None else z[0])
        if full:
            a, b = head, head + full * GROUP
            sl = slice(g, g + full)
            fill(
                out[a:b].reshape(full, GROUP, L, D),
                q[a:b].reshape(full, GROUP, L, D),
                s[sl, None],
                None if z is None else z[sl, None],
            )
        if head + full * GROUP < n:
            a = head + full * GROUP
            fill(out[a:], q[a:], s[g + full], None if z is None else z[g + full])
        return out
    full = D // GROUP  # groups of GROUP channels
    if full:
        c = full * GROUP
        fill(
            out[:, :, :c].reshape(n, L, full, GROUP),
            q[:, :, :c].reshape(n, L, full, GROUP),
            s[:, :, :full, None],
            None if z is None else z[:, :, :full, None],
        )
    if D % GROUP:
        c = full * GROUP
        fill(out[:, :, c:], q[:, :, c:], s[:, :, full:], None if z is None else z[:, :, full:])
    return out


@dataclass(frozen=True, eq=False)  # arrays: compare with np.array_equal
class QuantRows:
    """Rows [first_row, first_row + n) of a quantised K or V (int8 / int4) as stored: the codes
    and the scale (and zero) rows they need (`scale_rows`), not yet dequantised. The training
    stream hands these to the trainer, which dequantises on its device (train/quant.py): 1 or
    1/2 byte an element crosses to it instead of 4. `decode()` gives float32 here instead."""

    codec: str
    part: str
    width: int  # D: channels of a dequantised row
    first_row: int  # index of codes[0] in the shard: key-scale groups are aligned to it
    codes: np.ndarray  # [n, L, D] int8, or [n, L, ceil(D/2)] uint8 (int4)
    scale: np.ndarray  # float16: k [groups, L, D], v [n, L, ceil(D/32)]
    zero: np.ndarray | None = None  # int4 only, shaped like scale

    def __post_init__(self) -> None:
        _check(self.codec, self.part)
        if self.codec not in ("int8", "int4"):
            raise ValueError(f"QuantRows holds int8 / int4 codes, not {self.codec}")
        if (self.zero is None) != (self.codec == "int8"):
            raise ValueError(
                f"{self.codec} {self.part}: {'int4 needs' if self.zero is None else 'int8 has no'} zero points"
            )
        lo, hi = scale_rows(self.codec, self.part, self.first_row, self.first_row + len(self.codes))
        if len(self.scale) != hi - lo:
            raise ValueError(
                f"{self.codec} {self.part}: rows [{self.first_row}, {self.first_row + len(self.codes)}) need {hi - lo}"
                f" scale rows, got {len(self.scale)}"
            )

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows: slice) -> QuantRows:
        """Rows [a, b) of these (a view: no copy), with the scale rows they need."""
        a, b, step = rows.indices(len(self.codes))
        if step != 1:
            raise ValueError("QuantRows slices contiguous rows only")
        b = max(a, b)
        if self.part == "v":  # a scale row per row
            lo, hi = a, b
        else:  # scale_rows, relative to this one's first group (inline: the stream slices every sample)
            r0, g0 = self.first_row, self.first_row // GROUP
            lo = (r0 + a) // GROUP - g0
            hi = -(-(r0 + b) // GROUP) - g0 if b > a else lo
        out = object.__new__(QuantRows)  # already consistent: skip __post_init__'s checks
        fields = {**vars(self), "first_row": self.first_row + a, "codes": self.codes[a:b], "scale": self.scale[lo:hi]}
        fields["zero"] = None if self.zero is None else self.zero[lo:hi]
        out.__dict__.update(fields)
        return out

    def decode(self) -> np.ndarray:
        """float32 [n, L, D], as `decode` gives it."""
        arrays = {"": self.codes, "scale": self.scale, **({"zero": self.zero} if self.zero is not None else {})}
        return decode(self.codec, self.part, arrays, self.first_row, self.width)
