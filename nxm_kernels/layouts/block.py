"""``block``: k-of-RxC blocks (``"8:4x4"``) and mask libraries, the kept values plus one mask per block.

A weight ``[H, W]`` is a grid of ``H/R x W/C`` blocks of ``R x C`` entries, each keeping ``k``:

values   [H/R, (W/C)*k]          each block's kept values in row-major order within the block,
                                 the blocks of a block row one after another
metadata block kind:  [H/R, (W/C)*B] uint8, B = ceil(R*C/8): each block's bitmap, entry i
                                 (row-major) at bit i%8 of byte i//8 (a 4x4 bitmap is a
                                 little-endian uint16); exactly k bits set, the bits after R*C zero
         library:     [H/R, W/C] uint8 (up to 256 masks) or int16: each block's mask number

Sparse Tensor Cores cannot run these blocks; what the layout buys is bytes: for fp16 ``8:4x4``,
16 bytes of values plus 2 of bitmap per 32 dense bytes, 0.5625 of fp16.
"""

from __future__ import annotations

import functools

import torch

from .. import reference
from ..patterns.base import to_blocks
from .base import Layout, TensorSpec
from .registry import register_layout

_LIBRARY_UINT8 = 256  # mask numbers below this fit a byte


def bitmap_bytes(pattern) -> int:
    rows, cols = pattern.block
    return (rows * cols + 7) // 8


def number_dtype(pattern) -> torch.dtype:
    return torch.uint8 if len(pattern.codes) <= _LIBRARY_UINT8 else torch.int16


def from_blocks(blocks: torch.Tensor, shape, block) -> torch.Tensor:
    """Inverse of ``to_blocks``: ``[blocks, R*C]`` -> ``[H, W]``."""
    (height, width), (rows, cols) = shape, block
    return blocks.reshape(height // rows, width // cols, rows, cols).transpose(1, 2).reshape(height, width)


def pack_bitmaps(mask_blocks: torch.Tensor) -> torch.Tensor:
    """``[blocks, P]`` bool -> ``[blocks, ceil(P/8)]`` uint8, entry i at bit i%8 of byte i//8."""
    count, size = mask_blocks.shape
    nbytes = (size + 7) // 8
    padded = torch.zeros(count, nbytes * 8, dtype=torch.int32, device=mask_blocks.device)
    padded[:, :size] = mask_blocks
    weights = 1 << torch.arange(8, dtype=torch.int32, device=mask_blocks.device)
    return (padded.view(count, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bitmaps(bitmaps: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmaps`: ``[blocks, nbytes]`` uint8 -> ``[blocks, nbytes*8]`` bool
    (the bits after ``size`` included, for validation)."""
    bits = (bitmaps.to(torch.int32)[..., None] >> torch.arange(8, device=bitmaps.device)) & 1
    return bits.reshape(bitmaps.shape[0], -1).bool()


def kept_positions(mask_blocks: torch.Tensor, k: int) -> torch.Tensor:
    """``[blocks, k]`` positions of the kept entries, ascending (a stable sort puts kept first)."""
    return torch.sort((~mask_blocks).to(torch.uint8), dim=-1, stable=True).indices[:, :k]


def library_numbers(mask_blocks: torch.Tensor, pattern) -> torch.Tensor:
    """The mask number of each block's mask (``[blocks, P]`` bool, each one of the library)."""
    table = pattern.masks.to(mask_blocks.device).flatten(1).to(torch.float32)  # [K, P]
    numbers = torch.empty(mask_blocks.shape[0], dtype=torch.int64, device=mask_blocks.device)
    step = max(1, (1 << 22) // table.shape[0])
    for start in range(0, mask_blocks.shape[0], step):
        overlap = mask_blocks[start:start + step].to(torch.float32) @ table.T
        numbers[start:start + step] = (overlap == pattern.kept).to(torch.uint8).argmax(-1)
    return numbers


@functools.lru_cache(maxsize=64)
def _library_bitmaps(pattern) -> torch.Tensor:
    return pack_bitmaps(pattern.masks.flatten(1))


def library_bitmaps(pattern, device) -> torch.Tensor:
    """A library's masks as bitmaps, uint8 ``[count, bitmap bytes]`` by mask number: the table the
    block GEMMs look each block's mask number up in."""
    return _library_bitmaps(pattern).to(device)


def block_gemm_args(sw):
    """(masks, block rows, block cols, kept) of a block weight, as the ``sparse_mm_block`` ops take
    them: masks None for bitmaps, the library's bitmap table for mask numbers."""
    pattern = sw.pattern
    masks = library_bitmaps(pattern, sw.values.device) if pattern.kind == "library" else None
    return (masks, *pattern.block, pattern.kept_per_block)


def block_masks(metadata: torch.Tensor, shape, pattern) -> torch.Tensor:
    """``[blocks, R*C]`` bool: each block's mask, read from the metadata."""
    rows, cols = pattern.block
    if pattern.kind == "library":
        return pattern.masks.to(metadata.device).flatten(1)[metadata.reshape(-1).long()]
    return unpack_bitmaps(metadata.reshape(-1, bitmap_bytes(pattern)), rows * cols)[:, : rows * cols]


class BlockLayout(Layout):
    name = "block"
    description = "k-of-RxC blocks and mask libraries: kept values plus a bitmap or mask number per block"
    kinds = ("block", "library")

    def multiples(self, dtype, pattern):
        return pattern.block

    def storage(self, dtype, shape, pattern):
        (height, width), (rows, cols) = shape, pattern.block
        grid = (height // rows, width // cols)
        values = TensorSpec((grid[0], grid[1] * pattern.kept_per_block), dtype)
        if pattern.kind == "library":
            return {"values": values, "metadata": TensorSpec(grid, number_dtype(pattern))}
        return {"values": values, "metadata": TensorSpec((grid[0], grid[1] * bitmap_bytes(pattern)), torch.uint8)}

    def check_metadata(self, values, metadata, shape, pattern):
        if pattern.kind == "library":
            numbers = metadata.reshape(-1).long()
            bad = (numbers < 0) | (numbers >= len(pattern.codes))
            if bad.any():
                block = int(bad.nonzero()[0])
                raise ValueError(f"corrupt block metadata: block {block} has mask number {int(numbers[block])}, "
                                 f"but the library holds {len(pattern.codes)} masks; re-create the weight with "
                                 "nxm.compress")
            return
        rows, cols = pattern.block
        bits = unpack_bitmaps(metadata.reshape(-1, bitmap_bytes(pattern)), rows * cols)
        counts = bits[:, : rows * cols].sum(-1)
        if (counts != pattern.kept_per_block).any():
            block = int((counts != pattern.kept_per_block).nonzero()[0])
            raise ValueError(f"corrupt block metadata: the bitmap of block {block} keeps {int(counts[block])} entries, "
                             f"pattern {pattern} keeps {pattern.kept_per_block}; re-create the weight with nxm.compress")
        if bits[:, rows * cols:].any():
            raise ValueError(f"corrupt block metadata: a bitmap sets bits past the {rows * cols} entries of its "
                             "block (padding must be zero)")

    def compress(self, w, pattern, scores=None):
        rows, cols = pattern.block
        mask = to_blocks(pattern.mask(w, scores), rows, cols)
        positions = kept_positions(mask, pattern.kept_per_block)
        values = to_blocks(reference.as_bits(w), rows, cols).gather(-1, positions)
        grid_rows = w.shape[0] // rows
        if pattern.kind == "library":
            metadata = library_numbers(mask, pattern).to(number_dtype(pattern)).reshape(grid_rows, -1)
        else:
            metadata = pack_bitmaps(mask).reshape(grid_rows, -1)
        return values.reshape(grid_rows, -1).view(w.dtype), metadata

    def decompress(self, values, metadata, shape, pattern):
        mask = block_masks(metadata, shape, pattern)
        positions = kept_positions(mask, pattern.kept_per_block)
        bits = reference.as_bits(values)
        dense = torch.zeros(mask.shape, dtype=bits.dtype, device=values.device)
        dense.scatter_(-1, positions, bits.reshape(positions.shape))
        return from_blocks(dense, shape, pattern.block).view(values.dtype)


BLOCK = register_layout(BlockLayout())
