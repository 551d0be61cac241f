"""The ``PatternKind`` interface, and the exact best-mask search that block kinds share.

A pattern kind says which entries of a weight ``[out_features, in_features]`` may be kept. It
tiles the weight with blocks of ``block = (rows, cols)``; selection keeps, in every block, the
allowed mask that maximizes the sum of the scores over its kept entries (default score ``|w|``).
Ties go to the lowest flat index (the kept flat indices, row-major inside the block, compared
lexicographically), or for a mask library to the lowest mask number, so every backend agrees bit
for bit.

Sums are compared exactly. Each block's scores are scaled by a power of two into integers held
in float64, whose sums are exact whatever the summation order (no bit is lost for fp16 |w|, nor
for any block spanning less than ~2^35 in magnitude). A block that lost bits and whose best masks
come within that loss of each other is settled with Python fractions.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

# Elements a chunk of blocks holds at once: bounds memory without a Python loop over blocks.
CHUNK_ELEMENTS = 1 << 21


class PatternKind:
    """Base class of every pattern kind. Instances are immutable and hashable."""

    #: (rows, cols) of the blocks the kind tiles a weight with.
    block: tuple[int, int]

    #: The text form, for messages: "'n:m' (keep n of every m), e.g. '2:4'".
    form: str

    #: The kind's name, which backends and layouts list in what they serve ("row", "block", ...).
    kind: str

    @property
    def row_form(self):
        """The row n:m pattern every row of a weight in this kind satisfies and row layouts store
        (itself for row n:m), or None when rows alone cannot hold the kind."""
        return None

    @property
    def kept_per_block(self) -> int:
        """Entries every block keeps."""
        raise NotImplementedError

    @classmethod
    def from_text(cls, text: str):
        """The pattern written as ``text``, or None when ``text`` is not in this kind's form."""
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str):
        """The pattern written as ``text``; ValueError naming the form when it is not one."""
        pattern = cls.from_text(text)
        if pattern is None:
            raise ValueError(f"cannot parse pattern {text!r}: write it as {cls.form}")
        return pattern

    @property
    def kept_fraction(self) -> float:
        """The share of a weight's entries that selection keeps."""
        raise NotImplementedError

    def mask(self, w: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Bool tensor of ``w``'s shape: the kept entries (the reference selection)."""
        raise NotImplementedError

    def is_valid(self, t: torch.Tensor) -> bool:
        """True when the nonzeros of ``t`` fit the pattern in every block."""
        raise NotImplementedError

    def projection_scores(self, w: torch.Tensor) -> torch.Tensor | None:
        """Scores under which selection is the Euclidean projection onto the pattern (the ADMM
        Z-step): ``w**2``, exact in float64. None for kinds that keep the largest entries, where
        ``|w|`` already selects the same mask."""
        return w.to(torch.float64).square()

    def check_shape(self, shape, what: str = "weight") -> None:
        """Raise ValueError naming the block and the padding unless ``shape`` tiles into blocks."""
        rows, cols = self.block
        if len(shape) < 2:
            raise ValueError(f"{what} must be 2-D [out_features, in_features] for pattern {self} "
                             f"({rows}x{cols} blocks), got shape {tuple(shape)}")
        height, width = shape[-2], shape[-1]
        if height % rows or width % cols:
            raise ValueError(
                f"{what} of shape {tuple(shape)} does not tile into the {rows}x{cols} blocks of pattern "
                f"{self}: pad it with zeros to {-(-height // rows) * rows}x{-(-width // cols) * cols} "
                f"(out_features to a multiple of {rows}, in_features to a multiple of {cols})"
            )

    def __repr__(self) -> str:
        return f"<pattern {self}>"


# ---------------------------------------------------------------- blocks


def to_blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[..., H, W]`` -> ``[blocks, rows*cols]``: blocks in row-major order, entries row-major."""
    width = t.shape[-1]
    return t.reshape(-1, rows, width // cols, cols).transpose(1, 2).reshape(-1, rows * cols)


def select_blocks(w: torch.Tensor, scores: torch.Tensor | None, rows: int, cols: int, per_block: int,
                  choose) -> torch.Tensor:
    """The bool mask of ``w`` (``[..., H, W]``), one chunk of block rows at a time (bounded memory).

    ``choose(w_blocks, score_blocks)`` takes ``[blocks, rows*cols]`` tensors (``score_blocks`` None
    when ``scores`` is) and returns their bool masks; ``per_block`` is about the elements it holds
    per block, which sizes the chunks.
    """
    width = w.shape[-1]
    grid = (-1, rows, width // cols, cols)
    w4 = w.reshape(grid)
    s4 = None if scores is None else scores.reshape(grid)
    out = torch.empty(w4.shape, dtype=torch.bool, device=w.device)
    step = max(1, CHUNK_ELEMENTS // (per_block * (width // cols)))
    for start in range(0, w4.shape[0], step):
        part = slice(start, start + step)
        w_blocks = w4[part].transpose(1, 2).reshape(-1, rows * cols)
        s_blocks = None if s4 is None else s4[part].transpose(1, 2).reshape(-1, rows * cols)
        kept = choose(w_blocks, s_blocks)
        out[part] = kept.view(-1, width // cols, rows, cols).transpose(1, 2)
    return out.reshape(w.shape)


def linear_scores(w: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """What a block kind sums, in float64 (exact for every input dtype): ``scores`` or ``|w|``."""
    if scores is not None:
        return scores.to(torch.float64)
    if w.dtype == torch.int8:
        return w.to(torch.float64).abs_()
    return w.abs().to(torch.float64)


def block_integers(s: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block (row of ``s``, float64) by a power of two and truncate to integers below
    2**bits, as float64. Returns (the integers, per block: True where no bit was lost).

    A lossy block is off by less than one unit per entry, which :func:`mask_numbers` allows for.
    """
    top = s.abs().amax(-1, keepdim=True)
    _, exponent = torch.frexp(top)  # top < 2**exponent
    scale = torch.pow(2.0, (bits - exponent).to(torch.float64))
    ints = (s * scale).trunc_()
    exact = ((ints / scale) == s).all(-1)
    return ints, exact


def mask_numbers(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """For each block (row of ``scores``, float64 ``[blocks, P]``), the number of the mask in
    ``masks`` (bool ``[K, P]``) with the largest sum of scores; ties to the lowest number."""
    size = masks.shape[1]
    # Integers below 2**bits summed over P entries stay below 2**53: exact in float64 in any order.
    ints, exact = block_integers(scores, 53 - max(1, math.ceil(math.log2(size))))
    sums = ints @ masks.to(torch.float64).T
    best = sums.argmax(-1)  # the first maximum: the lowest mask number
    # A lossy block is settled here only if another mask comes within the truncation error.
    near = (sums >= sums.gather(-1, best[:, None]) - 2 * size).sum(-1) > 1
    settle_exactly(best, ~exact & near, scores, masks)
    return best


def settle_exactly(best: torch.Tensor, which: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor) -> None:
    """Redo the blocks ``which`` with exact rational sums (rare: lossy and nearly tied)."""
    rows = which.nonzero().flatten().tolist()
    if not rows:
        return
    keep = [m.nonzero().flatten().tolist() for m in masks.cpu()]
    for row in rows:
        values = [Fraction(v) for v in scores[row].tolist()]
        sums = [sum((values[i] for i in kept), Fraction(0)) for kept in keep]
        best[row] = max(range(len(sums)), key=lambda k: (sums[k], -k))
