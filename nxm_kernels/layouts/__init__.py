"""Layouts: how a compressed N:M weight sits in memory, one module per layout.

``packed`` (any n:m), ``cutlass`` (Sparse Tensor Cores), ``cusparselt`` (cuSPARSELt's opaque
buffer, made on a GPU), ``block`` (k-of-RxC blocks and mask libraries) and ``tiled_q`` (int8/int4
2:4 codes in tiles for the Triton decode GEMM). Each is a :class:`Layout` object registered by name; the API takes
``layout="cutlass"`` and resolves it once with :func:`get_layout`. A new layout is one module that
subclasses :class:`Layout`, plus ``register_layout(MyLayout())``.
"""

from .base import Layout, TensorSpec  # noqa: I001  (registry before the layouts that register)
from .registry import get_layout, layout_names, register_layout, registered_layouts, unregister_layout
from .weight import NMSparseWeight
from .packed import PACKED
from .cutlass import CUTLASS
from .cusparselt import CUSPARSELT
from .block import BLOCK
from .tiled_q import TILED_Q

__all__ = [
    "BLOCK",
    "CUSPARSELT",
    "CUTLASS",
    "LAYOUTS",
    "Layout",
    "NMSparseWeight",
    "PACKED",
    "TILED_Q",
    "TensorSpec",
    "get_layout",
    "layout_names",
    "register_layout",
    "registered_layouts",
    "unregister_layout",
]


def __getattr__(name):
    if name == "LAYOUTS":  # the names registered now (a layout registered later shows up too)
        return layout_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
