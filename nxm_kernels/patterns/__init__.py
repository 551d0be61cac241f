"""Pattern kinds, one module each: which entries of a weight may be kept.

- :class:`Pattern` (``"2:4"``): row N:M, n of every m along the last dimension;
- :class:`TransposablePattern` (``"2:4t"``): every m x m block n:m along rows and columns;
- :class:`BlockPattern` (``"8:4x4"``): k of every R x C block;
- :class:`LibraryPattern` (``Pattern.library(masks)``): each block one of a set of masks.

``nxm_kernels.pattern.as_pattern`` parses every kind's text form.
"""

from .base import PatternKind
from .block import BlockPattern
from .library import LibraryPattern
from .row import MAX_GROUP, Pattern
from .transposable import TransposablePattern

# Every kind's ``from_text`` answers None for text not in its form.
KINDS = (Pattern, TransposablePattern, BlockPattern, LibraryPattern)

__all__ = ["KINDS", "MAX_GROUP", "BlockPattern", "LibraryPattern", "Pattern", "PatternKind", "TransposablePattern"]
