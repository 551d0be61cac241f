"""The Triton kernels as the implementations of the ``torch.ops.nxm_triton`` ops.

Their schemas and fake kernels are those of the C++ ops (``nxm_kernels/_ops.py``, one definition
for both namespaces), so ``torch.compile`` traces them without running Triton at trace time.
Registered for CUDA tensors, and for CPU tensors (which run under the Triton interpreter only).
"""

from __future__ import annotations

import torch

from ... import _ops  # noqa: F401  (defines the schemas)
from ...layouts.cutlass import PATTERN as CUTLASS_PATTERN
from ...pattern import Pattern
from . import block_gemm, kernels

DEVICES = ("cuda", "cpu")


@torch.library.register_kernel("nxm_triton::nm_mask", DEVICES)
def _nm_mask(w, n, m, scores):
    return kernels.select(w, Pattern(n, m), scores, project=False)


@torch.library.register_kernel("nxm_triton::project", DEVICES)
def _project(w, n, m, scores):
    return kernels.select(w, Pattern(n, m), scores, project=True)


@torch.library.register_kernel("nxm_triton::compress_packed", DEVICES)
def _compress_packed(w, n, m, scores):
    return kernels.compress_packed(w, Pattern(n, m), scores)


@torch.library.register_kernel("nxm_triton::decompress_packed", DEVICES)
def _decompress_packed(values, metadata, cols, n, m):
    return kernels.decompress(values, metadata, (values.shape[0], cols), Pattern(n, m), cutlass=False)


@torch.library.register_kernel("nxm_triton::compress_cutlass", DEVICES)
def _compress_cutlass(w, scores):
    return kernels.compress_cutlass(w, CUTLASS_PATTERN[w.dtype], scores)


@torch.library.register_kernel("nxm_triton::decompress_cutlass", DEVICES)
def _decompress_cutlass(values, metadata):
    shape = (values.shape[0], values.shape[1] * 2)
    return kernels.decompress(values, metadata, shape, CUTLASS_PATTERN[values.dtype], cutlass=True)


@torch.library.register_kernel("nxm_triton::sparse_mm_packed", DEVICES)
def _sparse_mm_packed(x, values, metadata, bias, n, m):
    return kernels.sparse_mm(x, values, metadata, Pattern(n, m), bias)


@torch.library.register_kernel("nxm_triton::sparse_mm_block", DEVICES)
def _sparse_mm_block(x, values, metadata, masks, bias, block_rows, block_cols, kept):
    return block_gemm.sparse_mm_block(x, values, metadata, masks, bias, block_rows, block_cols, kept)
