"""``packed``: any n:m, the kept values plus a dense bitstream of their indices.

values   [rows, cols*n/m]        kept values, group by group, ascending index within a group
metadata [rows, packed_bytes]    uint8; each row is one little-endian bitstream of the kept
                                 indices at pattern.index_bits bits each, LSB first, zero-padded
                                 to a whole byte. Index k of a row occupies bits [k*b, (k+1)*b).
"""

from __future__ import annotations

import torch

from .. import reference
from ..pattern import Pattern
from .base import Layout, TensorSpec
from .registry import register_layout


def row_bytes(cols: int, pattern: Pattern) -> int:
    return (cols // pattern.m * pattern.n * pattern.index_bits + 7) // 8


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, count]`` ints < 2**bits -> ``[rows, ceil(count*bits/8)]`` uint8 bitstream."""
    rows, count = indices.shape
    nbytes = (count * bits + 7) // 8
    if 8 % bits == 0:  # whole indices per byte: shift and add, no bitstream
        per_byte = 8 // bits
        padded = torch.zeros(rows, nbytes * per_byte, dtype=torch.int32, device=indices.device)
        padded[:, :count] = indices
        shifts = bits * torch.arange(per_byte, dtype=torch.int32, device=indices.device)
        return (padded.reshape(rows, nbytes, per_byte) << shifts).sum(-1).to(torch.uint8)
    bit_values = (indices.to(torch.int32)[..., None] >> torch.arange(bits, device=indices.device)) & 1
    stream = torch.zeros(rows, nbytes * 8, dtype=torch.int32, device=indices.device)
    stream[:, : count * bits] = bit_values.reshape(rows, count * bits)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=indices.device)
    return (stream.reshape(rows, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_indices(metadata: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``[rows, count]`` int64."""
    rows = metadata.shape[0]
    stream = (metadata.to(torch.int64)[..., None] >> torch.arange(8, device=metadata.device)) & 1
    stream = stream.reshape(rows, metadata.shape[1] * 8)[:, : count * bits].reshape(rows, count, bits)
    return (stream << torch.arange(bits, device=metadata.device)).sum(-1)


def padding_bits(metadata: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The bits after the last index of each row (must be zero in a valid weight)."""
    stream = (metadata.to(torch.int64)[..., None] >> torch.arange(8, device=metadata.device)) & 1
    return stream.reshape(metadata.shape[0], metadata.shape[1] * 8)[:, count * bits :]


def compress(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None):
    rows, cols = w.shape
    idx = reference.kept_indices(reference.nm_mask(w, pattern, scores), pattern)  # [rows, groups, n]
    groups = cols // pattern.m
    values = reference.as_bits(w).reshape(rows, groups, pattern.m).gather(-1, idx).reshape(rows, groups * pattern.n)
    metadata = pack_indices(idx.reshape(rows, groups * pattern.n), pattern.index_bits)
    return values.view(w.dtype), metadata


def decompress(values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern) -> torch.Tensor:
    rows, cols = shape
    count = cols // pattern.m * pattern.n
    idx = unpack_indices(metadata, pattern.index_bits, count).reshape(rows, cols // pattern.m, pattern.n)
    bits = reference.as_bits(values)
    dense = torch.zeros(rows, cols // pattern.m, pattern.m, dtype=bits.dtype, device=values.device)
    dense.scatter_(-1, idx, bits.reshape(idx.shape))
    return dense.reshape(rows, cols).view(values.dtype)


def check_metadata(metadata: torch.Tensor, shape, pattern: Pattern) -> None:
    n, m, bits = pattern.n, pattern.m, pattern.index_bits
    rows, cols = shape
    count = cols // m * n
    idx = unpack_indices(metadata, bits, count).reshape(rows, cols // m, n)
    problems = (
        (idx >= m, f"an index out of range [0, {m})"),
        (idx[..., 1:] == idx[..., :-1], "an index repeated within its group"),
        (idx[..., 1:] < idx[..., :-1], "indices not in ascending order"),
    )
    for bad, what in problems:
        if bad.any():
            row, group = (int(i) for i in bad.nonzero()[0][:2])
            raise ValueError(
                f"corrupt packed metadata: group {group} of row {row} has {what} "
                f"(indices {idx[row, group].tolist()}); re-create the weight with nxm.compress"
            )
    if padding_bits(metadata, bits, count).any():
        raise ValueError("corrupt packed metadata: padding bits at the end of a row are not zero")


class PackedLayout(Layout):
    name = "packed"
    description = "any n:m, kept values plus a bitstream of their indices"
    encodings = ("float", "int8", "int4")
    kinds = ("row", "transposable")  # a transposable weight: W and W^T, each as row n:m

    def storage(self, dtype, shape, pattern):
        rows, cols = shape
        return {"values": TensorSpec((rows, cols // pattern.m * pattern.n), dtype),
                "metadata": TensorSpec((rows, row_bytes(cols, pattern)), torch.uint8)}

    def check_metadata(self, values, metadata, shape, pattern):
        check_metadata(metadata, shape, pattern)

    def compress(self, w, pattern, scores=None):
        return compress(w, pattern, scores)

    def decompress(self, values, metadata, shape, pattern):
        return decompress(values, metadata, shape, pattern)


PACKED = register_layout(PackedLayout())
