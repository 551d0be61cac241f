"""Pure-torch specification of every op, on any device: the ground truth the kernels match.

Selection (``nm_mask``, ``project``) lives here; each layout's compress and decompress live with the
layout (``nxm_kernels/layouts/``) and are reached through the layout object. Everything here is vectorised over rows and groups; the only Python loops run over the m
positions inside a group (at most 16). Inputs are assumed already checked by ``ops.py``.
"""

from __future__ import annotations

import torch

from .pattern import Pattern

# ---------------------------------------------------------------- selection

_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as a signed integer tensor: copying and gathering integers is much faster on
    CPU than on fp16/bf16, and the bits come through untouched."""
    return t.view(_BITS_VIEW[t.dtype]) if t.dtype in _BITS_VIEW else t


def magnitude_keys(w: torch.Tensor) -> torch.Tensor:
    """Integers ordered exactly as ``|w|``: for IEEE floats, the bits without the sign bit."""
    if w.dtype == torch.int8:
        return w.to(torch.int16).abs()  # abs(-128) overflows in int8
    bits = as_bits(w)
    return bits & torch.iinfo(bits.dtype).max


def selection_keys(w: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """What selection compares: ``|w|``, or ``scores`` in a dtype where comparison is exact."""
    if scores is None:
        return magnitude_keys(w)
    return scores if scores.dtype == torch.float64 else scores.to(torch.float32)


def nm_mask(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the n largest keys of each group of m along dim -1; ties go to the lower index.

    rank(i) = #{j : key_j > key_i} + #{j < i : key_j == key_i}; position i is kept iff rank < n.
    This is a strict total order, so exactly n positions per group are kept.
    """
    n, m = pattern.n, pattern.m
    keys = selection_keys(w, scores).reshape(-1, m)
    rank = [torch.zeros(keys.shape[0], dtype=torch.uint8, device=w.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = keys[:, j] > keys[:, i]  # on a tie, the lower index i wins
            rank[i] += j_wins.view(torch.uint8)
            rank[j] += j_wins.logical_not_().view(torch.uint8)
    return torch.stack([r < n for r in rank], dim=-1).reshape(w.shape)


def project(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection onto the pattern (for ``scores=None``), any kind. Dropped values are +0."""
    return torch.where(pattern.mask(w, scores), w, torch.zeros((), dtype=w.dtype, device=w.device))


def is_nm_sparse(z: torch.Tensor, pattern: Pattern) -> bool:
    """Every group of m along dim -1 holds at most n nonzeros."""
    nonzeros = (z.reshape(-1, pattern.m) != 0).sum(-1)
    return bool((nonzeros <= pattern.n).all())


def kept_indices(mask: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """``[rows, groups, n]`` positions of the kept values, ascending within each group."""
    n, m = pattern.n, pattern.m
    keep = mask.reshape(-1, m)
    # The s-th kept index is the number of positions whose running count of kept values is <= s.
    running = torch.zeros(keep.shape[0], dtype=torch.uint8, device=mask.device)
    idx = torch.zeros(keep.shape[0], n, dtype=torch.uint8, device=mask.device)
    slots = torch.arange(n, dtype=torch.uint8, device=mask.device)
    for i in range(m):
        running += keep[:, i]
        idx += running[:, None] <= slots
    return idx.long().reshape(mask.shape[0], mask.shape[-1] // m, n)


# ---------------------------------------------------------------- op entry points


def compress(w, pattern: Pattern, layout, scores=None):
    """(values, metadata) of ``w`` in ``layout`` (a Layout, or its name): the layout's own reference."""
    return _layout(layout).compress(w, pattern, scores)


def decompress(sw, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight in ``dtype`` (None: the weight's); a quantized one dequantized by its encoding."""
    return sw.encoding.decompress(sw, _layout_decompress, dtype)


def _layout_decompress(sw) -> torch.Tensor:
    return sw.layout.decompress(sw.values, sw.metadata, sw.shape, sw.pattern)


def _layout(layout):
    from .layouts import get_layout  # the layouts use the selection above: resolve at call time

    return get_layout(layout)


def sparse_mm(x: torch.Tensor, sw, bias: torch.Tensor | None = None, act_bits: int | None = None) -> torch.Tensor:
    """``x @ decompress(sw).T + bias``: fp32 accumulation for float types, exact int32 for int8.

    A quantized weight (W8A16, W4A16) is dequantized to fp32 (code * scale, rounded to fp32)
    inside the product. ``act_bits=8`` (W8A8) is :func:`sparse_mm_int`.
    """
    if act_bits is not None:
        return sparse_mm_int(x, sw, bias, act_bits)
    if x.dtype == torch.int8:
        w = decompress(sw)
        # float64 holds every int8 x int8 dot product exactly for K < 2**38.
        y = x.to(torch.float64) @ w.to(torch.float64).T
        if bias is not None:
            y = y + bias.to(torch.float64)
        return y.to(torch.int32)
    y = x.to(torch.float32) @ decompress(sw, torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


# ---------------------------------------------------------------- integer GEMM (W8A8)


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric quantization of ``x`` [M, K]: int8 codes and fp32 scales [M, 1],
    by the weights' rule (``scale = absmax(row) / qmax``, round half to even, a zero row: scale 0)."""
    from .encodings.integer import QMAX, quantize

    return quantize(x, QMAX[bits], None)


def sparse_mm_int(x: torch.Tensor, sw, bias: torch.Tensor | None, act_bits: int) -> torch.Tensor:
    """W8A8 (W4A8 for int4 codes): the integer product, exactly.

    With ``xq, sx = quantize_activations(x)``, the weight's codes ``q`` and scales ``s`` [N, G]
    (G groups of ``group_size`` input features; one group per row without one):

    - ``acc[i, n, j] = sum over k in group j of xq[i, k] * q[n, k]`` in int32 (exact);
    - ``y = 0``; for j = 0 .. G-1 in order: ``y = y + fp32(acc[.., j]) * s[n, j]`` (each product
      and each sum rounded to fp32, no fused multiply-add);
    - ``y = y * sx[i]``, then ``+ bias`` (fp32), then rounded to x's dtype.

    Every backend's integer path follows this order, so they agree bit for bit.
    """
    xq, sx = quantize_activations(x, act_bits)
    codes = sw.encoding.codes_weight(sw)
    q = _layout_decompress(codes).to(torch.float64)
    cols = sw.in_features
    group = sw.encoding.group_size or max(cols, 1)
    y = torch.zeros(x.shape[0], sw.out_features, dtype=torch.float32, device=x.device)
    for j in range(sw.scales.shape[1]):
        part = slice(j * group, (j + 1) * group)
        # float64 holds every partial sum exactly (|acc| < 127 * 127 * K < 2**53).
        acc = (xq[:, part].to(torch.float64) @ q[:, part].T).to(torch.int32)
        y = y + acc.to(torch.float32) * sw.scales[:, j]
    y = y * sx
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
