"""Pure-torch specification of every op, on any device: the ground truth the kernels match.

Everything here is vectorised over rows and groups; the only Python loops run over the m
positions inside a group (at most 16). Inputs are assumed already checked by ``ops.py``.
"""

from __future__ import annotations

import functools

import torch

from .pattern import Pattern

# ---------------------------------------------------------------- selection

_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as a signed integer tensor: copying and gathering integers is much faster on
    CPU than on fp16/bf16, and the bits come through untouched."""
    return t.view(_BITS_VIEW[t.dtype]) if t.dtype in _BITS_VIEW else t


def magnitude_keys(w: torch.Tensor) -> torch.Tensor:
    """Integers ordered exactly as ``|w|``: for IEEE floats, the bits without the sign bit."""
    if w.dtype == torch.int8:
        return w.to(torch.int16).abs()  # abs(-128) overflows in int8
    bits = as_bits(w)
    return bits & torch.iinfo(bits.dtype).max


def selection_keys(w: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """What selection compares: ``|w|``, or ``scores`` in a dtype where comparison is exact."""
    if scores is None:
        return magnitude_keys(w)
    return scores if scores.dtype == torch.float64 else scores.to(torch.float32)


def nm_mask(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the n largest keys of each group of m along dim -1; ties go to the lower index.

    rank(i) = #{j : key_j > key_i} + #{j < i : key_j == key_i}; position i is kept iff rank < n.
    This is a strict total order, so exactly n positions per group are kept.
    """
    n, m = pattern.n, pattern.m
    keys = selection_keys(w, scores).reshape(-1, m)
    rank = [torch.zeros(keys.shape[0], dtype=torch.uint8, device=w.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = keys[:, j] > keys[:, i]  # on a tie, the lower index i wins
            rank[i] += j_wins.view(torch.uint8)
            rank[j] += j_wins.logical_not_().view(torch.uint8)
    return torch.stack([r < n for r in rank], dim=-1).reshape(w.shape)


def project(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection onto the N:M set (for ``scores=None``). Dropped values are +0."""
    return torch.where(nm_mask(w, pattern, scores), w, torch.zeros((), dtype=w.dtype, device=w.device))


def is_nm_sparse(z: torch.Tensor, pattern: Pattern) -> bool:
    """Every group of m along dim -1 holds at most n nonzeros."""
    nonzeros = (z.reshape(-1, pattern.m) != 0).sum(-1)
    return bool((nonzeros <= pattern.n).all())


def kept_indices(mask: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """``[rows, groups, n]`` positions of the kept values, ascending within each group."""
    n, m = pattern.n, pattern.m
    keep = mask.reshape(-1, m)
    # The s-th kept index is the number of positions whose running count of kept values is <= s.
    running = torch.zeros(keep.shape[0], dtype=torch.uint8, device=mask.device)
    idx = torch.zeros(keep.shape[0], n, dtype=torch.uint8, device=mask.device)
    slots = torch.arange(n, dtype=torch.uint8, device=mask.device)
    for i in range(m):
        running += keep[:, i]
        idx += running[:, None] <= slots
    return idx.long().reshape(mask.shape[0], mask.shape[-1] // m, n)


# ---------------------------------------------------------------- packed layout
# values   [rows, cols*n/m]        kept values, group by group, ascending index within a group
# metadata [rows, packed_bytes]    uint8; each row is one little-endian bitstream of the kept
#                                  indices at pattern.index_bits bits each, LSB first, zero-padded
#                                  to a whole byte. Index k of a row occupies bits [k*b, (k+1)*b).


def packed_row_bytes(cols: int, pattern: Pattern) -> int:
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


def packed_padding_bits(metadata: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The bits after the last index of each row (must be zero in a valid weight)."""
    stream = (metadata.to(torch.int64)[..., None] >> torch.arange(8, device=metadata.device)) & 1
    return stream.reshape(metadata.shape[0], metadata.shape[1] * 8)[:, count * bits :]


def compress_packed(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None):
    rows, cols = w.shape
    idx = kept_indices(nm_mask(w, pattern, scores), pattern)  # [rows, groups, n]
    groups = cols // pattern.m
    values = as_bits(w).reshape(rows, groups, pattern.m).gather(-1, idx).reshape(rows, groups * pattern.n)
    metadata = pack_indices(idx.reshape(rows, groups * pattern.n), pattern.index_bits)
    return values.view(w.dtype), metadata


def decompress_packed(values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern):
    rows, cols = shape
    count = cols // pattern.m * pattern.n
    idx = unpack_indices(metadata, pattern.index_bits, count).reshape(rows, cols // pattern.m, pattern.n)
    bits = as_bits(values)
    dense = torch.zeros(rows, cols // pattern.m, pattern.m, dtype=bits.dtype, device=values.device)
    dense.scatter_(-1, idx, bits.reshape(idx.shape))
    return dense.reshape(rows, cols).view(values.dtype)


# ---------------------------------------------------------------- cutlass layout
# Byte-identical to torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass.
# values   [rows, cols/2]   the two kept values of each group of 4 (fp32 1:2: the one kept of 2)
# metadata [rows, cols/16] int16 (fp16/bf16/fp32) or [rows, cols/32] int32 (int8): one nibble per
#          group of 4 (fp32: per pair, read as 4 halves), low 2 bits = first kept index, high 2 bits
#          = second, nibbles LSB first; then the elements are permuted into CUTLASS's
#          ColumnMajorInterleaved<2> order (see cutlass_meta_offsets).

# Nonzero flags of a group (bit i = position i is nonzero) -> metadata nibble. Groups with two
# nonzeros encode them; groups with fewer (the weight had zeros) use CUTLASS's fill-in choice,
# which also keeps 1:2 pairs valid. (Codes with three or four flags never come from a projection.)
CUTLASS_NIBBLE_OF_FLAGS = (
    0b1110, 0b1000, 0b1001, 0b0100, 0b1110, 0b1000, 0b1001, 0b0100,  # noqa: E241
    0b1110, 0b1100, 0b1101, 0b0100, 0b1110, 0b1100, 0b1101, 0b0100,  # noqa: E241
)
CUTLASS_VALID_NIBBLES_2_4 = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)  # idx0 < idx1
CUTLASS_VALID_NIBBLES_1_2 = (0b0100, 0b1110)  # fp32 pairs: (0,1) = first kept, (2,3) = second


def cutlass_meta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int32 if dtype == torch.int8 else torch.int16


@functools.lru_cache(maxsize=32)
def cutlass_meta_offsets(rows: int, meta_cols: int, meta_dtype: torch.dtype, device) -> torch.Tensor:
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
    stored[cutlass_meta_offsets(rows, meta.shape[1], meta_dtype, meta.device)] = meta.reshape(-1)
    return stored.reshape(meta.shape)


def cutlass_nibbles(metadata: torch.Tensor) -> torch.Tensor:
    """Stored metadata -> ``[rows, quads]`` nibbles (inverse of the reorder and packing)."""
    rows, meta_cols = metadata.shape
    offsets = cutlass_meta_offsets(rows, meta_cols, metadata.dtype, metadata.device)
    meta = metadata.reshape(-1)[offsets].reshape(rows, meta_cols).to(torch.int64)
    shifts = 4 * torch.arange(metadata.dtype.itemsize * 2, device=metadata.device)
    return ((meta[..., None] >> shifts) & 0xF).reshape(rows, meta_cols * shifts.numel())


def cutlass_group_indices(nibbles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., k]`` positions of the stored values within each group (fp32: k=1 of 2, else 2 of 4)."""
    if dtype == torch.float32:
        return ((nibbles & 3) // 2).long()[..., None]
    return torch.stack((nibbles & 3, nibbles >> 2), -1).long()


def compress_cutlass(w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None):
    rows, cols = w.shape
    mask = nm_mask(w, pattern, scores)
    nonzero_kept = mask & (magnitude_keys(w) != 0)
    # Gather each group's 0/1 flag bytes into one word, then into a 4-bit code (little-endian).
    if w.dtype == torch.float32:  # a 1:2 pair is encoded as 2:4 over its four fp16 halves [a a b b]
        word = nonzero_kept.reshape(-1, 2).view(torch.int16).squeeze(-1).to(torch.int32)
        code = (word & 1) * 0b0011 | (word >> 8) * 0b1100
    else:
        word = nonzero_kept.reshape(-1, 4).view(torch.int32).squeeze(-1)
        code = (word | word >> 7 | word >> 14 | word >> 21) & 0xF
    nibbles = torch.tensor(CUTLASS_NIBBLE_OF_FLAGS, dtype=torch.uint8, device=w.device)[code]
    idx = cutlass_group_indices(nibbles, w.dtype)
    group = 2 if w.dtype == torch.float32 else 4
    values = as_bits(w).reshape(idx.shape[0], group).gather(-1, idx)
    # A slot CUTLASS fills in holds a dropped position: store project(w)'s +0 there, not w's -0.
    values = torch.where(mask.reshape(idx.shape[0], group).gather(-1, idx), values, 0).view(w.dtype)
    meta = _nibbles_to_meta(nibbles.reshape(rows, cols // group), cutlass_meta_dtype(w.dtype))
    return values.reshape(rows, cols // 2), meta


def decompress_cutlass(values: torch.Tensor, metadata: torch.Tensor, shape):
    rows, cols = shape
    idx = cutlass_group_indices(cutlass_nibbles(metadata).reshape(-1), values.dtype)
    group = 2 if values.dtype == torch.float32 else 4
    bits = as_bits(values).reshape(idx.shape)
    dense = torch.zeros(idx.shape[0], group, dtype=bits.dtype, device=values.device)
    dense.scatter_(-1, idx, bits)
    return dense.reshape(rows, cols).view(values.dtype)


# ---------------------------------------------------------------- op entry points


def compress(w, pattern: Pattern, layout: str, scores=None):
    if layout == "packed":
        return compress_packed(w, pattern, scores)
    return compress_cutlass(w, pattern, scores)


def decompress(sw) -> torch.Tensor:
    if sw.layout == "packed":
        return decompress_packed(sw.values, sw.metadata, sw.shape, sw.pattern)
    return decompress_cutlass(sw.values, sw.metadata, sw.shape)


def sparse_mm(x: torch.Tensor, sw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ decompress(sw).T + bias``: fp32 accumulation for float types, exact int32 for int8."""
    w = decompress(sw)
    if x.dtype == torch.int8:
        # float64 holds every int8 x int8 dot product exactly for K < 2**38.
        y = x.to(torch.float64) @ w.to(torch.float64).T
        if bias is not None:
            y = y + bias.to(torch.float64)
        return y.to(torch.int32)
    y = x.to(torch.float32) @ w.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
