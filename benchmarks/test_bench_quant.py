"""Quantized 2:4 weights (int8 per row, int4 per row and in groups of 128) in the native CPU GEMM
against dense bf16 ``F.linear`` and against dequantizing first (``decompress`` + ``F.linear``),
at decode sizes (M = 1, 8), interleaved rounds (harness.py).

Beside each speed-up stands its physical limit, the bytes ratio: dense bf16 weight bytes / (codes +
metadata + scales). Targets at M = 1: int8 2:4 >= 2x, int4 2:4 >= 3x over dense bf16.
W8A8 (``act_bits=8``: x quantized per token, int8 x int8 dot products in int32, AVX-512 VNNI) at
M = 1, 8, 64 against dense bf16 ``F.linear`` and against the W8A16 native path on the same weight.
Run alone: ``python -m pytest benchmarks/test_bench_quant.py -p no:cacheprovider -s``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

import nxm_kernels as nxm

from . import cases, harness

SHAPE = (4096, 4096)  # decoder-8b.attn-qo
ENCODINGS = {"int8": (8, None), "int4": (4, None), "int4-g128": (4, 128)}
M_VALUES = (1, 8)
W8A8_M_VALUES = (1, 8, 64)


@pytest.mark.parametrize("m", M_VALUES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_cpu_quantized_gemm(benchmark, profile, encoding, m):
    bits, group_size = ENCODINGS[encoding]
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sw = nxm.compress(w, "2:4", bits=bits, group_size=group_size)
    dense = w.clone()  # dense bf16: what the layer is without sparsity or quantization
    x = cases.activations(m, SHAPE[1], torch.bfloat16, "cpu")
    cases.require_backend("native", "sparse_mm", x=x, sw=sw, bias=None)
    benchmark.group = f"cpu gemm 2:4 {encoding} bf16 4096x4096 M={m}"
    ratios = harness.measure(
        benchmark, profile, torch.device("cpu"), functools.partial(nxm.sparse_mm, x, sw, backend="native"),
        {"dense F.linear": functools.partial(F.linear, x, dense),
         "decompress + F.linear": lambda: F.linear(x, nxm.decompress(sw))},
        kind="cpu_gemm_quant", op="sparse_mm", layout="packed", pattern="2:4", dtype="bfloat16", encoding=encoding,
        shape=list(SHAPE), m=m, backend="native", bytes=sw.nbytes, flops=2 * m * SHAPE[0] * SHAPE[1],
    )
    limit = cases.nbytes(dense) / sw.nbytes
    dense_x, dequant_x = (1 / ratios[name]["median"] for name in ("dense F.linear", "decompress + F.linear"))
    low, high = 1 / ratios["dense F.linear"]["max"], 1 / ratios["dense F.linear"]["min"]
    benchmark.extra_info.update(bytes_ratio=limit, speedup_median=dense_x)
    print(f"\n| 2:4 {encoding} bf16 4096x4096 M={m} | {dense_x:.2f}x [{low:.2f}-{high:.2f}] | {dequant_x:.1f}x | "
          f"{limit:.2f}x | {torch.get_num_threads()} | {os.getloadavg()[0]:.1f} |")


@pytest.mark.parametrize("m", W8A8_M_VALUES, ids=lambda m: f"M{m}")
def test_cpu_w8a8_gemm(benchmark, profile, m):
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sw = nxm.compress(w, "2:4", bits=8)
    x = cases.activations(m, SHAPE[1], torch.bfloat16, "cpu")
    cases.require_backend("native", "sparse_mm", x=x, sw=sw, bias=None, act_bits=8)
    benchmark.group = f"cpu gemm 2:4 int8 W8A8 bf16 4096x4096 M={m}"
    ratios = harness.measure(
        benchmark, profile, torch.device("cpu"), functools.partial(nxm.sparse_mm, x, sw, act_bits=8, backend="native"),
        {"dense F.linear": functools.partial(F.linear, x, w),
         "W8A16 native": functools.partial(nxm.sparse_mm, x, sw, backend="native")},
        kind="cpu_gemm_w8a8", op="sparse_mm", layout="packed", pattern="2:4", dtype="bfloat16", encoding="int8",
        act_bits=8, shape=list(SHAPE), m=m, backend="native", bytes=sw.nbytes, flops=2 * m * SHAPE[0] * SHAPE[1],
    )
    limit = cases.nbytes(w) / sw.nbytes
    dense_x, w8a16_x = (1 / ratios[name]["median"] for name in ("dense F.linear", "W8A16 native"))
    low, high = 1 / ratios["dense F.linear"]["max"], 1 / ratios["dense F.linear"]["min"]
    benchmark.extra_info.update(bytes_ratio=limit, speedup_median=dense_x)
    print(f"\n| 2:4 int8 W8A8 bf16 4096x4096 M={m} | {dense_x:.2f}x [{low:.2f}-{high:.2f}] | {w8a16_x:.2f}x | "
          f"{limit:.2f}x | {torch.get_num_threads()} | {os.getloadavg()[0]:.1f} |")
