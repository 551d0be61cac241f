"""The forward of ``SparseLinear`` as custom ops with fake kernels and an autograd formula.

torch.compile sees opaque ops instead of tracing into dispatch (which imports modules and reads
the environment); eager calls run the same code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..formats import NMSparseWeight
from ..pattern import as_pattern
from .policy import _backend_arg, _sparse_weight

@torch.library.custom_op("nxm::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    metadata: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    pattern: str,
    layout: str,
    backend: str,
    run_values: Optional[torch.Tensor],
    run_metadata: Optional[torch.Tensor],
    run_layout: str,
    run_shape: list[int],
) -> torch.Tensor:
    """``x @ W.T + bias`` for the N:M weight W stored padded in ``values``/``metadata``: pads
    ``x`` (zeros) and ``bias`` to the weight's shape and crops the output to ``out_features``.

    ``run_*``: a backend-specific form of the same weight (e.g. cuSPARSELt's buffer) to multiply
    with instead, when given; the stored form still serves the backward.
    """
    if run_values is not None:
        sw = NMSparseWeight(
            run_values, run_metadata, tuple(run_shape), as_pattern(pattern), run_layout, check_metadata=False
        )
    else:
        sw = _sparse_weight(values, metadata, as_pattern(pattern), layout)
    in_features = x.shape[-1]
    if in_features < sw.in_features:
        x = F.pad(x, (0, sw.in_features - in_features))
    if bias is not None and out_features < sw.out_features:
        bias = F.pad(bias, (0, sw.out_features - out_features))
    y = ops.sparse_mm(x, sw, bias, backend=_backend_arg(backend))
    return y[..., :out_features].contiguous() if out_features < sw.out_features else y


@sparse_linear.register_fake
def _(
    x, values, metadata, bias, out_features, pattern, layout, backend, run_values, run_metadata, run_layout, run_shape
):
    dtype = torch.int32 if x.dtype == torch.int8 else x.dtype
    return x.new_empty((*x.shape[:-1], out_features), dtype=dtype)


@torch.library.custom_op("nxm::sparse_linear_grad_input", mutates_args=())
def sparse_linear_grad_input(
    grad: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, in_features: int, pattern: str, layout: str
) -> torch.Tensor:
    """``grad @ W`` (the input gradient of ``sparse_linear``), W decompressed on the fly."""
    sw = _sparse_weight(values, metadata, as_pattern(pattern), layout)
    w = ops.decompress(sw)[: grad.shape[-1], :in_features]
    return (grad.to(torch.float32) @ w.to(torch.float32)).to(grad.dtype)


@sparse_linear_grad_input.register_fake
def _(grad, values, metadata, in_features, pattern, layout):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    x, values, metadata, _bias, _out_features, pattern, layout = inputs[:7]
    ctx.save_for_backward(values, metadata)
    ctx.in_features, ctx.pattern, ctx.layout = x.shape[-1], pattern, layout


def _backward(ctx, grad):
    values, metadata = ctx.saved_tensors
    grad_x = sparse_linear_grad_input(grad, values, metadata, ctx.in_features, ctx.pattern, ctx.layout)
    return (grad_x,) + (None,) * 11


sparse_linear.register_autograd(_backward, setup_context=_setup_context)
