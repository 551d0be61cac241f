"""Hugging Face ``Trainer`` integration: :class:`NMSparsityCallback` drives any sparsifier of
:mod:`nxm_kernels.training` inside ``Trainer.train()``::

    from nxm_kernels.integrations.hf import NMSparsityCallback
    from nxm_kernels.training import ADMMSparsifier

    callback = NMSparsityCallback(lambda model: ADMMSparsifier(model, "2:4", rho=0.1, penalty="proximal"),
                                  finalize_epoch=1)
    Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
    nxm.sparsify(model)        # exactly the trained layers

The Trainer computes the loss itself, so the callback never touches it:

- ADMM with ``penalty="loss"``: the penalty's gradient rho (W - Z + U) is added to each weight's
  ``.grad`` just before the optimizer step (``on_pre_optimizer_step``: after the gradients are
  accumulated, all-reduced and clipped; the clipping does not see the penalty). With the proximal
  form, and for the other sparsifiers, nothing is added: their ``step()`` does the work.
- ``sparsifier.step()`` after every optimizer step (``on_step_end``): the Z/U schedule, SR-STE's
  nothing, the fixed masks of the masked phase.
- ``finalize()`` at ``finalize_step`` (an optimizer step) or at the end of epoch
  ``finalize_epoch``, else when training ends; the masks then hold for the rest of training.
- ``nxm/primal`` (the relative distance of the weights from the pattern), ``nxm/sparsity`` (the
  share of zeros in the trained weights) and, for ADMM, ``nxm/dual`` and ``nxm/rho`` are added to
  each log: to the ``logs`` that later callbacks receive and to ``state.log_history``. Reporting
  integrations (TensorBoard, W&B) are called before user callbacks, so they see the values from
  the next log on only if the callback is inserted first: ``trainer.callback_handler.callbacks.insert(0, cb)``.

Pass a sparsifier, or a function ``model -> sparsifier`` that is called when training begins: on
several processes the model is then already wrapped and its weights broadcast, so every rank
starts Z and U from the same weights (a sparsifier built before the Trainer would start them from
each rank's own initialisation).
"""

from __future__ import annotations

from typing import Callable, Union

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "nxm_kernels.integrations.hf needs transformers and accelerate: pip install 'nxm-kernels[hf]'"
    ) from e

from ..training.common import NMSparsifier
from ..training.sharding import local

SparsifierLike = Union[NMSparsifier, Callable[[torch.nn.Module], NMSparsifier]]


def sparsity_of(sparsifier: NMSparsifier) -> float:
    """Share of exact zeros in the weights ``sparsifier`` trains (this rank's shards under FSDP)."""
    weights = [local(module.weight.detach()) for module in sparsifier.targets.values()]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


class NMSparsityCallback(TrainerCallback):
    """Runs ``sparsifier`` (or the one ``sparsifier(model)`` builds at ``on_train_begin``) inside
    ``Trainer.train()``; see the module's docstring. ``finalize_step``: the optimizer step after
    which ``finalize()`` runs; ``finalize_epoch``: the epoch (1 = the end of the first) at whose
    end it runs; neither: at the end of training, so the trained model is exactly N:M."""

    def __init__(self, sparsifier: SparsifierLike, finalize_step: int | None = None,
                 finalize_epoch: float | None = None):
        if finalize_step is not None and finalize_epoch is not None:
            raise ValueError("give finalize_step or finalize_epoch, not both")
        if finalize_step is not None and not (isinstance(finalize_step, int) and finalize_step >= 1):
            raise ValueError(f"finalize_step must be an optimizer step >= 1, got {finalize_step!r}")
        if finalize_epoch is not None and not finalize_epoch > 0:
            raise ValueError(f"finalize_epoch must be > 0, got {finalize_epoch!r}")
        if not (isinstance(sparsifier, NMSparsifier) or callable(sparsifier)):
            raise TypeError(f"sparsifier must be an NMSparsifier or a function model -> NMSparsifier, "
                            f"got {type(sparsifier).__name__}")
        self._make = None if isinstance(sparsifier, NMSparsifier) else sparsifier
        self.sparsifier: NMSparsifier | None = sparsifier if self._make is None else None
        self.finalize_step = finalize_step
        self.finalize_epoch = finalize_epoch

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.sparsifier is None:
            self.sparsifier = self._make(model)
            if not isinstance(self.sparsifier, NMSparsifier):
                raise TypeError(f"the sparsifier function returned {type(self.sparsifier).__name__}, "
                                "not an NMSparsifier")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        add_penalty_grad = getattr(self.sparsifier, "add_penalty_grad", None)  # ADMM's
        if add_penalty_grad is not None:
            add_penalty_grad()

    def on_step_end(self, args, state, control, **kwargs):
        self.sparsifier.step()
        if self.finalize_step is not None and state.global_step >= self.finalize_step:
            self.sparsifier.finalize()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.finalize_epoch is not None and state.epoch is not None and state.epoch >= self.finalize_epoch - 1e-9:
            self.sparsifier.finalize()

    def on_train_end(self, args, state, control, **kwargs):
        self.sparsifier.finalize()

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {f"nxm/{k}": float(v) for k, v in self.sparsifier.residual().items()}
        values["nxm/sparsity"] = sparsity_of(self.sparsifier)
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
