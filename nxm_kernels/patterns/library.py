"""Libraries, ``Pattern.library(masks)``: a user-given set of allowed ``R x C`` block masks
(pattern pruning). Each block takes the mask of the set with the largest sum of scores over its
kept entries; ties go to the lowest mask number (the mask's position in the set).

Every mask keeps the same number of entries, so a compressed block has a fixed size. The text
form lists the masks in hex, row-major with the block's first entry as the most significant bit:
``"4x4{f0f0,0f0f}"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import PatternKind, linear_scores, mask_numbers, select_blocks, to_blocks

MAX_MASKS = 4096
MAX_BLOCK = 256

_TEXT = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*\{\s*([0-9a-fA-F,\s]+)\}\s*")


@dataclass(frozen=True)
class LibraryPattern(PatternKind):
    """Each ``rows x cols`` block keeps one of ``codes`` (masks as integers, see the module)."""

    rows: int
    cols: int
    codes: tuple[int, ...]

    def __post_init__(self):
        size = self.rows * self.cols
        if not (isinstance(self.rows, int) and isinstance(self.cols, int) and 1 <= size <= MAX_BLOCK):
            raise ValueError(f"a mask library needs blocks of 1 to {MAX_BLOCK} entries, got {self.rows}x{self.cols}")
        if not 1 <= len(self.codes) <= MAX_MASKS:
            raise ValueError(f"a mask library holds 1 to {MAX_MASKS} masks, got {len(self.codes)}")
        if len(set(self.codes)) != len(self.codes):
            raise ValueError("the masks of a library must be distinct: remove the repeated ones")
        for code in self.codes:
            if code <= 0:
                raise ValueError(f"mask {code:x} keeps no entry of its {self.rows}x{self.cols} block: drop it")
            if code >= 1 << size:
                raise ValueError(f"mask {code:x} has more bits than the {self.rows}x{self.cols} block has entries ({size})")
        counts = {bin(c).count("1") for c in self.codes}
        if len(counts) != 1:
            raise ValueError(f"every mask of a library must keep the same number of entries, got {sorted(counts)}")

    @classmethod
    def from_masks(cls, masks) -> "LibraryPattern":
        """From bool-like masks ``[K, rows, cols]`` (a tensor or nested lists)."""
        masks = torch.as_tensor(masks)
        if masks.dim() != 3 or masks.shape[0] == 0:
            raise ValueError(f"Pattern.library takes masks of shape [count, rows, cols], got {tuple(masks.shape)}")
        flat = masks.reshape(masks.shape[0], -1)
        if not bool(((flat == 0) | (flat == 1)).all()):
            raise ValueError("library masks must hold only 0/1 (or False/True)")
        size = flat.shape[1]
        codes = tuple(sum(1 << (size - 1 - i) for i in row.nonzero().flatten().tolist()) for row in flat.cpu())
        return cls(int(masks.shape[1]), int(masks.shape[2]), codes)

    form = "'RxC{hex masks}' (a library of R x C block masks), e.g. '2x2{9,6}'"
    kind = "library"

    @classmethod
    def from_text(cls, text: str):
        match = _TEXT.fullmatch(text)
        if match is None:
            return None
        codes = tuple(int(c, 16) for c in match[3].replace(" ", "").split(",") if c)
        return cls(int(match[1]), int(match[2]), codes)

    @property
    def block(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def kept(self) -> int:
        """Entries every mask keeps."""
        return bin(self.codes[0]).count("1")

    @property
    def kept_fraction(self) -> float:
        return self.kept / (self.rows * self.cols)

    @property
    def kept_per_block(self) -> int:
        return self.kept

    @property
    def masks(self) -> torch.Tensor:
        """Bool ``[K, rows, cols]``, by mask number."""
        size = self.rows * self.cols
        bits = torch.tensor([[(c >> (size - 1 - i)) & 1 for i in range(size)] for c in self.codes])
        return bits.bool().view(-1, self.rows, self.cols)

    def mask(self, w: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        table = self.masks.to(w.device).flatten(1)

        def choose(w_blocks, s_blocks):
            return table[mask_numbers(linear_scores(w_blocks, s_blocks), table)]

        return select_blocks(w, scores, self.rows, self.cols, len(self.codes) + table.shape[1], choose)

    def is_valid(self, t: torch.Tensor) -> bool:
        """Every block's nonzeros lie inside some mask of the library."""
        nonzero = to_blocks(t != 0, self.rows, self.cols).to(torch.float32)
        outside = nonzero @ (~self.masks.to(t.device).flatten(1)).to(torch.float32).T  # [blocks, K]
        return bool((outside == 0).any(-1).all())

    def __str__(self) -> str:
        digits = -(-self.rows * self.cols // 4)
        return f"{self.rows}x{self.cols}{{{','.join(format(c, f'0{digits}x') for c in self.codes)}}}"
