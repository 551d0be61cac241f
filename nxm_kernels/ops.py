"""The op surface: check -> dispatch. Every backend is reached through these functions.

Checks that every backend needs (pattern, dtype, shapes, devices, finite weights) live here, so
each backend receives valid inputs and answers only what is specific to it.
"""

from __future__ import annotations

import torch

from . import _ops, dispatch, reference  # noqa: F401  (_ops: the schemas of the ops below)
from .encodings import from_bits
from .layouts import Layout, NMSparseWeight, get_layout
from .pattern import PatternLike, as_pattern, check_groups

SELECT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not t.is_floating_point() or t.numel() == 0:
        return
    # One vectorised pass, no temporary: NaN propagates into min and max, +-Inf lands there.
    low, high = torch.aminmax(t)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{what} has {bad} non-finite value(s) (NaN or Inf): N:M selection needs finite "
            f"magnitudes; fix or clamp the {what} first (e.g. torch.nan_to_num)"
        )


def _check_selection_inputs(w, pattern, scores) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SELECT_DTYPES:
        raise TypeError(
            f"unsupported dtype {w.dtype} for N:M selection: use one of "
            f"{', '.join(str(d) for d in SELECT_DTYPES)}"
        )
    check_groups(w.shape, pattern)
    _check_finite(w, "weight")
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or scores.shape != w.shape:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a tensor of the weight's shape {tuple(w.shape)}, got {got}")
        if not scores.is_floating_point():
            raise TypeError(f"scores must be floating point, got {scores.dtype}")
        if scores.device != w.device:
            raise ValueError(f"scores are on {scores.device} but the weight on {w.device}: move them")
        _check_finite(scores, "scores")


def nm_mask(w: torch.Tensor, pattern: PatternLike, scores=None, *, backend: str | None = None) -> torch.Tensor:
    """Bool mask with exactly n True per group of m along dim -1: the n largest |w| (or
    ``scores``) of each group, ties to the lower index. For the block kinds (``"2:4t"``,
    ``"8:4x4"``, libraries): in every block, the allowed mask with the largest sum of |w| (or
    ``scores``), ties to the lowest flat index (a library: the lowest mask number)."""
    pattern = as_pattern(pattern)
    _check_selection_inputs(w, pattern, scores)
    return dispatch.run("nm_mask", backend, w=w, pattern=pattern, scores=scores)  # Support.kinds: who selects it


def project(w: torch.Tensor, pattern: PatternLike, scores=None, *, backend: str | None = None) -> torch.Tensor:
    """``w`` with all but the selected n of every m values set to zero: the Euclidean projection
    onto the N:M set when ``scores`` is None."""
    pattern = as_pattern(pattern)
    _check_selection_inputs(w, pattern, scores)
    return dispatch.run("project", backend, w=w, pattern=pattern, scores=scores)


def is_nm_sparse(z: torch.Tensor, pattern: PatternLike) -> bool:
    """True when the nonzeros of ``z`` fit the pattern: for row n:m, at most n in every group of m
    along dim -1; for the block kinds, in every block (see ``nxm_kernels.patterns``)."""
    pattern = as_pattern(pattern)
    check_groups(z.shape, pattern, "tensor")
    return pattern.is_valid(z)


def compress(
    w: torch.Tensor, pattern: PatternLike, layout: str | Layout = "packed", scores=None, *,
    bits: int | None = None, group_size: int | None = None, backend: str | None = None,
) -> NMSparseWeight:
    """Select as :func:`nm_mask` does and keep only the selected values plus their indices, stored
    as ``layout`` (a name from ``nxm.LAYOUTS``, or a Layout object).

    ``bits=8`` or ``4``: the kept values as symmetric int8/int4 codes with fp32 scales, one per
    output row (``group_size=None``) or per ``group_size`` input features (see
    :mod:`nxm_kernels.encodings.integer`); ``bits=None`` keeps the weight's dtype.
    """
    pattern = as_pattern(pattern)
    layout = get_layout(layout)
    encoding = from_bits(bits, group_size)
    _check_selection_inputs(w, pattern, scores)
    if encoding.quantized and pattern.row_form is not pattern:
        raise ValueError(f"quantized weights are stored for row n:m patterns, not pattern {pattern}: use "
                         "nxm.fake_quant for its quantized values (dense), or a row pattern")
    encoding.check(w.dtype, w.shape, pattern, layout)
    layout.check(encoding.element_dtype(w.dtype), w.shape, pattern)
    if pattern.row_form not in (None, pattern):
        return _compress_transposable(w, pattern, layout, scores, backend)
    return _compress_checked(w, pattern, layout, scores, encoding, backend)


def _compress_checked(w, pattern, layout, scores, encoding, backend) -> NMSparseWeight:
    """``compress`` of a row pattern, its inputs already checked."""
    values, metadata, own = encoding.compress(
        w, pattern, layout, scores,
        select=lambda w, scores: dispatch.run("nm_mask", dispatch.selection_backend(backend), w=w, pattern=pattern,
                                              scores=scores),
        store=lambda w, scores: dispatch.run("compress", backend, w=w, pattern=pattern, layout=layout, scores=scores),
    )
    return NMSparseWeight(values, metadata, tuple(w.shape), pattern, layout, check_metadata=False,
                          encoding=encoding, **own)


def _compress_transposable(w, pattern, layout, scores, backend) -> NMSparseWeight:
    """W and W^T, each stored as the row pattern with the kind's mask (as scores: the row
    selection then keeps exactly the mask, zeros and -0 included)."""
    mask = dispatch.run("nm_mask", dispatch.selection_backend(backend), w=w, pattern=pattern, scores=scores)
    rows, encoding = pattern.row_form, from_bits(None, None)
    forward = _compress_checked(w, rows, layout, mask.to(torch.float32), encoding, backend)
    backward = _compress_checked(w.T.contiguous(), rows, layout, mask.T.contiguous().to(torch.float32), encoding,
                                 backend)
    return NMSparseWeight(forward.values, forward.metadata, tuple(w.shape), pattern, layout, check_metadata=False,
                          values_t=backward.values, metadata_t=backward.metadata)


def decompress(sw: NMSparseWeight, *, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """The dense weight: equal, bit for bit, to ``project`` of the weight that was compressed; a
    quantized weight dequantized (code * scale in fp32), in ``dtype`` (default: the weight's)."""
    if not isinstance(sw, NMSparseWeight):
        raise TypeError(f"decompress takes an NMSparseWeight (from nxm.compress), got {type(sw).__name__}")
    return sw.encoding.decompress(sw, lambda inner: dispatch.run("decompress", backend, sw=inner.stored_form), dtype)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, pattern, encoding):
        mask = dispatch.run("nm_mask", None, w=w, pattern=pattern, scores=None)
        codes, scales = encoding.quantize(w, mask)
        return encoding.dequantize(codes, scales, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None  # straight through: rounding and selection pass the gradient unchanged


def fake_quant(w: torch.Tensor, pattern: PatternLike, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``decompress(compress(w, pattern, bits=bits, group_size=group_size))``, bit for bit, for
    every pattern kind (block kinds too, which ``compress`` does not store), with a straight-through
    gradient (the identity): what quantization-aware training trains through."""
    pattern = as_pattern(pattern)
    encoding = from_bits(bits, group_size)
    if not encoding.quantized:
        raise ValueError("fake_quant needs bits=8 or bits=4 (bits=None would not quantize: use nxm.project)")
    _check_selection_inputs(w, pattern, None)
    if w.dim() != 2:
        raise ValueError(f"fake_quant takes a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    encoding.check(w.dtype, w.shape, pattern, None)
    return _FakeQuant.apply(w, pattern, encoding)


def _check_sparse_mm(x, sw, bias, act_bits) -> None:
    if not isinstance(sw, NMSparseWeight):
        raise TypeError(f"sparse_mm takes an NMSparseWeight (from nxm.compress), got {type(sw).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError("x must be a tensor of shape [..., in_features]")
    if x.shape[-1] != sw.in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension, but the weight is "
            f"{sw.out_features}x{sw.in_features}: x must be [..., {sw.in_features}]"
        )
    if x.dtype != sw.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {sw.dtype}: cast x (or the weight) to match")
    if act_bits is not None and (act_bits != 8 or not sw.encoding.quantized or not x.is_floating_point()):
        raise ValueError(
            f"act_bits={act_bits!r} with a {sw.encoding} {sw.dtype} weight: act_bits=8 (W8A8) quantizes float "
            "activations per token to int8 and multiplies them with a quantized weight's integer codes: compress "
            "the weight with bits=8 (or 4), or leave act_bits=None"
        )
    if x.device != sw.device:
        raise ValueError(f"x is on {x.device} but the weight on {sw.device}: move one of them")
    if bias is not None:
        want = torch.int32 if x.dtype == torch.int8 else x.dtype
        if bias.shape != (sw.out_features,) or bias.dtype != want or bias.device != x.device:
            raise ValueError(
                f"bias must be {want} [{sw.out_features}] on {x.device}, got {bias.dtype} "
                f"{list(bias.shape)} on {bias.device}"
            )


def sparse_mm(x: torch.Tensor, sw: NMSparseWeight, bias=None, *, act_bits: int | None = None,
              backend: str | None = None) -> torch.Tensor:
    """``x @ decompress(sw).T + bias`` for ``x`` of shape ``[..., in_features]``.

    Half types accumulate in fp32 and return the input dtype; int8 x int8 returns int32. A
    quantized weight (``compress(..., bits=)``) is dequantized inside the product (W8A16/W4A16);
    ``act_bits=8`` also quantizes x per token and multiplies integers (W8A8; the exact numerics:
    ``reference.sparse_mm_int``). Under ``torch.compile`` the call is one opaque op
    (``torch.ops.nxm.sparse_mm``), which runs this same function at run time: no graph break.
    """
    if torch.compiler.is_compiling():
        sw = sw.stored_form
        return torch.ops.nxm.sparse_mm(x, sw.values, sw.metadata, bias, list(sw.shape), str(sw.pattern),
                                       sw.layout.name, backend or "auto", sw.scales, str(sw.encoding), act_bits or 0)
    _check_sparse_mm(x, sw, bias, act_bits)
    x2 = x.reshape(-1, sw.in_features)
    quantized = {} if act_bits is None else {"act_bits": act_bits}  # asked only of backends that declare it
    y = dispatch.run("sparse_mm", backend, x=x2, sw=sw.stored_form, bias=bias, **quantized)
    return y.reshape(*x.shape[:-1], sw.out_features)


# ---------------------------------------------------------------- the ops torch.compile sees (schemas: _ops.py)


def _weight(values, metadata, shape, pattern: str, layout: str, scales=None, encoding="float",
            float_dtype=None) -> NMSparseWeight:
    return NMSparseWeight(values, metadata, tuple(shape), pattern, layout, check_metadata=False, scales=scales,
                          encoding=encoding, float_dtype=float_dtype if scales is not None else None)


@torch.library.register_kernel("nxm::sparse_mm", None)  # every device: dispatch decides
def _sparse_mm_op(x, values, metadata, bias, shape, pattern, layout, backend, scales=None, encoding="float",
                  act_bits=0):
    sw = _weight(values, metadata, shape, pattern, layout, scales, encoding, x.dtype)
    return sparse_mm(x, sw, bias, act_bits=act_bits or None, backend=None if backend == "auto" else backend)


@torch.library.register_kernel("nxm::sparse_mm_grad_input", None)
def _sparse_mm_grad_input_op(grad, values, metadata, shape, pattern, layout, scales=None, encoding="float"):
    """``grad @ W``: the input gradient of ``sparse_mm``, W decompressed on the fly."""
    w = decompress(_weight(values, metadata, shape, pattern, layout, scales, encoding, grad.dtype), dtype=torch.float32)
    return (grad.to(torch.float32) @ w).to(grad.dtype)


def _sparse_mm_setup_context(ctx, inputs, output):
    _x, values, metadata, _bias, shape, pattern, layout, _backend, scales, encoding, _act_bits = inputs
    ctx.save_for_backward(values, metadata, scales)
    ctx.static = (shape, pattern, layout)
    ctx.encoding = encoding


def _sparse_mm_backward(ctx, grad):
    values, metadata, scales = ctx.saved_tensors
    grad_x = torch.ops.nxm.sparse_mm_grad_input(grad, values, metadata, *ctx.static, scales, ctx.encoding)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias, None, None, None, None, None, None, None


torch.library.register_autograd("nxm::sparse_mm", _sparse_mm_backward, setup_context=_sparse_mm_setup_context)
