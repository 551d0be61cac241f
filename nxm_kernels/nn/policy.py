"""Layer policy of ``SparseLinear``: which layout a layer gets, the shape it is padded to, and how
a dense layer weight becomes a compressed one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dispatch, ops
from ..formats import CUTLASS_PATTERN, LAYOUTS, NMSparseWeight, check_layout, cusparselt_multiples, cutlass_multiples
from ..pattern import Pattern

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What a SparseLinear stores (and saves). Backend-specific forms such as the cusparselt buffer are
# made on the device from these and never stored.
STORED_LAYOUTS = ("packed", "cutlass")
DERIVED_LAYOUTS = tuple(layout for layout in LAYOUTS if layout not in STORED_LAYOUTS)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def default_layout(dtype: torch.dtype, pattern: Pattern, out_features: int, in_features: int) -> str:
    """The layout ``SparseLinear`` picks when none is given.

    ``cutlass`` (the Sparse Tensor Core layout) when the dtype's hardware pattern is ``pattern``
    (2:4 for fp16/bf16, 1:2 for fp32) and the shape already fits it (``cutlass_multiples``), so no
    padding is spent just to reach it; otherwise ``packed``.
    """
    if CUTLASS_PATTERN.get(dtype) != pattern:
        return "packed"
    row_mult, col_mult = cutlass_multiples(dtype)
    return "cutlass" if out_features % row_mult == 0 and in_features % col_mult == 0 else "packed"


def padded_shape(out_features: int, in_features: int, pattern: Pattern, layout: str, dtype: torch.dtype):
    """The weight shape a layout holds: in_features padded to whole groups of m (``packed``), or
    rows and columns to the layout's multiples (``cutlass``, and the derived ``cusparselt``).
    Padding is zeros, never selected over a real value."""
    if layout == "cutlass":
        row_mult, col_mult = cutlass_multiples(dtype)
        return _round_up(out_features, row_mult), _round_up(in_features, col_mult)
    if layout == "cusparselt":  # a derived form: both dimensions to cuSPARSELt's multiple
        mult = cusparselt_multiples(dtype)[0]
        return _round_up(out_features, mult), _round_up(in_features, math.lcm(mult, pattern.m))
    return out_features, _round_up(in_features, pattern.m)


def _sparse_weight(values: torch.Tensor, metadata: torch.Tensor, pattern: Pattern, layout: str) -> NMSparseWeight:
    """Rebuild the (trusted) compressed weight from a module's buffers."""
    shape = (values.shape[0], values.shape[1] // pattern.n * pattern.m)
    return NMSparseWeight(values, metadata, shape, pattern, layout, check_metadata=False)


def _backend_arg(backend: str) -> str | None:
    # "auto" defers to dispatch's default, so NXM_BACKEND applies to modules built with "auto".
    return None if backend == "auto" else backend


def _compress_layer(w: torch.Tensor, pattern: Pattern, layout: str | None, scores, backend: str) -> NMSparseWeight:
    """Pad ``w`` [out, in] (and ``scores``) to the layout's shape and compress it.

    ``layout=None``: :func:`default_layout`, unless an explicit ``backend`` cannot run ``sparse_mm``
    on that layout but can on ``packed`` (e.g. a GEMM that reads only ``packed``).
    """
    _check_float(w.dtype)
    out_features, in_features = w.shape
    if backend != "auto":
        dispatch.get_backend(backend)  # an unknown name fails here, not at the first forward
    if layout is not None and layout not in STORED_LAYOUTS:
        raise ValueError(
            f"SparseLinear stores layout 'packed' or 'cutlass' (or None: automatic), not {layout!r}; "
            "backend-specific forms are made from these on the device"
        )

    def compress(candidate: str) -> NMSparseWeight:
        shape = padded_shape(out_features, in_features, pattern, candidate, w.dtype)
        check_layout(w.dtype, shape, pattern, candidate)
        # Padded scores sit below every real score, so a padded position is never kept over a real one.
        padded_scores = (
            None
            if scores is None
            else _pad(scores, shape, torch.finfo(scores.dtype).min if scores.is_floating_point() else 0)
        )
        return ops.compress(_pad(w, shape, 0), pattern, candidate, scores=padded_scores)

    sw = compress(layout or default_layout(w.dtype, pattern, out_features, in_features))
    if layout is not None or backend == "auto" or sw.layout == "packed":
        return sw
    chosen = dispatch.get_backend(backend)

    def runs(candidate: NMSparseWeight) -> bool:
        x = torch.zeros(1, candidate.in_features, dtype=w.dtype, device=w.device)
        return not dispatch.reasons(chosen, "sparse_mm", {"x": x, "sw": candidate, "bias": None})

    if runs(sw):
        return sw
    packed = compress("packed")
    return packed if runs(packed) else sw


def _check_float(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"SparseLinear holds float32, float16 or bfloat16 weights, got {dtype}: cast the layer "
            "first (e.g. linear.half()); int8 weights go through nxm.compress/nxm.sparse_mm"
        )


def _pad(t: torch.Tensor, shape, value) -> torch.Tensor:
    rows, cols = t.shape
    if (rows, cols) == tuple(shape):
        return t
    return F.pad(t, (0, shape[1] - cols, 0, shape[0] - rows), value=value)


def _checked_mask(mask, w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != w.shape:
        raise ValueError(f"mask must be a tensor of the weight's shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    groups = _pad(mask, (mask.shape[0], _round_up(mask.shape[1], pattern.m)), False).reshape(-1, pattern.m)
    too_many = groups.sum(-1) > pattern.n
    if too_many.any():
        raise ValueError(
            f"mask keeps more than {pattern.n} of {pattern.m} in {int(too_many.sum())} group(s): "
            f"it is not a {pattern} mask (make one with nxm.nm_mask)"
        )
    return mask

