"""The N:M pattern: keep ``n`` of every ``m`` consecutive values along the last dimension.

This is the industry convention (PyTorch, SR-STE, Wanda). The NxMTransformer paper names the
same pattern the other way round: its "4x2" (groups of 4, keep 2) is our ``2:4``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

MAX_GROUP = 16

PatternLike = Union["Pattern", str, tuple]


@dataclass(frozen=True)
class Pattern:
    """Keep ``n`` of every ``m`` consecutive values along the reduction (last) dimension."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise TypeError(f"Pattern(n, m) takes two ints, got n={self.n!r}, m={self.m!r}")
        if not 1 <= self.n < self.m <= MAX_GROUP:
            raise ValueError(
                f"unsupported pattern {self.n}:{self.m}: need 1 <= n < m <= {MAX_GROUP} "
                "(keep n of every m values), e.g. '2:4', '1:2', '2:8'"
            )

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """``"2:4"`` -> ``Pattern(2, 4)``."""
        parts = text.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"cannot parse pattern {text!r}: write it as 'n:m' (keep n of every m), e.g. '2:4'"
            )
        return cls(int(parts[0]), int(parts[1]))

    @property
    def index_bits(self) -> int:
        """Bits per kept-value index in the ``packed`` layout: ceil(log2 m)."""
        return max(1, math.ceil(math.log2(self.m)))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def as_pattern(pattern: PatternLike) -> Pattern:
    """Accept ``Pattern``, ``"n:m"`` or ``(n, m)``."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        return Pattern.parse(pattern)
    if isinstance(pattern, tuple) and len(pattern) == 2:
        return Pattern(*pattern)
    raise TypeError(f"pattern must be a Pattern, 'n:m' string or (n, m) tuple, got {pattern!r}")


def check_groups(shape: torch.Size | tuple, pattern: Pattern, what: str = "weight") -> None:
    """The last dimension must split into whole groups of ``m``."""
    if len(shape) == 0:
        raise ValueError(f"{what} must have at least one dimension, got a scalar")
    cols = shape[-1]
    if cols % pattern.m != 0:
        raise ValueError(
            f"{what} last dimension {cols} is not divisible by m={pattern.m} of pattern {pattern}: "
            f"pad in_features to a multiple of {pattern.m} (SparseLinear does this for you)"
        )
