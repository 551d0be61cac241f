"""Transposable N:M, ``"n:mt"``: every m x m block is n:m along its rows and along its columns.

W and W^T are then both row n:m, so the backward pass (``grad @ W``) can run on the same sparse
kernels as the forward. Selection is exact: the best of all valid block masks.

**Mask numbers.** The valid masks of a block are numbered in decreasing order of their bits read
row-major with the block's first entry as the most significant bit. Mask 0 is thus the one whose
kept flat indices are lexicographically smallest, and "lowest mask number" among the best masks
is the lowest-flat-index tie rule of every kind.

2:4t (90 masks) has a faster search (meet in the middle): one matmul gives, per block, the sums
of every choice for rows 0-1 and for rows 2-3, each carrying a tie code in its low bits; the best
of each column-count class of rows 0-1 pairs with the best of the complementary class of rows
2-3, and the largest total names the mask through its tie code. Other n:mt compare all their
masks, when there are at most ``MAX_MASKS``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass

import torch

from .base import PatternKind, block_integers, linear_scores, mask_numbers, select_blocks, to_blocks
from .row import MAX_GROUP, Pattern

MAX_MASKS = 4096

_TEXT = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*t\s*")


@functools.lru_cache(maxsize=None)
def valid_masks(n: int, m: int) -> torch.Tensor | None:
    """Bool ``[K, m*m]``: every m x m mask that is n:m along rows and columns, by mask number
    (None when there are more than ``MAX_MASKS``)."""
    choices = list(itertools.combinations(range(m), n))  # lexicographic: decreasing row bits

    def extend(prefix, used):
        left = m - len(prefix)
        if left == 0:
            yield prefix
            return
        for row in choices:
            now = list(used)
            for col in row:
                now[col] += 1
            if max(now) <= n and min(now) >= n - (left - 1):
                yield from extend(prefix + [row], now)

    found = list(itertools.islice(extend([], [0] * m), MAX_MASKS + 1))
    if len(found) > MAX_MASKS:
        return None
    masks = torch.zeros(len(found), m, m, dtype=torch.bool)
    for k, rows in enumerate(found):
        for r, cols in enumerate(rows):
            masks[k, r, list(cols)] = True
    return masks.reshape(len(found), m * m)


@dataclass(frozen=True)
class TransposablePattern(PatternKind):
    """Every ``m x m`` block keeps ``n`` per row and ``n`` per column."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise TypeError(f"TransposablePattern(n, m) takes two ints, got n={self.n!r}, m={self.m!r}")
        if not 1 <= self.n < self.m <= MAX_GROUP:
            raise ValueError(f"unsupported pattern {self.n}:{self.m}t: need 1 <= n < m <= {MAX_GROUP}, e.g. '2:4t'")
        if valid_masks(self.n, self.m) is None:
            raise ValueError(
                f"pattern {self}: a {self.m}x{self.m} block has more than {MAX_MASKS} valid masks, too many "
                f"for the exact search; use a transposable pattern with m <= 5 (e.g. '2:4t'), '1:6t' or "
                f"'5:6t', or the row pattern '{self.n}:{self.m}'"
            )

    form = "'n:mt' (every m x m block n:m along rows and columns), e.g. '2:4t'"
    kind = "transposable"

    @classmethod
    def from_text(cls, text: str):
        match = _TEXT.fullmatch(text)
        return None if match is None else cls(int(match[1]), int(match[2]))

    @property
    def block(self) -> tuple[int, int]:
        return self.m, self.m

    @property
    def kept_fraction(self) -> float:
        return self.n / self.m

    @property
    def row_form(self) -> Pattern:
        """Rows of W, and of W^T, are row n:m: row layouts store both (``NMSparseWeight.transposed``)."""
        return Pattern(self.n, self.m)

    @property
    def kept_per_block(self) -> int:
        return self.n * self.m

    @property
    def index_bits(self) -> int:
        """Bits per kept-value index when W (or W^T) is stored as row n:m."""
        return max(1, math.ceil(math.log2(self.m)))

    @property
    def masks(self) -> torch.Tensor:
        """Bool ``[K, m, m]``: the valid block masks, by mask number."""
        return valid_masks(self.n, self.m).view(-1, self.m, self.m)

    def mask(self, w: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        if (self.n, self.m) == (2, 4):
            return select_blocks(w, scores, 4, 4, 120, _best_2_4t)
        table = valid_masks(self.n, self.m).to(w.device)

        def choose(w_blocks, s_blocks):
            return table[mask_numbers(linear_scores(w_blocks, s_blocks), table)]

        return select_blocks(w, scores, self.m, self.m, table.shape[0] + self.m * self.m, choose)

    def is_valid(self, t: torch.Tensor) -> bool:
        nonzero = to_blocks(t != 0, self.m, self.m).view(-1, self.m, self.m)
        return bool((nonzero.sum(-1) <= self.n).all() and (nonzero.sum(-2) <= self.n).all())

    def __str__(self) -> str:
        return f"{self.n}:{self.m}t"


# ---------------------------------------------------------------- the 2:4t search

_PAIRS = list(itertools.combinations(range(4), 2))  # the 6 choices of a row, in decreasing row bits
_TIE = 2048  # tie codes run below 6**4 = 1296


@functools.lru_cache(maxsize=None)
def _tables_2_4t(device: torch.device):
    """(selector [16, 72], tie codes [72], class sizes, tie code -> mask [1296, 16]).

    Column j < 36 of the selector sums one choice for rows 0-1, column 36 + j one for rows 2-3;
    both halves list their classes in the same order (singletons, then pairs, then the class of
    six), class by class complementary in column counts.
    """
    classes: dict[tuple, tuple[set, set]] = {}
    code_mask = torch.zeros(6 ** 4, 16, dtype=torch.bool)
    for mask in valid_masks(2, 4).view(-1, 4, 4):
        q = [_PAIRS.index(tuple(row.nonzero().flatten().tolist())) for row in mask]
        # Larger for lexicographically smaller choices (q0, q1, q2, q3), i.e. lower mask numbers.
        code_mask[sum((5 - q[r]) * 6 ** (3 - r) for r in range(4))] = mask.flatten()
        upper, lower = classes.setdefault(tuple(mask[:2].sum(0).tolist()), (set(), set()))
        upper.add((q[0], q[1]))
        lower.add((q[2], q[3]))
    order = sorted(classes, key=lambda c: len(classes[c][0]))
    columns, ties = [], []
    for half, rows in enumerate(((0, 1), (2, 3))):
        for count in order:
            for choice in sorted(classes[count][half]):
                column = torch.zeros(16, dtype=torch.float64)
                for row, q in zip(rows, choice):
                    column[[4 * row + j for j in _PAIRS[q]]] = 1
                columns.append(column)
                ties.append(sum((5 - q) * 6 ** (3 - row) for row, q in zip(rows, choice)))
    sizes = [len(classes[c][0]) for c in order]
    selector = torch.stack(columns, 1).to(device)
    return selector, torch.tensor(ties, dtype=torch.float64, device=device), sizes, code_mask.to(device)


def _best_2_4t(w_blocks: torch.Tensor, s_blocks: torch.Tensor | None) -> torch.Tensor:
    selector, ties, sizes, code_mask = _tables_2_4t(w_blocks.device)
    scores = linear_scores(w_blocks, s_blocks)
    # 8 entries below 2**39 sum below 2**42; with the tie code below 2**53: exact in float64.
    ints, exact = block_integers(scores, 39)
    halves = torch.addmm(ties, ints, selector, alpha=_TIE).view(-1, 2, 36)
    singles, pairs = sizes.count(1), sizes.count(2)
    best_of = torch.empty(halves.shape[0], 2, len(sizes), dtype=torch.float64, device=halves.device)
    best_of[:, :, :singles] = halves[:, :, :singles]
    doubles = halves[:, :, singles:singles + 2 * pairs]
    torch.maximum(doubles[:, :, 0::2], doubles[:, :, 1::2], out=best_of[:, :, singles:singles + pairs])
    best_of[:, :, -1] = halves[:, :, singles + 2 * pairs:].amax(-1)
    total = (best_of[:, 0] + best_of[:, 1]).amax(-1)
    kept = code_mask.index_select(0, torch.remainder(total, _TIE).to(torch.int64))
    if not bool(exact.all()):  # blocks that lost bits: the general search allows for the loss
        table = valid_masks(2, 4).to(w_blocks.device)
        kept[~exact] = table[mask_numbers(scores[~exact], table)]
    return kept
