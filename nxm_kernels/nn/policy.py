"""Layer policy of ``SparseLinear``: which layout a layer gets, the shape it is padded to, and how
a dense layer weight becomes a compressed one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch, ops
from ..encodings import from_bits
from ..layouts import BLOCK, CUTLASS, PACKED, Layout, NMSparseWeight, get_layout, registered_layouts
from ..layouts.base import round_up as _round_up
from ..pattern import Pattern

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The layouts that hold any n:m (packed) or block kind (block), whatever the shape.
GENERAL_LAYOUTS = (PACKED, BLOCK)
# The layouts default_layout tries, in order, by device type. On CPU the native GEMM reads the
# general ones (cutlass only the reference does). Elsewhere the Sparse Tensor Core layout first where
# it fits as is (on a GPU cuSPARSELt's buffer is made from any stored layout, see
# SparseLinear.backend_form), then the general ones.
DEFAULT_LAYOUTS = {"cpu": GENERAL_LAYOUTS}
DEFAULT_LAYOUTS_ELSEWHERE = (CUTLASS, *GENERAL_LAYOUTS)


def stored_layouts() -> tuple[Layout, ...]:
    """What a SparseLinear stores (and checkpoints save). The others (``Layout.stored`` False, such
    as the cusparselt buffer) are backend forms made on the device from these and never stored."""
    return tuple(layout for layout in registered_layouts() if layout.stored)


def derived_layouts() -> tuple[Layout, ...]:
    return tuple(layout for layout in registered_layouts() if not layout.stored)


# The names of the built-in stored layouts (for code written before Layout.stored).
STORED_LAYOUTS = tuple(layout.name for layout in stored_layouts())


def default_layout(dtype: torch.dtype, pattern: Pattern, out_features: int, in_features: int,
                   device: torch.device | str | None = None) -> str:
    """The layout ``SparseLinear`` picks when none is given, for a layer on ``device`` (None: a GPU's
    choice).

    On CPU ``packed`` (``block`` for block kinds): what the native CPU GEMM reads. Elsewhere
    ``cutlass`` (the Sparse Tensor Core layout) when it holds this dtype and pattern (2:4 for
    fp16/bf16, 1:2 for fp32) and the shape already fits its multiples, so no padding is spent
    just to reach it; otherwise ``packed``.
    """
    device_type = None if device is None else torch.device(device).type
    for layout in DEFAULT_LAYOUTS.get(device_type, DEFAULT_LAYOUTS_ELSEWHERE):
        if not layout.not_supported_reasons(dtype, (out_features, in_features), pattern):
            return layout.name
    # A shape that needs padding: the first general layout that holds the pattern's kind.
    return next(layout.name for layout in GENERAL_LAYOUTS if not layout.kind_reasons(pattern))


def padded_shape(out_features: int, in_features: int, pattern: Pattern, layout: str | Layout, dtype: torch.dtype):
    """The weight shape ``layout`` holds for a layer of this size (``Layout.padded_shape``): e.g.
    in_features padded to whole groups of m (``packed``), or rows and columns to the layout's
    multiples (``cutlass``, and the derived ``cusparselt``). Padding is zeros, never selected over
    a real value."""
    return get_layout(layout).padded_shape(out_features, in_features, pattern, dtype)


def _sparse_weight(values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern, layout,
                   **more) -> NMSparseWeight:
    """Rebuild the (trusted) compressed weight from a module's buffers (``more``: W^T's, see NMSparseWeight)."""
    return NMSparseWeight(values, metadata, tuple(shape), pattern, layout, check_metadata=False, **more)


def _backend_arg(backend: str) -> str | None:
    # "auto" defers to dispatch's default, so NXM_BACKEND applies to modules built with "auto".
    return None if backend == "auto" else backend


def _compress_layer(w: torch.Tensor, pattern: Pattern, layout: str | None, scores, backend: str,
                    bits: int | None = None, group_size: int | None = None) -> NMSparseWeight:
    """Pad ``w`` [out, in] (and ``scores``) to the layout's shape and compress it (``bits``,
    ``group_size``: quantized, as ``nxm.compress``).

    ``layout=None``: :func:`default_layout` (``packed`` for a quantized weight: it holds int8 and
    int4, and the CPU GEMM reads it), unless an explicit ``backend`` cannot run ``sparse_mm`` on
    that layout but can on ``packed`` (e.g. a GEMM that reads only ``packed``).
    """
    element_dtype = from_bits(bits, group_size).element_dtype(w.dtype)
    _check_float(w.dtype)
    out_features, in_features = w.shape
    if backend != "auto":
        dispatch.get_backend(backend)  # an unknown name fails here, not at the first forward
    if layout is not None:
        layout = get_layout(layout)
        _check_stored(layout)

    def compress(candidate) -> NMSparseWeight:
        candidate = get_layout(candidate)
        shape = candidate.padded_shape(out_features, in_features, pattern, element_dtype)
        candidate.check(element_dtype, shape, pattern)
        # Padded scores sit below every real score, so a padded position is never kept over a real one.
        padded_scores = (
            None
            if scores is None
            else _pad(scores, shape, torch.finfo(scores.dtype).min if scores.is_floating_point() else 0)
        )
        return ops.compress(_pad(w, shape, 0), pattern, candidate, scores=padded_scores, bits=bits,
                            group_size=group_size)

    sw = compress(layout or (PACKED if bits else default_layout(w.dtype, pattern, out_features, in_features, w.device)))
    if layout is not None or backend == "auto" or sw.layout is PACKED:
        return sw
    chosen = dispatch.get_backend(backend)

    def runs(candidate: NMSparseWeight) -> bool:
        x = torch.zeros(1, candidate.in_features, dtype=w.dtype, device=w.device)
        return not dispatch.reasons(chosen, "sparse_mm", {"x": x, "sw": candidate, "bias": None})

    if runs(sw):
        return sw
    packed = compress(PACKED)
    return packed if runs(packed) else sw


def _check_stored(layout: Layout) -> None:
    if not layout.stored:
        names = " or ".join(repr(stored.name) for stored in stored_layouts())
        raise ValueError(
            f"SparseLinear stores layout {names} (or None: automatic), not {layout.name!r}; "
            "backend-specific forms are made from these on the device"
        )


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
    rows, cols = pattern.block
    if not pattern.is_valid(_pad(mask, (_round_up(mask.shape[0], rows), _round_up(mask.shape[1], cols)), False)):
        raise ValueError(
            f"mask keeps more than pattern {pattern} allows in some {rows}x{cols} block: "
            f"it is not a {pattern} mask (make one with nxm.nm_mask)"
        )
    return mask

