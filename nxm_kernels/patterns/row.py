"""Row N:M, ``"n:m"``: keep ``n`` of every ``m`` consecutive values along the last dimension.

This is the industry convention (PyTorch, SR-STE, Wanda). The NxMTransformer paper names the
same pattern the other way round: its "4x2" (groups of 4, keep 2) is our ``2:4``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .base import PatternKind

MAX_GROUP = 16

_TEXT = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


@dataclass(frozen=True)
class Pattern(PatternKind):
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

    form = "'n:m' (keep n of every m), e.g. '2:4'"
    kind = "row"

    @classmethod
    def from_text(cls, text: str):
        """``"2:4"`` -> ``Pattern(2, 4)``."""
        match = _TEXT.fullmatch(text)
        return None if match is None else cls(int(match[1]), int(match[2]))

    @staticmethod
    def library(masks) -> "PatternKind":
        """A library of allowed block masks (pattern pruning): see :class:`LibraryPattern`."""
        from .library import LibraryPattern  # the library module builds on this one

        return LibraryPattern.from_masks(masks)

    @property
    def block(self) -> tuple[int, int]:
        return 1, self.m

    @property
    def kept_fraction(self) -> float:
        return self.n / self.m

    @property
    def row_form(self) -> "Pattern":
        return self

    @property
    def kept_per_block(self) -> int:
        return self.n

    @property
    def index_bits(self) -> int:
        """Bits per kept-value index in the ``packed`` layout: ceil(log2 m)."""
        return max(1, math.ceil(math.log2(self.m)))

    def check_shape(self, shape, what: str = "weight") -> None:
        """The last dimension must split into whole groups of ``m``."""
        if len(shape) == 0:
            raise ValueError(f"{what} must have at least one dimension, got a scalar")
        cols = shape[-1]
        if cols % self.m != 0:
            raise ValueError(
                f"{what} last dimension {cols} is not divisible by m={self.m} of pattern {self}: "
                f"pad in_features to a multiple of {self.m} (SparseLinear does this for you)"
            )

    # The row kind's selection is the package's reference selection, which its kernels match.
    def mask(self, w: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        from .. import reference  # reference imports the pattern kinds

        return reference.nm_mask(w, self, scores)

    def projection_scores(self, w: torch.Tensor) -> None:
        return None  # the largest |w| are the largest w**2

    def is_valid(self, t: torch.Tensor) -> bool:
        from .. import reference

        return reference.is_nm_sparse(t, self)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"
