"""nxm-kernels: N:M semi-structured sparsity for Transformer linear layers.

Select (``nm_mask``, ``project``), compress (``packed`` for any n:m, ``cutlass`` for the
Sparse Tensor Core layout), and multiply (``sparse_mm``) through one op surface whose backends
are chosen by :mod:`nxm_kernels.dispatch`.
"""

# Load the backends package before binding the name `backends` to the function below: importing
# a subpackage sets it as an attribute of its parent, which would otherwise shadow nxm.backends().
# Importing it registers every backend into dispatch.
from . import backends as _backend_modules  # noqa: F401  isort: skip
from ._version import __version__
from .backends.cusparselt import tune
from .checkpoint import CheckpointError, load, save
from .dispatch import BackendNotSupported, backends
from .layouts import Layout, NMSparseWeight, get_layout, register_layout
from .nn import SparseLinear, sparsify
from .ops import compress, decompress, fake_quant, is_nm_sparse, nm_mask, project, sparse_mm
from .pattern import Pattern


def __getattr__(name):
    if name == "LAYOUTS":  # the layout names registered now
        from .layouts import layout_names

        return layout_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LAYOUTS",
    "BackendNotSupported",
    "CheckpointError",
    "Layout",
    "NMSparseWeight",
    "SparseLinear",
    "Pattern",
    "backends",
    "compress",
    "decompress",
    "fake_quant",
    "get_layout",
    "is_nm_sparse",
    "load",
    "nm_mask",
    "project",
    "register_layout",
    "save",
    "sparse_mm",
    "sparsify",
    "tune",
]
