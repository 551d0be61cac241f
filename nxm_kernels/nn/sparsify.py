"""``sparsify(model)``: swap a model's eligible ``nn.Linear`` layers for ``SparseLinear``, with a
report of what was converted and why the rest was skipped."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..layouts import NMSparseWeight
from ..pattern import PatternLike, as_pattern
from ..plan import LayerConfig, PlanLike, load_plan
from ..selection import Selector, layer_pattern_of, marked, select_layers
from .linear import SparseLinear
from .policy import FLOAT_DTYPES
from .torch_layers import prepare_parents, unsupported_child


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did. ``model`` is the sparsified model (a copy when ``inplace=False``)."""

    model: nn.Module
    converted: dict[str, str] = field(default_factory=dict)  # layer name -> what it became
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why not
    selection: str = ""  # how the layers were chosen
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    # layer name -> relative Frobenius error of its quantized weight against the projected one
    # (weight_bits given): ||dequantized - project(w)|| / ||project(w)||
    quant_error: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layer(s), skipped {len(self.skipped)}"]
        lines += [f"  selection: {self.selection}"] if self.selection else []
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
            sw = module.weight_sparse
            kept = sw.encoding.codes_weight(sw).values if sw.encoding.quantized else sw.values  # (int4: 2 a byte)
            params += kept.numel() + (module.bias.numel() if module.bias is not None else 0)
    return params, nbytes


def sparsify(
    model: nn.Module,
    pattern: PatternLike | None = None,
    include: Selector = None,
    exclude: Selector = None,
    scores=None,
    backend: str = "auto",
    inplace: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    weight_bits: int | None = None,
    group_size: int | None = None,
    act_bits: int | None = None,
    plan: PlanLike | None = None,
) -> SparsifyReport:
    """Swap the selected ``nn.Linear`` layers of ``model`` for :class:`SparseLinear`.

    The layers are chosen as the sparsifiers of ``nxm_kernels.training`` choose them
    (:func:`nxm_kernels.selection.select_layers`): on a model trained by one (its layers are
    marked), exactly the trained layers, each with its pattern; otherwise every Linear but the
    output heads, poolers and embedding projections. ``include``/``exclude``: name globs
    (``"encoder.*.intermediate.dense"``, a string or a list) or a predicate ``(name, module) ->
    bool``; ``include`` overrides both defaults. ``pattern``: default the marks' or 2:4.
    ``scores``: ``{layer name: tensor}`` or ``(name, module) -> tensor``; a layer it gives no
    scores for is skipped. ``progress(done, total, name)`` is called after each layer.
    Layers are also skipped, with the reason in the report, when their weight is tied to another
    module's, is not loaded (meta) or has a dtype that cannot be held. PyTorch's
    ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` are adapted to call their sparse
    children (see :mod:`nxm_kernels.nn.torch_layers`). ``weight_bits``/``group_size``/``act_bits``:
    quantized layers (see :meth:`SparseLinear.from_dense`); the report gives each layer's
    quantization error (relative Frobenius, against the projected weight). A layer trained
    quantized (its mark has ``weight_bits``) is stored with its mark's encoding unless
    ``weight_bits`` is given. ``plan`` (:mod:`nxm_kernels.plan`, a JSON path or a mapping): each
    layer it names with a pattern gets that pattern and encoding; no other layer is converted.
    """
    asked = None if pattern is None else as_pattern(pattern)
    planned = None if plan is None else {n: c for n, c in load_plan(plan).items() if c.pattern is not None}
    if planned is not None and (include is not None or asked is not None or weight_bits is not None
                                or group_size is not None or act_bits is not None):
        raise ValueError("plan= sets each layer's pattern and encoding and names the layers: give it without "
                         "pattern=, include=, weight_bits=, group_size= and act_bits=")
    if not inplace:
        model = copy.deepcopy(model)
    report = SparsifyReport(model)
    report.params_before, report.bytes_before = model_size(model)
    if planned is not None:
        include = lambda name, _: name in planned  # noqa: E731
    targets, report_skipped = select_layers(model, asked, include, exclude, whole_groups=False)
    if planned is not None:
        report_skipped = {n: "not in the plan (or dense there)" if why == "not selected by include" else why
                          for n, why in report_skipped.items()}
        missing = sorted(set(planned) - set(targets) - set(report_skipped))
        if missing:
            raise ValueError(f"the plan names layers the model has no nn.Linear of: {missing[:5]}; "
                             "was it made for another model?")
        configs = {name: planned[name] for name in targets}
    else:
        asked_quant = LayerConfig(None, weight_bits, group_size, act_bits)  # SparseLinear checks the values
        configs = {name: _layer_config(m, layer_pattern_of(name, m, asked), asked_quant)  # refuses a conflict
                   for name, m in targets.items()}
    patterns = {name: config.pattern for name, config in configs.items()}
    trained_by = {name: marked(m)["by"] for name, m in targets.items() if marked(m) is not None}
    del targets  # names only from here: conversion streams (see below)
    report.selection = ("the layers the plan names, each with its configuration" if planned is not None
                        else _describe_selection(include, trained_by, patterns))
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
        why, layer_scores = report_skipped.get(name), None
        if why is None:
            why, layer_scores = _skip_reason(name, linear, scores, owners, parents)
        if why is None:
            try:
                config = configs[name]
                sparse = SparseLinear.from_dense(linear, patterns[name], scores=layer_scores, backend=backend,
                                                 weight_bits=config.weight_bits, group_size=config.group_size,
                                                 act_bits=config.act_bits)
            except (TypeError, ValueError) as e:
                why = str(e)
        if why is None:
            sparse.train(linear.training)
            parent, child_name = parents[name]
            setattr(parent, child_name, sparse)
            dtype = str(sparse.weight_sparse.dtype).removeprefix("torch.")
            quantized = ""
            if configs[name].quantized:
                report.quant_error[name] = _quantization_error(linear, sparse)
                quantized = f" {sparse.weight_sparse.encoding} (error {report.quant_error[name]:.2e})"
            # Weights already N:M (e.g. after ADMM training) convert without dropping any.
            dropped = int(torch.count_nonzero(linear.weight)) - int(torch.count_nonzero(sparse.values))
            trained = f"trained by {trained_by[name]}, " if name in trained_by else ""
            report.converted[name] = (
                f"{linear.in_features}->{linear.out_features} {patterns[name]} {sparse.layout} {dtype}{quantized}, "
                f"{trained}"
                + (f"dropped {dropped:,} nonzero weights" if dropped else "already N:M, nothing dropped")
            )
        else:
            report.skipped[name] = why
        if progress is not None:
            progress(done, len(names), name)
    prepare_parents(model)
    report.params_after, report.bytes_after = model_size(model)
    return report


def _quantization_error(linear: nn.Linear, sparse: SparseLinear) -> float:
    """||dequantized - projected|| / ||projected||, in float64 (0 for an all-zero weight)."""
    dense = sparse.to_dense().weight.detach().to(torch.float64)
    sw = sparse.weight_sparse
    # The projection: w at the positions the layout stores (a code may round to 0 inside the pattern).
    ones = torch.ones(sw.values.shape[0], sw.layout.storage(torch.float32, sw.shape, sw.pattern)["values"].shape[1])
    stored = NMSparseWeight(ones.to(sw.device), sw.metadata, sw.shape, sw.pattern, sw.layout, check_metadata=False)
    kept = ops.decompress(stored)[: dense.shape[0], : dense.shape[1]] != 0
    projected = torch.where(kept, linear.weight.detach().to(torch.float64), 0.0)
    norm = float(torch.linalg.vector_norm(projected))
    return float(torch.linalg.vector_norm(dense - projected)) / norm if norm else 0.0


def _layer_config(module: nn.Module, pattern, asked: LayerConfig) -> LayerConfig:
    """A layer's configuration: ``pattern``, and the asked encoding, else its mark's (trained quantized)."""
    mk = marked(module) or {}
    if asked.quantized or mk.get("weight_bits") is None:
        return LayerConfig(pattern, asked.weight_bits, asked.group_size, asked.act_bits)
    return LayerConfig(pattern, mk["weight_bits"], mk.get("group_size"), mk.get("act_bits"))


def _describe_selection(include, trained_by: dict, patterns: dict) -> str:
    if include is not None:
        return "the layers include= selects"
    if trained_by:
        kinds = sorted({f"{by} {patterns[name]}" for name, by in trained_by.items()})
        return f"exactly the layers trained sparse ({', '.join(kinds)}), each with its pattern"
    return "every Linear but output heads, poolers and embedding projections (include= overrides)"


def _skip_reason(name, linear, scores, owners, parents):
    """(why the selected ``linear`` cannot be converted or None, its scores)."""
    parent, child_name = parents.get(name, (None, None))
    unsupported = unsupported_child(parent, child_name) if parent is not None else None
    if unsupported is not None:
        return unsupported, None
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
