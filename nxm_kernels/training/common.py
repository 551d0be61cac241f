"""What every sparsifier shares: the target Linears (:mod:`nxm_kernels.selection`, the same
rule as ``sparsify``), their marks, and the masked phase.

Each target is marked with the sparsifier's kind and pattern, so that ``nxm.sparsify(model)``
later converts exactly the layers trained sparse. Once masks are fixed (``finalize()``), they live
with the modules (:mod:`.masking`): the weights are exactly N:M after every optimizer step,
whatever the loop does (momentum, weight decay, no more ``step()`` calls, ``load_state_dict`` of
dense weights).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..pattern import PatternLike, as_pattern
from ..selection import Selector, mark, select_layers
from . import masking, sharding


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers, so names match the model's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def select_linears(model: nn.Module, pattern: PatternLike, include: Selector = None, exclude: Selector = None):
    """``(targets, skipped)`` of a sparsifier: :func:`nxm_kernels.selection.select_layers` on the
    unwrapped model, whole groups of m required; raises when nothing is selected."""
    model = unwrap(model)
    targets, skipped = select_layers(model, pattern, include, exclude, whole_groups=True)
    if not targets:
        raise ValueError(
            f"no nn.Linear layer to sparsify in {type(model).__name__} (skipped: {skipped or 'none found'}); "
            "check include/exclude"
        )
    return targets, skipped


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
        parents = {f"{p}.{c}" if p else c: parent for p, parent in unwrap(model).named_modules()
                   for c, _ in parent.named_children()}
        for name in list(self.targets):
            why = self._cannot_train(parents.get(name))
            if why is not None:
                del self.targets[name]
                self.skipped[name] = why
        if not self.targets:
            raise ValueError(f"{type(self).__name__} can train none of the selected layers: {self.skipped}")
        for name, module in self.targets.items():
            sharding.check_shards(name, module.weight, self.pattern)
        for module in self.targets.values():
            mark(module, self.pattern, self.kind)
        self.masks: dict[str, torch.Tensor] | None = None
        self.steps = 0

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
            pairs = [(sharding.local(m.weight.detach()), m.weight) for m in self.targets.values()]
            off = [(w - ops.project(w, self.pattern), weight) for w, weight in pairs]
            return {"primal": (sharding.sq_norm(off) / max(sharding.sq_norm(pairs), 1e-30)) ** 0.5}

    def finalize(self) -> "NMSparsifier":
        """Hard-prune W = project(W) and fix the masks for masked fine-tuning."""
        if not self.finalized:
            self._fix_masks({n: ops.nm_mask(sharding.local(m.weight.detach()), self.pattern)
                             for n, m in self.targets.items()})
        return self

    @property
    def finalized(self) -> bool:
        return self.masks is not None

    def remove(self) -> None:
        """Release the fixed masks and their hooks: the pattern is no longer enforced (the
        weights keep their values, the layers their marks)."""
        for module in self.targets.values():
            masking.release(module)

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
    def _cannot_train(self, parent: nn.Module | None) -> str | None:
        """Why a selected layer under ``parent`` cannot be trained by this method (None: it can)."""
        return None

    def _sparsify_step(self) -> None:
        pass

    def _zero(self) -> torch.Tensor:
        return sharding.local(next(iter(self.targets.values())).weight).new_zeros(())

    def _fix_masks(self, masks: dict) -> None:
        for name, module in self.targets.items():
            masking.fix_mask(module, masks[name])
        self.masks = {name: masking.mask_of(module) for name, module in self.targets.items()}

    def _apply_masks(self) -> None:
        for module in self.targets.values():
            masking.apply_mask(module)
