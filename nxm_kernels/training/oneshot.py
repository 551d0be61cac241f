"""One-shot pruning of a trained model to N:M, with calibration: magnitude, Wanda, SparseGPT and
layer-wise ADMM.

::

    report = prune(model, "2:4", method="sparsegpt", calibration=[{"input_ids": ids} for ids in batches])
    print(report)              # per layer: relative reconstruction error, seconds
    nxm.sparsify(model)        # converts exactly the pruned layers

The model's repeated blocks (the largest ``nn.ModuleList`` holding target Linears, e.g.
``model.model.layers`` of a Hugging Face decoder) are pruned in order, each calibrated on the
outputs of the blocks already pruned (see :mod:`.calibration`): per block, one pass gathers the
input statistics of all its target Linears, they are pruned, and a second pass produces the next
block's inputs. Target Linears outside the blocks, or all of them when the model has no such
list, are pruned after the blocks from one pass over the whole model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .. import ops
from ..encodings import from_bits
from ..pattern import PatternLike, as_pattern
from ..plan import LayerConfig
from ..selection import mark
from .calibration import (
    HESSIAN, NORMS, BlockInputs, InputStats, capture_block_inputs, find_blocks, model_call, no_cache,
)
from .common import Selector, select_linears, unwrap
from .layerwise_admm import admm
from .sparsegpt import group_width, sparsegpt

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
# Per-method options (keyword arguments of prune), with the function that reads them.
_OPTIONS = {
    "magnitude": (), "wanda": (), "sparsegpt": ("damp", "block_size"), "admm": ("iterations", "rho", "ramp", "damp"),
}
_NEEDS_HESSIAN = ("sparsegpt", "admm")


@dataclass
class LayerReport:
    method: str
    shape: tuple[int, int]  # (out_features, in_features)
    error: float | None  # ||X (W - W0)^T||^2 / ||X W0^T||^2 on the calibration inputs; None without them
    seconds: float  # the pruning itself, statistics excluded
    details: dict = field(default_factory=dict)  # method-specific (ADMM: primal residual)


@dataclass
class PruneReport:
    """What :func:`prune` did: per pruned layer, and the layers it left dense with the reason."""

    method: str
    pattern: str
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the whole call, calibration passes included

    @property
    def mean_error(self) -> float | None:
        errors = [r.error for r in self.layers.values() if r.error is not None]
        return sum(errors) / len(errors) if errors else None

    def __str__(self) -> str:
        lines = [
            f"pruned {len(self.layers)} linear layer(s) to {self.pattern} with {self.method} in {self.seconds:.1f} s"
        ]
        for name, r in self.layers.items():
            error = "" if r.error is None else f", relative error {r.error:.4g}"
            lines.append(f"  + {name}: {r.shape[1]}->{r.shape[0]}{error}, {r.seconds:.2f} s")
        lines += [f"  - {name}: {why}" for name, why in self.skipped.items()]
        if self.mean_error is not None:
            lines.append(f"mean relative reconstruction error {self.mean_error:.4g}")
        return "\n".join(lines)


def _select(model: nn.Module, pattern, include: Selector, exclude: Selector):
    """The target Linears: the package's one layer selection (heads and embeddings stay dense)."""
    return select_linears(model, pattern, include, exclude)


def prune(
    model: nn.Module,
    pattern: PatternLike = "2:4",
    method: str = "magnitude",
    calibration: Iterable | None = None,
    include: Selector = None,
    exclude: Selector = None,
    progress: bool | Callable[[int, int, str], None] = True,
    measure_error: bool = True,
    weight_bits: int | None = None,
    group_size: int | None = None,
    **options,
) -> PruneReport:
    """Prune the target ``nn.Linear`` layers of ``model`` in place to ``pattern``, in one shot.

    ``method``:

    - ``"magnitude"``: keep the n largest |w| of every m (no calibration needed);
    - ``"wanda"``: keep the largest |w_ij| * ||x_j|| (x_j: input feature j over the calibration tokens);
    - ``"sparsegpt"``: the OBS update with H = X^T X (options ``damp=0.01``, ``block_size=128``;
      see :func:`.sparsegpt.sparsegpt`);
    - ``"admm"``: layer-wise ADMM on ||X W0^T - X W^T||^2 with a gradual mask (options
      ``iterations=20``, ``rho=1.0``, ``ramp=15``, ``damp=0.1``; see
      :func:`.layerwise_admm.admm`).

    ``calibration``: an iterable of model inputs (tensors, tuples of positional arguments, or
    dicts of keyword arguments for Hugging Face models; ``use_cache=False`` is forced), read
    once into a list. ``include``/``exclude`` select the Linears as the sparsifiers do (heads and
    embeddings stay dense by default). ``progress``: True prints a line per layer on stderr, or a
    callable ``(done, total, name)``. ``measure_error``: gather H for every method when
    calibration is given, to report each layer's relative reconstruction error (costs the H
    accumulation for magnitude and Wanda).

    ``weight_bits=8`` or ``4`` (``group_size``: one scale per that many input features, else per
    row): the pruned weights end on the int8/int4 grid, exactly representable
    (``nxm.fake_quant(w, pattern, bits, group_size)`` returns them bit for bit), and the layers are
    marked with the encoding, so ``nxm.sparsify(model)`` stores them quantized. SparseGPT and ADMM
    quantize jointly (rounding inside the sweep / the Z-step); magnitude and Wanda prune, then
    quantize.
    """
    pattern = as_pattern(pattern)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(_OPTIONS[method]) or "none"
        raise TypeError(f"method {method!r} takes no option(s) {', '.join(unknown)} (its options: {allowed})")
    if calibration is None and method != "magnitude":
        raise ValueError(f"method {method!r} needs calibration inputs: pass calibration=[batch, ...]")
    _check_pattern_kind(pattern, method)
    config = LayerConfig.make(pattern, weight_bits, group_size)
    from_bits(weight_bits, group_size).check(torch.float32, (1, pattern.block[1]), pattern, None)

    start = time.perf_counter()
    model = unwrap(model)
    targets, skipped = _select(model, pattern, include, exclude)
    report = PruneReport(method, str(pattern), skipped=dict(skipped))
    say = _progress_printer(progress, len(targets), method)
    kind = HESSIAN if method in _NEEDS_HESSIAN or (measure_error and calibration is not None) else NORMS
    prune_layers = _LayerPruner(method, config, options, kind, report, say)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if calibration is None:
                for name, layer in targets.items():
                    prune_layers({name: layer}, None)
            else:
                _prune_calibrated(model, targets, calibration, prune_layers)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def _prune_calibrated(model, targets, calibration, prune_layers) -> None:
    device = next(iter(targets.values())).weight.device
    found = find_blocks(model, targets)
    if found is None:  # no repeated blocks: one pass over the whole model, on the dense inputs
        _prune_in_one_pass(model, targets, calibration, device, prune_layers)
        return
    _, blocks = found
    calibration = list(calibration)
    inputs = capture_block_inputs(model, blocks[0], calibration, device)
    in_blocks = {id(m) for m in blocks.modules()}
    for index, block in enumerate(blocks):
        in_block = {id(m) for m in block.modules()}
        layers = {name: layer for name, layer in targets.items() if id(layer) in in_block}
        if layers:
            with InputStats(layers, prune_layers.kind, _stats_dtype(layers)) as stats:
                for i in range(len(inputs.hidden)):
                    inputs.call(block, i)
            prune_layers(layers, stats)
        if index + 1 == len(blocks):
            break
        inputs = BlockInputs([inputs.call(block, i) for i in range(len(inputs.hidden))], inputs.context)
    del inputs
    rest = {name: layer for name, layer in targets.items() if id(layer) not in in_blocks}
    if rest:
        _prune_in_one_pass(model, rest, calibration, device, prune_layers)


def _prune_in_one_pass(model, layers, calibration, device, prune_layers) -> None:
    with InputStats(layers, prune_layers.kind, _stats_dtype(layers)) as stats:
        for batch in calibration:
            args, kwargs = model_call(batch, device)
            model(*args, **no_cache(model, kwargs))
    prune_layers(layers, stats)


def _stats_dtype(layers) -> torch.dtype:
    # fp32 statistics (the dampened solves are well conditioned there); fp64 for fp64 models.
    return torch.float64 if any(m.weight.dtype == torch.float64 for m in layers.values()) else torch.float32


class _LayerPruner:
    """Prunes layers from their statistics, fills the report, marks the layers."""

    def __init__(self, method, config: LayerConfig, options, kind, report, say):
        self.method, self.config, self.pattern, self.kind = method, config, config.pattern, kind
        # SparseGPT and ADMM round inside their iterations; the grid options go to them.
        quantized = {"weight_bits": config.weight_bits, "group_size": config.group_size}
        self.options = {**options, **quantized} if config.quantized and method in _NEEDS_HESSIAN else options
        self.report, self.say = report, say

    def __call__(self, layers: dict[str, nn.Linear], stats: InputStats | None) -> None:
        for name, layer in layers.items():
            start = time.perf_counter()
            w0 = layer.weight.detach()
            hessian = stats.hessian(name) if stats is not None and self.kind == HESSIAN else None
            new, details = self._prune_weight(w0, name, stats, hessian)
            new = new.to(w0.dtype)
            if self.config.quantized:
                new = on_grid(new, self.config)
            error = None if hessian is None else relative_error(w0, new, hessian)
            layer.weight.copy_(new)
            # sparsify(model) then converts exactly these, with the encoding if quantized
            mark(layer, self.config if self.config.quantized else self.pattern, self.method)
            self.report.layers[name] = LayerReport(
                self.method, tuple(w0.shape), error, time.perf_counter() - start, details
            )
            self.say(name, self.report.layers[name])

    def _prune_weight(self, w0, name, stats, hessian):
        if self.method == "magnitude":
            return ops.project(w0, self.pattern), {}
        if self.method == "wanda":
            norms = stats.norms(name).sqrt()  # fp32 or fp64: fp16 scores would blur the ranking
            return ops.project(w0, self.pattern, scores=w0.abs().to(norms.dtype) * norms), {}
        if self.method == "sparsegpt":
            return sparsegpt(w0, hessian, self.pattern, **self.options), {}
        result = admm(w0, hessian, self.pattern, **self.options)
        return result.weight, {"primal_residual": result.primal_residual}


def on_grid(w: torch.Tensor, config: LayerConfig, passes: int = 3) -> torch.Tensor:
    """``w`` (on the pattern) made exactly representable: ``fake_quant`` repeated to its fixed point.

    One pass is usually a fixed point already. It is not when a group's largest kept value sits
    below its grid's top (SparseGPT's later updates moved it, or ``w`` was never on a grid): the
    pass regrids the group onto the smaller scale, half a step at most. And the rule's scale,
    absmax / qmax rounded to fp32, can land one ulp off the scale the values were made with (or,
    for half-precision weights, the dequantized values round): the next pass settles that.
    """
    for _ in range(passes):
        quantized = ops.fake_quant(w, config.pattern, config.weight_bits, config.group_size)
        if torch.equal(quantized, w):
            return quantized
        w = quantized
    raise RuntimeError(f"fake_quant did not reach a fixed point in {passes} passes ({config})")


def relative_error(w0: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X (W - W0)^T||^2 / ||X W0^T||^2 from H = X^T X."""
    delta, reference = (w - w0).to(hessian.dtype), w0.to(hessian.dtype)
    denominator = float(((reference @ hessian) * reference).sum())
    return float(((delta @ hessian) * delta).sum()) / max(denominator, 1e-30)


def _check_pattern_kind(pattern, method: str) -> None:
    """Refuse, before any calibration pass, a pattern kind the method has no rule for (every
    mask goes through nm_mask/project; SparseGPT also needs the column width of one group)."""
    if method == "sparsegpt":
        group_width(pattern)


def _progress_printer(progress, total: int, method: str):
    done = [0]

    def say(name: str, layer: LayerReport) -> None:
        done[0] += 1
        if callable(progress):
            progress(done[0], total, name)
        elif progress:
            error = "" if layer.error is None else f" rel. error {layer.error:.4g}"
            extra = "".join(f" {k.replace('_', ' ')} {v:.3g}" for k, v in layer.details.items())
            shape = f"{layer.shape[1]}->{layer.shape[0]}"
            sys.stderr.write(f"[{done[0]}/{total}] {method} {name} {shape}{error}{extra} {layer.seconds:.2f} s\n")
            sys.stderr.flush()

    return say
