"""Blocks, ``"k:RxC"``: keep the ``k`` best of every ``R x C`` block (e.g. ``"8:4x4"``).

The k largest scores of a block maximize their sum, so selection is a stable sort: ties go to the
lowest flat index (row-major inside the block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import PatternKind, select_blocks, to_blocks

MAX_BLOCK = 256  # entries per block

_TEXT = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*x\s*(\d+)\s*")


@dataclass(frozen=True)
class BlockPattern(PatternKind):
    """Keep ``k`` of every ``rows x cols`` block."""

    k: int
    rows: int
    cols: int

    def __post_init__(self):
        if not all(isinstance(v, int) for v in (self.k, self.rows, self.cols)):
            raise TypeError(f"BlockPattern(k, rows, cols) takes three ints, got {self.k!r}, {self.rows!r}, {self.cols!r}")
        size = self.rows * self.cols
        if not (self.rows >= 1 and self.cols >= 1 and 1 <= self.k < size <= MAX_BLOCK):
            raise ValueError(
                f"unsupported pattern {self}: need 1 <= k < R*C <= {MAX_BLOCK} "
                "(keep k of every R x C block), e.g. '8:4x4'"
            )

    form = "'k:RxC' (keep k of every R x C block), e.g. '8:4x4'"
    kind = "block"

    @classmethod
    def from_text(cls, text: str):
        match = _TEXT.fullmatch(text)
        return None if match is None else cls(int(match[1]), int(match[2]), int(match[3]))

    @property
    def block(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def kept_fraction(self) -> float:
        return self.k / (self.rows * self.cols)

    @property
    def kept_per_block(self) -> int:
        return self.k

    def mask(self, w: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        from ..reference import selection_keys  # exact keys (|w| as integers, or float scores)

        def choose(w_blocks, s_blocks):
            keys = selection_keys(w_blocks, s_blocks)
            order = torch.sort(keys, dim=-1, descending=True, stable=True).indices  # ties: lower index first
            kept = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
            return kept.scatter_(-1, order[:, :self.k], True)

        return select_blocks(w, scores, self.rows, self.cols, 4 * self.rows * self.cols, choose)

    def projection_scores(self, w: torch.Tensor) -> None:
        return None  # the largest |w| are the largest w**2

    def is_valid(self, t: torch.Tensor) -> bool:
        return bool(((to_blocks(t, self.rows, self.cols) != 0).sum(-1) <= self.k).all())

    def __str__(self) -> str:
        return f"{self.k}:{self.rows}x{self.cols}"
