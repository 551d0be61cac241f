"""SparseGPT (Frantar & Alistarh, ICML 2023) for N:M patterns: prune a Linear's weight column by
column and let the columns not yet visited absorb each pruned weight's error (the OBS update).

With H = X^T X (dampened), the error of a weight change dW of one row is dW H dW^T. Visiting
columns left to right with the columns already visited frozen, removing column j's weight w_j
is compensated by the columns right of j at a cost w_j^2 / [(H_{j:,j:})^-1]_00. Both that
denominator and the compensating update are a row of U, the upper Cholesky factor of H^-1:
[(H_{j:,j:})^-1]_00 = U_jj^2 and the update is -(w_j / U_jj) U_{j,j:}. So one factorization
serves every column. The N:M mask of a group of m columns is chosen when the sweep reaches the
group, by the score w^2 / U_jj^2 of the (already updated) weights: keep the n costliest to prune.
Updates are lazy: within a block of columns the sweep updates only that block; the columns to its
right get the block's accumulated errors in one matrix product.

Joint quantization (``weight_bits``/``group_size``, GPTQ-style): each column's kept weights are
rounded onto the grid as the sweep reaches it, and the rounding error joins the pruning error in
the OBS update. A group's scale follows the package's rule (absmax of the kept values / qmax, fp32)
applied when the sweep reaches the group's first column, to its weights as updated so far, masked
by the SparseGPT score (per-row scales: the whole row, before the sweep). The lazy blocks are
rounded to whole quantization groups, so a group's weights are up to date when its scale is set.
With ``mask=`` given (ADMM's), the sweep keeps that mask and only quantizes.
The final weights' own absmax can end below that scale's grid point (later updates moved it):
``prune`` then applies ``fake_quant`` once more, which regrids such a group onto its finer scale
(an extra error of at most half that step).
"""

from __future__ import annotations

import torch

from .. import ops
from ..encodings import from_bits
from ..encodings.integer import quantize
from ..pattern import Pattern

DAMP = 0.01  # fraction of H's mean diagonal added to the diagonal: the reference's default
BLOCK_SIZE = 128  # columns per lazy block: the reference's default; rounded down to whole groups


def group_width(pattern) -> int:
    """Columns of one mask group: m of a row n:m pattern; other kinds are refused."""
    if not isinstance(pattern, Pattern):
        raise ValueError(
            f"sparsegpt chooses its mask one group of columns at a time and knows the row n:m kind only, "
            f"not {pattern!r}: use the admm or wanda method for this pattern"
        )
    return pattern.m


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of (H + damp * mean(diag H) I)^-1, with the dead
    inputs (H_jj == 0: a feature that is always zero) given H_jj = 1 so that H stays invertible."""
    h = hessian.clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError(
            f"H + {damp} * mean(diag H) I is not positive definite (in {h.dtype}): raise damp, "
            "or give more calibration tokens than input features"
        )
    inverse_factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info):
        raise ValueError(f"the inverse of the dampened H is not positive definite in {h.dtype}: raise damp")
    return inverse_factor, dead


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    weight_bits: int | None = None,
    group_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pruned weight (in H's dtype): ``weight`` [out, in] made ``pattern``-sparse with the
    OBS update, ``hessian`` = X^T X [in, in] of the layer's calibration inputs. ``weight_bits``
    (8 or 4) and ``group_size``: kept weights rounded onto that grid in the sweep. ``mask``: bool [out, in], the kept weights
    (any pattern kind), instead of choosing them."""
    group = group_width(pattern) if mask is None else 1
    encoding = from_bits(weight_bits, group_size)
    encoding.check(weight.dtype, weight.shape, pattern, None)
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise ValueError(f"damp must be a number >= 0 (a fraction of H's mean diagonal), got {damp!r}")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(
            f"hessian must be [{columns}, {columns}] for a weight {tuple(weight.shape)}, got {tuple(hessian.shape)}"
        )
    u, dead = inverse_hessian_factor(hessian, damp)
    # Transposed, [in, out]: the sweep reads and updates whole columns of W, contiguous here.
    wt = weight.to(hessian.dtype).T.contiguous()
    wt[dead] = 0
    block = max(group, block_size // group * group)
    if encoding.quantized and group_size is not None:  # a quantization group never straddles two blocks
        block = max(group_size, block // group_size * group_size)
    if encoding.quantized and group_size is None:  # one scale per row, set before the sweep
        scales = _scales(wt, u.diagonal(), pattern, encoding.qmax, None if mask is None else mask.T)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block, u_block = wt[start:end], u[start:end, start:end]
        errors = torch.empty_like(w_block)
        for i in range(end - start):
            if encoding.quantized and group_size is not None and i % group_size == 0:
                scales = _scales(w_block[i : i + group_size], u_block.diagonal()[i : i + group_size], pattern,
                                 encoding.qmax, None if mask is None else mask.T[start + i : start + i + group_size])
            if mask is not None:
                pruned = ~mask[:, start + i : start + i + 1].T
            elif i % group == 0:
                values = w_block[i : i + group].T
                scores = values.pow(2) / u_block.diagonal()[i : i + group].pow(2)
                pruned = ~ops.nm_mask(values.contiguous(), pattern, scores=scores.contiguous()).T
            column = w_block[i]
            kept = _round(column, scales, encoding.qmax) if encoding.quantized else column
            target = kept.masked_fill(pruned[i % group], 0)
            torch.sub(column, target, out=errors[i]).div_(u_block[i, i])
            w_block[i:].addr_(u_block[i, i:], errors[i], alpha=-1)
            column.copy_(target)  # exactly zero or on the grid, whatever the rounding of the update
        wt[end:].addmm_(u[start:end, end:].T, errors, alpha=-1)
    return wt.T.contiguous()


def _scales(wt: torch.Tensor, diagonal: torch.Tensor, pattern: Pattern, qmax: int, kept_t=None) -> torch.Tensor:
    """[out] fp32 scales of the columns ``wt`` [cols, out] by the package's rule, over the weights
    ``kept_t`` [cols, out] keeps, by default those the SparseGPT score would keep now
    (``diagonal``: U_jj of those columns)."""
    if kept_t is None:
        scores = (wt.pow(2) / diagonal[:, None].pow(2)).T.contiguous()
        kept_t = ops.nm_mask(wt.T.contiguous(), pattern, scores=scores).T
    return quantize((wt * kept_t).T, qmax, None)[1][:, 0]


def _round(column: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """``column`` [out] on the grid of ``scales``, dequantized as the encoding does (fp32 product)."""
    safe = torch.where(scales > 0, scales, 1.0).to(torch.float64)
    codes = torch.round(column.to(torch.float64) / safe).clamp_(-qmax, qmax)
    return (codes.to(torch.float32) * scales).to(column.dtype)
