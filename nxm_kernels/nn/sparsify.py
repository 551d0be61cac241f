"""``sparsify(model)``: swap a model's eligible ``nn.Linear`` layers for ``SparseLinear``, with a
report of what was converted and why the rest was skipped."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..pattern import PatternLike, as_pattern
from .linear import SparseLinear
from .policy import FLOAT_DTYPES

Selector = Callable[[str, nn.Module], bool]

# Modules that read their child Linear's .weight directly (PyTorch's fused fast paths), so a
# swapped layer would break them or be bypassed.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did. ``model`` is the sparsified model (a copy when ``inplace=False``)."""

    model: nn.Module
    converted: dict[str, str] = field(default_factory=dict)  # layer name -> what it became
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why not
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layer(s), skipped {len(self.skipped)}"]
        lines += [f"  + {name}: {what}" for name, what in self.converted.items()]
        lines += [f"  - {name}: {why}" for name, why in self.skipped.items()]
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} (stored weights); "
            f"bytes {self.bytes_before:,} -> {self.bytes_after:,} ({ratio:.1%})"
        )
        return "\n".join(lines)


def model_size(model: nn.Module) -> tuple[int, int]:
    """(weights stored, bytes): parameters plus SparseLinear values and bias; bytes of every
    parameter and buffer (each tensor counted once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, SparseLinear):
            params += module.values.numel() + (module.bias.numel() if module.bias is not None else 0)
    return params, nbytes


def _selects(selector, name: str, module: nn.Module) -> str | None:
    """The glob of ``selector`` that matches ``name`` (or "the predicate"), None if none does."""
    if callable(selector):
        return "the predicate" if selector(name, module) else None
    globs = [selector] if isinstance(selector, str) else list(selector)
    return next((f"'{g}'" for g in globs if fnmatch.fnmatchcase(name, g)), None)


def sparsify(
    model: nn.Module,
    pattern: PatternLike = "2:4",
    include=None,
    exclude=None,
    scores=None,
    backend: str = "auto",
    inplace: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> SparsifyReport:
    """Swap the eligible ``nn.Linear`` layers of ``model`` for :class:`SparseLinear`.

    ``include``/``exclude``: name globs (``"encoder.*.intermediate.dense"``, a string or a list)
    or a predicate ``(name, module) -> bool``; by default every ``nn.Linear`` is included.
    ``scores``: ``{layer name: tensor}`` or ``(name, module) -> tensor``; a layer it gives no
    scores for is skipped (say so by leaving it out of ``include``). ``progress(done, total,
    name)`` is called after each layer. Layers are skipped, with the reason in the report, when
    their weight is tied to another module's, their parent reads their ``.weight`` directly
    (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``), or their dtype cannot be held.
    """
    pattern = as_pattern(pattern)
    if not inplace:
        model = copy.deepcopy(model)
    report = SparsifyReport(model)
    report.params_before, report.bytes_before = model_size(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    parents = {}
    for parent_name, parent in model.named_modules():
        for child_name, _ in parent.named_children():
            parents[f"{parent_name}.{child_name}" if parent_name else child_name] = (parent, child_name)

    # Names, not modules: holding the modules would keep every dense weight alive until the end;
    # looking each layer up as it is swapped lets the converted ones go (conversion streams).
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for done, name in enumerate(names, 1):
        linear = model.get_submodule(name)
        why, layer_scores = _skip_reason(name, linear, include, exclude, scores, owners, parents)
        if why is None:
            try:
                sparse = SparseLinear.from_dense(linear, pattern, scores=layer_scores, backend=backend)
            except (TypeError, ValueError) as e:
                why = str(e)
        if why is None:
            sparse.train(linear.training)
            parent, child_name = parents[name]
            setattr(parent, child_name, sparse)
            dtype = str(sparse.values.dtype).removeprefix("torch.")
            # Weights already N:M (e.g. after ADMM training) convert without dropping any.
            dropped = int(torch.count_nonzero(linear.weight)) - int(torch.count_nonzero(sparse.values))
            report.converted[name] = (
                f"{linear.in_features}->{linear.out_features} {pattern} {sparse.layout} {dtype}, "
                + (f"dropped {dropped:,} nonzero weights" if dropped else "already N:M, nothing dropped")
            )
        else:
            report.skipped[name] = why
        if progress is not None:
            progress(done, len(names), name)
    report.params_after, report.bytes_after = model_size(model)
    return report


def _skip_reason(name, linear, include, exclude, scores, owners, parents):
    """(why ``linear`` is not converted or None, its scores)."""
    if include is not None and _selects(include, name, linear) is None:
        return "not selected by include", None
    if exclude is not None:
        matched = _selects(exclude, name, linear)
        if matched is not None:
            return f"excluded by {matched}", None
    parent = parents.get(name, (None, None))[0]
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return (
            f"its parent {type(parent).__name__} reads .weight directly (PyTorch's fused path), so a "
            "swapped layer would be bypassed; write the block with plain nn.Linear calls to sparsify it"
        ), None
    shared = [o for o in owners.get(id(linear.weight), []) if o != f"{name}.weight"]
    if shared:
        return f"weight is tied to {', '.join(shared)} (sparsifying one side would untie them)", None
    if linear.weight.is_meta:
        return "weight is on the meta device (not loaded yet): load the weights, then sparsify", None
    if linear.weight.dtype not in FLOAT_DTYPES:
        return f"dtype {linear.weight.dtype} cannot be held: cast the model to float32/float16/bfloat16", None
    if scores is None:
        return None, None
    layer_scores = scores(name, linear) if callable(scores) else scores.get(name)
    if layer_scores is None:
        return "no scores given for this layer", None
    return None, layer_scores
