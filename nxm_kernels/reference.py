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


def decompress(sw) -> torch.Tensor:
    return sw.layout.decompress(sw.values, sw.metadata, sw.shape, sw.pattern)


def _layout(layout):
    from .layouts import get_layout  # the layouts use the selection above: resolve at call time

    return get_layout(layout)


def sparse_mm(x: torch.Tensor, sw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ decompress(sw).T + bias``: fp32 accumulation for float types, exact int32 for int8."""
    w = decompress(sw)
    if x.dtype == torch.int8:
        # float64 holds every int8 x int8 dot product exactly for K < 2**38.
        y = x.to(torch.float64) @ w.to(torch.float64).T
        if bias is not None:
            y = y + bias.to(torch.float64)
        return y.to(torch.int32)
    y = x.to(torch.float32) @ w.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
