"""A layer's compression configuration, and plans: one configuration per layer name.

A plan is what ``nxm_kernels.training.search`` writes and what ``sparsify(model, plan=...)``,
every sparsifier (``plan=``) and ``nxm sparsify --plan`` read, as JSON::

    {"bert.encoder.layer.0.attention.self.query": {"pattern": "2:4", "weight_bits": 8,
                                                   "group_size": null, "act_bits": null}, ...}

``pattern: null`` keeps a layer dense (float); a layer the plan does not name is not touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Union

from .encodings import from_bits
from .pattern import PatternKind, PatternLike, as_pattern

FIELDS = ("pattern", "weight_bits", "group_size", "act_bits")


@dataclass(frozen=True)
class LayerConfig:
    """How one Linear is stored: its pattern (None: dense float) and value encoding."""

    pattern: PatternKind | None
    weight_bits: int | None = None
    group_size: int | None = None
    act_bits: int | None = None

    @classmethod
    def make(cls, pattern: PatternLike | None, weight_bits=None, group_size=None, act_bits=None) -> "LayerConfig":
        config = cls(None if pattern is None else as_pattern(pattern), weight_bits, group_size, act_bits)
        from_bits(weight_bits, group_size)  # refuses bad bits / group_size, with the reason
        if act_bits is not None and (act_bits != 8 or weight_bits is None):
            raise ValueError(f"act_bits={act_bits!r}: act_bits=8 (int8 activations per token) needs weight_bits=8 "
                             "or 4; leave act_bits=None for float activations")
        if pattern is None and weight_bits is not None:
            raise ValueError(f"a dense layer with weight_bits={weight_bits}: quantized weights are stored N:M "
                             "(give a pattern), or keep the layer dense float (weight_bits=None)")
        return config

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    def as_dict(self) -> dict:
        return {"pattern": None if self.pattern is None else str(self.pattern), "weight_bits": self.weight_bits,
                "group_size": self.group_size, "act_bits": self.act_bits}

    def __str__(self) -> str:
        if self.pattern is None:
            return "dense"
        bits = "fp" if self.weight_bits is None else f"int{self.weight_bits}"
        group = "" if self.group_size is None else f" g{self.group_size}"
        act = "" if self.act_bits is None else f" a{self.act_bits}"
        return f"{self.pattern} {bits}{group}{act}"


def parse_config(text: str) -> LayerConfig:
    """A configuration from its text form, as :class:`LayerConfig` prints it: a pattern or
    ``dense``, then ``fp`` (default), ``int8`` or ``int4``, optionally ``g<group size>`` and ``a8``
    (int8 activations): ``"2:4 int4 g128"``, ``"1:4 int8"``, ``"2:4 fp"``, ``"dense"``."""
    words = text.split()
    if not words:
        raise ValueError("an empty configuration: give e.g. '2:4 int8', '2:4 int4 g128' or 'dense'")
    fields = {"pattern": None if words[0] == "dense" else words[0]}
    for word in words[1:]:
        if word in ("fp", "int8", "int4"):
            fields["weight_bits"] = None if word == "fp" else int(word[3:])
        elif word[0] == "g" and word[1:].isdigit():
            fields["group_size"] = int(word[1:])
        elif word == "a8":
            fields["act_bits"] = 8
        else:
            raise ValueError(f"{word!r} in configuration {text!r}: expected fp, int8, int4, g<group size> or a8 "
                             "after the pattern (e.g. '2:4 int4 g128')")
    try:
        return LayerConfig.make(**fields)
    except ValueError as e:
        raise ValueError(f"configuration {text!r}: {e}") from None


PlanLike = Union[str, os.PathLike, Mapping[str, Union[LayerConfig, Mapping]]]


def load_plan(plan: PlanLike) -> dict[str, LayerConfig]:
    """``{layer name: LayerConfig}`` from a plan: a JSON file's path, or a mapping of layer names to
    LayerConfigs or dicts with the keys of :data:`FIELDS`."""
    if isinstance(plan, (str, os.PathLike)):
        with open(plan) as f:
            plan = json.load(f)
    if not isinstance(plan, Mapping):
        raise TypeError(f"a plan is a JSON file or a mapping of layer names to configurations, "
                        f"got {type(plan).__name__}")
    configs = {}
    for name, entry in plan.items():
        if isinstance(entry, LayerConfig):
            configs[name] = entry
            continue
        if not isinstance(entry, Mapping) or "pattern" not in entry or set(entry) - set(FIELDS):
            raise ValueError(f"plan entry {name!r} must be a dict with 'pattern' and optionally weight_bits, "
                             f"group_size, act_bits; got {entry!r}")
        try:
            configs[name] = LayerConfig.make(**entry)
        except (TypeError, ValueError) as e:
            raise ValueError(f"plan entry {name!r}: {e}") from e
    return configs


def save_plan(plan: Mapping[str, LayerConfig], path: str | os.PathLike) -> None:
    """Write ``plan`` as JSON (sorted by nothing: the model's order, as given)."""
    with open(path, "w") as f:
        json.dump({name: config.as_dict() for name, config in plan.items()}, f, indent=1)
        f.write("\n")
