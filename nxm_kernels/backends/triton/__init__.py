"""The Triton backend: fused mask + compress, decompress and a fused sparse GEMM.

Every op runs on CUDA tensors; on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``nxm_kernels`` is imported), which is how the tests prove
the kernels without a GPU. Auto dispatch picks it only for CUDA tensors.

Layouts: ``compress``/``decompress`` handle ``packed`` (any n:m) and ``cutlass``. ``sparse_mm``
reads ``packed`` directly, the same bytes ``compress`` stores (see ``kernels.py``), and ``block``
(k-of-RxC blocks and mask libraries, see ``block_gemm.py``), and int8/int4 2:4 weights (W8A16,
W4A16) in ``tiled_q`` (``quant_gemm.py``, fp16/bf16 activations); weights in
the ``cutlass`` layout are answered with a reason that says to compress with
``layout='packed'`` (their reordered metadata serves CUTLASS/cuSPARSELt, not this kernel).

The kernels are the ``torch.ops.nxm_triton`` ops (``library.py``), with the same schemas and fake
kernels as the C++ ops of ``torch.ops.nxm`` (both defined in ``nxm_kernels/_ops.py``).
"""

from __future__ import annotations

import torch

from ... import _compat
from ... import _ops, dispatch
from ...dispatch import Backend, Support, call_facts
from ...layouts import BLOCK, NMSparseWeight, PACKED, TILED_Q
from ...layouts.block import block_gemm_args

try:
    import triton  # noqa: F401
except ImportError as error:  # the module must import without triton, and say so
    _IMPORT_ERROR: str | None = f"triton is not importable ({error}): pip install triton (Linux)"
else:
    _IMPORT_ERROR = None
    from . import kernels, library, quant_gemm  # noqa: F401 (library registers the kernels of torch.ops.nxm_triton)

_INT32_LIMIT = 2**31  # the kernels index elements with 32-bit offsets within a row block
DEVICES = ("cuda", "cpu")  # cpu: under TRITON_INTERPRET=1 only (extra_reasons)
KERNELS = _ops.layout_kernels("nxm_triton")


class TritonBackend(Backend):
    name = "triton"
    supports = {
        "nm_mask": Support(devices=DEVICES),
        "project": Support(devices=DEVICES),
        "compress": Support(layouts=tuple(KERNELS), devices=DEVICES),
        "decompress": Support(layouts=tuple(KERNELS), devices=DEVICES),
        "sparse_mm": Support(
            layouts=(PACKED.name, BLOCK.name, TILED_Q.name), dtypes=(torch.float16, torch.bfloat16, torch.float32),
            devices=DEVICES, kinds=("row", "block", "library"), encodings=("float", "int8", "int4"),
            advice="the Triton GEMMs read layouts 'packed' and 'block' (compress with layout='packed' or 'block') "
                   "and multiply float types (int8 x int8 -> int32 is not implemented in them), and int8/int4 2:4 "
                   "weights in layout 'tiled_q' with fp16/bf16 activations: use another backend for the rest",
        ),
    }
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

    def extra_reasons(self, op: str, **inputs) -> list[str]:
        why = []
        if call_facts(inputs)[2].type == "cpu" and not kernels.INTERPRETED:
            why.append("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before "
                       "importing nxm_kernels (slow; for testing), or move the tensors to a CUDA GPU")
        tensors = [v for v in inputs.values() if isinstance(v, (torch.Tensor, NMSparseWeight))]
        sizes = [t.values.numel() if isinstance(t, NMSparseWeight) else t.numel() for t in tensors]
        sw = inputs.get("sw")
        if op == "sparse_mm" and isinstance(sw, NMSparseWeight):
            why += _quantized_reasons(sw)
        if max(sizes) >= _INT32_LIMIT:
            why.append("tensors of 2**31 or more elements are not supported (32-bit offsets): split the layer")
        return why

    def nm_mask(self, w, pattern, scores):
        return torch.ops.nxm_triton.nm_mask(w, pattern.n, pattern.m, scores)

    def project(self, w, pattern, scores):
        return torch.ops.nxm_triton.project(w, pattern.n, pattern.m, scores)

    def compress(self, w, pattern, layout, scores):
        return KERNELS[layout.name][0](w, pattern, scores)

    def decompress(self, sw):
        return KERNELS[sw.layout.name][1](sw.values, sw.metadata, sw.shape, sw.pattern)

    def sparse_mm(self, x, sw, bias):
        if sw.layout == TILED_Q:
            return quant_gemm.sparse_mm_tiled_q(x, sw.values, sw.metadata, sw.scales, bias, sw.encoding.bits,
                                                sw.encoding.group_size or 0)
        if sw.layout == BLOCK:
            masks, rows, cols, kept = block_gemm_args(sw)
            return torch.ops.nxm_triton.sparse_mm_block(x, sw.values, sw.metadata, masks, bias, rows, cols, kept)
        return torch.ops.nxm_triton.sparse_mm_packed(x, sw.values, sw.metadata, bias, sw.pattern.n, sw.pattern.m)


def _quantized_reasons(sw) -> list[str]:
    """The pairs the table cannot say: int8/int4 codes only in ``tiled_q``, with fp16/bf16 activations."""
    if sw.encoding.quantized and sw.layout != TILED_Q:
        return [f"multiplies {sw.encoding} weights in layout 'tiled_q' only, not {sw.layout.name!r}: compress with "
                "layout='tiled_q'"]
    if sw.layout == TILED_Q and sw.dtype not in (torch.float16, torch.bfloat16):
        return [f"multiplies 'tiled_q' weights with float16/bfloat16 activations, not {sw.dtype}"]
    return []


BACKEND = dispatch.register(TritonBackend(), priority=10)
