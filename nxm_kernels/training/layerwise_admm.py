"""Layer-wise ADMM pruning (Boža, "Fast and Effective Weight Update for Pruned Large Language
Models", arXiv 2401.02938): the one-shot form of the package's ADMM split, for one Linear.

Minimise ||X W0^T - X W^T||^2 subject to W in the pattern, with H = X^T X. Split W = Z, Z in the
pattern, scaled dual U:

- Z-step: Z = (W + U) restricted to a mask chosen on |W + U| (the projection onto the pattern,
  gradually, see below);
- U-step: U = U + W - Z;
- W-step: the exact minimiser of the objective + rho/2 ||W - Z + U||^2, a linear solve with
  (H + rho I), factored once (Cholesky) before the first iteration.

Coordinates are scaled by the input feature norms d_j = sqrt(H_jj): W_s = W diag(d),
H_s = diag(d)^-1 H diag(d)^-1, whose diagonal is 1. There |W_s| is Wanda's score |w_ij| ||x_j||,
so the first mask is Wanda's, and one rho suits every layer whatever the scale of its inputs.

Gradual mask: over the first ``ramp`` iterations the pruned share grows as
share * (1 - (1 - (t + 1) / ramp)^3) (cubic: quick at first, when most pruned weights are clearly
small, then slower as the choices get harder), where share = 1 - n/m is the pattern's. At every
ramp iteration the pattern's winners on |W + U| are kept, and of the other entries only the
smallest are pruned, as many as the schedule says, so the last ramp iteration prunes all of them:
the mask ends exactly on the pattern. After the ramp the mask is fixed and the remaining
iterations refit the kept weights to it.

Quantization (``weight_bits``/``group_size``): after the iterations, with the mask fixed, the
kept weights are rounded onto the grid by SparseGPT's sweep (GPTQ: each column's rounding error
is absorbed by the kept weights of the columns not yet rounded). Rounding inside the Z-step
instead (Z / d onto the grid in the original coordinates, then scaled back) was tried and not
kept: on a 32->16 layer with correlated inputs at 2:4 int4, held-out relative error 0.14 against
0.034 for rounding the ADMM result once, and it diverged with 40 iterations (1.2) or rho = 3 (5.0):
with a fixed rho the dual collects the int4 rounding residuals and the iteration does not settle.
At int8 both are level (0.0006 against 0.0005).

Defaults (those of the paper's code, in scaled coordinates where diag H_s = 1):

- ``damp=0.1``: 0.1 * mean(diag H_s) is added to H_s's diagonal (equivalently 10% of each H_jj
  in the original coordinates); it keeps the solve well conditioned and pulls weights the
  calibration hardly constrains towards their dense values.
- ``rho=1.0``: as large as the (unit) diagonal, so each W-step moves W well towards Z - U
  without stalling the fit; with one factorization rho stays fixed.
- ``iterations=20``, ``ramp=15``: 15 iterations to choose the mask, 5 to refit to it.

Measured on the 7 Linears of SmolLM2-135M's block 6 at 2:4 (H from 24 x 256 tokens of one play,
relative output error on 8 x 256 tokens of another; sum over the layers): SparseGPT 0.333,
these defaults 0.283. Tried and not kept: rho 0.3 (0.333) or 3 (0.290); damp 0.01 (0.292) or
0.03 (0.290); 40 iterations with a 30-iteration ramp (0.282, twice the time); rho growing
geometrically during the iterations as the paper's code does (0.1 x 1.3^t, 0.3 x 1.15^t,
0.5 x 1.1^t, refactored at each change: 1-2% worse on the six 576-wide layers); an exact
least-squares refit of the kept weights after the last iteration (no gain: the 5 iterations after
the ramp have converged; with a damp of 0.01 instead, 2% worse on held-out text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..encodings import from_bits
from .sparsegpt import sparsegpt

ITERATIONS = 20
RAMP = 15
RHO = 1.0
DAMP = 0.1


@dataclass
class ADMMResult:
    weight: torch.Tensor  # [out, in], on the pattern, in H's dtype
    mask: torch.Tensor  # bool, the kept entries
    # ||W - Z|| / ||W|| at the end (scaled coordinates): how far the last W-step was from the pattern
    primal_residual: float


def ramp_share(t: int, ramp: int, share: float) -> float:
    """The pruned share at ramp iteration ``t`` (0-based): cubic from share * (1 - (1 - 1/ramp)^3)
    up to ``share`` at t = ramp - 1."""
    return share * (1.0 - (1.0 - (t + 1) / ramp) ** 3)


def ramp_mask(v: torch.Tensor, winners: torch.Tensor, pruned_share: float) -> torch.Tensor:
    """Keep ``winners`` and, of the other entries, all but the smallest |v| so that about
    ``pruned_share`` of all entries is pruned (exactly all non-winners when it reaches their share;
    ties at the threshold are pruned together)."""
    k = min(int(round(pruned_share * v.numel())), v.numel() - int(winners.sum()))
    if k <= 0:
        return torch.ones_like(winners)
    scores = v.abs().masked_fill(winners, float("inf"))
    threshold = scores.flatten().kthvalue(k).values
    return scores > threshold


def _check_options(iterations, rho, ramp, damp, mask) -> None:
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if not (isinstance(ramp, int) and 0 <= ramp <= iterations):
        raise ValueError(f"ramp must be an int in [0, iterations={iterations}], got {ramp!r}")
    if not (isinstance(rho, (int, float)) and rho > 0):
        raise ValueError(f"rho must be a positive number (relative to the unit diagonal of the scaled H), got {rho!r}")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise ValueError(f"damp must be a number >= 0 (a fraction of the scaled H's mean diagonal), got {damp!r}")
    if mask is not None and ramp:
        raise ValueError("a given mask is fixed: pass ramp=0 with mask=")


def admm(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern,
    iterations: int = ITERATIONS,
    rho: float = RHO,
    ramp: int = RAMP,
    damp: float = DAMP,
    mask: torch.Tensor | None = None,
    weight_bits: int | None = None,
    group_size: int | None = None,
) -> ADMMResult:
    """Prune ``weight`` [out, in] to ``pattern`` by layer-wise ADMM with ``hessian`` = X^T X.

    ``ramp=0``: the mask is chosen once, on the dense scaled weights (Wanda's mask), or given as
    ``mask`` (bool [out, in], on the pattern), and held fixed: the iterations then converge to the
    least-squares fit of the kept weights. ``weight_bits`` (8 or 4), ``group_size``: the result
    rounded onto that grid (see the module's notes).
    """
    _check_options(iterations, rho, ramp, damp, mask)
    encoding = from_bits(weight_bits, group_size)
    encoding.check(weight.dtype, weight.shape, pattern, None)
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(
            f"hessian must be [{columns}, {columns}] for a weight {tuple(weight.shape)}, got {tuple(hessian.shape)}"
        )
    norms = hessian.diagonal().sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # dead inputs: any scale
    scaled_h = hessian / norms[:, None] / norms[None, :]
    scaled_h.diagonal().add_(damp * scaled_h.diagonal().mean())
    w0 = weight.to(hessian.dtype) * norms
    target = w0 @ scaled_h  # the W-step's right-hand side without the rho term
    scaled_h.diagonal().add_(rho)
    factor, info = torch.linalg.cholesky_ex(scaled_h)
    if int(info):
        raise ValueError(f"scaled H + (damp + rho) I is not positive definite in {hessian.dtype}: raise damp or rho")
    del scaled_h

    if mask is not None:
        if mask.shape != weight.shape or mask.dtype != torch.bool or not ops.is_nm_sparse(mask, pattern):
            raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)} on {pattern}")
        mask = mask.to(weight.device)

    w, u = w0, torch.zeros_like(w0)
    for t in range(iterations):
        v = w + u
        if t < ramp:
            winners = ops.nm_mask(v, pattern, scores=v.square())  # the Euclidean projection, for every kind
            share = 1.0 - float(winners.sum()) / winners.numel()
            mask = ramp_mask(v, winners, ramp_share(t, ramp, share))
        elif mask is None:
            mask = ops.nm_mask(v, pattern, scores=v.square())
        z = v * mask
        u = v - z  # u + w - z
        w = torch.cholesky_solve((target + rho * (z - u)).T, factor).T
    z = (w + u) * mask
    primal = float((w - z).norm() / w.norm().clamp_min(1e-30))
    weight = z / norms
    if encoding.quantized:
        weight = sparsegpt(weight, hessian, pattern, weight_bits=weight_bits, group_size=group_size, mask=mask)
    return ADMMResult(weight, mask, primal)
