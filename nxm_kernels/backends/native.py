"""The compiled extension as a backend: C++ ops on CPU tensors, CUDA kernels on CUDA tensors.

Both run the per-group logic of ``csrc/nm_core.h`` and match the reference bit for bit. On CPU this
is the fast path for selection and (de)compression, e.g. converting a large checkpoint. When ``_C``
has no CUDA kernels (built without nvcc, or absent), CuPy compiles the same kernel source at run
time (``nxm-kernels[cupy]``, see ``_native_cupy.py``).
"""

from __future__ import annotations

import torch

from .. import _extension
from ..dispatch import Backend
from ..formats import NMSparseWeight
from . import _native_cupy


def _selection_scores(scores):
    """Scores in a dtype where comparison is exact (as reference.selection_keys)."""
    if scores is None or scores.dtype == torch.float64:
        return scores
    return scores.to(torch.float32)


class NativeBackend(Backend):
    name = "native"
    ops = frozenset({"nm_mask", "project", "compress", "decompress"})
    auto_devices = ("cpu", "cuda")

    def unavailable_reason(self) -> str | None:
        built = _extension.unavailable_reason()
        if built is None or _native_cupy.unavailable_reason() is None:
            return None  # (CuPy alone: CUDA tensors only, which not_supported_reasons says)
        return f"{built}; for CUDA tensors {_native_cupy.unavailable_reason()}"

    def not_supported_reasons(self, op: str, **inputs) -> list[str]:
        sw = inputs.get("sw")
        if inputs.get("layout") == "cusparselt" or (sw is not None and sw.layout == "cusparselt"):
            return ["handles the packed and cutlass layouts, not cuSPARSELt's opaque buffer"]
        subject = inputs.get("w", sw)
        device = subject.device if isinstance(subject, (torch.Tensor, NMSparseWeight)) else None
        if device is None:
            return []
        if device.type == "cpu" and _extension.unavailable_reason():
            return [_extension.unavailable_reason()]
        if device.type == "cuda" and not _extension.has_cuda_kernels() and _native_cupy.unavailable_reason():
            return [
                "nxm_kernels._C has no CUDA kernels (built without nvcc or with NXM_SKIP_CUDA_BUILD=1, or not "
                f"built) and {_native_cupy.unavailable_reason()}: rebuild with CUDA_HOME set, or install CuPy"
            ]
        if device.type not in ("cpu", "cuda"):
            return [f"runs on CPU and CUDA tensors, not on {device.type}"]
        return []

    def nm_mask(self, w, pattern, scores):
        if _through_cupy(w):
            return _native_cupy.select(w, pattern, _selection_scores(scores), project=False)
        return torch.ops.nxm.nm_mask(w, pattern.n, pattern.m, _selection_scores(scores))

    def project(self, w, pattern, scores):
        if _through_cupy(w):
            return _native_cupy.select(w, pattern, _selection_scores(scores), project=True)
        return torch.ops.nxm.project(w, pattern.n, pattern.m, _selection_scores(scores))

    def compress(self, w, pattern, layout, scores):
        scores = _selection_scores(scores)
        if layout == "packed":
            if _through_cupy(w):
                return _native_cupy.compress_packed(w, pattern, scores)
            return torch.ops.nxm.compress_packed(w, pattern.n, pattern.m, scores)
        if _through_cupy(w):
            return _native_cupy.compress_cutlass(w, scores)
        return torch.ops.nxm.compress_cutlass(w, scores)

    def decompress(self, sw):
        if sw.layout == "packed":
            if _through_cupy(sw.values):
                return _native_cupy.decompress_packed(sw.values, sw.metadata, sw.shape, sw.pattern)
            return torch.ops.nxm.decompress_packed(sw.values, sw.metadata, sw.shape[1], sw.pattern.n, sw.pattern.m)
        if _through_cupy(sw.values):
            return _native_cupy.decompress_cutlass(sw.values, sw.metadata)
        return torch.ops.nxm.decompress_cutlass(sw.values, sw.metadata)


def _through_cupy(t: torch.Tensor) -> bool:
    """CUDA tensors go through CuPy's NVRTC build of the kernels when _C has none."""
    return t.is_cuda and not _extension.has_cuda_kernels()


BACKEND = NativeBackend()
