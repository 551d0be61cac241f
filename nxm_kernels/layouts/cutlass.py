"""``cutlass``: the Sparse Tensor Core layout of CUTLASS (and torch's semi-structured tensors).

Byte-identical to torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass.

values   [rows, cols/2]   the two kept values of each group of 4 (fp32 1:2: the one kept of 2)
metadata [rows, cols/16] int16 (fp16/bf16/fp32) or [rows, cols/32] int32 (int8): one nibble per
         group of 4 (fp32: per pair, read as 4 halves), low 2 bits = first kept index, high 2 bits
         = second, nibbles LSB first; then the elements are permuted into CUTLASS's
         ColumnMajorInterleaved<2> order (see :func:`meta_offsets`).
"""

from __future__ import annotations

import functools

import torch

from .. import reference
from ..pattern import Pattern
from .base import Layout, TensorSpec
from .registry import register_layout

# The pattern each dtype's Sparse Tensor Core instruction implements.
PATTERN = {
    torch.float16: Pattern(2, 4),
    torch.bfloat16: Pattern(2, 4),
    torch.int8: Pattern(2, 4),
    torch.float32: Pattern(1, 2),
}


def multiples(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) multiples CUTLASS's metadata reordering needs.

    Rows: CUTLASS reorders metadata in blocks of 32 (int16) / 16 (int32) rows. Columns: the
    reorder swaps metadata in 2x2 blocks, so each row needs an even number of metadata elements
    (16 values per int16 element for fp16/bf16, 8 for fp32 pairs, 32 per int32 element for int8).
    """
    return {torch.int8: (16, 64), torch.float32: (32, 16)}.get(dtype, (32, 32))


def hardware_reasons(layout: str, patterns: dict, mults: tuple[int, int], why: str, dtype, shape, pattern) -> list[str]:
    """The reasons of a layout the hardware reads: one pattern per dtype, shapes in multiples."""
    need = patterns[dtype]
    if pattern != need:
        return [f"layout {layout!r} holds {dtype} only as {need} (the Sparse Tensor Core pattern), "
                f"not {pattern}: use pattern '{need}' or layout='packed'"]
    row_mult, col_mult = mults
    rows, cols = shape
    if rows % row_mult or cols % col_mult:
        return [f"layout {layout!r} for {dtype} needs rows divisible by {row_mult} and columns by "
                f"{col_mult}, got {rows}x{cols} ({why}): pad the weight (SparseLinear does) or use "
                "layout='packed'"]
    return []


# Nonzero flags of a group (bit i = position i is nonzero) -> metadata nibble. Groups with two
# nonzeros encode them; groups with fewer (the weight had zeros) use CUTLASS's fill-in choice,
# which also keeps 1:2 pairs valid. (Codes with three or four flags never come from a projection.)
NIBBLE_OF_FLAGS = (
    0b1110, 0b1000, 0b1001, 0b0100, 0b1110, 0b1000, 0b1001, 0b0100,  # noqa: E241
    0b1110, 0b1100, 0b1101, 0b0100, 0b1110, 0b1100, 0b1101, 0b0100,  # noqa: E241
)
VALID_NIBBLES_2_4 = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)  # idx0 < idx1
VALID_NIBBLES_1_2 = (0b0100, 0b1110)  # fp32 pairs: (0,1) = first kept, (2,3) = second


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int32 if dtype == torch.int8 else torch.int16


def group_size(dtype: torch.dtype) -> int:
    """Values per metadata nibble: a pair for fp32 (1:2), else a group of 4."""
    return PATTERN[dtype].m


def meta_cols(cols: int, dtype: torch.dtype) -> int:
    # One nibble per group, itemsize*2 nibbles per metadata element.
    return cols // (group_size(dtype) * meta_dtype(dtype).itemsize * 2)


@functools.lru_cache(maxsize=32)
def meta_offsets(rows: int, meta_cols: int, meta_dtype: torch.dtype, device) -> torch.Tensor:
    """Flat position in the stored metadata of element (row, col) of the row-major metadata.

    CUTLASS permutes rows inside blocks of 32 (int16) or 16 (int32) rows, swaps the off-diagonal
    elements of every 2x2 block, and stores the result column-major interleaved by 2 columns.
    """
    block, spread = (32, 4) if meta_dtype.itemsize == 2 else (16, 2)
    r = torch.arange(rows, device=device)[:, None].expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device)[None, :].expand(rows, meta_cols)
    r = r // block * block + (r % 8) * spread + (r % block) // 8
    swap = ((r % 2 == 0) & (c % 2 == 1)).long() - ((r % 2 == 1) & (c % 2 == 0)).long()
    r, c = r + swap, c - swap
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def _nibbles_to_meta(nibbles: torch.Tensor, meta_dtype: torch.dtype) -> torch.Tensor:
    """``[rows, quads]`` nibbles -> reordered ``[rows, meta_cols]`` metadata."""
    rows = nibbles.shape[0]
    per_elem = meta_dtype.itemsize * 2
    words = torch.zeros(rows, nibbles.shape[1] // per_elem, dtype=torch.int64, device=nibbles.device)
    for k in range(per_elem):
        words |= nibbles[:, k::per_elem].to(torch.int64) << (4 * k)
    meta = words.to(torch.int32).to(meta_dtype)  # two's-complement wrap, as CUTLASS stores it
    stored = torch.empty(meta.numel(), dtype=meta_dtype, device=meta.device)
    stored[meta_offsets(rows, meta.shape[1], meta_dtype, meta.device)] = meta.reshape(-1)
    return stored.reshape(meta.shape)


def nibbles(metadata: torch.Tensor) -> torch.Tensor:
    """Stored metadata -> ``[rows, quads]`` nibbles (inverse of the reorder and packing)."""
    rows, cols = metadata.shape
    offsets = meta_offsets(rows, cols, metadata.dtype, metadata.device)
    meta = metadata.reshape(-1)[offsets].reshape(rows, cols).to(torch.int64)
    shifts = 4 * torch.arange(metadata.dtype.itemsize * 2, device=metadata.device)
    return ((meta[..., None] >> shifts) & 0xF).reshape(rows, cols * shifts.numel())


def group_indices(nibbles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., k]`` positions of the stored values within each group (fp32: k=1 of 2, else 2 of 4)."""
    if group_size(dtype) == 2:
        return ((nibbles & 3) // 2).long()[..., None]
    return torch.stack((nibbles & 3, nibbles >> 2), -1).long()


def compress(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None):
    rows, cols = w.shape
    mask = reference.nm_mask(w, pattern, scores)
    nonzero_kept = mask & (reference.magnitude_keys(w) != 0)
    group = group_size(w.dtype)
    # Gather each group's 0/1 flag bytes into one word, then into a 4-bit code (little-endian).
    if group == 2:  # a 1:2 pair is encoded as 2:4 over its four fp16 halves [a a b b]
        word = nonzero_kept.reshape(-1, 2).view(torch.int16).squeeze(-1).to(torch.int32)
        code = (word & 1) * 0b0011 | (word >> 8) * 0b1100
    else:
        word = nonzero_kept.reshape(-1, 4).view(torch.int32).squeeze(-1)
        code = (word | word >> 7 | word >> 14 | word >> 21) & 0xF
    nibble = torch.tensor(NIBBLE_OF_FLAGS, dtype=torch.uint8, device=w.device)[code]
    idx = group_indices(nibble, w.dtype)
    values = reference.as_bits(w).reshape(idx.shape[0], group).gather(-1, idx)
    # A slot CUTLASS fills in holds a dropped position: store project(w)'s +0 there, not w's -0.
    values = torch.where(mask.reshape(idx.shape[0], group).gather(-1, idx), values, 0).view(w.dtype)
    meta = _nibbles_to_meta(nibble.reshape(rows, cols // group), meta_dtype(w.dtype))
    return values.reshape(rows, cols // 2), meta


def decompress(values: torch.Tensor, metadata: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = shape
    idx = group_indices(nibbles(metadata).reshape(-1), values.dtype)
    group = group_size(values.dtype)
    bits = reference.as_bits(values).reshape(idx.shape)
    dense = torch.zeros(idx.shape[0], group, dtype=bits.dtype, device=values.device)
    dense.scatter_(-1, idx, bits)
    return dense.reshape(rows, cols).view(values.dtype)


class CutlassLayout(Layout):
    name = "cutlass"
    description = "CUTLASS's Sparse Tensor Core layout (reordered metadata)"
    # int8 codes sit as int8 values (the int8 Sparse Tensor Core layout); no int4 Sparse Tensor Core layout here.
    encodings = ("float", "int8")
    kinds = ("row", "transposable")  # a transposable weight: W and W^T, each as row 2:4

    def shape_reasons(self, dtype, shape, pattern):
        return hardware_reasons(self.name, PATTERN, multiples(dtype), "CUTLASS's metadata reordering",
                                dtype, shape, pattern)

    def multiples(self, dtype, pattern):
        return multiples(dtype)

    def storage(self, dtype, shape, pattern):
        rows, cols = shape
        return {"values": TensorSpec((rows, cols // 2), dtype),
                "metadata": TensorSpec((rows, meta_cols(cols, dtype)), meta_dtype(dtype))}

    def check_metadata(self, values, metadata, shape, pattern):
        nib = nibbles(metadata)
        valid = VALID_NIBBLES_1_2 if group_size(values.dtype) == 2 else VALID_NIBBLES_2_4
        bad = ~torch.isin(nib, torch.tensor(valid, device=nib.device))
        if bad.any():
            row, group = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"corrupt cutlass metadata: group {group} of row {row} has nibble "
                f"{int(nib[row, group]):#06b}, which repeats an index or is out of order; "
                "re-create the weight with nxm.compress"
            )

    def compress(self, w, pattern, scores=None):
        return compress(w, pattern, scores)

    def decompress(self, values, metadata, shape, pattern):
        return decompress(values, metadata, shape)


CUTLASS = register_layout(CutlassLayout())
