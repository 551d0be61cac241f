"""``cusparselt``: the opaque buffer of cuSPARSELt's compress, made on a GPU.

It holds the hardware's patterns (as ``cutlass``), fp8 too. The buffer (kept values and metadata,
in cuSPARSELt's own order) sits 1-D in ``values``, in the weight's dtype, its length set by the
library; ``metadata`` is empty. Only cuSPARSELt writes and reads it, so it is a backend's own form:
``SparseLinear`` makes it on the device from a stored layout and never saves it.
"""

from __future__ import annotations

import math

import torch

from ..pattern import Pattern
from . import cutlass
from .base import VALUE_DTYPES, Layout, TensorSpec
from .registry import register_layout

FP8 = torch.float8_e4m3fn
PATTERN = {**cutlass.PATTERN, FP8: Pattern(2, 4)}


def multiples(dtype: torch.dtype) -> tuple[int, int]:
    """(weight rows and cols, activation rows and cols): the multiples cuSPARSELt needs for ``dtype``
    (structured operand 32/16/8 for 8/16/32-bit values, dense operand half that)."""
    weight = {1: 32, 2: 16, 4: 8}[dtype.itemsize]
    return weight, weight // 2


class CusparseltLayout(Layout):
    name = "cusparselt"
    description = "cuSPARSELt's opaque buffer"
    stored = False
    value_dtypes = VALUE_DTYPES + (FP8,)
    encodings = ("float", "int8")  # int8 codes: cuSPARSELt's int8 x int8 GEMM (W8A8)

    def shape_reasons(self, dtype, shape, pattern):
        mult = multiples(dtype)[0]
        return cutlass.hardware_reasons(self.name, PATTERN, (mult, mult), "cuSPARSELt's structured operand",
                                        dtype, shape, pattern)

    def multiples(self, dtype, pattern):
        mult = multiples(dtype)[0]
        return mult, math.lcm(mult, pattern.m)

    def storage(self, dtype, shape, pattern):
        return {"values": TensorSpec(None, dtype), "metadata": TensorSpec((0,), torch.uint8)}

    def check_tensor(self, name, tensor, shape, pattern):
        # At least the kept values, plus the library's metadata.
        kept = shape[0] * shape[1] // pattern.m * pattern.n
        if tensor.dim() != 1 or tensor.numel() <= kept:
            raise ValueError(
                f"a cusparselt weight holds cuSPARSELt's compressed buffer as one 1-D tensor of more than "
                f"{kept} elements, got shape {tuple(tensor.shape)}: re-create it with "
                "nxm.compress(w, pattern, layout='cusparselt') on a GPU"
            )

    def reference_reasons(self):
        return ["the cusparselt layout is cuSPARSELt's opaque buffer, which only cuSPARSELt writes and "
                "reads: use backend='cusparselt' on a GPU, or layout 'packed'/'cutlass'"]


CUSPARSELT = register_layout(CusparseltLayout())
