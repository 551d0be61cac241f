"""Triton W8A16 / W4A16 GEMM ``y = x @ W^T (+ bias)`` for int8/int4 2:4 weights in the ``tiled_q``
layout (``layouts/tiled_q.py``), made for decoding (M <= 16) and correct for any M.
Specification: ``reference.sparse_mm`` (code * scale in fp32, fp32 accumulation).

A program owns ``BLOCK_N`` rows (whole 16-row blocks of the layout) and ``BLOCK_M`` rows of x,
and steps along K by ``BLOCK_K`` (whole 64-feature tiles). Per step it reads, as contiguous runs,
the codes (int8: 2 bytes per group of 4; int4: 1 byte, two nibbles) and the metadata (a nibble
of two 2-bit positions per group), places each group's two codes at their positions in a dense
``[BLOCK_N, BLOCK_K]`` tile of integers, and multiplies it with ``tl.dot`` (fp32 accumulation,
mma / wgmma): codes up to 127 are exact in fp16 and bf16, so the tensor cores see the integers
themselves. The scales are applied to the fp32 products: once at the end for one scale per row,
or after each step for groups (``BLOCK_K`` divides the group size, so a step lies in one group).
So the only roundings are fp32 accumulation and the final cast, as in the reference, whose
order of fp32 additions differs. The weight bytes read are the codes, the metadata and the
scales: 3/16 + 1/64 of the fp16 dense bytes for int4 2:4 with g = 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layouts.tiled_q import META_PER_ROW, TILE_K, TILE_N
from . import kernels


@triton.jit
def _w_tile(values_ptr, meta_ptr, v_offsets, m_offsets, valid, dtype: tl.constexpr,
            BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[BLOCK_N, BLOCK_K]`` tile of integer codes (in ``dtype``) from one step's codes and metadata."""
    G: tl.constexpr = BLOCK_K // 4
    if BITS == 8:  # two int8 codes per group, side by side
        first, second = tl.split(tl.reshape(tl.load(values_ptr + v_offsets, mask=valid, other=0), (BLOCK_N, G, 2)))
    else:  # one byte per group: first code in the low nibble, 4-bit two's complement
        byte = tl.load(values_ptr + v_offsets, mask=valid, other=0).to(tl.int32)
        first = ((byte & 0xF) ^ 8) - 8
        second = ((byte >> 4) ^ 8) - 8
    meta = tl.load(meta_ptr + m_offsets, mask=valid, other=0).to(tl.int32)
    nibble = tl.reshape(tl.join(meta & 0xF, meta >> 4), (BLOCK_N, G))  # even group in the low nibble
    position = tl.arange(0, 4)[None, None, :]
    first = first.to(dtype)[:, :, None]
    second = second.to(dtype)[:, :, None]
    dense = tl.where(position == (nibble & 3)[:, :, None], first,
                     tl.where(position == (nibble >> 2)[:, :, None], second, tl.zeros_like(first)))
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse_mm_tiled_q_kernel(
    # pointers: x [M, K]; codes [N/16, (K/64)*16*CODE_BYTES]; metadata [N/16, (K/64)*16*8] uint8;
    # scales [N, groups] fp32; bias [N]; y [M, N]
    x_ptr, values_ptr, meta_ptr, scales_ptr, bias_ptr, y_ptr,
    # sizes; M_BUCKET is only an autotuning key (decode and larger M configs)
    M, N, K, M_BUCKET,
    # strides (codes, metadata and y are contiguous; a row block of codes/metadata is one run)
    stride_xm, stride_xk, stride_vb, stride_mb, stride_sn,
    # meta-parameters: code width, scale group (0: one per row), the layout's tile, numerics, program tile
    BITS: tl.constexpr, GROUP_K: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr,
    META_BYTES: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = (rn < N)[:, None]
    # Offsets inside one step: byte j of a row's run lies in tile j // per_row of the step, at
    # column j % per_row of the tile row; tile rows of a row block follow each other.
    CODE_BYTES: tl.constexpr = TILE_COLS // 2 * BITS // 8  # per tile row
    block_row = (rn // TILE_ROWS).to(tl.int64)
    tile_row = rn % TILE_ROWS
    jv = tl.arange(0, BLOCK_K // TILE_COLS * CODE_BYTES)
    v_in_step = (jv // CODE_BYTES) * TILE_ROWS * CODE_BYTES + jv % CODE_BYTES
    v_offsets = (block_row * stride_vb + tile_row * CODE_BYTES)[:, None] + v_in_step[None, :]
    jm = tl.arange(0, BLOCK_K // TILE_COLS * META_BYTES)
    m_in_step = (jm // META_BYTES) * TILE_ROWS * META_BYTES + jm % META_BYTES
    m_offsets = (block_row * stride_mb + tile_row * META_BYTES)[:, None] + m_in_step[None, :]
    V_STEP: tl.constexpr = BLOCK_K // TILE_COLS * TILE_ROWS * CODE_BYTES  # per step, within a row block
    M_STEP: tl.constexpr = BLOCK_K // TILE_COLS * TILE_ROWS * META_BYTES
    dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    s_rows = scales_ptr + rn.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K // BLOCK_K):
        k0 = step * BLOCK_K
        x = tl.load(x_rows + (k0 + rk)[None, :] * stride_xk, mask=(rm < M)[:, None], other=0.0).to(dtype)
        w = _w_tile(values_ptr + step * V_STEP, meta_ptr + step * M_STEP, v_offsets, m_offsets, row_valid,
                    dtype, BITS, BLOCK_N, BLOCK_K)
        if GROUP_K == 0:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee" if UPCAST else "tf32")
        else:  # this step's fp32 products, times its group's scale
            part = tl.dot(x, tl.trans(w), input_precision="ieee" if UPCAST else "tf32")
            acc += part * tl.load(s_rows + k0 // GROUP_K, mask=rn < N, other=0.0)[None, :]
    if GROUP_K == 0:
        acc = acc * tl.load(s_rows, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# Decoding (M <= 16): one thin M tile; N tiles narrow enough to give every SM programs (N / BLOCK_N
# of them) and K steps long enough to keep loads in flight. Larger M: wider tiles for reuse. Every
# config compiles to mma (sm_80) / wgmma or mma (sm_90) without spills (tests/test_triton_aot.py).
# BLOCK_K must divide K and the group size; the launch keeps the configs where it does.
def _configs(*rows):
    return tuple(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s) for bm, bn, bk, w, s in rows)


DECODE_M = 16
CONFIGS = {  # decode (M <= DECODE_M)? -> configs
    True: _configs((16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 64, 4, 4), (16, 32, 64, 4, 3),
                   (16, 16, 64, 4, 3)),
    False: _configs((64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (32, 64, 64, 4, 3)),
}
# Under the interpreter one small config runs: two 16-row blocks per program, two tiles per step
# when K and the group size allow.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1)
_TUNED = {decode: [kernels._triton_config(c) for c in configs] for decode, configs in CONFIGS.items()}


def _fits(block_k: int, k: int, group_size: int) -> bool:
    return k % block_k == 0 and (group_size == 0 or group_size % block_k == 0)


def _configs_for_call(configs, named_args, **kwargs):
    # Never empty: K and the group size are multiples of TILE_K, and both tables hold BLOCK_K = TILE_K.
    k, group = named_args["K"], kwargs["GROUP_K"]
    return [c for c in _TUNED[named_args["M"] <= DECODE_M] if _fits(c.kwargs["BLOCK_K"], k, group)]


_sparse_mm_tiled_q_tuned = triton.autotune(
    configs=[c for configs in _TUNED.values() for c in configs],
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_K"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _configs_for_call},
)(_sparse_mm_tiled_q_kernel)

DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- host side: check -> allocate -> launch


def sparse_mm_tiled_q(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, scales: torch.Tensor, bias,
                      bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for W [N, K] as ``bits`` (8 or 4) codes in the ``tiled_q`` layout with fp32
    ``scales`` [N, groups] (``group_size`` 0: one per row). ``config``: a fixed program tile
    (``BLOCK_M/N/K``, ``num_warps``, ``num_stages``) instead of autotuning (the interpreter's by default)."""
    m_rows, k = x.shape
    n = scales.shape[0]
    code_bytes = TILE_K // 2 * bits // 8
    groups = 1 if group_size == 0 else -(-k // group_size)
    want = {"values": (n // TILE_N, k // TILE_K * TILE_N * code_bytes),
            "metadata": (n // TILE_N, k // TILE_K * TILE_N * META_PER_ROW), "scales": (n, groups)}
    got = {"values": values, "metadata": metadata, "scales": scales}
    if (x.dtype not in DTYPES or bits not in (8, 4) or n % TILE_N or k % TILE_K or (group_size % TILE_K)
            or any(tuple(got[name].shape) != shape for name, shape in want.items())
            or scales.dtype != torch.float32):
        raise ValueError(
            f"sparse_mm_tiled_q: x {x.dtype} {tuple(x.shape)} (float16/bfloat16, K a multiple of {TILE_K}) with "
            f"{bits}-bit codes, group_size {group_size} (0 or a multiple of {TILE_K}) needs "
            + ", ".join(f"{name} {shape}" for name, shape in want.items())
            + " (scales float32), got " + ", ".join(f"{name} {tuple(t.shape)}" for name, t in got.items())
            + f" (scales {scales.dtype})")
    values, metadata, scales = values.contiguous(), metadata.contiguous(), scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((m_rows, n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    args = (x, values, metadata, scales, bias, y, m_rows, n, k, min(triton.next_power_of_2(m_rows), 2 * DECODE_M),
            x.stride(0), x.stride(1), values.stride(0), metadata.stride(0), scales.stride(0))
    meta = dict(BITS=bits, GROUP_K=group_size, TILE_ROWS=TILE_N, TILE_COLS=TILE_K, META_BYTES=META_PER_ROW,
                HAS_BIAS=bias is not None, UPCAST=kernels.INTERPRETED and x.dtype == torch.bfloat16)

    def grid(c):
        return (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m_rows, c["BLOCK_M"]))

    if config is None and kernels.INTERPRETED:
        config = dict(INTERPRETER_CONFIG)
        while not _fits(config["BLOCK_K"], k, group_size):
            config["BLOCK_K"] //= 2
    if config is not None:
        if not _fits(config["BLOCK_K"], k, group_size) or config["BLOCK_K"] % TILE_K or config["BLOCK_N"] % TILE_N:
            raise ValueError(f"sparse_mm_tiled_q: BLOCK_K={config['BLOCK_K']} must be a multiple of {TILE_K} dividing "
                             f"K={k} and the group size {group_size or 'K'}, BLOCK_N={config['BLOCK_N']} a multiple "
                             f"of {TILE_N}")
        _sparse_mm_tiled_q_kernel[grid(config)](*args, **meta, **config)
    else:
        _sparse_mm_tiled_q_tuned[grid](*args, **meta)
    return y
