"""Which ``nn.Linear`` layers get N:M weights: one rule for ``sparsify`` and every sparsifier in
``nxm_kernels.training``.

By default every Linear is a target except those that stay dense, each skip with its reason:

- output heads: the module that ``get_output_embeddings()`` returns (of the model or any submodule
  that has the method, as Hugging Face models do), and Linears named ``classifier``, ``lm_head``,
  ``score``, ``qa_outputs`` or ``head`` (the last component of the name);
- poolers: Linears named ``pooler`` or under a module of that name (BERT's ``pooler.dense``);
- embedding projections: Linears with ``embed`` in a component of their name (``embed``,
  ``patch_embed.proj``, ``embed_out``).

These are the layers NxMTransformer, apex ASP and SR-STE keep dense: few weights, and the ones
whose pruning costs most accuracy. ``include=`` overrides the defaults (a layer it selects is a
target even if it is a head); ``exclude=`` skips layers on top of them.

**Marks.** A sparsifier marks each layer it trains: the module gets the instance attribute
``_nxm_sparsity = {"pattern": "2:4", "by": "admm"}`` (trained quantized: also ``weight_bits``,
``group_size``, ``act_bits``). An attribute, not a buffer, so it adds no
``state_dict`` key; it follows the module through ``copy.deepcopy``, pickling and DDP, but a model
rebuilt from a ``state_dict`` is unmarked. When any Linear of a model is marked and no
``include=`` is given, the targets are exactly the marked layers, each with its own pattern: a
layer that was not trained sparse is never pruned unasked.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Union

from torch import nn

from .pattern import Pattern, PatternLike, as_pattern

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

MARK = "_nxm_sparsity"
HEAD_NAMES = ("classifier", "lm_head", "score", "qa_outputs", "head")
DEFAULT_PATTERN = "2:4"


def mark(module: nn.Module, pattern, by: str) -> None:
    """Record on ``module`` that ``by`` (a sparsifier kind) trains it to ``pattern`` (a pattern, or
    a :class:`~nxm_kernels.plan.LayerConfig`: a quantized one adds weight_bits, group_size and
    act_bits to the mark, which ``sparsify`` then stores the layer with)."""
    config = pattern if hasattr(pattern, "as_dict") else None
    record = {"pattern": str(as_pattern(pattern if config is None else config.pattern)), "by": by}
    if config is not None and config.quantized:
        record.update({k: v for k, v in config.as_dict().items() if k != "pattern"})
    setattr(module, MARK, record)


def marked(module: nn.Module) -> dict | None:
    """The mark :func:`mark` left on ``module``, or None."""
    return getattr(module, MARK, None)


def matches(selector: Selector, name: str, module: nn.Module, what: str) -> str | None:
    """How ``selector`` selects ``name`` ("'glob'" or "the predicate"), None if it does not."""
    if callable(selector):
        return "the predicate" if selector(name, module) else None
    globs = (selector,) if isinstance(selector, str) else tuple(selector)
    if not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{what} must be a name glob, a list of globs or a predicate(name, module), got {selector!r}")
    return next((f"'{g}'" for g in globs if fnmatch.fnmatchcase(name, g)), None)


def dense_by_default(model: nn.Module) -> dict[str, str]:
    """``{layer name: why it stays dense}`` for the Linears of ``model`` the defaults keep dense."""
    outputs = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module):
            outputs.add(id(head))
    why = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if id(module) in outputs:
            why[name] = "output head (the model's get_output_embeddings())"
        elif parts[-1] in HEAD_NAMES:
            why[name] = f"output head (named {parts[-1]!r})"
        elif "pooler" in parts:
            why[name] = "pooler (kept dense with the output head)"
        elif any("embed" in part for part in parts):
            why[name] = "embedding projection (kept dense with the output head)"
    return why


def select_layers(
    model: nn.Module,
    pattern: PatternLike | None = None,
    include: Selector = None,
    exclude: Selector = None,
    *,
    whole_groups: bool = True,
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """``(targets, skipped)``: the ``nn.Linear`` layers to make N:M by name, and why the others are not.

    ``include`` / ``exclude``: name globs (``"encoder.layer.*.intermediate.dense"``, one or a
    list) or a predicate ``(name, module) -> bool``. Without ``include``, the targets are the
    marked layers if the model has any, else every Linear but those :func:`dense_by_default`
    keeps dense. ``pattern`` (default: a marked layer's own, else 2:4) must agree with the marks
    of the targets. ``whole_groups``: the layer's ``in_features`` must be a multiple of m (the
    training projection works on whole groups; ``SparseLinear`` pads, so ``sparsify`` passes
    False): a default target that is not is skipped, one chosen by ``include`` or a mark raises.
    Returns an empty ``targets`` rather than raising when nothing is selected.
    """
    asked = None if pattern is None else as_pattern(pattern)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    trainers = sorted({f"{mk['by']} {mk['pattern']}" for _, m in linears if (mk := marked(m)) is not None})
    dense = {} if trainers or include is not None else dense_by_default(model)
    targets: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, module in linears:
        mk = marked(module)
        if include is not None and matches(include, name, module, "include") is None:
            skipped[name] = "not selected by include"
            continue
        if exclude is not None and (by := matches(exclude, name, module, "exclude")) is not None:
            skipped[name] = f"excluded by {by}"
            continue
        if include is None and trainers and mk is None:
            skipped[name] = (
                f"not trained sparse (the trained layers are marked: {', '.join(trainers)}); "
                "name it in include= to prune it anyway"
            )
            continue
        if name in dense:
            skipped[name] = f"{dense[name]}; name it in include= to make it sparse"
            continue
        layer_pattern = layer_pattern_of(name, module, asked)
        rows, cols = layer_pattern.block
        if whole_groups and (module.in_features % cols or module.out_features % rows):
            reason = (f"in_features {module.in_features} is not a multiple of m={cols}" if rows == 1 else
                      f"its {module.out_features}x{module.in_features} weight does not tile into the "
                      f"{rows}x{cols} blocks of {layer_pattern}")
            if include is not None or mk is not None:
                raise ValueError(f"layer {name!r} cannot be trained to {layer_pattern}: {reason}; exclude it")
            skipped[name] = reason
            continue
        targets[name] = module
    return targets, skipped


def layer_pattern_of(name: str, module: nn.Module, asked: Pattern | None) -> Pattern:
    """The pattern of a target: its mark's; ``asked`` must agree with it. Unmarked: ``asked`` or 2:4."""
    mk = marked(module)
    if mk is None:
        return asked if asked is not None else as_pattern(DEFAULT_PATTERN)
    own = as_pattern(mk["pattern"])
    if asked is not None and asked != own:
        raise ValueError(
            f"layer {name!r} was trained to {own} by {mk['by']}, but {asked} was asked: "
            f"pass pattern={str(own)!r} (or leave it out), or choose the layers with include="
        )
    return own
