"""The compiled extension as a backend: C++ ops on CPU tensors, CUDA kernels on CUDA tensors.

Both run the per-group logic of ``csrc/nm_core.h`` and match the reference bit for bit. On CPU this
is the fast path for selection and (de)compression, e.g. converting a large checkpoint. When ``_C``
has no CUDA kernels (built without nvcc, or absent), CuPy compiles the same kernel source at run
time (``nxm-kernels[cupy]``, see ``_native_cupy.py``).
"""

from __future__ import annotations

import torch

from .. import _extension, _ops, dispatch
from ..dispatch import Backend, Support, call_facts
from ..layouts import BLOCK
from ..layouts.block import block_gemm_args
from . import _native_cupy

DEVICES = ("cpu", "cuda")
# {layout name: (compress(w, pattern, scores), decompress(values, metadata, shape, pattern))}
KERNELS = _ops.layout_kernels("nxm")
CUPY_KERNELS = {
    "packed": (_native_cupy.compress_packed,
               lambda values, metadata, shape, pattern: _native_cupy.decompress_packed(values, metadata, shape, pattern)),
    "cutlass": (lambda w, pattern, scores: _native_cupy.compress_cutlass(w, scores),
                lambda values, metadata, shape, pattern: _native_cupy.decompress_cutlass(values, metadata)),
}


def _selection_scores(scores):
    """Scores in a dtype where comparison is exact (as reference.selection_keys)."""
    if scores is None or scores.dtype == torch.float64:
        return scores
    return scores.to(torch.float32)


class NativeBackend(Backend):
    name = "native"
    supports = {
        # row n:m, and 2:4t on CPU (csrc/cpu_transposable*.cpp: extra_reasons refuses the rest)
        "nm_mask": Support(devices=DEVICES, kinds=("row", "transposable")),
        "project": Support(devices=DEVICES, kinds=("row", "transposable")),
        "compress": Support(layouts=tuple(KERNELS), devices=DEVICES),
        "decompress": Support(layouts=tuple(KERNELS), devices=DEVICES),
        # csrc/cpu_gemm*.cpp: SIMD kernels (AVX-512, AVX2) for 2:4, a portable one for every n:m;
        # int8/int4 codes dequantized inside (W8A16/W4A16; SIMD on AVX-512), or multiplied with x quantized
        # per token (act_bits=8, W8A8: csrc/cpu_gemm_w8a8*.cpp, VNNI on AVX-512; bit for bit the reference's).
        # csrc/cpu_block_gemm.cpp: the block layout (k-of-RxC bitmaps, mask-library numbers).
        "sparse_mm": Support(
            layouts=("packed", "block"), dtypes=(torch.float32, torch.bfloat16, torch.float16), devices=("cpu",),
            encodings=("float", "int8", "int4"), act_bits=(None, 8), kinds=("row", "block", "library"),
            advice="the native GEMM reads layouts 'packed' and 'block' on CPU and multiplies float types (int8/int4 "
                   "weights with float or per-token int8 activations, packed only): use another backend for the rest",
        ),
    }
    auto_devices = DEVICES

    def unavailable_reason(self) -> str | None:
        built = _extension.unavailable_reason()
        if built is None or _native_cupy.unavailable_reason() is None:
            return None  # (CuPy alone: CUDA tensors only, which extra_reasons says)
        return f"{built}; for CUDA tensors {_native_cupy.unavailable_reason()}"

    def extra_reasons(self, op: str, **inputs) -> list[str]:
        device = call_facts(inputs)[2]
        if device is None:
            return []
        if device.type == "cpu" and _extension.unavailable_reason():
            return [_extension.unavailable_reason()]
        pattern = call_facts(inputs)[3]
        if op in ("nm_mask", "project") and pattern is not None and pattern.kind == "transposable":
            if str(pattern) != "2:4t" or device.type != "cpu":
                return [f"the native transposable selection (csrc/cpu_transposable.cpp) is 2:4t on CPU tensors, not "
                        f"{pattern} on {device.type}"]
            if not _has_kernel("nxm::select_2of4t"):
                return ["nxm_kernels._C predates the 2:4t selection (csrc/cpu_transposable.cpp): rebuild it "
                        "(pip install --no-build-isolation -e .)"]
        if op == "sparse_mm" and call_facts(inputs)[0] == BLOCK and not _has_kernel("nxm::sparse_mm_block"):
            return ["nxm_kernels._C predates the block-layout GEMM (csrc/cpu_block_gemm.cpp): rebuild it "
                    "(pip install --no-build-isolation -e .)"]
        if device.type == "cuda" and not _extension.has_cuda_kernels() and _native_cupy.unavailable_reason():
            return [
                "nxm_kernels._C has no CUDA kernels (built without nvcc or with NXM_SKIP_CUDA_BUILD=1, or not "
                f"built) and {_native_cupy.unavailable_reason()}: rebuild with CUDA_HOME set, or install CuPy"
            ]
        return []

    def nm_mask(self, w, pattern, scores):
        if pattern.kind == "transposable":
            return torch.ops.nxm.select_2of4t(w, _selection_scores(scores), False)
        if _through_cupy(w):
            return _native_cupy.select(w, pattern, _selection_scores(scores), project=False)
        return torch.ops.nxm.nm_mask(w, pattern.n, pattern.m, _selection_scores(scores))

    def project(self, w, pattern, scores):
        if pattern.kind == "transposable":
            return torch.ops.nxm.select_2of4t(w, _selection_scores(scores), True)
        if _through_cupy(w):
            return _native_cupy.select(w, pattern, _selection_scores(scores), project=True)
        return torch.ops.nxm.project(w, pattern.n, pattern.m, _selection_scores(scores))

    def compress(self, w, pattern, layout, scores):
        compress, _ = (CUPY_KERNELS if _through_cupy(w) else KERNELS)[layout.name]
        return compress(w, pattern, _selection_scores(scores))

    def decompress(self, sw):
        _, decompress = (CUPY_KERNELS if _through_cupy(sw.values) else KERNELS)[sw.layout.name]
        return decompress(sw.values, sw.metadata, sw.shape, sw.pattern)

    def sparse_mm(self, x, sw, bias, act_bits=None):
        if sw.layout == BLOCK:
            masks, rows, cols, kept = block_gemm_args(sw)
            return torch.ops.nxm.sparse_mm_block(x, sw.values, sw.metadata, masks, bias, rows, cols, kept)
        n, m, encoding = sw.pattern.n, sw.pattern.m, sw.encoding
        if act_bits is not None:  # (the op surface allows it for quantized weights only)
            return torch.ops.nxm.sparse_mm_packed_w8a8(x, sw.values, sw.metadata, sw.scales, bias, n, m,
                                                       encoding.bits, encoding.group_size or 0)
        if encoding.quantized:
            return torch.ops.nxm.sparse_mm_packed_q(x, sw.values, sw.metadata, sw.scales, bias, n, m, encoding.bits,
                                                    encoding.group_size or 0)
        return torch.ops.nxm.sparse_mm_packed(x, sw.values, sw.metadata, bias, n, m)


def _has_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def _through_cupy(t: torch.Tensor) -> bool:
    """CUDA tensors go through CuPy's NVRTC build of the kernels when _C has none."""
    return t.is_cuda and not _extension.has_cuda_kernels()


BACKEND = dispatch.register(NativeBackend(), priority=20)
