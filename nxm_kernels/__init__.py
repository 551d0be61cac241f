"""nxm-kernels: N:M semi-structured sparsity for Transformer linear layers.

Select (``nm_mask``, ``project``), compress (``packed`` for any n:m, ``cutlass`` for the
Sparse Tensor Core layout), and multiply (``sparse_mm``) through one op surface whose backends
are chosen by :mod:`nxm_kernels.dispatch`.
"""

# Load the backends package before binding the name `backends` to the function below: importing
# a subpackage sets it as an attribute of its parent, which would otherwise shadow nxm.backends().
from . import backends as _backend_modules  # noqa: F401  isort: skip
from .backends.cusparselt import tune
from .checkpoint import CheckpointError, load, save
from .dispatch import BackendNotSupported, backends
from .formats import LAYOUTS, NMSparseWeight
from .nn import SparseLinear, sparsify
from .ops import compress, decompress, is_nm_sparse, nm_mask, project, sparse_mm
from .pattern import Pattern

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS",
    "BackendNotSupported",
    "CheckpointError",
    "NMSparseWeight",
    "SparseLinear",
    "Pattern",
    "backends",
    "compress",
    "decompress",
    "is_nm_sparse",
    "load",
    "nm_mask",
    "project",
    "save",
    "sparse_mm",
    "sparsify",
    "tune",
]
