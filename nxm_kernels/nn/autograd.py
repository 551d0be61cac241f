"""The forward of ``SparseLinear`` as custom ops with an autograd formula.

torch.compile sees opaque ops instead of tracing into dispatch (which imports modules and reads
the environment); eager calls run the same code. The schemas and fake kernels of
``torch.ops.nxm.sparse_linear`` and ``sparse_linear_grad_input`` are in ``nxm_kernels/_ops.py``;
their implementations (every device: dispatch decides) and the autograd formula are here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _ops, dispatch, ops  # noqa: F401  (_ops: the schemas)
from ..layouts import NMSparseWeight
from ..pattern import as_pattern
from .policy import _backend_arg, _sparse_weight

sparse_linear = torch.ops.nxm.sparse_linear
sparse_linear_grad_input = torch.ops.nxm.sparse_linear_grad_input


@torch.library.register_kernel("nxm::sparse_linear", None)
def _sparse_linear(x, *weight_args, **weight_kwargs):
    """``x @ W.T + bias`` for the N:M weight W of ``shape`` stored padded in ``values``/``metadata``:
    :func:`linear_plan` made and run for this one call."""
    return linear_plan(x, *weight_args, **weight_kwargs)(x)


def linear_plan(x, values, metadata, bias, shape, out_features, pattern, layout, backend, run_values, run_metadata,
                run_layout, run_shape, values_t=None, metadata_t=None, scales=None, encoding="float", act_bits=0):
    """``sparse_linear`` as a callable of x for every input like ``x`` (its dtype, device and number of
    features): the weight is rebuilt, the inputs checked and the backend chosen once, here; a call
    then pads ``x`` (zeros) to the weight's padded width, runs the chosen kernel on the bound weight
    and bias (padded to the weight's rows) and crops the output to ``out_features``.

    ``run_*``: a backend-specific form of the same weight (e.g. cuSPARSELt's buffer) to multiply
    with instead, when given; the stored form still serves the backward. ``values_t``/``metadata_t``:
    W^T of a transposable pattern, which the backward multiplies with. ``scales``/``encoding``: a
    quantized weight (in x's dtype when dequantized); ``act_bits`` 8: W8A8.
    """
    quantized = _quantized(scales, encoding, x.dtype)
    if run_values is not None:
        sw = NMSparseWeight(run_values, run_metadata, tuple(run_shape), as_pattern(pattern), run_layout,
                            check_metadata=False)
    else:
        sw = _sparse_weight(values, metadata, shape, as_pattern(pattern), layout, values_t=values_t,
                            metadata_t=metadata_t, **quantized)
    in_features = x.shape[-1]
    pad, crop = sw.in_features - in_features, out_features < sw.out_features
    if bias is not None and crop:
        bias = F.pad(bias, (0, sw.out_features - out_features))
    x2 = x.reshape(-1, in_features)
    x2 = F.pad(x2, (0, pad)) if pad else x2
    ops._check_sparse_mm(x2, sw, bias, act_bits or None)
    weight = sw.stored_form
    activations = {"act_bits": act_bits} if act_bits else {}  # asked only of backends that declare it
    chosen = dispatch.select("sparse_mm", _backend_arg(backend), {"x": x2, "sw": weight, "bias": bias, **activations})
    kernel = functools.partial(chosen.sparse_mm, sw=weight, bias=bias, **activations)

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() != 2
        x2 = x.reshape(-1, in_features) if flat else x
        y = kernel(F.pad(x2, (0, pad)) if pad else x2)
        if crop:
            y = y[:, :out_features].contiguous()
        return y.reshape(*x.shape[:-1], out_features) if flat else y

    return run


@torch.library.register_kernel("nxm::sparse_linear_grad_input", None)
def _sparse_linear_grad_input(grad, values, metadata, shape, in_features, pattern, layout, values_t=None,
                              metadata_t=None, scales=None, encoding="float"):
    """``grad @ W`` (the input gradient of ``sparse_linear``): ``sparse_mm`` with W^T when the weight
    stores it (a transposable pattern: dense-free both ways), else W decompressed on the fly."""
    sw = _sparse_weight(values, metadata, shape, as_pattern(pattern), layout, values_t=values_t,
                        metadata_t=metadata_t, **_quantized(scales, encoding, grad.dtype))
    if sw.transposed is not None:
        out_features = grad.shape[-1]
        padded = F.pad(grad, (0, sw.out_features - out_features)) if out_features < sw.out_features else grad
        return ops.sparse_mm(padded, sw.transposed)[..., :in_features].contiguous()
    w = ops.decompress(sw)[: grad.shape[-1], :in_features]
    return (grad.to(torch.float32) @ w.to(torch.float32)).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    x, values, metadata, _bias, shape, _out_features, pattern, layout = inputs[:8]
    given = list(inputs[13:17])  # the trailing arguments with defaults: values_t, metadata_t, scales, encoding
    values_t, metadata_t, scales, encoding = given + [None, None, None, "float"][len(given):]
    ctx.save_for_backward(values, metadata, values_t, metadata_t, scales)
    ctx.in_features, ctx.shape, ctx.pattern, ctx.layout, ctx.encoding = x.shape[-1], shape, pattern, layout, encoding
    ctx.inputs = len(inputs)


def _backward(ctx, grad):
    values, metadata, values_t, metadata_t, scales = ctx.saved_tensors
    grad_x = sparse_linear_grad_input(grad, values, metadata, ctx.shape, ctx.in_features, ctx.pattern, ctx.layout,
                                      values_t, metadata_t, scales, ctx.encoding)
    return (grad_x,) + (None,) * (ctx.inputs - 1)


def _quantized(scales, encoding: str, dtype: torch.dtype) -> dict:
    """A quantized weight's fields for NMSparseWeight (its dtype: the activations')."""
    return {} if scales is None else {"scales": scales, "encoding": encoding, "float_dtype": dtype}


torch.library.register_autograd("nxm::sparse_linear", _backward, setup_context=_setup_context)
