"""Quantization-aware N:M training: the targeted Linears' forward runs through ``nxm.fake_quant``.

A sparsifier given ``weight_bits=`` (and ``group_size=``, ``act_bits=``), or a plan, replaces each
quantized target's ``forward`` (on the instance; parameters and ``state_dict`` keys unchanged) by

    y = F.linear(fq_act(x), fake_quant(W, pattern, weight_bits, group_size), bias)

with straight-through gradients: W trains in float, the forward sees exactly the weight
``sparsify`` will store (``decompress(compress(W, bits=...))``, bit for bit), and ``fq_act`` is
the per-token int8 rounding W8A8 inference applies (``act_bits=8``).

Before ADMM's ``finalize()`` the weight is dense by design (ADMM pulls it towards N:M through Z),
so its forward quantizes the dense weight: every value is rounded to the grid of its group,
whose scale is that of the N:M weight too (a group's largest |w| is always kept). From
``finalize()`` on, and throughout for the other methods, the forward selects and quantizes.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..encodings import from_bits
from ..plan import LayerConfig
from ..reference import quantize_activations

STATE = "_nxm_qat"  # module attribute: (LayerConfig, whether the forward selects N:M)


class _FakeQuantDense(torch.autograd.Function):
    """Every value rounded to its group's grid (no selection); straight-through gradient."""

    @staticmethod
    def forward(ctx, w, encoding):
        codes, scales = encoding.quantize(w, torch.ones_like(w, dtype=torch.bool))
        return encoding.dequantize(codes, scales, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _FakeQuantActivations(torch.autograd.Function):
    """Per-token symmetric rounding, as W8A8 inference quantizes x; straight-through gradient."""

    @staticmethod
    def forward(ctx, x, bits):
        flat = x.reshape(-1, x.shape[-1])
        codes, scales = quantize_activations(flat, bits)
        return (codes.to(torch.float32) * scales).to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantized_weight(weight: torch.Tensor, config: LayerConfig, sparse: bool) -> torch.Tensor:
    """What the forward multiplies by: ``fake_quant(weight)``, or the dense rounding."""
    if sparse:
        return ops.fake_quant(weight, config.pattern, config.weight_bits, config.group_size)
    return _FakeQuantDense.apply(weight, from_bits(config.weight_bits, config.group_size))


def linear(module: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through ``module``'s quantization, if it has one."""
    state = module.__dict__.get(STATE)
    if state is not None:
        config, sparse = state
        weight = quantized_weight(weight, config, sparse)
        if config.act_bits is not None:
            x = _FakeQuantActivations.apply(x, config.act_bits)
    return F.linear(x, weight, module.bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(self, x, self.weight)


def install(module: nn.Linear, config: LayerConfig, sparse: bool) -> None:
    """Train ``module`` through ``config``'s quantization; ``sparse``: select N:M in the forward
    too. A forward the caller set itself (SR-STE's) is kept: it calls :func:`linear`."""
    setattr(module, STATE, (config, sparse))
    if "forward" not in module.__dict__:
        module.forward = types.MethodType(_forward, module)


def remove(module: nn.Linear) -> None:
    """Back to the plain forward."""
    installed = getattr(module.__dict__.get("forward"), "__func__", None) is _forward
    if module.__dict__.pop(STATE, None) is not None and installed:
        del module.forward


@torch.no_grad()
def round_to_grid(module: nn.Linear, config: LayerConfig) -> None:
    """``W = fake_quant(W)``: the weight becomes exactly what ``sparsify`` stores."""
    from .sharding import local

    w = local(module.weight)
    w.copy_(ops.fake_quant(w, config.pattern, config.weight_bits, config.group_size))
