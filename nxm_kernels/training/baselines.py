"""The baselines ADMM is measured against, driven by the same loop.

- :class:`MagnitudePruner`: one-shot magnitude prune, then masked fine-tuning (apex ASP's recipe).
- :class:`SRSTESparsifier`: SR-STE (Zhou et al., ICLR 2021): the forward pass uses the projected
  weight, the backward pass goes straight through to the dense weight, plus the sparse-refined
  decay ``decay * (1 - mask) * W`` on the pruned entries so the mask settles.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .. import ops
from ..pattern import Pattern, PatternLike
from . import qat
from .common import NMSparsifier, Selector


class MagnitudePruner(NMSparsifier):
    """Prunes to the n largest |w| of every m at construction; the masks stay fixed after that."""

    kind = "magnitude"

    def __init__(
        self, model: nn.Module, pattern: PatternLike = "2:4", include: Selector = None, exclude: Selector = None,
        **quantization,
    ):
        super().__init__(model, pattern, include, exclude, **quantization)
        self.finalize()


class _SparseRefinedSTE(torch.autograd.Function):
    """Forward: W * mask (mask = n largest |W| per group). Backward: g + decay * (1 - mask) * W."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, pattern: Pattern, decay: float):
        mask = ops.nm_mask(weight.detach(), pattern)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight * ~mask, None, None


def _srste_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return qat.linear(self, x, _SparseRefinedSTE.apply(self.weight, self._nxm_pattern, self._nxm_decay))


class SRSTESparsifier(NMSparsifier):
    """SR-STE on the targeted Linears until ``finalize()``; masked fine-tuning after it.

    The targeted modules' ``forward`` is replaced (on the instance) by one that multiplies by the
    projected weight; parameters and their names are untouched, so optimizers, DDP and
    ``state_dict`` see the same model. ``finalize()`` restores the original ``forward``.
    ``decay`` is the paper's lambda_W (2e-4); it is added once per forward pass.
    """

    kind = "srste"

    def __init__(
        self,
        model: nn.Module,
        pattern: PatternLike = "2:4",
        decay: float = 2e-4,
        include: Selector = None,
        exclude: Selector = None,
        **quantization,
    ):
        super().__init__(model, pattern, include, exclude, **quantization)
        if not decay >= 0:
            raise ValueError(f"decay must be >= 0, got {decay!r}")
        self.decay = float(decay)
        for name, module in self.targets.items():
            module._nxm_pattern, module._nxm_decay = self.configs[name].pattern, self.decay
            module.forward = types.MethodType(_srste_forward, module)

    def _cannot_train(self, parent: nn.Module | None) -> str | None:
        if isinstance(parent, nn.MultiheadAttention):
            return (
                "its MultiheadAttention reads out_proj.weight directly, so SR-STE's projected forward would "
                "be bypassed: train it with ADMMSparsifier or MagnitudePruner, or exclude it"
            )
        return None

    def finalize(self) -> "SRSTESparsifier":
        self._restore_forward()
        return super().finalize()

    def remove(self) -> None:
        self._restore_forward()
        super().remove()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.finalized:
            self._restore_forward()

    def _restore_forward(self) -> None:
        for module in self.targets.values():
            if getattr(module.__dict__.get("forward"), "__func__", None) is _srste_forward:
                del module.forward, module._nxm_pattern, module._nxm_decay
