"""What every sparsifier shares: choosing the target Linears, and the masked phase.

Once masks are fixed, the pattern holds exactly whatever the optimizer does: gradients are masked
by a hook on each weight (so momentum and Adam statistics of pruned entries stop growing), and
``step()`` re-applies the mask to the weights after every optimizer step (weight decay, momentum
left from before the masks were fixed, or any other update cannot revive a pruned weight).
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .. import ops
from ..pattern import PatternLike, as_pattern

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

# Layers that are not "the encoder/blocks": embeddings, poolers and task heads stay dense, as in
# NxMTransformer, apex ASP and SR-STE. Pass ``exclude=()`` to target them too.
DEFAULT_EXCLUDE = ("*embed*", "*pooler*", "*classifier*", "*head*", "*score*")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers, so names match the model's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _matcher(selector: Selector, what: str) -> Callable[[str, nn.Module], bool]:
    if callable(selector):
        return selector
    globs = (selector,) if isinstance(selector, str) else tuple(selector)
    if not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{what} must be a name glob, a list of globs or a predicate(name, module), got {selector!r}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_linears(model: nn.Module, pattern: PatternLike, include: Selector = None, exclude: Selector = None):
    """``(targets, skipped)``: the ``nn.Linear`` layers to sparsify by name, and why others are not.

    ``include`` / ``exclude`` are name globs (``"encoder.layer.*.intermediate.dense"``) or a
    predicate ``(name, module) -> bool``. By default every Linear is a target except those matching
    :data:`DEFAULT_EXCLUDE`; a default target whose ``in_features`` is not a multiple of m is
    skipped, but one named by ``include`` raises, since the caller asked for it.
    """
    pattern = as_pattern(pattern)
    model = unwrap(model)
    included = _matcher(include, "include") if include is not None else (lambda name, module: True)
    excluded = _matcher(DEFAULT_EXCLUDE if exclude is None else exclude, "exclude")
    targets: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not included(name, module):
            skipped[name] = "not matched by include"
        elif excluded(name, module):
            skipped[name] = "matched by exclude" + (" (default: embeddings, poolers, heads)" if exclude is None else "")
        elif module.in_features % pattern.m:
            reason = f"in_features {module.in_features} is not a multiple of m={pattern.m}"
            if include is not None:
                raise ValueError(f"layer {name!r} cannot be sparsified to {pattern}: {reason}; exclude it")
            skipped[name] = reason
        else:
            targets[name] = module
    if not targets:
        raise ValueError(
            f"no nn.Linear layer to sparsify in {type(model).__name__} (skipped: {skipped or 'none found'}); "
            "check include/exclude"
        )
    return targets, skipped


def _norm_sq(tensors) -> float:
    return float(sum(t.float().pow(2).sum() for t in tensors))


class NMSparsifier:
    """Base of the sparsifiers: one training loop drives all of them.

    ::

        loss = task_loss + sparsifier.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
        sparsifier.step()
        ...
        sparsifier.finalize()   # then keep training: the masks stay fixed
    """

    kind = "base"

    def __init__(
        self, model: nn.Module, pattern: PatternLike = "2:4", include: Selector = None, exclude: Selector = None
    ):
        self.pattern = as_pattern(pattern)
        self.targets, self.skipped = select_linears(model, self.pattern, include, exclude)
        self.masks: dict[str, torch.Tensor] | None = None
        self.steps = 0
        self._grad_hooks = []

    # -- the loop -------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """Term to add to the task loss (zero unless the method has one)."""
        return self._zero()

    def step(self) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        if self.finalized:
            self._apply_masks()
        else:
            self._sparsify_step()

    def residual(self) -> dict:
        """Distance of the weights from the N:M set, relative: ||W - project(W)|| / ||W||."""
        with torch.no_grad():
            weights = [m.weight for m in self.targets.values()]
            off = [w - ops.project(w.detach(), self.pattern) for w in weights]
            return {"primal": (_norm_sq(off) / max(_norm_sq(weights), 1e-30)) ** 0.5}

    def finalize(self) -> "NMSparsifier":
        """Hard-prune W = project(W) and fix the masks for masked fine-tuning."""
        if not self.finalized:
            self._fix_masks({n: ops.nm_mask(m.weight.detach(), self.pattern) for n, m in self.targets.items()})
        return self

    @property
    def finalized(self) -> bool:
        return self.masks is not None

    def remove(self) -> None:
        """Detach the gradient hooks (the weights keep their values)."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "pattern": str(self.pattern),
            "targets": list(self.targets),
            "steps": self.steps,
            "masks": None if self.masks is None else {n: m.clone() for n, m in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("pattern") != str(self.pattern):
            raise ValueError(
                f"state is for {state.get('kind')} {state.get('pattern')}, this is {self.kind} {self.pattern}: "
                "load it into the sparsifier that saved it"
            )
        if state["targets"] != list(self.targets):
            raise ValueError(
                f"state targets {state['targets']} differ from this sparsifier's {list(self.targets)}: "
                "build it on the same model with the same include/exclude"
            )
        self.steps = int(state["steps"])
        if state["masks"] is not None:
            self.remove()
            self._fix_masks({n: state["masks"][n].to(m.weight.device) for n, m in self.targets.items()})

    # -- helpers --------------------------------------------------------------------------------
    def _sparsify_step(self) -> None:
        pass

    def _zero(self) -> torch.Tensor:
        return next(iter(self.targets.values())).weight.new_zeros(())

    def _fix_masks(self, masks: dict) -> None:
        self.masks = masks
        for name, module in self.targets.items():
            mask = masks[name]
            self._grad_hooks.append(module.weight.register_hook(lambda g, mask=mask: g * mask))
        self._apply_masks()

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for name, module in self.targets.items():
                module.weight.mul_(self.masks[name])
