"""The pattern entry point: every kind (``nxm_kernels.patterns``) by its text form.

``"2:4"`` row N:M (n of every m along the last dimension, the industry convention; the
NxMTransformer paper's "4x2" is our ``2:4``), ``"2:4t"`` transposable N:M, ``"8:4x4"`` k of every
R x C block, ``"4x4{f0f0,0f0f}"`` a library of block masks (``Pattern.library(masks)``).
"""

from __future__ import annotations

from typing import Union

import torch

from .patterns import KINDS, MAX_GROUP, Pattern, PatternKind

PatternLike = Union[PatternKind, str, tuple]

FORMS = "; ".join(kind.form for kind in KINDS)


def parse(text: str) -> PatternKind:
    """The pattern written as ``text``, in any kind's form."""
    for kind in KINDS:
        pattern = kind.from_text(text)
        if pattern is not None:
            return pattern
    raise ValueError(f"cannot parse pattern {text!r}: write it as {FORMS}")


def as_pattern(pattern: PatternLike) -> PatternKind:
    """Accept a pattern kind, its text form or ``(n, m)`` (row N:M)."""
    if isinstance(pattern, PatternKind):
        return pattern
    if isinstance(pattern, str):
        return parse(pattern)
    if isinstance(pattern, tuple) and len(pattern) == 2:
        return Pattern(*pattern)
    raise TypeError(f"pattern must be a Pattern, 'n:m' string or (n, m) tuple (or any kind's text form: {FORMS}), "
                    f"got {pattern!r}")


def check_groups(shape: torch.Size | tuple, pattern: PatternKind, what: str = "weight") -> None:
    """The shape must tile into the pattern's blocks (row n:m: whole groups of m along dim -1)."""
    pattern.check_shape(shape, what)


__all__ = ["FORMS", "MAX_GROUP", "Pattern", "PatternKind", "PatternLike", "as_pattern", "check_groups", "parse"]
