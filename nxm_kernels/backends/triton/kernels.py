"""Triton kernels for N:M selection, compression, decompression and the sparse GEMM.

Every kernel moves weights as raw bits (fp16/bf16 as int16, fp32 as int32, fp64 as int64), so
values come out bit for bit and magnitudes compare as integers: for IEEE floats, |w| orders
exactly as the bits with the sign cleared (the reference's ``magnitude_keys``).

Selection inside a group of m uses the reference's rank rule with broadcast comparisons
(no sort, no custom reduce): rank(i) = #{j : key_j > key_i} + #{j < i : key_j == key_i},
kept iff rank < n. Groups are tiles ``[G, MP]`` (MP = m rounded up to a power of two, the
extra columns masked), so any m <= 16 works, not only powers of two.

The GEMM reads the ``packed`` layout as it is stored (no GEMM-specific re-arrangement) and
builds each dense ``[BLOCK_N, BLOCK_K]`` tile of W in registers before ``tl.dot`` (fp32
accumulation). For m a power of two, tiles hold whole groups: per group it reads one code from
the row's index bitstream (one byte for 1:2, 1:4, 2:4) and n values, and places each value at
its position. For other m (3, 5, 6, ...) a group can straddle tiles, so each element finds its
own slot in its group's code and loads that value (or 0). Either way only values + metadata are
read from memory (9/16 of the dense bytes for fp16 2:4) and one format serves every n:m; the
price is gathered (not vectorised) value loads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...layouts import CUTLASS, PACKED
from ...layouts.cutlass import NIBBLE_OF_FLAGS
from ...pattern import Pattern

# ---------------------------------------------------------------- shared device helpers


@triton.jit
def _keys(bits, SIGN_CLEAR: tl.constexpr):
    """Integers ordered as |w|: sign-cleared IEEE bits; int8 (SIGN_CLEAR == 0) by abs."""
    if bits.dtype.primitive_bitwidth < 32:
        bits = bits.to(tl.int32)  # sign-extends: the low bits are unchanged
    if SIGN_CLEAR == 0:
        return tl.abs(bits)
    return bits & SIGN_CLEAR


@triton.jit
def _keep(keys, i, M: tl.constexpr, N: tl.constexpr):
    """``[G, MP]`` keys -> bool keep with exactly N per group (rank rule, ties to lower index)."""
    key_i = keys[:, :, None]
    key_j = keys[:, None, :]
    j = i[None, None, :]
    beats = (key_j > key_i) | ((key_j == key_i) & (j < i[None, :, None]))
    rank = tl.sum((beats & (j < M)).to(tl.int32), axis=2)
    return (rank < N) & (i < M)[None, :]


@triton.jit
def _load_groups(w_ptr, scores_ptr, base, g, i, valid, M: tl.constexpr, N: tl.constexpr,
                 SIGN_CLEAR: tl.constexpr, HAS_SCORES: tl.constexpr, SCORE_TYPE: tl.constexpr):
    """Bits and keep mask of the groups ``g`` (positions ``i``) starting at element ``base``."""
    offsets = base + g[:, None] * M + i[None, :]
    bits = tl.load(w_ptr + offsets, mask=valid, other=0)
    if HAS_SCORES:
        keys = tl.load(scores_ptr + offsets, mask=valid, other=0).to(SCORE_TYPE)
    else:
        keys = _keys(bits, SIGN_CLEAR)
    return bits, _keep(keys, i, M, N)


@triton.jit
def _pick(data, idx, i):
    """``[G, S]`` entries ``data[g, idx[g, s]]`` of a ``[G, MP]`` tile (exactly one match)."""
    hit = idx[:, :, None] == i[None, None, :]
    return tl.sum(tl.where(hit, data[:, None, :], 0), axis=2)


@triton.jit
def _pack_fields(fields, G: tl.constexpr, FIELD_BITS: tl.constexpr, WORD_BITS: tl.constexpr,
                 WORDS: tl.constexpr):
    """Concatenate ``[G]`` fields of FIELD_BITS (LSB first) into ``[WORDS]`` words of WORD_BITS.

    Each word collects the parts of the fields that overlap it; the parts are disjoint bits,
    so a sum is an OR. Shift amounts are clamped below 64 (larger shifts are undefined).
    """
    start = tl.arange(0, G)[:, None] * FIELD_BITS - tl.arange(0, WORDS)[None, :] * WORD_BITS
    up = tl.minimum(tl.maximum(start, 0), 63).to(tl.int64)
    down = tl.minimum(tl.maximum(-start, 0), 63).to(tl.int64)
    f = fields[:, None]
    part = tl.where(start >= 0, f << up, f >> down) & ((1 << WORD_BITS) - 1)
    overlaps = (start < WORD_BITS) & (-start < FIELD_BITS)
    return tl.sum(tl.where(overlaps, part, 0), axis=0)


@triton.jit
def _cutlass_meta_offset(row, col, rows, BLOCK: tl.constexpr, SPREAD: tl.constexpr):
    """Stored position of metadata element (row, col): ``layouts.cutlass.meta_offsets``."""
    r = row // BLOCK * BLOCK + (row % 8) * SPREAD + (row % BLOCK) // 8
    swap = ((r % 2 == 0) & (col % 2 == 1)).to(tl.int32) - ((r % 2 == 1) & (col % 2 == 0)).to(tl.int32)
    r = r + swap
    c = col - swap
    return (c // 2) * rows * 2 + r * 2 + c % 2


# ---------------------------------------------------------------- mask / project


@triton.jit
def _select_kernel(
    # pointers: weight bits, optional scores, output (bool mask as uint8, or projected bits)
    w_ptr, scores_ptr, out_ptr,
    # sizes
    total_groups,
    # meta-parameters
    M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, G: tl.constexpr,
    SIGN_CLEAR: tl.constexpr, HAS_SCORES: tl.constexpr, SCORE_TYPE: tl.constexpr, PROJECT: tl.constexpr,
):
    g = tl.program_id(0) * G + tl.arange(0, G)
    i = tl.arange(0, MP)
    valid = (g < total_groups)[:, None] & (i < M)[None, :]
    bits, keep = _load_groups(w_ptr, scores_ptr, 0, g, i, valid, M, N, SIGN_CLEAR, HAS_SCORES, SCORE_TYPE)
    offsets = g[:, None] * M + i[None, :]
    if PROJECT:
        tl.store(out_ptr + offsets, tl.where(keep, bits, 0), mask=valid)
    else:
        tl.store(out_ptr + offsets, keep.to(tl.uint8), mask=valid)


# ---------------------------------------------------------------- compress


@triton.jit
def _compress_packed_kernel(
    # pointers: weight bits, optional scores, kept values (bits), metadata bytes
    w_ptr, scores_ptr, values_ptr, meta_ptr,
    # sizes and strides (rows are contiguous)
    groups_per_row, row_bytes,
    # meta-parameters; G is a multiple of 8 so every program owns whole metadata bytes
    M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, BYTES: tl.constexpr,
    SIGN_CLEAR: tl.constexpr, HAS_SCORES: tl.constexpr, SCORE_TYPE: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1) * G + tl.arange(0, G)
    i = tl.arange(0, MP)
    valid = (g < groups_per_row)[:, None] & (i < M)[None, :]
    base = row.to(tl.int64) * groups_per_row * M
    bits, keep = _load_groups(w_ptr, scores_ptr, base, g, i, valid, M, N, SIGN_CLEAR, HAS_SCORES, SCORE_TYPE)
    # slot of a kept position = number of kept positions before it
    before = tl.sum((keep[:, None, :] & (i[None, None, :] < i[None, :, None])).to(tl.int32), axis=2)
    s = tl.arange(0, NP)
    # idx[g, s]: the position whose slot is s (sum of the one match)
    is_slot = keep[:, None, :] & (before[:, None, :] == s[None, :, None])
    idx = tl.sum(tl.where(is_slot, i[None, None, :], 0), axis=2)
    kept_bits = tl.sum(tl.where(is_slot, bits[:, None, :], 0), axis=2)
    slot_valid = (g < groups_per_row)[:, None] & (s < N)[None, :]
    v_base = row.to(tl.int64) * groups_per_row * N
    tl.store(values_ptr + v_base + g[:, None] * N + s[None, :], kept_bits.to(values_ptr.dtype.element_ty),
             mask=slot_valid)
    code = tl.sum(tl.where(slot_valid, idx.to(tl.int64) << (s * BITS)[None, :].to(tl.int64), 0), axis=1)
    packed = _pack_fields(code, G, N * BITS, 8, BYTES)
    byte = tl.program_id(1) * (G * N * BITS // 8) + tl.arange(0, BYTES)
    tl.store(meta_ptr + row.to(tl.int64) * row_bytes + byte, packed.to(tl.uint8),
             mask=(byte < row_bytes) & (tl.arange(0, BYTES) < G * N * BITS // 8))


# layouts.cutlass.NIBBLE_OF_FLAGS as one 64-bit constant: nibble of flags f = (TABLE >> 4f) & 0xF.
CUTLASS_NIBBLE_TABLE = sum(nib << (4 * f) for f, nib in enumerate(NIBBLE_OF_FLAGS))


@triton.jit
def _compress_cutlass_kernel(
    # pointers: weight bits, optional scores, kept values (bits), reordered metadata
    w_ptr, scores_ptr, values_ptr, meta_ptr,
    # sizes (rows are contiguous)
    rows, groups_per_row,
    # meta-parameters: PAIRS for fp32 1:2; WORD_BITS 16 (int16 metadata) or 32 (int8 weights)
    PAIRS: tl.constexpr, G: tl.constexpr, WORD_BITS: tl.constexpr, TABLE: tl.constexpr,
    SIGN_CLEAR: tl.constexpr, HAS_SCORES: tl.constexpr, SCORE_TYPE: tl.constexpr,
):
    M: tl.constexpr = 2 if PAIRS else 4
    N: tl.constexpr = M // 2
    row = tl.program_id(0)
    g = tl.program_id(1) * G + tl.arange(0, G)
    i = tl.arange(0, M)
    valid = (g < groups_per_row)[:, None]
    base = row.to(tl.int64) * groups_per_row * M
    bits, keep = _load_groups(w_ptr, scores_ptr, base, g, i, valid, M, N, SIGN_CLEAR, HAS_SCORES, SCORE_TYPE)
    flags = (keep & (_keys(bits, SIGN_CLEAR) != 0)).to(tl.int64)
    if PAIRS:  # a 1:2 pair is encoded as 2:4 over its four fp16 halves [a a b b]
        code = tl.sum(flags * tl.where(i == 0, 0b0011, 0b1100)[None, :], axis=1)
        nibble = (TABLE >> (4 * code)) & 0xF
        idx = ((nibble & 3) // 2)[:, None]
    else:
        code = tl.sum(flags << i[None, :].to(tl.int64), axis=1)
        nibble = (TABLE >> (4 * code)) & 0xF
        idx = tl.where(tl.arange(0, 2)[None, :] == 0, (nibble & 3)[:, None], (nibble >> 2)[:, None])
    # Read project(w): a fill-in slot may name a dropped position, which holds +0 even where w has -0.
    kept_bits = _pick(tl.where(keep, bits, 0), idx.to(tl.int32), i)
    s = tl.arange(0, N)
    tl.store(values_ptr + row.to(tl.int64) * groups_per_row * N + g[:, None] * N + s[None, :],
             kept_bits.to(values_ptr.dtype.element_ty), mask=valid)
    PER_WORD: tl.constexpr = WORD_BITS // 4
    words = _pack_fields(nibble, G, 4, WORD_BITS, G // PER_WORD)
    col = tl.program_id(1) * (G // PER_WORD) + tl.arange(0, G // PER_WORD)
    BLOCK: tl.constexpr = 32 if WORD_BITS == 16 else 16
    SPREAD: tl.constexpr = 4 if WORD_BITS == 16 else 2
    offset = _cutlass_meta_offset(row, col, rows, BLOCK, SPREAD)
    tl.store(meta_ptr + offset, words.to(meta_ptr.dtype.element_ty), mask=col < groups_per_row // PER_WORD)


# ---------------------------------------------------------------- decompress


@triton.jit
def _packed_index(meta_ptr, row_base, k, row_bytes, BITS: tl.constexpr):
    """Index number ``k`` of a row's bitstream (BITS <= 4 bits, so two bytes hold it)."""
    bit = k * BITS
    byte = bit // 8
    lo = tl.load(meta_ptr + row_base + byte, mask=byte < row_bytes, other=0).to(tl.int32)
    hi = tl.load(meta_ptr + row_base + byte + 1, mask=byte + 1 < row_bytes, other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def _decompress_kernel(
    # pointers: kept values (bits), metadata, dense output (bits)
    values_ptr, meta_ptr, out_ptr,
    # sizes
    rows, groups_per_row, meta_cols,
    # meta-parameters
    M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, CUTLASS: tl.constexpr, PAIRS: tl.constexpr, WORD_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1) * G + tl.arange(0, G)
    s = tl.arange(0, NP)
    slot_valid = (g < groups_per_row)[:, None] & (s < N)[None, :]
    v = tl.load(values_ptr + row.to(tl.int64) * groups_per_row * N + g[:, None] * N + s[None, :],
                mask=slot_valid, other=0)
    if CUTLASS:
        PER_WORD: tl.constexpr = WORD_BITS // 4
        BLOCK: tl.constexpr = 32 if WORD_BITS == 16 else 16
        SPREAD: tl.constexpr = 4 if WORD_BITS == 16 else 2
        offset = _cutlass_meta_offset(row, g // PER_WORD, rows, BLOCK, SPREAD)
        word = tl.load(meta_ptr + offset, mask=g < groups_per_row, other=0).to(tl.int64)
        nibble = (word >> (4 * (g % PER_WORD)).to(tl.int64)) & 0xF
        if PAIRS:
            idx = ((nibble & 3) // 2)[:, None]
        else:
            idx = tl.where(s[None, :] == 0, (nibble & 3)[:, None], (nibble >> 2)[:, None])
    else:
        k = g[:, None] * N + s[None, :]
        idx = _packed_index(meta_ptr, row.to(tl.int64) * meta_cols, k, meta_cols, BITS)
    i = tl.arange(0, MP)
    hit = (idx[:, :, None] == i[None, None, :]) & slot_valid[:, :, None]
    dense = tl.sum(tl.where(hit, v[:, :, None], 0), axis=1)
    offsets = row.to(tl.int64) * groups_per_row * M + g[:, None] * M + i[None, :]
    tl.store(out_ptr + offsets, dense.to(out_ptr.dtype.element_ty),
             mask=(g < groups_per_row)[:, None] & (i < M)[None, :])


# ---------------------------------------------------------------- sparse GEMM


@triton.jit
def _group_codes(meta_ptr, rn, group, N, row_bytes, BITS: tl.constexpr, N_KEEP: tl.constexpr,
                 CODE_BYTES: tl.constexpr):
    """``[BLOCK_N, len(group)]`` codes (N_KEEP indices of BITS bits) of groups ``group`` of rows ``rn``."""
    first_bit = group * (N_KEEP * BITS)
    first_byte = (first_bit // 8)[None, :]
    m_rows = meta_ptr + rn[:, None].to(tl.int64) * row_bytes
    valid = (rn < N)[:, None]
    code = tl.zeros((rn.shape[0], group.shape[0]), dtype=tl.int64 if CODE_BYTES > 3 else tl.int32)
    for b in tl.static_range(CODE_BYTES):
        byte = tl.load(m_rows + first_byte + b, mask=valid & (first_byte + b < row_bytes), other=0)
        code |= byte.to(code.dtype) << (8 * b)
    return code >> (first_bit % 8)[None, :].to(code.dtype)


@triton.jit
def _w_tile_by_group(values_ptr, meta_ptr, rn, k0, N, K, row_bytes, stride_vn,
                     N_KEEP: tl.constexpr, M_GROUP: tl.constexpr, BITS: tl.constexpr, CODE_BYTES: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[BLOCK_N, BLOCK_K]`` tile of W from whole groups (m a power of two divides BLOCK_K):
    one code and N_KEEP value loads per group, then each kept value is placed at its position."""
    G: tl.constexpr = BLOCK_K // M_GROUP
    group = k0 // M_GROUP + tl.arange(0, G)
    code = _group_codes(meta_ptr, rn, group, N, row_bytes, BITS, N_KEEP, CODE_BYTES)
    valid = (rn < N)[:, None] & (group < K // M_GROUP)[None, :]
    v_groups = values_ptr + rn[:, None].to(tl.int64) * stride_vn + (group * N_KEEP)[None, :]
    position = tl.arange(0, M_GROUP)[None, None, :]
    dense = tl.zeros((BLOCK_N, G, M_GROUP), dtype=values_ptr.dtype.element_ty)
    for s in tl.static_range(N_KEEP):
        index = ((code >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.int32)
        value = tl.load(v_groups + s, mask=valid, other=0.0)
        dense = tl.where(index[:, :, None] == position, value[:, :, None], dense)
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def _w_tile_by_element(values_ptr, meta_ptr, rn, k, N, K, row_bytes, stride_vn,
                       N_KEEP: tl.constexpr, M_GROUP: tl.constexpr, BITS: tl.constexpr, CODE_BYTES: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[BLOCK_N, BLOCK_K]`` tile of W for any m (groups may straddle tiles): element
    (n, k) is position k % m of group k // m; it finds its slot in the group's code and loads
    that value, or 0. K is the fastest axis, so neighbouring threads read neighbouring bytes."""
    group = k // M_GROUP
    position = (k % M_GROUP)[None, :]
    code = _group_codes(meta_ptr, rn, group, N, row_bytes, BITS, N_KEEP, CODE_BYTES)
    slot = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    kept = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int1)
    for s in tl.static_range(N_KEEP):
        hit = ((code >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.int32) == position
        slot = tl.where(hit, s, slot)
        kept = kept | hit
    v_rows = values_ptr + rn[:, None].to(tl.int64) * stride_vn
    valid = (rn < N)[:, None] & (k < K)[None, :] & kept
    return tl.load(v_rows + (group * N_KEEP)[None, :] + slot, mask=valid, other=0.0)


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's ``[BLOCK_M, BLOCK_N]`` output tile, in grouped program
    order: GROUP_M row-blocks share each column-block of W while it is in L2."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * blocks_n) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_rows
    pid_n = (pid % (GROUP_M * blocks_n)) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def store_output_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, HAS_BIAS: tl.constexpr):
    """``y[rm, rn] = acc (+ bias[rn])`` in y's dtype, for a contiguous ``y [M, N]``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _sparse_mm_kernel(
    # pointers: x [M, K], kept values [N, K*n/m], packed metadata [N, row_bytes], bias [N], y [M, N]
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes; M_BUCKET is only an autotuning key (small-M and large-M configs)
    M, N, K, row_bytes, M_BUCKET,
    # strides (values, metadata and y rows are contiguous)
    stride_xm, stride_xk, stride_vn,
    # meta-parameters: the pattern, its code width, the tile
    N_KEEP: tl.constexpr, M_GROUP: tl.constexpr, BITS: tl.constexpr, CODE_BYTES: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=(rm < M)[:, None] & (k < K)[None, :], other=0.0)
        if (M_GROUP & (M_GROUP - 1)) == 0:
            w = _w_tile_by_group(values_ptr, meta_ptr, rn, k0, N, K, row_bytes, stride_vn,
                                 N_KEEP, M_GROUP, BITS, CODE_BYTES, BLOCK_N, BLOCK_K)
        else:
            w = _w_tile_by_element(values_ptr, meta_ptr, rn, k0 + rk, N, K, row_bytes, stride_vn,
                                   N_KEEP, M_GROUP, BITS, CODE_BYTES, BLOCK_N, BLOCK_K)
        if UPCAST:  # exact: a bf16 x bf16 product fits in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    store_output_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, HAS_BIAS)


# Small M (decoding: batch x tokens <= 64) streams W under a thin M tile; narrow N tiles give
# enough programs to fill the GPU (N / BLOCK_N of them). Large M uses wide tiles for tensor-core
# reuse. fp32 multiplies on CUDA cores and needs smaller tiles to stay in registers. One table
# for autotuning, the AOT test and ``inspect``; every entry compiles without spills for sm_80
# and sm_90 (tests/test_triton_aot.py checks 2:4, 4:8, 8:16 and 5:6).
def _configs(*rows):
    return tuple(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s) for bm, bn, bk, w, s in rows)


SMALL_M = 64
CONFIGS = {  # (activation family, small M?) -> configs
    ("half", True): _configs((16, 16, 256, 8, 3), (16, 32, 128, 8, 3), (32, 32, 64, 4, 3), (32, 64, 64, 8, 3),
                             (64, 64, 32, 4, 3)),
    ("half", False): _configs((128, 128, 32, 8, 3), (128, 64, 64, 8, 3)),
    ("fp32", True): _configs((32, 32, 32, 4, 2), (32, 64, 16, 4, 2)),
    ("fp32", False): _configs((64, 64, 16, 4, 2), (128, 64, 16, 8, 2)),
}
# Under the interpreter one small config runs (autotuning there would only cost time).
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)


def family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _triton_config(c):
    meta = {k: v for k, v in c.items() if k.startswith("BLOCK")}
    return triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"])


_TUNED_CONFIGS = {key: [_triton_config(c) for c in configs] for key, configs in CONFIGS.items()}


def _configs_for_call(configs, named_args, **kwargs):
    return _TUNED_CONFIGS[family(named_args["x_ptr"].dtype), named_args["M"] <= SMALL_M]


INTERPRETED = not isinstance(_sparse_mm_kernel, triton.runtime.jit.JITFunction)

_sparse_mm_tuned = triton.autotune(
    configs=[c for configs in _TUNED_CONFIGS.values() for c in configs],
    key=["M_BUCKET", "N", "K", "N_KEEP", "M_GROUP"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _configs_for_call},
)(_sparse_mm_kernel)


# ---------------------------------------------------------------- host side: check -> allocate -> launch

_BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
               torch.float64: torch.int64, torch.int8: torch.int8}
_SIGN_CLEAR = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF, torch.int8: 0}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS_DTYPE[t.dtype])


def _scores_args(scores):
    if scores is None:
        return None, False, tl.float32
    if scores.dtype == torch.float64:
        return scores.contiguous(), True, tl.float64
    return scores.contiguous(), True, tl.float32


def _groups_per_program(mp: int) -> int:
    """Groups per program: about 256 weights, a multiple of 8 (whole metadata bytes)."""
    return max(8, 256 // mp)


def code_bytes(pattern: Pattern) -> int:
    """Bytes that hold one group's code wherever it starts in the bitstream."""
    width = pattern.n * pattern.index_bits
    return (8 - math.gcd(width, 8) + width + 7) // 8


def select(w: torch.Tensor, pattern: Pattern, scores, project: bool) -> torch.Tensor:
    bits = _bits(w)
    scores, has_scores, score_type = _scores_args(scores)
    out = torch.empty_like(bits) if project else torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    mp = triton.next_power_of_2(pattern.m)
    g = _groups_per_program(mp)
    total_groups = w.numel() // pattern.m
    _select_kernel[(triton.cdiv(total_groups, g),)](
        bits, scores, out, total_groups,
        M=pattern.m, N=pattern.n, MP=mp, G=g,
        SIGN_CLEAR=_SIGN_CLEAR[bits.dtype], HAS_SCORES=has_scores, SCORE_TYPE=score_type, PROJECT=project,
    )
    return out.view(w.dtype) if project else out.view(torch.bool)


def _compress_outputs(layout, w: torch.Tensor, bits: torch.Tensor, pattern: Pattern):
    specs = layout.storage(w.dtype, tuple(w.shape), pattern)
    values = torch.empty(specs["values"].shape, dtype=bits.dtype, device=w.device)
    return values, torch.empty(specs["metadata"].shape, dtype=specs["metadata"].dtype, device=w.device)


def compress_packed(w: torch.Tensor, pattern: Pattern, scores):
    rows, cols = w.shape
    bits = _bits(w)
    scores, has_scores, score_type = _scores_args(scores)
    values, metadata = _compress_outputs(PACKED, w, bits, pattern)
    groups_per_row = cols // pattern.m
    mp = triton.next_power_of_2(pattern.m)
    g = _groups_per_program(mp)
    width = pattern.n * pattern.index_bits
    _compress_packed_kernel[(rows, triton.cdiv(groups_per_row, g))](
        bits, scores, values, metadata, groups_per_row, metadata.shape[1],
        M=pattern.m, N=pattern.n, MP=mp, NP=triton.next_power_of_2(pattern.n), BITS=pattern.index_bits,
        G=g, BYTES=triton.next_power_of_2(g * width // 8),
        SIGN_CLEAR=_SIGN_CLEAR[bits.dtype], HAS_SCORES=has_scores, SCORE_TYPE=score_type,
    )
    return values.view(w.dtype), metadata


def compress_cutlass(w: torch.Tensor, pattern: Pattern, scores):
    rows, cols = w.shape
    bits = _bits(w)
    scores, has_scores, score_type = _scores_args(scores)
    values, metadata = _compress_outputs(CUTLASS, w, bits, pattern)
    groups_per_row = cols // pattern.m
    g = 64
    _compress_cutlass_kernel[(rows, triton.cdiv(groups_per_row, g))](
        bits, scores, values, metadata, rows, groups_per_row,
        PAIRS=pattern.m == 2, G=g, WORD_BITS=8 * metadata.element_size(), TABLE=CUTLASS_NIBBLE_TABLE,
        SIGN_CLEAR=_SIGN_CLEAR[bits.dtype], HAS_SCORES=has_scores, SCORE_TYPE=score_type,
    )
    return values.view(w.dtype), metadata


def decompress(values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern, cutlass: bool):
    """Dense weight from the packed layout, or (``cutlass``) from the cutlass layout."""
    rows, cols = shape
    bits = _bits(values)
    out = torch.empty((rows, cols), dtype=bits.dtype, device=values.device)
    mp = triton.next_power_of_2(pattern.m)
    g = _groups_per_program(mp)
    groups_per_row = cols // pattern.m
    _decompress_kernel[(rows, triton.cdiv(groups_per_row, g))](
        bits, metadata.contiguous(), out, rows, groups_per_row, metadata.shape[1],
        M=pattern.m, N=pattern.n, MP=mp, NP=triton.next_power_of_2(pattern.n), BITS=pattern.index_bits,
        G=g, CUTLASS=cutlass, PAIRS=pattern.m == 2,
        WORD_BITS=8 * metadata.element_size(),
    )
    return out.view(values.dtype)


# fp32 stays fp32 ("ieee", CUDA cores): TF32 would round x and W to 10 mantissa bits, which
# torch's fp32 matmul does not do by default. The Triton 3.8 interpreter multiplies bf16 as its
# uint16 storage, so there bf16 tiles are widened to fp32 first (exact) and multiplied in fp32.
_FP32_DOT = (torch.float32, torch.bfloat16) if INTERPRETED else (torch.float32,)


def sparse_mm(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, pattern: Pattern, bias):
    m_rows, k = x.shape
    n = values.shape[0]
    values, metadata = values.contiguous(), metadata.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((m_rows, n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    args = (x, values, metadata, bias, y, m_rows, n, k, metadata.shape[1],
            min(triton.next_power_of_2(m_rows), 2 * SMALL_M), x.stride(0), x.stride(1), values.stride(0))
    meta = dict(N_KEEP=pattern.n, M_GROUP=pattern.m, BITS=pattern.index_bits, CODE_BYTES=code_bytes(pattern),
                HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype in _FP32_DOT else "tf32",
                UPCAST=INTERPRETED and x.dtype == torch.bfloat16, GROUP_M=8)

    def grid(c):
        return (triton.cdiv(m_rows, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

    if INTERPRETED:
        _sparse_mm_kernel[grid(INTERPRETER_CONFIG)](*args, **meta, **INTERPRETER_CONFIG)
    else:
        _sparse_mm_tuned[grid](*args, **meta)
    return y
