"""Calibration for one-shot pruning: feeding calibration inputs through a model block by block,
and the per-layer input statistics the pruning methods need.

Sequential calibration (as SparseGPT and Wanda do it): the inputs of the first block of the
model's repeated layers are captured once (a hook stops the forward there); each block then runs
on the outputs of the blocks before it, already pruned. Only one block's inputs and outputs are
held at a time, whatever the model's depth.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

# Statistics a method reads: the sum of x_j^2 per input feature (Wanda), or H = X^T X (SparseGPT,
# ADMM, and the reconstruction error of any method).
NORMS, HESSIAN = "norms", "hessian"


def model_call(batch: Any, device: torch.device) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one calibration input: a tensor, a tuple of positional arguments or a
    dict of keyword arguments (Hugging Face models), tensors moved to ``device``."""

    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, torch.Tensor):
        return (move(batch),), {}
    if isinstance(batch, (tuple, list)):
        return tuple(move(v) for v in batch), {}
    if isinstance(batch, dict):
        return (), {k: move(v) for k, v in batch.items()}
    raise TypeError(
        f"a calibration input must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(batch).__name__}"
    )


def no_cache(model: nn.Module, kwargs: dict) -> dict:
    """``use_cache=False`` for a model whose forward takes it (Hugging Face): a key/value cache
    would only cost memory during calibration, and blocks must not append to a shared one."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return {**kwargs, "use_cache": False}
    return kwargs


def find_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` holding the model's repeated blocks: the one that contains the most
    target Linears (ties: the outermost, e.g. the decoder layers over the experts inside each).
    None when no ModuleList contains a target."""
    target_ids = {id(m) for m in targets.values()}
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(id(m) in target_ids for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    return best


class _Stop(Exception):
    """Raised by the capture hook to end the forward at the first block."""


@dataclass
class BlockInputs:
    """What one block is called with, per calibration input: the hidden states, and the other
    arguments (attention mask, position embeddings, ...) exactly as the model passed them."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    context: list[tuple[tuple, dict, bool]] = field(default_factory=list)  # (other args, kwargs, by keyword)

    def call(self, block: nn.Module, index: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``block`` on input ``index`` (its hidden states replaced by ``hidden`` if given)."""
        hidden = self.hidden[index] if hidden is None else hidden
        args, kwargs, by_keyword = self.context[index]
        out = block(*args, **kwargs, hidden_states=hidden) if by_keyword else block(hidden, *args, **kwargs)
        # Blocks return the hidden states, or a tuple that starts with them (older HF layers).
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(model: nn.Module, first_block: nn.Module, calibration: Iterable, device) -> BlockInputs:
    """Run the model on each calibration input up to ``first_block`` and record its inputs."""
    captured = BlockInputs()

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if args:
            hidden, rest, by_keyword = args[0], tuple(args[1:]), False
        elif "hidden_states" in kwargs:
            hidden, rest, by_keyword = kwargs.pop("hidden_states"), (), True
        else:
            raise TypeError(
                f"the first block {type(module).__name__} was called without positional arguments or "
                "hidden_states=: pass include/exclude so that its Linears are pruned without block calibration"
            )
        captured.hidden.append(hidden)
        captured.context.append((rest, kwargs, by_keyword))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calibration:
            args, kwargs = model_call(batch, device)
            try:
                model(*args, **no_cache(model, kwargs))
            except _Stop:
                continue
            raise RuntimeError(
                f"the model's forward never called its block {type(first_block).__name__}: "
                "sequential calibration needs the blocks called in order by the model's forward"
            )
    finally:
        handle.remove()
    if not captured.hidden:
        raise ValueError("calibration is empty: give at least one model input")
    return captured


class InputStats:
    """Statistics of the inputs of some Linears, gathered by forward hooks while it is active.

    ``kind`` NORMS: ``norms[name]`` = sum over tokens of x_j^2; HESSIAN: ``hessian[name]`` =
    X^T X (its diagonal is the same sum). ``tokens[name]`` counts the rows of X. Linears fed the
    same input tensor (q, k and v) share one computation of it.
    """

    def __init__(self, layers: dict[str, nn.Linear], kind: str, dtype: torch.dtype = torch.float32):
        if kind not in (NORMS, HESSIAN):
            raise ValueError(f"kind must be {NORMS!r} or {HESSIAN!r}, got {kind!r}")
        self.kind, self.dtype = kind, dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {name: 0 for name in layers}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                contribution = self._last[1]
            else:
                rows = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
                contribution = rows.T @ rows if self.kind == HESSIAN else rows.pow(2).sum(0)
                self._last = (x, contribution)
            if name in self.sums:
                self.sums[name] += contribution
            else:
                self.sums[name] = contribution.clone()
            self.tokens[name] += x.numel() // x.shape[-1]

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        self._require(name, HESSIAN)
        return self.sums[name]

    def norms(self, name: str) -> torch.Tensor:
        """Sum of x_j^2 per input feature j."""
        self._require(name, None)
        return self.sums[name] if self.kind == NORMS else self.sums[name].diagonal()

    def _require(self, name: str, kind: str | None) -> None:
        if kind is not None and self.kind != kind:
            raise RuntimeError(f"statistics are {self.kind}, not {kind}")
        if name not in self.sums:
            raise RuntimeError(f"layer {name!r} was never called during calibration: it cannot be calibrated")

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], None

    def __enter__(self) -> "InputStats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
