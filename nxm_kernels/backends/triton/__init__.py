"""The Triton backend: fused mask + compress, decompress and a fused sparse GEMM.

Every op runs on CUDA tensors; on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``nxm_kernels`` is imported), which is how the tests prove
the kernels without a GPU. Auto dispatch picks it only for CUDA tensors.

Layouts: ``compress``/``decompress`` handle ``packed`` (any n:m) and ``cutlass``. ``sparse_mm``
reads ``packed`` directly, the same bytes ``compress`` stores (see ``kernels.py``); weights in
the ``cutlass`` layout are answered with a reason that says to compress with
``layout='packed'`` (their reordered metadata serves CUTLASS/cuSPARSELt, not this kernel).
"""

from __future__ import annotations

import torch

from ... import _compat
from ...dispatch import OPS, Backend
from ...formats import NMSparseWeight

try:
    import triton  # noqa: F401
except ImportError as error:  # the module must import without triton, and say so
    _IMPORT_ERROR: str | None = f"triton is not importable ({error}): pip install triton (Linux)"
else:
    _IMPORT_ERROR = None
    from . import kernels, library  # noqa: F401 (library registers torch.ops.nxm_triton)

_INT32_LIMIT = 2**31  # the kernels index elements with 32-bit offsets within a row block


class TritonBackend(Backend):
    name = "triton"
    ops = frozenset(OPS)
    auto_devices = ("cuda",)

    def unavailable_reason(self) -> str | None:
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        if kernels.INTERPRETED and _compat.triton_interpreter_problem():
            return _compat.triton_interpreter_problem()
        if not kernels.INTERPRETED and not torch.cuda.is_available():
            return ("no CUDA GPU here: the Triton kernels run on CUDA tensors, or on CPU tensors under "
                    "TRITON_INTERPRET=1 set before importing nxm_kernels (slow; for testing)")
        return None

    def not_supported_reasons(self, op: str, **inputs) -> list[str]:
        why = []
        tensors = [v for v in inputs.values() if isinstance(v, (torch.Tensor, NMSparseWeight))]
        device = tensors[0].device
        if device.type == "cpu" and not kernels.INTERPRETED:
            why.append("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before "
                       "importing nxm_kernels (slow; for testing), or move the tensors to a CUDA GPU")
        elif device.type not in ("cuda", "cpu"):
            why.append(f"Triton kernels run on CUDA tensors, got {device.type} tensors")
        sizes = [t.values.numel() if isinstance(t, NMSparseWeight) else t.numel() for t in tensors]
        if max(sizes) >= _INT32_LIMIT:
            why.append("tensors of 2**31 or more elements are not supported (32-bit offsets): split the layer")
        layout = inputs["sw"].layout if "sw" in inputs else inputs.get("layout")
        if layout not in (None, "packed", "cutlass"):
            why.append(f"layout {layout!r} is not read or written by the Triton kernels: use 'packed' or 'cutlass'")
        elif op == "sparse_mm":
            if layout != "packed":
                why.append("the Triton GEMM reads layout 'packed', not 'cutlass': "
                           "compress with layout='packed' (or use a backend for cutlass weights)")
            if inputs["x"].dtype == torch.int8:
                why.append("int8 x int8 -> int32 is not implemented in the Triton GEMM: use another backend")
        return why

    def nm_mask(self, w, pattern, scores):
        return torch.ops.nxm_triton.nm_mask(w, scores, pattern.n, pattern.m)

    def project(self, w, pattern, scores):
        return torch.ops.nxm_triton.project(w, scores, pattern.n, pattern.m)

    def compress(self, w, pattern, layout, scores):
        return torch.ops.nxm_triton.compress(w, scores, pattern.n, pattern.m, layout)

    def decompress(self, sw):
        return torch.ops.nxm_triton.decompress(
            sw.values, sw.metadata, sw.pattern.n, sw.pattern.m, sw.layout, sw.in_features
        )

    def sparse_mm(self, x, sw, bias):
        return torch.ops.nxm_triton.sparse_mm(x, sw.values, sw.metadata, bias, sw.pattern.n, sw.pattern.m)


BACKEND = TritonBackend()
