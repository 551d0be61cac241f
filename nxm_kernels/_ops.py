"""Every custom op's schema and fake (meta) kernel, defined once.

Kernel ops exist in two namespaces with the same schema and the same fake kernel:
``torch.ops.nxm.*`` (C++ CPU/CUDA kernels of ``nxm_kernels._C``: ``csrc/*`` registers only their
implementations, with ``TORCH_LIBRARY_IMPL``) and ``torch.ops.nxm_triton.*`` (the Triton kernels,
registered with ``torch.library.register_kernel`` in ``backends/triton/library.py``). The
``nxm``-only ops are cuSPARSELt's (``csrc/cuda/cusparselt.cpp``) and the Python ops that let
``torch.compile`` see ``nxm.sparse_mm`` and ``SparseLinear`` as one opaque call (implemented in
``ops.py`` and ``nn/autograd.py``).

Output shapes come from the Layout objects (``layouts/``), the one place that knows storage.
"""

from __future__ import annotations

import torch

from .layouts import CUTLASS, PACKED
from .layouts.cutlass import PATTERN as CUTLASS_PATTERN
from .pattern import Pattern

KERNEL_NAMESPACES = ("nxm", "nxm_triton")

# name -> schema, for both kernel namespaces.
# scores: None selects by |w|; else float32 or float64 of w's shape (ties to the lower index).
KERNEL_SCHEMAS = {
    "nm_mask": "(Tensor w, int n, int m, Tensor? scores) -> Tensor",
    "project": "(Tensor w, int n, int m, Tensor? scores) -> Tensor",
    "compress_packed": "(Tensor w, int n, int m, Tensor? scores) -> (Tensor, Tensor)",
    "decompress_packed": "(Tensor values, Tensor metadata, int cols, int n, int m) -> Tensor",
    # cutlass: the pattern is the dtype's Sparse Tensor Core pattern (2:4, fp32 1:2)
    "compress_cutlass": "(Tensor w, Tensor? scores) -> (Tensor, Tensor)",
    "decompress_cutlass": "(Tensor values, Tensor metadata) -> Tensor",
    # x [M, K] @ W.T (+ bias) for W [N, K] in the packed layout; int8 -> int32
    "sparse_mm_packed": "(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int n, int m) -> Tensor",
    # x [M, K] @ W.T (+ bias) for W [N, K] in the block layout (kept of every block_rows x block_cols block);
    # masks None: metadata holds bitmaps, else mask numbers into masks (uint8 [count, bitmap bytes])
    "sparse_mm_block": ("(Tensor x, Tensor values, Tensor metadata, Tensor? masks, Tensor? bias, int block_rows, "
                        "int block_cols, int kept) -> Tensor"),
}

NXM_SCHEMAS = {
    # the instruction set the CPU GEMM (csrc/cpu_gemm.cpp) runs here: "avx512", "avx2" or "portable"
    "cpu_isa": "() -> str",
    # the exact 2:4t selection (patterns/transposable.py) of w [..., rows, cols] (multiples of 4): its bool
    # mask, or with project w with the dropped entries +0; scores as for nm_mask
    "select_2of4t": "(Tensor w, Tensor? scores, bool project) -> Tensor",
    # x [M, K] (float) @ W.T (+ bias) for W [N, K] as int8 (bits 8) or int4 (bits 4, two per byte) codes
    # in the packed layout with fp32 scales [N, groups] (group_size 0: one per row): W8A16 / W4A16
    "sparse_mm_packed_q": ("(Tensor x, Tensor values, Tensor metadata, Tensor scales, Tensor? bias, int n, int m, "
                           "int bits, int group_size) -> Tensor"),
    # W8A8: x [M, K] (float) quantized per row to int8 (reference.quantize_activations), integer dot
    # products with the codes (as sparse_mm_packed_q's), then both scales (reference.sparse_mm_int)
    "sparse_mm_packed_w8a8": ("(Tensor x, Tensor values, Tensor metadata, Tensor scales, Tensor? bias, int n, int m, "
                              "int bits, int group_size) -> Tensor"),
    # cuSPARSELt (csrc/cuda/cusparselt.cpp)
    "cusparselt_version": "() -> int",
    "cusparselt_plan_cache_size": "() -> int",
    "cusparselt_release": "() -> ()",
    "cusparselt_compress": "(Tensor dense) -> Tensor",
    "cusparselt_mm": ("(Tensor x, Tensor packed, int out_features, Tensor? bias, Tensor? alpha, ScalarType? out_dtype, "
                      "bool transpose_output, int alg_id, int split_k) -> Tensor"),
    "cusparselt_max_algorithm_id": ("(Tensor x, Tensor packed, int out_features, Tensor? bias, Tensor? alpha, "
                                    "ScalarType? out_dtype, bool transpose_output) -> int"),
    # nxm.sparse_mm as one op (ops.py): x [..., K] @ W.T + bias, W of `shape` in `layout`,
    # run by dispatch (`backend`: "auto" or a name)
    # (scales/encoding: a quantized weight, e.g. "int4-g128"; act_bits 8: W8A8, 0: float activations)
    "sparse_mm": ("(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int[] shape, str pattern, str layout, "
                  "str backend, Tensor? scales=None, str encoding=\"float\", int act_bits=0) -> Tensor"),
    "sparse_mm_grad_input": ("(Tensor grad, Tensor values, Tensor metadata, int[] shape, str pattern, str layout, "
                             "Tensor? scales=None, str encoding=\"float\") -> Tensor"),
    # SparseLinear's forward (nn/autograd.py): W stored padded to `shape`; x and bias are padded,
    # the output cropped to out_features. run_*: a backend's own form of W to multiply with instead.
    "sparse_linear": ("(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int[] shape, int out_features, "
                      "str pattern, str layout, str backend, Tensor? run_values, Tensor? run_metadata, str run_layout, "
                      "int[] run_shape, Tensor? values_t=None, Tensor? metadata_t=None, Tensor? scales=None, "
                      "str encoding=\"float\", int act_bits=0) -> Tensor"),
    # values_t/metadata_t: W^T of a transposable pattern, which the backward multiplies with
    "sparse_linear_grad_input": ("(Tensor grad, Tensor values, Tensor metadata, int[] shape, int in_features, "
                                 "str pattern, str layout, Tensor? values_t=None, Tensor? metadata_t=None, "
                                 "Tensor? scales=None, str encoding=\"float\") -> Tensor"),
}


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.int32 if x.dtype == torch.int8 else x.dtype


def _storage(layout, dtype, shape, pattern):
    specs = layout.storage(dtype, shape, pattern)
    return specs["values"], specs["metadata"]


# ---------------------------------------------------------------- fake kernels, one per op


def _nm_mask_fake(w, n, m, scores):
    return w.new_empty(w.shape, dtype=torch.bool)


def _project_fake(w, n, m, scores):
    return w.new_empty(w.shape)


def _compress_packed_fake(w, n, m, scores):
    values, metadata = _storage(PACKED, w.dtype, tuple(w.shape), Pattern(n, m))
    return w.new_empty(values.shape), w.new_empty(metadata.shape, dtype=metadata.dtype)


def _decompress_packed_fake(values, metadata, cols, n, m):
    return values.new_empty(values.shape[0], cols)


def _compress_cutlass_fake(w, scores):
    values, metadata = _storage(CUTLASS, w.dtype, tuple(w.shape), CUTLASS_PATTERN[w.dtype])
    return w.new_empty(values.shape), w.new_empty(metadata.shape, dtype=metadata.dtype)


def _decompress_cutlass_fake(values, metadata):
    return values.new_empty(values.shape[0], values.shape[1] * 2)


def _sparse_mm_packed_fake(x, values, metadata, bias, n, m):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=_product_dtype(x))


def _sparse_mm_block_fake(x, values, metadata, masks, bias, block_rows, block_cols, kept):
    return x.new_empty((x.shape[0], values.shape[0] * block_rows))


def _sparse_mm_packed_q_fake(x, values, metadata, scales, bias, n, m, bits, group_size):
    return x.new_empty((x.shape[0], values.shape[0]))


def _select_2of4t_fake(w, scores, project):
    return w.new_empty(w.shape) if project else w.new_empty(w.shape, dtype=torch.bool)


def _cusparselt_compress_fake(dense):
    return dense.new_empty(torch.library.get_ctx().new_dynamic_size())


def _cusparselt_mm_fake(x, packed, out_features, bias, alpha, out_dtype, transpose_output, alg_id, split_k):
    out_dtype = out_dtype or _product_dtype(x)
    shape = (out_features, x.shape[0]) if transpose_output else (x.shape[0], out_features)
    return x.new_empty(shape, dtype=out_dtype)


def _sparse_mm_fake(x, values, metadata, bias, shape, pattern, layout, backend, scales=None, encoding="float",
                    act_bits=0):
    return x.new_empty((*x.shape[:-1], shape[0]), dtype=_product_dtype(x))


def _sparse_mm_grad_input_fake(grad, values, metadata, shape, pattern, layout, scales=None, encoding="float"):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _sparse_linear_fake(x, values, metadata, bias, shape, out_features, pattern, layout, backend, run_values,
                        run_metadata, run_layout, run_shape, values_t=None, metadata_t=None, scales=None,
                        encoding="float", act_bits=0):
    return x.new_empty((*x.shape[:-1], out_features), dtype=_product_dtype(x))


def _sparse_linear_grad_input_fake(grad, values, metadata, shape, in_features, pattern, layout, values_t=None,
                                   metadata_t=None, scales=None, encoding="float"):
    return grad.new_empty((*grad.shape[:-1], in_features))


KERNEL_FAKES = {
    "nm_mask": _nm_mask_fake,
    "project": _project_fake,
    "compress_packed": _compress_packed_fake,
    "decompress_packed": _decompress_packed_fake,
    "compress_cutlass": _compress_cutlass_fake,
    "decompress_cutlass": _decompress_cutlass_fake,
    "sparse_mm_packed": _sparse_mm_packed_fake,
    "sparse_mm_block": _sparse_mm_block_fake,
}
NXM_FAKES = {
    "sparse_mm_packed_q": _sparse_mm_packed_q_fake,
    "select_2of4t": _select_2of4t_fake,
    "sparse_mm_packed_w8a8": _sparse_mm_packed_q_fake,
    "cusparselt_compress": _cusparselt_compress_fake,
    "cusparselt_mm": _cusparselt_mm_fake,
    "sparse_mm": _sparse_mm_fake,
    "sparse_mm_grad_input": _sparse_mm_grad_input_fake,
    "sparse_linear": _sparse_linear_fake,
    "sparse_linear_grad_input": _sparse_linear_grad_input_fake,
}


def qualnames() -> list[str]:
    """Every op defined here, "namespace::name"."""
    return [f"{ns}::{name}" for ns in KERNEL_NAMESPACES for name in KERNEL_SCHEMAS] + [
        f"nxm::{name}" for name in NXM_SCHEMAS
    ]


def _define_all() -> None:
    for namespace in KERNEL_NAMESPACES:
        for name, schema in KERNEL_SCHEMAS.items():
            torch.library.define(f"{namespace}::{name}", schema)
            torch.library.register_fake(f"{namespace}::{name}", KERNEL_FAKES[name])
    for name, schema in NXM_SCHEMAS.items():
        torch.library.define(f"nxm::{name}", schema)
        if name in NXM_FAKES:
            torch.library.register_fake(f"nxm::{name}", NXM_FAKES[name])


_define_all()


# ---------------------------------------------------------------- calling the layout kernels


def layout_kernels(namespace: str) -> dict:
    """{layout name: (compress(w, pattern, scores), decompress(values, metadata, shape, pattern))}
    calling the kernel ops of ``namespace`` (the same schemas in every namespace)."""
    ops = getattr(torch.ops, namespace)
    return {
        PACKED.name: (
            lambda w, pattern, scores: ops.compress_packed(w, pattern.n, pattern.m, scores),
            lambda values, metadata, shape, pattern: ops.decompress_packed(
                values, metadata, shape[1], pattern.n, pattern.m),
        ),
        CUTLASS.name: (
            lambda w, pattern, scores: ops.compress_cutlass(w, scores),
            lambda values, metadata, shape, pattern: ops.decompress_cutlass(values, metadata),
        ),
    }
