"""Compatibility names for code written before ``nxm_kernels.layouts`` (which now holds all of this).

New code uses the Layout objects: ``get_layout(name).check(...)``, ``.storage(...)``, ``.padded_shape(...)``.
"""

from __future__ import annotations

import torch

from .layouts import NMSparseWeight, get_layout, layout_names
from .layouts.base import VALUE_DTYPES
from .layouts.cusparselt import PATTERN as CUSPARSELT_PATTERN
from .layouts.cusparselt import multiples as cusparselt_multiples
from .layouts.cutlass import PATTERN as CUTLASS_PATTERN
from .layouts.cutlass import multiples as cutlass_multiples
from .pattern import Pattern

CUSPARSELT_DTYPES = get_layout("cusparselt").value_dtypes

__all__ = [
    "CUSPARSELT_DTYPES",
    "CUSPARSELT_PATTERN",
    "CUTLASS_PATTERN",
    "LAYOUTS",
    "NMSparseWeight",
    "VALUE_DTYPES",
    "check_layout",
    "cusparselt_multiples",
    "cutlass_multiples",
    "expected_storage",
]


def check_layout(dtype: torch.dtype, shape, pattern: Pattern, layout) -> None:
    """Raise a ValueError (TypeError for the dtype) that names what ``layout`` needs if it cannot
    hold this weight."""
    get_layout(layout).check(dtype, shape, pattern)


def expected_storage(dtype: torch.dtype, shape, pattern: Pattern, layout):
    """(values shape, metadata shape, metadata dtype) of a weight in ``layout``."""
    specs = get_layout(layout).storage(dtype, shape, pattern)
    return specs["values"].shape, specs["metadata"].shape, specs["metadata"].dtype


def __getattr__(name):
    if name == "LAYOUTS":
        return layout_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
