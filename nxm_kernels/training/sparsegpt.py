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
"""

from __future__ import annotations

import torch

from .. import ops
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
) -> torch.Tensor:
    """The pruned weight (in H's dtype): ``weight`` [out, in] made ``pattern``-sparse with the
    OBS update, ``hessian`` = X^T X [in, in] of the layer's calibration inputs."""
    group = group_width(pattern)
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
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block, u_block = wt[start:end], u[start:end, start:end]
        errors = torch.empty_like(w_block)
        for i in range(end - start):
            if i % group == 0:
                values = w_block[i : i + group].T
                scores = values.pow(2) / u_block.diagonal()[i : i + group].pow(2)
                pruned = ~ops.nm_mask(values.contiguous(), pattern, scores=scores.contiguous()).T
            column = w_block[i]
            torch.mul(column, pruned[i % group], out=errors[i]).div_(u_block[i, i])
            w_block[i:].addr_(u_block[i, i:], errors[i], alpha=-1)
            column.masked_fill_(pruned[i % group], 0)  # exactly zero, whatever the rounding
        wt[end:].addmm_(u[start:end, end:].T, errors, alpha=-1)
    return wt.T.contiguous()
