"""The native CPU sparse GEMM (2:4, packed) against dense ``F.linear`` on the projected weight, at
decode sizes: M = 1, 8, 64, in bf16 and fp32, same threads, interleaved rounds (harness.py).

Beside each measured speed-up stands its physical limit, the bytes ratio (dense weight bytes /
sparse values + metadata bytes): at small M both GEMMs stream their weight, so that ratio bounds
what the sparse one can gain. Cases:
- one 4096x4096 layer (it stays in this CPU's last-level cache between calls);
- the weights of enough such layers to exceed the last-level cache, cycled call after call as a
  model's decode steps through its layers (each call finds its weight in DRAM);
- the linear layers of BERT-base and SmolLM2-135M.
Run alone: ``python -m benchmarks.run -- -k cpu_gemm -s`` (-s prints the table as it goes).
"""

from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import nxm_kernels as nxm

from . import cases, harness

SHAPES = {
    "decoder-8b.attn-qo": (4096, 4096),
    "bert-base.attn": (768, 768),
    "bert-base.ffn-up": (3072, 768),
    "bert-base.ffn-down": (768, 3072),
    "smollm2-135m.attn-qo": (576, 576),
    "smollm2-135m.attn-kv": (192, 576),
    "smollm2-135m.mlp-up": (1536, 576),
    "smollm2-135m.mlp-down": (576, 1536),
}
DTYPES = (torch.bfloat16, torch.float32)
M_VALUES = (1, 8, 64)
# Layers cycled to exceed the last-level cache with the sparse weights too: 32 x 18 MiB (bf16) and
# 16 x 34 MiB (fp32) > 480 MiB, the largest L3 of the machines this suite ran on.
CYCLED_LAYERS = {torch.bfloat16: 32, torch.float32: 16}


def bytes_ratio(dense: torch.Tensor, sw) -> float:
    return cases.nbytes(dense) / (cases.nbytes(sw.values) + cases.nbytes(sw.metadata))


def layer(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator, dtype=dtype)
    sw = nxm.compress(w, "2:4", layout="packed")
    return nxm.project(w, "2:4"), sw


def require_native(x, sw):
    cases.require_backend("native", "sparse_mm", x=x, sw=sw, bias=None)


def report(benchmark, ratios, limit, what):
    speedup = 1 / ratios["dense F.linear"]["median"]
    low, high = 1 / ratios["dense F.linear"]["max"], 1 / ratios["dense F.linear"]["min"]
    benchmark.extra_info.update(bytes_ratio=limit, speedup_median=speedup)
    print(f"\n| {what} | {speedup:.2f}x [{low:.2f}-{high:.2f}] | {limit:.2f}x | "
          f"{torch.get_num_threads()} | {os.getloadavg()[0]:.1f} |")


@pytest.mark.parametrize("m", M_VALUES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=cases.dtype_name)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_cpu_gemm(benchmark, profile, shape_name, dtype, m):
    shape = SHAPES[shape_name]
    dense, sw = layer(shape, dtype, seed=sum(shape))
    x = cases.activations(m, shape[1], dtype, "cpu")
    require_native(x, sw)
    benchmark.group = f"cpu gemm 2:4 {cases.dtype_name(dtype)} {shape_name} M={m}"
    ratios = harness.measure(
        benchmark, profile, torch.device("cpu"), functools.partial(nxm.sparse_mm, x, sw, backend="native"),
        {"dense F.linear": functools.partial(F.linear, x, dense)},
        kind="cpu_gemm", op="sparse_mm", layout="packed", pattern="2:4", dtype=cases.dtype_name(dtype),
        model=shape_name, shape=list(shape), m=m, backend="native", bytes=sw.nbytes, flops=2 * m * shape[0] * shape[1],
    )
    report(benchmark, ratios, bytes_ratio(dense, sw), f"{cases.dtype_name(dtype)} {shape_name} {shape[0]}x{shape[1]} M={m}")


@pytest.mark.parametrize("m", M_VALUES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=cases.dtype_name)
def test_cpu_gemm_layers_beyond_cache(benchmark, profile, dtype, m):
    shape = SHAPES["decoder-8b.attn-qo"]
    count = CYCLED_LAYERS[dtype]
    layers = [layer(shape, dtype, seed=i) for i in range(count)]
    x = cases.activations(m, shape[1], dtype, "cpu")
    require_native(x, layers[0][1])
    sparse_layers, dense_layers = itertools.cycle([sw for _, sw in layers]), itertools.cycle([d for d, _ in layers])

    def sparse_step():
        return nxm.sparse_mm(x, next(sparse_layers), backend="native")

    def dense_step():
        return F.linear(x, next(dense_layers))

    benchmark.group = f"cpu gemm 2:4 {cases.dtype_name(dtype)} {count} layers cycled M={m}"
    ratios = harness.measure(
        benchmark, profile, torch.device("cpu"), sparse_step, {"dense F.linear": dense_step},
        kind="cpu_gemm", op="sparse_mm", layout="packed", pattern="2:4", dtype=cases.dtype_name(dtype),
        model=f"decoder-8b.attn-qo x{count} cycled", shape=list(shape), m=m, backend="native",
        bytes=layers[0][1].nbytes, flops=2 * m * shape[0] * shape[1],
    )
    report(benchmark, ratios, bytes_ratio(*layers[0]),
           f"{cases.dtype_name(dtype)} {count} x 4096x4096 cycled (beyond the L3) M={m}")
