"""``tiled_q``: int8/int4 2:4 weights stored tile by tile for the Triton decode GEMM
(``backends/triton/quant_gemm.py``), so that every load of a program is contiguous.

A weight ``[N, K]`` is a grid of tiles of ``TILE_N = 16`` rows x ``TILE_K = 64`` input features.
Row block ``r`` (rows ``16r .. 16r+15``) is one contiguous run: its ``K/64`` tiles in order along
K, each tile row by row. A GEMM program that owns a row block and steps along K therefore reads
one contiguous stream of codes and one of metadata, 32 or 16 bytes (int8 / int4) and 8 bytes per
tile row: 128-bit loads for the codes.

values   [N/16, (K/64)*16*32] int8 codes; tile (r, t), row i, kept slot j (group j // 2, its
         first or second kept value) at ``[r, (t*16 + i)*32 + j]``. For int4 the encoding packs
         two codes per byte (``encodings/integer.py``): ``[N/16, (K/64)*16*16]`` uint8, so byte
         j of a tile row holds group j's two codes (first in the low nibble).
metadata [N/16, (K/64)*16*8] uint8; the two 2-bit positions of each group of 4 as a nibble (first
         kept position in bits 0-1, second in bits 2-3), two groups per byte (even group in the
         low nibble): tile (r, t), row i, group q (0..15) at ``[r, (t*16 + i)*8 + q//2]``.
scales   the encoding's: fp32 ``[N, groups]`` (one per row, or per ``g`` input features with
         ``g`` a multiple of 64, so that a tile never straddles two scales).

Each tile row is the ``packed`` layout's 2:4 row segment as it is (same value order, same
nibbles), so converting between the two is a permutation of whole tile rows.
"""

from __future__ import annotations

import torch

from ..pattern import Pattern
from . import packed
from .base import Layout, TensorSpec
from .cutlass import VALID_NIBBLES_2_4
from .registry import register_layout

TILE_N = 16  # rows per tile: one mma N-tile of the GEMM (a multiple of 8)
TILE_K = 64  # input features per tile: 32 int8 / 16 int4 code bytes and 8 metadata bytes per row
PATTERN = Pattern(2, 4)
CODES_PER_ROW = TILE_K // 2  # kept values of a tile row
META_PER_ROW = TILE_K // 8  # metadata bytes of a tile row


def to_tiles(rows_major: torch.Tensor, per_row: int) -> torch.Tensor:
    """``[N, K/64 * per_row]`` (each row's tiles in order) -> ``[N/16, K/64 * 16 * per_row]``."""
    n, width = rows_major.shape
    tiles = width // per_row
    return (rows_major.reshape(n // TILE_N, TILE_N, tiles, per_row).transpose(1, 2)
            .reshape(n // TILE_N, tiles * TILE_N * per_row))


def from_tiles(tiled: torch.Tensor, shape, per_row: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles` for a weight of ``shape``: ``[N, K/64 * per_row]``."""
    rows, tiles = shape[0], shape[1] // TILE_K
    return (tiled.reshape(rows // TILE_N, tiles, TILE_N, per_row).transpose(1, 2)
            .reshape(rows, tiles * per_row))


def nibbles(metadata: torch.Tensor, shape) -> torch.Tensor:
    """``[N, K/4]`` nibbles (group order) of tiled metadata."""
    rows_major = from_tiles(metadata, shape, META_PER_ROW).to(torch.int16)
    return torch.stack((rows_major & 0xF, rows_major >> 4), -1).reshape(shape[0], shape[1] // 4)


class TiledQLayout(Layout):
    name = "tiled_q"
    description = "int8/int4 2:4 codes in 16x64 tiles, each program's loads contiguous (the Triton decode GEMM's)"
    # It holds the codes of a quantized weight (any float dtype dequantizes from them); the
    # weight's own float values have the other layouts.
    value_dtypes = (torch.int8,)
    encodings = ("int8", "int4")
    kinds = ("row",)

    def dtype_reasons(self, dtype):
        if dtype in self.value_dtypes:
            return []
        return [f"layout {self.name!r} holds int8/int4 codes of a quantized weight, not {dtype} values: compress "
                "with bits=8 or bits=4 (SparseLinear: weight_bits=), or use layout 'packed' for float values"]

    def encoding_reasons(self, encoding):
        why = super().encoding_reasons(encoding)
        if why and not encoding.quantized:
            why.append("to store it here, quantize it: compress with bits=8 or bits=4")
        if not why and encoding.group_size is not None and encoding.group_size % TILE_K:
            why.append(f"layout {self.name!r} needs group_size a multiple of {TILE_K} (a {TILE_K}-feature tile shares "
                       f"one scale in its GEMM), got {encoding.group_size}: use group_size=64 or 128 (or None), or "
                       "layout 'packed'")
        return why

    def shape_reasons(self, dtype, shape, pattern):
        why = []
        if pattern != PATTERN:
            why.append(f"layout {self.name!r} holds pattern {PATTERN} only (its GEMM expands groups of 4), not "
                       f"{pattern}: use pattern '2:4' or layout 'packed'")
        rows, cols = shape
        if rows % TILE_N or cols % TILE_K:
            why.append(f"layout {self.name!r} stores {TILE_N}x{TILE_K} tiles: rows must be divisible by {TILE_N} and "
                       f"columns by {TILE_K}, got {rows}x{cols}: pad the weight (SparseLinear does) or use "
                       "layout 'packed'")
        return why

    def multiples(self, dtype, pattern):
        return TILE_N, TILE_K

    def storage(self, dtype, shape, pattern):
        rows, cols = shape
        tiles = cols // TILE_K
        return {"values": TensorSpec((rows // TILE_N, tiles * TILE_N * CODES_PER_ROW), dtype),
                "metadata": TensorSpec((rows // TILE_N, tiles * TILE_N * META_PER_ROW), torch.uint8)}

    def check_metadata(self, values, metadata, shape, pattern):
        nib = nibbles(metadata, shape)
        bad = ~torch.isin(nib, torch.tensor(VALID_NIBBLES_2_4, dtype=nib.dtype, device=nib.device))
        if bad.any():
            row, group = (int(i) for i in bad.nonzero()[0])
            value = int(nib[row, group])
            raise ValueError(f"corrupt tiled_q metadata: group {group} of row {row} has positions "
                             f"({value & 3}, {value >> 2}), which repeat a position or are out of order; "
                             "re-create the weight with nxm.compress")

    def compress(self, w, pattern, scores=None):
        values, metadata = packed.compress(w, pattern, scores)
        return to_tiles(values, CODES_PER_ROW), to_tiles(metadata, META_PER_ROW)

    def decompress(self, values, metadata, shape, pattern):
        return packed.decompress(from_tiles(values, shape, CODES_PER_ROW), from_tiles(metadata, shape, META_PER_ROW),
                                 shape, pattern)


TILED_Q = register_layout(TiledQLayout())
