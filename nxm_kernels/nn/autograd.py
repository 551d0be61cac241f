"""The forward of ``SparseLinear`` as custom ops with an autograd formula.

torch.compile sees opaque ops instead of tracing into dispatch (which imports modules and reads
the environment); eager calls run the same code. The schemas and fake kernels of
``torch.ops.nxm.sparse_linear`` and ``sparse_linear_grad_input`` are in ``nxm_kernels/_ops.py``;
their implementations (every device: dispatch decides) and the autograd formula are here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ops, ops  # noqa: F401  (_ops: the schemas)
from ..layouts import NMSparseWeight
from ..pattern import as_pattern
from .policy import _backend_arg, _sparse_weight

sparse_linear = torch.ops.nxm.sparse_linear
sparse_linear_grad_input = torch.ops.nxm.sparse_linear_grad_input


@torch.library.register_kernel("nxm::sparse_linear", None)
def _sparse_linear(x, values, metadata, bias, shape, out_features, pattern, layout, backend, run_values, run_metadata,
                   run_layout, run_shape):
    """``x @ W.T + bias`` for the N:M weight W of ``shape`` stored padded in ``values``/``metadata``:
    pads ``x`` (zeros) and ``bias`` to the weight's shape and crops the output to ``out_features``.

    ``run_*``: a backend-specific form of the same weight (e.g. cuSPARSELt's buffer) to multiply
    with instead, when given; the stored form still serves the backward.
    """
    if run_values is not None:
        sw = NMSparseWeight(run_values, run_metadata, tuple(run_shape), as_pattern(pattern), run_layout,
                            check_metadata=False)
    else:
        sw = _sparse_weight(values, metadata, shape, as_pattern(pattern), layout)
    in_features = x.shape[-1]
    if in_features < sw.in_features:
        x = F.pad(x, (0, sw.in_features - in_features))
    if bias is not None and out_features < sw.out_features:
        bias = F.pad(bias, (0, sw.out_features - out_features))
    y = ops.sparse_mm(x, sw, bias, backend=_backend_arg(backend))
    return y[..., :out_features].contiguous() if out_features < sw.out_features else y


@torch.library.register_kernel("nxm::sparse_linear_grad_input", None)
def _sparse_linear_grad_input(grad, values, metadata, shape, in_features, pattern, layout):
    """``grad @ W`` (the input gradient of ``sparse_linear``), W decompressed on the fly."""
    sw = _sparse_weight(values, metadata, shape, as_pattern(pattern), layout)
    w = ops.decompress(sw)[: grad.shape[-1], :in_features]
    return (grad.to(torch.float32) @ w.to(torch.float32)).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    x, values, metadata, _bias, shape, _out_features, pattern, layout = inputs[:8]
    ctx.save_for_backward(values, metadata)
    ctx.in_features, ctx.shape, ctx.pattern, ctx.layout = x.shape[-1], shape, pattern, layout


def _backward(ctx, grad):
    values, metadata = ctx.saved_tensors
    grad_x = sparse_linear_grad_input(grad, values, metadata, ctx.shape, ctx.in_features, ctx.pattern, ctx.layout)
    return (grad_x,) + (None,) * 12


torch.library.register_autograd("nxm::sparse_linear", _backward, setup_context=_setup_context)
