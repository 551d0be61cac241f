"""ADMM for N:M sparsity while fine-tuning (NxMTransformer, NeurIPS 2021), in scaled form.

Minimise f(W) subject to W in S (the N:M set) by splitting W = Z, Z in S, scaled dual U:

- W-step: optimizer steps on f(W) + rho/2 ||W - Z + U||^2;
- Z-step, every ``update_every`` steps: Z = project(W + U) (the Euclidean projection onto S);
- U-step: U = U + W - Z;

until ||W - Z|| is small; then ``finalize()`` hard-prunes W = project(W) and fixes the masks.
With ``retrain="srste"`` (ADMM pattern pruning's recipe: ADMM, hard prune, SR-STE retraining) the
first ``finalize()`` hard-prunes and retrains with SR-STE instead of fixed masks (the forward uses
project(W), the gradient reaches every weight, pruned ones decay), and a second ``finalize()``
fixes the masks.

Two ways to apply the rho term, because adaptive optimizers change what it means:

- ``penalty="loss"`` (the paper's): add ``admm.penalty()`` to the loss. Under Adam every weight
  moves at most about lr per step whatever the gradient, so a large rho cannot pull W onto Z
  faster; it suits SGD.
- ``penalty="proximal"`` (decoupled, like AdamW's weight decay): ``penalty()`` is zero and
  ``step()`` applies the exact proximal step of rho/2 ||W - Z + U||^2 after each optimizer step,
  W = (W + rho (Z - U)) / (1 + rho), so rho is the fraction of the way to Z - U moved per step,
  independent of the optimizer.

Damping (proximal form): between two dual updates the W-steps close a fraction
1 - (1 + rho)^-update_every of the gap to Z - U. When rho * update_every is small, U grows faster
than W follows, and a pruned weight swings through zero to the opposite sign before settling (the
weight and the dual form an under-damped oscillator with a period of about
2 pi sqrt(update_every / rho) steps): with rho growing from 3e-3 to 9e-2 over 336 steps and
update_every 4 it reaches -0.6 times its starting value, and |W + U| of a swinging weight can
outgrow a kept one, so the mask moves with no gradient asking for it. The model trains with those
weights flipped meanwhile. Keep rho * update_every >= 1.5 (e.g. rho 0.1, update_every 16: under
-0.15, the mask stays).
"""

from __future__ import annotations

import copy
import math
import types
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..pattern import PatternLike
from . import qat, sharding
from .baselines import SRSTESparsifier, _srste_forward
from .common import NMSparsifier, Selector, unwrap

PENALTIES = ("loss", "proximal")
INITS = (None, "magnitude", "wanda", "sparsegpt")
RETRAINS = (None, "srste")


def _one_shot_weights(model: nn.Module, pattern, names: list[str], method: str, calibration) -> dict:
    """The target weights pruned one-shot by ``method``, from a copy of the model."""
    from .oneshot import prune

    pruned = copy.deepcopy(unwrap(model))
    wanted = set(names)
    prune(pruned, pattern, method=method, calibration=calibration, include=lambda name, _: name in wanted,
          progress=False, measure_error=False)
    return {name: pruned.get_submodule(name).weight.detach() for name in names}


def geometric_rho(factor: float, steps: int) -> Callable[[int], float]:
    """A ``rho_schedule``: rho grows geometrically to ``factor`` times its start over ``steps``,
    then stays there (rho 1e-3 with factor 100 reaches 1e-1)."""
    if factor <= 0 or steps <= 0:
        raise ValueError(f"geometric_rho needs factor > 0 and steps > 0, got factor={factor}, steps={steps}")
    return lambda step: factor ** min(step / steps, 1.0)


class ADMMSparsifier(NMSparsifier):
    """ADMM towards N:M weights on the targeted ``nn.Linear`` layers of ``model``.

    ``rho_schedule`` maps the step count to a multiplier of ``rho`` (as ``LambdaLR`` does for the
    learning rate), e.g. :func:`geometric_rho`. Z and U live on each weight's device, in fp32
    when the weight is fp16/bf16 (master copies), else in the weight's dtype.
    Build it after wrapping the model in DDP: every rank then holds the same W, hence the same
    Z and U, with no communication of its own. Under FSDP2 (``fully_shard``) Z and U are the
    rank's row shards of the weight's, projected per shard (:mod:`.sharding`); the penalty cannot
    enter the loss there (the weights it reads are sharded), so with ``penalty="loss"`` call
    :meth:`add_penalty_grad` between ``backward()`` and ``opt.step()`` instead.

    ``init``: None starts Z from project(W) (the magnitude mask); ``"magnitude"``, ``"wanda"`` or
    ``"sparsegpt"`` start Z from that one-shot pruning of the weights (:func:`.oneshot.prune` on a
    copy of the model, with ``calibration``: an iterable of model inputs), U = 0 either way. The
    model's weights are not changed.

    ``retrain="srste"``: the first ``finalize()`` hard-prunes W = project(W) and drops Z and U,
    then training continues as SR-STE (``retrain_decay``: its lambda_W, see
    :class:`.SRSTESparsifier`), so a mask can still move where the task asks for it;
    ``retraining`` is True in that phase and ``step()`` / ``penalty()`` do nothing but count. The
    second ``finalize()`` fixes the masks SR-STE ended with (masked fine-tuning from there on).
    Layers SR-STE cannot train (``nn.MultiheadAttention``'s ``out_proj``) are skipped, with why.
    """

    kind = "admm"
    _sparse_forward = False  # the W-step trains dense W; quantized layers see its rounding only

    def __init__(
        self,
        model: nn.Module,
        pattern: PatternLike = "2:4",
        rho: float = 1e-3,
        rho_schedule: Callable[[int], float] | None = None,
        update_every: int = 16,
        include: Selector = None,
        exclude: Selector = None,
        penalty: str = "loss",
        init: str | None = None,
        calibration=None,
        retrain: str | None = None,
        retrain_decay: float = 2e-4,
        **quantization,
    ):
        if retrain not in RETRAINS:
            raise ValueError(f"retrain must be None (masked fine-tuning after finalize) or 'srste', got {retrain!r}")
        if not retrain_decay >= 0:
            raise ValueError(f"retrain_decay must be >= 0, got {retrain_decay!r}")
        self.retrain, self.retrain_decay, self.retraining = retrain, float(retrain_decay), False
        super().__init__(model, pattern, include, exclude, **quantization)
        if init not in INITS:
            raise ValueError(f"init must be None or one of {INITS[1:]}, got {init!r}")
        if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a positive number, got {rho!r}")
        if not (isinstance(update_every, int) and update_every >= 1):
            raise ValueError(
                f"update_every must be a positive int (optimizer steps per Z/U update), got {update_every!r}"
            )
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        self.base_rho = float(rho)
        self.rho_schedule = rho_schedule
        self.update_every = update_every
        self.penalty_mode = penalty
        self.rho = self._scheduled_rho(0)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.last_dual = 0.0
        if init is not None and any(sharding.is_sharded(m.weight) for m in self.targets.values()):
            raise ValueError(f"init={init!r} prunes a copy of the whole model, which FSDP shards: build the "
                             "sparsifier with init=None, or prune the unsharded model with nxm_kernels.training.prune "
                             "first and shard it afterwards")
        if init is not None and len({c.pattern for c in self.configs.values()}) > 1:
            raise ValueError(f"init={init!r} prunes every layer to one pattern, the plan has several: use init=None")
        start = None if init is None else _one_shot_weights(
            model, next(iter(self.configs.values())).pattern, list(self.targets), init, calibration)
        with torch.no_grad():
            for name, module in self.targets.items():
                w = self._master(module.weight)
                self.Z[name] = self._z(name, w) if start is None else self._z(name, start[name].to(w.dtype))
                self.U[name] = torch.zeros_like(w)

    def penalty(self) -> torch.Tensor:
        """rho/2 * sum ||W - Z + U||^2 (zero once finalized or retraining, or with ``penalty="proximal"``)."""
        if self.finalized or self.retraining or self.penalty_mode != "loss":
            return self._zero()
        if any(sharding.is_sharded(m.weight) for m in self.targets.values()):
            raise RuntimeError(
                "the weights are sharded (FSDP), so the ADMM penalty cannot be part of the loss: call "
                "admm.add_penalty_grad() after backward() and before opt.step(), or use penalty='proximal'"
            )
        total = sum(
            (module.weight.to(self.Z[n].dtype) - self.Z[n] + self.U[n]).pow(2).sum()
            for n, module in self.targets.items()
        )
        return 0.5 * self.rho * total

    def add_penalty_grad(self) -> None:
        """Add the penalty's gradient rho (W - Z + U) to each weight's ``.grad``: ``penalty()`` for
        loops that do not own the loss (the Hugging Face Trainer, FSDP). Call it after
        ``backward()`` (and any gradient clipping), before ``opt.step()``; it does nothing once
        finalized or retraining, or with ``penalty="proximal"``."""
        if self.finalized or self.retraining or self.penalty_mode != "loss":
            return
        with torch.no_grad():
            for n, module in self.targets.items():
                weight = module.weight
                grad = (self.rho * (self._master(weight) - self.Z[n] + self.U[n])).to(weight.dtype)
                if weight.grad is None:
                    weight.grad = sharding.like(grad, weight)
                else:
                    sharding.local(weight.grad).add_(grad)

    def residual(self) -> dict:
        """Relative primal ||W - Z|| / ||W||, dual ||Z - Z_prev|| / ||W|| of the last Z-step, rho
        (over all ranks under FSDP); while retraining, the distance of W from the N:M set."""
        if self.finalized:
            return {"primal": 0.0, "dual": 0.0, "rho": self.rho}
        if self.retraining:
            return super().residual()
        with torch.no_grad():
            weights = [(self._master(m.weight), m.weight) for m in self.targets.values()]
            w_sq = max(sharding.sq_norm(weights), 1e-30)
            primal = sharding.sq_norm((w - self.Z[n], weight) for (w, weight), n in zip(weights, self.targets))
        return {"primal": (primal / w_sq) ** 0.5, "dual": (self.last_dual / w_sq) ** 0.5, "rho": self.rho}

    def finalize(self) -> "ADMMSparsifier":
        """W = project(W), masks fixed; Z and U are dropped. With ``retrain="srste"``, the first call
        hard-prunes and starts SR-STE retraining, the second fixes the masks."""
        self.Z, self.U = {}, {}
        if self.retrain == "srste" and not self.retraining and not self.finalized:
            self._start_retraining()
            return self
        self._stop_retraining()
        super().finalize()
        return self

    def remove(self) -> None:
        self._stop_retraining()
        super().remove()

    def _cannot_train(self, parent: nn.Module | None) -> str | None:
        return SRSTESparsifier._cannot_train(self, parent) if self.retrain == "srste" else None

    def _start_retraining(self) -> None:
        """Hard prune W = project(W), then train every target through SR-STE's forward."""
        with torch.no_grad():
            for name, module in self.targets.items():
                pattern = self.configs[name].pattern
                weight = sharding.local(module.weight)
                weight.copy_(ops.project(self._master(module.weight), pattern).to(weight.dtype))
        self._install_srste()

    def _install_srste(self) -> None:
        for name, module in self.targets.items():
            module._nxm_pattern, module._nxm_decay = self.configs[name].pattern, self.retrain_decay
            module.forward = types.MethodType(_srste_forward, module)
            if self.configs[name].quantized:
                qat.install(module, self.configs[name], sparse=True)
        self.retraining = True

    def _stop_retraining(self) -> None:
        if self.retraining:
            for module in self.targets.values():
                del module.forward, module._nxm_pattern, module._nxm_decay
            self.retraining = False

    def _sparsify_step(self) -> None:
        if self.retraining:
            return  # SR-STE acts in the forward and backward passes
        with torch.no_grad():
            if self.penalty_mode == "proximal":
                for n, module in self.targets.items():
                    w = self._master(module.weight)
                    sharding.local(module.weight).copy_((w + self.rho * (self.Z[n] - self.U[n])) / (1 + self.rho))
            if self.steps % self.update_every == 0:
                self._update_z_u()
            new_rho = self._scheduled_rho(self.steps)
            if new_rho != self.rho:
                # Scaled form: U is the dual divided by rho, so it rescales when rho changes.
                for u in self.U.values():
                    u.mul_(self.rho / new_rho)
                self.rho = new_rho

    def _update_z_u(self) -> None:
        moved = []
        for n, module in self.targets.items():
            w = self._master(module.weight)
            z = self._z(n, w + self.U[n])
            moved.append((z - self.Z[n], module.weight))
            self.Z[n] = z
            self.U[n].add_(w - z)
        self.last_dual = sharding.sq_norm(moved)

    def _z(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """The Z-step's projection: onto the N:M set (Euclidean for every kind: scores v^2), then,
        for a quantized layer, rounded to its grid (the scales of the kept values)."""
        config = self.configs[name]
        z = ops.project(v, config.pattern, config.pattern.projection_scores(v))
        return z if not config.quantized else ops.fake_quant(z, config.pattern, config.weight_bits, config.group_size)

    def _scheduled_rho(self, step: int) -> float:
        return self.base_rho * (self.rho_schedule(step) if self.rho_schedule is not None else 1.0)

    @staticmethod
    def _master(w: torch.Tensor) -> torch.Tensor:
        w = sharding.local(w.detach())  # the rank's shard under FSDP2
        return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            rho=self.rho,
            last_dual=self.last_dual,
            retraining=self.retraining,
            Z={n: z.clone() for n, z in self.Z.items()},
            U={n: u.clone() for n, u in self.U.items()},
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rho = float(state["rho"])
        self.last_dual = float(state["last_dual"])
        self._stop_retraining()
        if state.get("retraining") and not self.finalized:
            self._install_srste()
        self.Z = {n: z.to(self.targets[n].weight.device) for n, z in state["Z"].items()}
        self.U = {n: u.to(self.targets[n].weight.device) for n, u in state["U"].items()}
