"""``int8`` / ``int4``: kept values as symmetric integer codes with fp32 scales.

Quantization (of the projected weight, so dropped entries stay exactly zero):

- scales: one per output row (``group_size=None``), or one per ``g`` consecutive input features
  counted in the dense weight (``g`` a multiple of the pattern's block width; a last, shorter group
  when ``g`` does not divide ``in_features``). ``scale = absmax(kept values of the group) / qmax``,
  ``qmax = 127`` (int8) or ``7`` (int4), computed in float64 and rounded once to **float32**: the
  weight's own dtype was the alternative, but a bf16 scale would move a code of 127 by up to half a
  step, while fp32 moves it by 127 * 2**-24 of one. An all-zero group has scale 0 (no NaN).
- codes: ``q = clamp(round(w / scale), -qmax, qmax)`` (round half to even), made exact: the
  residual ``w - q * scale`` is at most ``scale / 2``. So the dequantized ``q * scale`` is within
  half a step of the projected weight, the step being the stored (fp32-rounded) scale.
- int4 codes are packed two per byte in the layout's values tensor: element ``2j`` in the low
  nibble, ``2j + 1`` in the high nibble, 4-bit two's complement in [-7, 7] (the code -8 is never
  written and refused on load); an odd count leaves a zero high nibble in the row's last byte.

Dequantization: ``q`` (as fp32) times its scale, the product rounded to fp32, then to the
requested dtype (default: the weight's original dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..layouts.base import TensorSpec
from .base import Encoding

QMAX = {8: 127, 4: 7}
SCALE_DTYPE = torch.float32
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_bits(bits) -> None:
    if bits not in QMAX:
        raise ValueError(f"bits={bits!r} is not supported: quantized weights have bits=8 (int8) or bits=4 (int4) "
                         "(bits=None keeps the weight's dtype)")


def group_count(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def expand(scales: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """``[rows, groups]`` scales -> ``[rows, cols]``: each column's scale."""
    if group_size is None:
        return scales.expand(scales.shape[0], cols)
    return scales.repeat_interleave(group_size, dim=1)[:, :cols]


def quantize(w: torch.Tensor, qmax: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes of ``w`` [rows, cols] (int8, |q| <= qmax) and their fp32 scales [rows, groups]."""
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    groups = group_count(cols, group_size)
    w64 = w.to(torch.float64)
    absmax = F.pad(w64.abs(), (0, groups * g - cols)).reshape(rows, groups, g).amax(-1) if cols else \
        w64.new_zeros(rows, groups)
    scales = (absmax / qmax).to(SCALE_DTYPE)
    # A step below fp32's smallest subnormal would round to 0 for a group that is not all zero.
    scales = torch.where((absmax > 0) & (scales == 0), torch.finfo(SCALE_DTYPE).smallest_normal * 2.0**-23, scales)
    step = expand(scales, cols, group_size).to(torch.float64)
    safe = torch.where(step > 0, step, 1.0)
    q = torch.round(w64 / safe)
    # The quotient is rounded once: make the residual exactly at most half a step.
    residual = w64 - q * safe
    q = q + (residual > safe / 2).to(q.dtype) - (residual < -safe / 2).to(q.dtype)
    q = torch.where(step > 0, q, 0.0).clamp_(-qmax, qmax)
    return q.to(torch.int8), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * expand(scales, q.shape[1], group_size)).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[rows, k]`` int8 codes in [-8, 7] -> ``[rows, ceil(k/2)]`` uint8 (low nibble first)."""
    rows, count = codes.shape
    padded = F.pad(codes.to(torch.int16), (0, count % 2)).reshape(rows, -1, 2) & 0xF
    return (padded[..., 0] | (padded[..., 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[rows, count]`` int8 codes (nibbles sign-extended)."""
    b = packed.to(torch.int16)
    nibbles = torch.stack((b & 0xF, b >> 4), -1).reshape(packed.shape[0], -1)[:, :count]
    return ((nibbles ^ 8) - 8).to(torch.int8)


class IntEncoding(Encoding):
    """int8 or int4 codes with symmetric fp32 scales per row or per ``group_size`` input features."""

    tensor_names = ("scales",)

    def __init__(self, bits: int, group_size: int | None = None):
        check_bits(bits)
        if group_size is not None and (type(group_size) is not int or group_size <= 0):
            raise ValueError(f"group_size must be a positive int (input features per scale) or None (one scale "
                             f"per output row), got {group_size!r}")
        self.bits, self.group_size = bits, group_size
        self.name = f"int{bits}"
        self.qmax = QMAX[bits]

    def __str__(self) -> str:
        return self.name if self.group_size is None else f"{self.name}-g{self.group_size}"

    def element_dtype(self, dtype):
        return torch.int8

    def reasons(self, dtype, shape, pattern, layout):
        why = super().reasons(dtype, shape, pattern, layout)
        if dtype not in FLOAT_DTYPES:
            why.append(f"{self} quantizes float weights, not {dtype}: pass a float weight, or keep an int8 weight "
                       "as it is (bits=None)")
        width = pattern.block[1]
        if self.group_size is not None and self.group_size % width:
            why.append(f"group_size={self.group_size} must be a multiple of the pattern's block width {width} "
                       f"({pattern}), e.g. {math.lcm(width, 64)} or {math.lcm(width, 128)}")
        return why

    def storage(self, layout, dtype, shape, pattern):
        specs = dict(layout.storage(torch.int8, shape, pattern))
        if self.bits == 4:
            rows, count = specs["values"].shape
            specs["values"] = TensorSpec((rows, -(-count // 2)), torch.uint8)
        specs["scales"] = TensorSpec((shape[0], group_count(shape[1], self.group_size)), SCALE_DTYPE)
        return specs

    # ---------------------------------------------------------------- codes <-> stored values

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_int4(codes) if self.bits == 4 else codes

    def unpack(self, values: torch.Tensor, count: int) -> torch.Tensor:
        return unpack_int4(values, count) if self.bits == 4 else values

    def codes_weight(self, sw):
        """``sw``'s codes as a float-encoded int8 weight of the same layout (what layouts read)."""
        from ..layouts import NMSparseWeight

        # (int4 codes need their count; int8 ones are the values as they are, also in an opaque buffer)
        count = sw.layout.storage(torch.int8, sw.shape, sw.pattern)["values"].shape[-1] if self.bits == 4 else None
        return NMSparseWeight(self.unpack(sw.values, count), sw.metadata, sw.shape, sw.pattern, sw.layout,
                              check_metadata=False)

    # ---------------------------------------------------------------- quantize / dequantize

    def quantize(self, w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [rows, cols] int8, zero where ``mask`` is False; scales) of the kept values of ``w``."""
        return quantize(torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), self.qmax,
                        self.group_size)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(codes, scales, self.group_size, dtype)

    def compress(self, w, pattern, layout, scores, *, select, store):
        mask = select(w, scores)
        codes, scales = self.quantize(w, mask)
        # The mask as scores keeps exactly the selected entries, also those whose code rounds to 0.
        values, metadata = store(codes, mask.to(torch.float32))
        return self.pack(values), metadata, {"scales": scales, "float_dtype": w.dtype}

    def decompress(self, sw, load, dtype):
        return self.dequantize(load(self.codes_weight(sw)), sw.scales, dtype or sw.dtype)

    # ---------------------------------------------------------------- validation

    def validate(self, sw, check_metadata):
        self.check(sw.dtype, sw.shape, sw.pattern, sw.layout)
        layout, specs = sw.layout, self.storage(sw.layout, sw.dtype, sw.shape, sw.pattern)
        # An opaque buffer (spec shape None, e.g. cuSPARSELt's: codes and the library's metadata in one
        # tensor) has its dtype checked here, its shape by the layout, and no codes or zeros to read.
        opaque = specs["values"].shape is None
        for name in ("values", "scales"):
            tensor, spec = getattr(sw, name), specs[name]
            shape_ok = spec.shape is None or (isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == spec.shape)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != spec.dtype or not shape_ok:
                got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else repr(tensor)
                raise ValueError(f"{name} of a {sw.shape[0]}x{sw.shape[1]} {sw.pattern} {layout} {self} weight must "
                                 f"be {spec.dtype} {spec.shape}, got {got}")
        if sw.scales.device != sw.values.device:
            raise ValueError(f"scales are on {sw.scales.device} but values on {sw.values.device}: move both")
        codes_sw = self.codes_weight(sw)
        layout.validate(codes_sw.values, sw.metadata, sw.shape, sw.pattern, check_metadata)
        if not opaque:
            self._check_codes(sw.values, codes_sw.values)
        self._check_scales(sw.scales)
        if check_metadata and not opaque:
            dense = layout.decompress(codes_sw.values, sw.metadata, sw.shape, sw.pattern)
            nonzero = F.pad((dense != 0).to(torch.int8), (0, (-sw.shape[1]) % (self.group_size or sw.shape[1] or 1)))
            nonzero = nonzero.reshape(sw.shape[0], sw.scales.shape[1], -1).any(-1)
            bad = nonzero & (sw.scales == 0)
            if bad.any():
                row, group = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"scale {group} of row {row} is 0 but its group holds non-zero codes: the weight "
                                 "is corrupt; re-create it with nxm.compress")

    def _check_codes(self, values: torch.Tensor, codes: torch.Tensor) -> None:
        bad = (codes < -self.qmax) | (codes > self.qmax)
        if bad.any():
            row, slot = (int(i) for i in bad.nonzero()[0])
            what = "int4 nibble" if self.bits == 4 else "int8 code"
            raise ValueError(f"corrupt values: {what} {int(codes[row, slot])} at row {row}, slot {slot} is outside "
                             f"[-{self.qmax}, {self.qmax}]: re-create the weight with nxm.compress")
        if self.bits == 4 and codes.shape[1] % 2 and (values[:, -1] >> 4).any():
            raise ValueError("corrupt values: the unused high nibble at the end of a row is not zero")

    def _check_scales(self, scales: torch.Tensor) -> None:
        problems = ((~torch.isfinite(scales), "not finite (NaN or inf)"), (scales < 0, "negative"))
        for bad, what in problems:
            if bad.any():
                row, group = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"scale {group} of row {row} is {what} ({float(scales[row, group])}): scales are "
                                 "absmax / qmax >= 0; the weight is corrupt, re-create it with nxm.compress")


def from_bits(bits: int | None, group_size: int | None = None) -> Encoding:
    """The encoding ``compress(..., bits=, group_size=)`` asks for."""
    from .floating import FLOAT

    if bits is None:
        if group_size is not None:
            raise ValueError(f"group_size={group_size} sets the scales of a quantized weight: give bits=8 or bits=4 "
                             "with it")
        return FLOAT
    return IntEncoding(bits, group_size)
