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
from ..encodings import from_bits
from ..pattern import PatternLike, as_pattern
from ..plan import LayerConfig, PlanLike, load_plan
from ..selection import Selector, mark, select_layers
from . import masking, qat, sharding


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

    Quantization-aware training (:mod:`.qat`): ``weight_bits=8`` or ``4`` (``group_size=`` input
    features per scale, ``act_bits=8`` for int8 activations) trains every target through
    ``nxm.fake_quant``; ``finalize()`` leaves weights that ``sparsify`` stores exactly. ``plan=``
    (:mod:`nxm_kernels.plan`: a JSON path or a mapping) gives each layer it names its own pattern
    and encoding instead of ``pattern``/``weight_bits``/...; its dense layers are not targets.
    ``configs`` holds each target's :class:`~nxm_kernels.plan.LayerConfig`.
    """

    kind = "base"

    def __init__(
        self, model: nn.Module, pattern: PatternLike = "2:4", include: Selector = None, exclude: Selector = None,
        *, weight_bits: int | None = None, group_size: int | None = None, act_bits: int | None = None,
        plan: PlanLike | None = None,
    ):
        if plan is None:
            self.pattern = as_pattern(pattern)
            self.targets, self.skipped = select_linears(model, self.pattern, include, exclude)
            config = LayerConfig.make(self.pattern, weight_bits, group_size, act_bits)
            self.configs = {name: config for name in self.targets}
        else:
            if include is not None or weight_bits is not None or act_bits is not None or group_size is not None:
                raise ValueError("plan= sets each layer's pattern and encoding and names the layers: give it without "
                                 "include=, weight_bits=, group_size= and act_bits=")
            planned = {n: c for n, c in load_plan(plan).items() if c.pattern is not None}
            missing = sorted(set(planned) - {n for n, m in unwrap(model).named_modules() if isinstance(m, nn.Linear)})
            if missing:
                raise ValueError(f"the plan names layers the model has no nn.Linear of: {missing[:5]}; "
                                 "was it made for another model?")
            self.pattern = None  # one per layer: self.configs
            self.targets, self.skipped = select_linears(model, None, lambda name, _: name in planned, exclude)
            self.configs = {name: planned[name] for name in self.targets}
        for name, module in self.targets.items():
            self.configs[name].pattern.check_shape(module.weight.shape, f"layer {name!r}")
            if self.configs[name].quantized:
                from_bits(self.configs[name].weight_bits, self.configs[name].group_size).check(
                    module.weight.dtype, module.weight.shape, self.configs[name].pattern, None)
        parents = {f"{p}.{c}" if p else c: parent for p, parent in unwrap(model).named_modules()
                   for c, _ in parent.named_children()}
        for name in list(self.targets):
            why = self._cannot_train(parents.get(name))
            if why is not None:
                del self.targets[name]
                self.skipped[name] = why
        if not self.targets:
            raise ValueError(f"{type(self).__name__} can train none of the selected layers: {self.skipped}")
        self.configs = {name: self.configs[name] for name in self.targets}
        for name, module in self.targets.items():
            sharding.check_shards(name, module.weight, self.configs[name].pattern)
        for name, module in self.targets.items():
            mark(module, self.configs[name], self.kind)
            if self.configs[name].quantized:
                qat.install(module, self.configs[name], sparse=self._sparse_forward)
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
            off = [(w - ops.project(w, self.configs[n].pattern), weight) for (w, weight), n in zip(pairs, self.targets)]
            return {"primal": (sharding.sq_norm(off) / max(sharding.sq_norm(pairs), 1e-30)) ** 0.5}

    def finalize(self) -> "NMSparsifier":
        """Hard-prune W = project(W) and fix the masks for masked fine-tuning. Quantized layers:
        W = fake_quant(W), the value ``sparsify`` stores, and the forward selects and quantizes
        from here on; masked fine-tuning moves W off the grid again (the forward does not), so
        each later call rounds it again."""
        if not self.finalized:
            self._fix_masks({n: ops.nm_mask(sharding.local(m.weight.detach()), self.configs[n].pattern)
                             for n, m in self.targets.items()})
        for name, module in self.targets.items():
            if self.configs[name].quantized:
                qat.round_to_grid(module, self.configs[name])
                qat.install(module, self.configs[name], sparse=True)
        return self

    @property
    def finalized(self) -> bool:
        return self.masks is not None

    def remove(self) -> None:
        """Release the fixed masks and their hooks and the quantized forward: the pattern is no
        longer enforced (the weights keep their values, the layers their marks)."""
        for module in self.targets.values():
            masking.release(module)
            qat.remove(module)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "pattern": str(self.pattern),
            "configs": {n: c.as_dict() for n, c in self.configs.items()},
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
        if state.get("configs", {n: c.as_dict() for n, c in self.configs.items()}) != {
                n: c.as_dict() for n, c in self.configs.items()}:
            raise ValueError("state is for other layer configurations (patterns, weight_bits, group_size, act_bits) "
                             "than this sparsifier's: build it with the same settings or plan")
        self.steps = int(state["steps"])
        if state["masks"] is not None:
            self.remove()
            self._fix_masks({n: state["masks"][n].to(m.weight.device) for n, m in self.targets.items()})

    # -- helpers --------------------------------------------------------------------------------
    # Whether a quantized forward selects N:M before finalize(): yes, but for ADMM's dense W-step.
    _sparse_forward = True

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
