"""Per-layer configuration search (NxMiFormer's heterogeneous configurations).

:func:`search` gives every target Linear (each of Q, K, V, O and the two FFN Linears of every
block is a group of its own) one candidate configuration, so that the encoder reaches a
compression target at the least total sensitivity:

1. Sensitivity of each (layer, candidate): the relative increase of the model's output error
   when only that layer is converted (its weight replaced by ``fake_quant``/``project`` of itself,
   its input rounded per token for ``a8``) on the calibration inputs:
   ``sum ||y - y_dense||^2 / sum ||y_dense||^2`` over the outputs (logits, else the last hidden
   state). One layer at a time: sensitivities are treated as additive.
2. Choice: a multiple-choice knapsack by dynamic programming. The cost of a choice is its value
   bits (kept weights x bits per value, 32 for fp, as the papers count against fp32), counted in
   units of the costs' common divisor (exact), or of 1/``resolution`` of the budget rounded up
   when that gives too many units, so the plan always meets the target; the DP minimises the
   summed sensitivity within the budget. Ties go to the candidate listed
   first, then to the cheaper choice: the result depends only on the model, the calibration and
   the candidates.

Compression is reported both ways (DESIGN.md section 7): by value bits against fp32 (2:4 int8 =
87.5%) and by the bytes ``nxm.compress`` actually stores (values, metadata, scales) against the
fp32 weights, over the searched layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..plan import LayerConfig, parse_config, save_plan
from ..selection import Selector
from .calibration import model_call
from .common import select_linears, unwrap
from .qat import _FakeQuantActivations, quantized_weight

DEFAULT_CANDIDATES = ("2:4 fp", "2:4 int8", "2:4 int4 g128", "1:4 int8")


@dataclass
class SearchResult:
    """The chosen plan, what each choice measured and cost, and the compression reached."""

    plan: dict[str, LayerConfig]
    sensitivity: dict[str, dict[str, float]]  # layer -> candidate -> relative output error
    target: float
    compression: float  # value bits against fp32, over the searched layers
    compression_actual: float  # stored bytes (values, metadata, scales) against fp32 weights
    total_sensitivity: float
    candidates: list[str] = field(default_factory=list)

    def save(self, path) -> None:
        """Write the plan JSON that ``sparsify(plan=)``, the sparsifiers and ``nxm sparsify --plan`` read."""
        save_plan(self.plan, path)

    def to_dict(self) -> dict:
        return {"target": self.target, "compression": self.compression, "compression_actual": self.compression_actual,
                "total_sensitivity": self.total_sensitivity, "candidates": self.candidates,
                "plan": {n: c.as_dict() for n, c in self.plan.items()}, "sensitivity": self.sensitivity}

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for config in self.plan.values():
            counts[str(config)] = counts.get(str(config), 0) + 1
        mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"{len(self.plan)} layers: {mix}; compression {self.compression:.2%} by value bits (target "
                f"{self.target:.2%}), {self.compression_actual:.2%} in stored bytes; total sensitivity "
                f"{self.total_sensitivity:.4g}")


def value_bits(weight: torch.Tensor, config: LayerConfig) -> int:
    """Bits of the kept values (as the papers count: no metadata, no scales)."""
    bits = 32 if config.weight_bits is None else config.weight_bits
    if config.pattern is None:
        return weight.numel() * bits
    return int(ops.nm_mask(weight, config.pattern).sum()) * bits


def stored_bytes(weight: torch.Tensor, config: LayerConfig) -> int:
    """Bytes ``nxm.compress`` stores for the weight in fp32 (values, metadata, scales)."""
    w = weight.float()
    if config.pattern is None:
        return w.numel() * w.element_size()
    return ops.compress(w, config.pattern, bits=config.weight_bits, group_size=config.group_size).nbytes


def compression(model: nn.Module, plan: dict[str, LayerConfig]) -> tuple[float, float]:
    """``(by value bits, by stored bytes)`` of ``plan`` on ``model``'s weights, against fp32,
    over the layers the plan names (dense ones count in full)."""
    weights = [(unwrap(model).get_submodule(name).weight.detach(), config) for name, config in plan.items()]
    fp32_bits = sum(w.numel() * 32 for w, _ in weights)
    bits = sum(value_bits(w, config) for w, config in weights)
    stored = sum(stored_bytes(w, config) for w, config in weights)
    return 1 - bits / fp32_bits, 1 - stored / (fp32_bits // 8)


def _output(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        return _output(out[0])
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}: return a tensor, logits or "
                    "last_hidden_state")


@torch.no_grad()
def _outputs(model, calibration, device) -> list[torch.Tensor]:
    results = []
    for batch in calibration:
        args, kwargs = model_call(batch, device)
        results.append(_output(model(*args, **kwargs)).float())
    return results


@torch.no_grad()
def measure(model: nn.Module, layer: nn.Linear, config: LayerConfig, calibration, dense) -> float:
    """Relative output error with only ``layer`` converted to ``config``."""
    saved = layer.weight.detach().clone()
    if config.pattern is not None:
        layer.weight.copy_(quantized_weight(saved, config, sparse=True) if config.quantized
                           else ops.project(saved, config.pattern))
    hook = None
    if config.act_bits is not None:
        hook = layer.register_forward_pre_hook(lambda m, a: (_FakeQuantActivations.apply(a[0], config.act_bits),))
    try:
        outputs = _outputs(model, calibration, saved.device)
    finally:
        layer.weight.copy_(saved)
        if hook is not None:
            hook.remove()
    error = sum(float((y - d).double().pow(2).sum()) for y, d in zip(outputs, dense))
    return error / max(sum(float(d.double().pow(2).sum()) for d in dense), 1e-300)


def choose(sensitivity: list[list[float]], costs: list[list[int]], budget: int, resolution: int) -> list[int]:
    """Multiple-choice knapsack: one option per group, sum of costs <= budget, least summed
    sensitivity. Exact when the budget holds at most ``resolution`` units of the costs' greatest
    common divisor (layers of a model share one, large); else costs are rounded up to units of
    budget / resolution, so the choice never exceeds the budget."""
    common = math.gcd(*(c for row in costs for c in row))
    if common and budget // common <= resolution:
        slots, units = budget // common, [[c // common for c in row] for row in costs]
    else:
        slots, unit = resolution, budget / resolution
        units = [[math.ceil(c / unit - 1e-9) for c in row] for row in costs]
    inf = float("inf")
    best = [0.0] + [inf] * slots  # best[b]: least sensitivity using exactly b units so far
    picks = []
    for sens_row, unit_row in zip(sensitivity, units):
        new, pick = [inf] * (slots + 1), [-1] * (slots + 1)
        for option, (s, u) in enumerate(zip(sens_row, unit_row)):
            for b in range(u, slots + 1):
                value = best[b - u] + s
                if value < new[b]:  # strict: the first-listed option wins a tie
                    new[b], pick[b] = value, option
        best = new
        picks.append(pick)
    end = min(range(slots + 1), key=lambda b: (best[b], b))
    if best[end] == inf:
        raise ValueError("no combination of the candidates meets the compression target")
    chosen = []
    for pick, unit_row in zip(reversed(picks), reversed(units)):
        option = pick[end]
        chosen.append(option)
        end -= unit_row[option]
    return chosen[::-1]


def search(
    model: nn.Module,
    candidates: Sequence[str | LayerConfig] = DEFAULT_CANDIDATES,
    calibration: Iterable = (),
    target_compression: float = 0.875,
    *,
    include: Selector = None,
    exclude: Selector = None,
    samples: int | None = None,
    seed: int = 0,
    resolution: int = 2000,
    progress=None,
) -> SearchResult:
    """A plan giving each target Linear of ``model`` one of ``candidates`` (text forms such as
    ``"2:4 int4 g128"`` or :class:`~nxm_kernels.plan.LayerConfig`), reaching
    ``target_compression`` (value bits against fp32, e.g. 0.875) at the least summed sensitivity
    on ``calibration`` (model inputs: tensors, tuples or dicts). ``samples``: use that many
    calibration inputs drawn with ``seed``. Targets: as the sparsifiers choose them
    (``include``/``exclude``). ``progress(done, total, name)`` after each layer."""
    configs = [parse_config(c) if isinstance(c, str) else c for c in candidates]
    if not configs:
        raise ValueError("no candidates: give configurations such as '2:4 int8' or '2:4 int4 g128'")
    if not 0 <= target_compression < 1:
        raise ValueError(f"target_compression is a fraction of the fp32 value bits saved, in [0, 1), got "
                         f"{target_compression!r}")
    calibration = list(calibration)
    if samples is not None:
        order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed))[:samples]
        calibration = [calibration[i] for i in sorted(order.tolist())]
    if not calibration:
        raise ValueError("search needs calibration inputs (a list of tensors, tuples or dicts for the model)")
    model = unwrap(model)
    targets, _ = select_linears(model, None, include, exclude)
    was_training = model.training
    model.eval()
    try:
        dense = _outputs(model, calibration, next(iter(targets.values())).weight.device)
        sensitivity, costs, sizes = {}, [], []
        for done, (name, layer) in enumerate(targets.items(), 1):
            w = layer.weight.detach()
            usable = [c for c in configs if c.pattern is None or _fits(w, c)]
            sensitivity[name] = {str(c): (measure(model, layer, c, calibration, dense) if c in usable else math.inf)
                                 for c in configs}
            costs.append([value_bits(w, c) for c in configs])
            sizes.append([stored_bytes(w, c) if c in usable else 0 for c in configs])
            if progress is not None:
                progress(done, len(targets), name)
    finally:
        model.train(was_training)
    fp32_bits = sum(layer.weight.numel() * 32 for layer in targets.values())
    budget = math.floor(fp32_bits * (1 - target_compression))
    cheapest = sum(min(c for c, s in zip(row, sensitivity[n].values()) if s < math.inf)
                   for row, n in zip(costs, targets))
    if cheapest > budget:
        raise ValueError(f"the candidates reach at most {1 - cheapest / fp32_bits:.2%} compression, below the "
                         f"target {target_compression:.2%}: add sparser or lower-bit candidates, or lower the target")
    rows = [list(sensitivity[n].values()) for n in targets]
    chosen = choose(rows, costs, budget, resolution)
    plan = {name: configs[i] for name, i in zip(targets, chosen)}
    bits = sum(costs[k][i] for k, i in enumerate(chosen))
    stored = sum(sizes[k][i] for k, i in enumerate(chosen))
    return SearchResult(
        plan=plan, sensitivity=sensitivity, target=target_compression, compression=1 - bits / fp32_bits,
        compression_actual=1 - stored / (fp32_bits // 8), candidates=[str(c) for c in configs],
        total_sensitivity=sum(rows[k][i] for k, i in enumerate(chosen)),
    )


def _fits(weight: torch.Tensor, config: LayerConfig) -> bool:
    try:
        config.pattern.check_shape(weight.shape)
        if config.quantized:
            ops.compress(weight[: config.pattern.block[0]].float(), config.pattern, bits=config.weight_bits,
                         group_size=config.group_size)
    except ValueError:
        return False
    return True


def save_result(result: SearchResult, path) -> None:
    """The full result (sensitivities, both compressions) as JSON, beside the plan."""
    with open(path, "w") as f:
        json.dump(result.to_dict(), f, indent=1)
        f.write("\n")
