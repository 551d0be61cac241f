"""Fixed N:M masks that live with their module, so the pattern holds whatever the loop does.

:func:`fix_mask` gives an ``nn.Linear`` its mask as a non-persistent buffer ``_nxm_mask`` (it
moves with ``.to()``, never enters ``state_dict``, and ``module.weight`` stays a plain
Parameter, so checkpoints, ``sparsify`` and DDP see the usual model) and these hooks:

- on the weight's gradient: ``grad * mask``, so the optimizer state of pruned entries (Adam's
  moments, momentum) stops growing;
- after every ``torch.optim`` optimizer step that updates the weight (a global step post-hook):
  ``weight *= mask``, so momentum left from before the mask, weight decay, or a loop that never
  calls the sparsifier's ``step()`` again cannot revive a pruned weight;
- after ``load_state_dict`` (of the module or any parent): ``weight *= mask``, so loading dense
  weights keeps the pattern;
- before the forward: a copy of the module (``copy.deepcopy``, pickling) or a replaced weight is
  attached again (the gradient and optimizer hooks belong to the weight, which a copy renews).

The weight is therefore exactly N:M after every optimizer step. An update outside ``torch.optim``
(a hand-written ``p -= lr * p.grad``) keeps it too, since its gradient is masked; anything else
that writes the weight should call :func:`apply_mask`. Optimizers that replace the parameters
(FSDP1's flat parameters, ZeRO) are not covered.

FSDP2 (``fully_shard``): the weight is a DTensor and the mask covers the rank's shard
(:mod:`.sharding`). FSDP2 writes the reduced gradient into ``.grad`` itself, past any gradient
hook, so a global optimizer step pre-hook masks the gradient of such weights instead; the gathered
weight FSDP2 swaps in for the forward pass is not the one the mask is attached to.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .sharding import is_sharded, local

MASK_BUFFER = "_nxm_mask"
_HANDLES = "_nxm_mask_handles"

# module -> (its weight when attached, the gradient hook's handle). The optimizer hook re-masks the
# modules whose weight the optimizer updated. A copy of the module (deepcopy, pickle) keeps its
# buffer and module hooks but not this entry nor the gradient hook: its first forward re-attaches.
_attached: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_optimizer_hooks = None


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """The fixed mask of ``module``, or None."""
    return getattr(module, MASK_BUFFER, None)


def fix_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Fix ``module.weight``'s mask (bool, the weight's shape) and apply it now."""
    shape = local(module.weight).shape  # the rank's shard under FSDP2
    if mask.shape != shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of the weight's shape {tuple(shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    release(module)
    module.register_buffer(MASK_BUFFER, mask.to(module.weight.device), persistent=False)
    # Named functions, not lambdas: the model still pickles.
    setattr(module, _HANDLES, [
        module.register_load_state_dict_post_hook(_after_load),
        module.register_forward_pre_hook(_before_forward),
    ])
    _attach(module)
    apply_mask(module)


def apply_mask(module: nn.Module) -> None:
    """``weight *= mask`` (no-op for a module without a fixed mask)."""
    mask = mask_of(module)
    if mask is not None:
        with torch.no_grad():
            local(module.weight).mul_(mask)


def release(module: nn.Module) -> None:
    """Remove the mask and its hooks (the weight keeps its values)."""
    for handle in module.__dict__.pop(_HANDLES, []):
        handle.remove()
    if MASK_BUFFER in module._buffers:
        del module._buffers[MASK_BUFFER]
    _detach(module)


def _detach(module: nn.Module) -> None:
    handle = _attached.pop(module, (None, None))[1]
    if handle is not None:
        handle.remove()


def _attach(module: nn.Module) -> None:
    """The gradient hook and the optimizer hook's entry for ``module``'s current weight."""
    global _optimizer_hooks
    _detach(module)
    ref = weakref.ref(module)  # the gradient hook must not keep the module alive
    handle = (None if is_sharded(module.weight)  # FSDP2 sets .grad past autograd: masked before the step
              else module.weight.register_hook(lambda grad: grad * getattr(ref(), MASK_BUFFER)))
    _attached[module] = (module.weight, handle)
    if _optimizer_hooks is None:
        _optimizer_hooks = (register_optimizer_step_pre_hook(_before_optimizer_step),
                            register_optimizer_step_post_hook(_after_optimizer_step))


def _before_forward(module: nn.Module, args) -> None:
    entry = _attached.get(module)
    if entry is not None and is_sharded(entry[0]) and not is_sharded(module.weight):
        return  # FSDP2 gathered the weight for this forward pass; the shard keeps the mask
    if entry is None or entry[0] is not module.weight:  # a copy, or the weight was replaced
        _attach(module)
        apply_mask(module)


def _after_load(module: nn.Module, incompatible_keys) -> None:
    apply_mask(module)


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    """Mask the gradients that no gradient hook saw (FSDP2's sharded weights)."""
    if not _attached:
        return
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module, (weight, handle) in list(_attached.items()):
        if handle is None and id(weight) in updated and weight.grad is not None:
            with torch.no_grad():
                local(weight.grad).mul_(getattr(module, MASK_BUFFER))


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if not _attached:
        return
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module, (weight, _) in list(_attached.items()):
        if id(weight) in updated and weight is module.weight:
            apply_mask(module)
