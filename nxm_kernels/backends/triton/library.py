"""The Triton kernels as ``torch.library`` custom ops (namespace ``nxm_triton``) with fake kernels,
so ``torch.compile`` traces through them without running Triton at trace time."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...formats import expected_storage
from ...pattern import Pattern
from . import kernels


@torch.library.custom_op("nxm_triton::nm_mask", mutates_args=())
def nm_mask(w: Tensor, scores: Optional[Tensor], n: int, m: int) -> Tensor:
    return kernels.select(w, Pattern(n, m), scores, project=False)


@nm_mask.register_fake
def _(w, scores, n, m):
    return torch.empty_like(w, dtype=torch.bool)


@torch.library.custom_op("nxm_triton::project", mutates_args=())
def project(w: Tensor, scores: Optional[Tensor], n: int, m: int) -> Tensor:
    return kernels.select(w, Pattern(n, m), scores, project=True)


@project.register_fake
def _(w, scores, n, m):
    return torch.empty_like(w)


@torch.library.custom_op("nxm_triton::compress", mutates_args=())
def compress(w: Tensor, scores: Optional[Tensor], n: int, m: int, layout: str) -> tuple[Tensor, Tensor]:
    return kernels.compress(w, Pattern(n, m), layout, scores)


@compress.register_fake
def _(w, scores, n, m, layout):
    values_shape, meta_shape, meta_dtype = expected_storage(w.dtype, w.shape, Pattern(n, m), layout)
    return w.new_empty(values_shape), w.new_empty(meta_shape, dtype=meta_dtype)


@torch.library.custom_op("nxm_triton::decompress", mutates_args=())
def decompress(values: Tensor, metadata: Tensor, n: int, m: int, layout: str, in_features: int) -> Tensor:
    return kernels.decompress(values, metadata, (values.shape[0], in_features), Pattern(n, m), layout)


@decompress.register_fake
def _(values, metadata, n, m, layout, in_features):
    return values.new_empty((values.shape[0], in_features))


@torch.library.custom_op("nxm_triton::sparse_mm", mutates_args=())
def sparse_mm(x: Tensor, values: Tensor, metadata: Tensor, bias: Optional[Tensor], n: int, m: int) -> Tensor:
    return kernels.sparse_mm(x, values, metadata, Pattern(n, m), bias)


@sparse_mm.register_fake
def _(x, values, metadata, bias, n, m):
    return x.new_empty((x.shape[0], values.shape[0]))
