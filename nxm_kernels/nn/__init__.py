"""Modules: ``SparseLinear`` (``linear``), its layout policy (``policy``), its forward as custom ops
(``autograd``) and ``sparsify(model)`` (``sparsify``)."""

from .autograd import sparse_linear, sparse_linear_grad_input
from .linear import SparseLinear
from .policy import FLOAT_DTYPES, STORED_LAYOUTS, default_layout, padded_shape
from .sparsify import SparsifyReport, model_size, sparsify

__all__ = [
    "FLOAT_DTYPES",
    "STORED_LAYOUTS",
    "SparseLinear",
    "SparsifyReport",
    "default_layout",
    "model_size",
    "padded_shape",
    "sparse_linear",
    "sparse_linear_grad_input",
    "sparsify",
]
