"""Triton GEMM ``y = x @ W^T (+ bias)`` for W in the ``block`` layout (k-of-RxC blocks and mask
libraries), decompressed on the fly in registers. Specification: ``reference.sparse_mm`` (the
layout: ``layouts/block.py``).

Each element (n, k) of a ``[BLOCK_N, BLOCK_K]`` tile of W lies in block (n // R, k // C) at entry
``e = (n % R) * C + k % C`` (row-major). It reads its block's bitmap (for a library: the block's
mask number, then that mask's bitmap from a small table), is kept iff bit e is set, and then sits at
slot ``popcount(bitmap bits below e)`` of its block's run of kept values, which it loads (else 0).
Elements decode independently, so any R and C work and blocks may straddle tiles; neighbouring
elements read the same bitmap bytes and neighbouring values. Then ``tl.dot`` with fp32
accumulation, as the packed GEMM (``kernels.py``), whose tile table and program order this reuses.

Only values + bitmaps are read from memory: 0.5625 of the dense bytes for fp16 ``8:4x4``. Sparse
Tensor Cores do not run general blocks, so the multiply is dense on the decompressed tile: what
the layout buys is bytes (decoding, small batches), not fewer tensor-core FLOPs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import kernels
from .kernels import output_tile, store_output_tile


@triton.jit
def _popcount8(byte):
    """Set bits of each byte (int32 values in [0, 256))."""
    byte = byte - ((byte >> 1) & 0x55)
    byte = (byte & 0x33) + ((byte >> 2) & 0x33)
    return (byte + (byte >> 4)) & 0x0F


@triton.jit
def _w_tile_block(values_ptr, meta_ptr, masks_ptr, rn, k, N, K, stride_vn, stride_mn,
                  R: tl.constexpr, C: tl.constexpr, KEPT: tl.constexpr, BITMAP_BYTES: tl.constexpr,
                  LIBRARY: tl.constexpr):
    """Dense ``[len(rn), len(k)]`` tile of W: each element decodes its own block's bitmap."""
    block_row = rn // R
    block_col = k // C
    entry = (rn % R)[:, None] * C + (k % C)[None, :]  # row-major position inside the block
    valid = (rn < N)[:, None] & (k < K)[None, :]
    meta_rows = meta_ptr + block_row[:, None].to(tl.int64) * stride_mn
    if LIBRARY:  # the block's mask number, then that mask's bitmap in the table
        number = tl.load(meta_rows + block_col[None, :], mask=valid, other=0).to(tl.int32)
        bitmaps = masks_ptr + number * BITMAP_BYTES
    else:
        bitmaps = meta_rows + (block_col * BITMAP_BYTES)[None, :]
    entry_byte = entry // 8
    entry_bit = entry % 8
    slot = tl.zeros(entry.shape, dtype=tl.int32)
    kept = tl.zeros(entry.shape, dtype=tl.int1)
    for j in tl.static_range(BITMAP_BYTES):
        byte = tl.load(bitmaps + j, mask=valid, other=0).to(tl.int32)
        below = tl.where(entry_byte > j, byte, tl.where(entry_byte == j, byte & ((1 << entry_bit) - 1), 0))
        slot += _popcount8(below)
        kept = kept | ((entry_byte == j) & (((byte >> entry_bit) & 1) != 0))
    value_rows = values_ptr + block_row[:, None].to(tl.int64) * stride_vn
    return tl.load(value_rows + (block_col * KEPT)[None, :] + slot, mask=valid & kept, other=0.0)


@triton.jit
def _sparse_mm_block_kernel(
    # pointers: x [M, K]; values [N/R, (K/C)*KEPT]; metadata: bitmaps [N/R, (K/C)*BITMAP_BYTES] uint8,
    # or (LIBRARY) mask numbers [N/R, K/C]; masks: the library's bitmaps [count, BITMAP_BYTES] uint8
    # (unused without LIBRARY); bias [N]; y [M, N]
    x_ptr, values_ptr, meta_ptr, masks_ptr, bias_ptr, y_ptr,
    # sizes; M_BUCKET is only an autotuning key (small-M and large-M configs)
    M, N, K, M_BUCKET,
    # strides (values, metadata and y rows are contiguous)
    stride_xm, stride_xk, stride_vn, stride_mn,
    # meta-parameters: the block and its encoding, the numerics, the tile
    R: tl.constexpr, C: tl.constexpr, KEPT: tl.constexpr, BITMAP_BYTES: tl.constexpr, LIBRARY: tl.constexpr,
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
        w = _w_tile_block(values_ptr, meta_ptr, masks_ptr, rn, k, N, K, stride_vn, stride_mn,
                          R, C, KEPT, BITMAP_BYTES, LIBRARY)
        if UPCAST:  # exact: a bf16 x bf16 product fits in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    store_output_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, HAS_BIAS)


def _configs_for_call(configs, named_args, **kwargs):
    return kernels._TUNED_CONFIGS[kernels.family(named_args["x_ptr"].dtype), named_args["M"] <= kernels.SMALL_M]


_sparse_mm_block_tuned = triton.autotune(
    configs=[c for configs in kernels._TUNED_CONFIGS.values() for c in configs],
    key=["M_BUCKET", "N", "K", "R", "C", "KEPT", "LIBRARY"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _configs_for_call},
)(_sparse_mm_block_kernel)


# ---------------------------------------------------------------- host side: check -> launch


def sparse_mm_block(x, values, metadata, masks, bias, block_rows: int, block_cols: int, kept: int):
    """``x @ W^T + bias`` for W in the block layout; ``masks`` None: metadata holds bitmaps, else
    mask numbers into ``masks`` (uint8 ``[count, bitmap bytes]``, the library's bitmaps)."""
    m_rows, k = x.shape
    bitmap_bytes = (block_rows * block_cols + 7) // 8
    grid_cols = k // block_cols
    meta_cols = grid_cols if masks is not None else grid_cols * bitmap_bytes
    if k % block_cols or tuple(values.shape[1:]) != (grid_cols * kept,) or metadata.shape != (values.shape[0], meta_cols):
        raise ValueError(f"sparse_mm_block: x {tuple(x.shape)} with {kept}:{block_rows}x{block_cols} blocks needs "
                         f"values [rows, {grid_cols * kept}] and metadata [rows, {meta_cols}], got "
                         f"{tuple(values.shape)} and {tuple(metadata.shape)}")
    if masks is not None and (masks.dtype != torch.uint8 or masks.shape[1:] != (bitmap_bytes,)):
        raise ValueError(f"sparse_mm_block: masks must be uint8 [count, {bitmap_bytes}], got {masks.dtype} "
                         f"{tuple(masks.shape)}")
    n = values.shape[0] * block_rows
    values, metadata = values.contiguous(), metadata.contiguous()
    masks = masks.contiguous() if masks is not None else None
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((m_rows, n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    args = (x, values, metadata, masks, bias, y, m_rows, n, k, min(triton.next_power_of_2(m_rows), 2 * kernels.SMALL_M),
            x.stride(0), x.stride(1), values.stride(0), metadata.stride(0))
    meta = dict(R=block_rows, C=block_cols, KEPT=kept, BITMAP_BYTES=bitmap_bytes, LIBRARY=masks is not None,
                HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype in kernels._FP32_DOT else "tf32",
                UPCAST=kernels.INTERPRETED and x.dtype == torch.bfloat16, GROUP_M=8)

    def grid(c):
        return (triton.cdiv(m_rows, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

    if kernels.INTERPRETED:
        _sparse_mm_block_kernel[grid(kernels.INTERPRETER_CONFIG)](*args, **meta, **kernels.INTERPRETER_CONFIG)
    else:
        _sparse_mm_block_tuned[grid](*args, **meta)
    return y
