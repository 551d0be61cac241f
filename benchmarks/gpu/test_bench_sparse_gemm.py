"""Sparse GEMM on a GPU: cuSPARSELt (ours, default and tuned algorithm) against cuBLAS dense,
``torch._cslt_sparse_mm`` (cuSPARSELt as torch calls it: descriptors and plan rebuilt every call)
and our Triton GEMM, for M = 1 .. 8192 on BERT-base and 7-8B decoder linear layers.

Each implementation is timed with ``triton.testing.do_bench`` (CUDA events, L2 cleared, median),
in interleaved rounds; the report (benchmarks/gpu/results/, or NXM_BENCH_OUT) holds the table and
a plot of the speed-up over dense against M. Skipped without a GPU.
"""

import statistics

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import dispatch
from nxm_kernels.backends import cusparselt

from .. import cases
from . import report

pytestmark = pytest.mark.gpu
M_VALUES = tuple(2**i for i in range(14))  # 1 .. 8192
ROUNDS = 3


def grid():
    params = []
    for shape_name in cases.MODEL_SHAPES:
        for dtype in (torch.float16, torch.bfloat16, torch.int8):
            for m in M_VALUES:
                params.append(pytest.param(shape_name, dtype, m, id=f"{shape_name}-{cases.dtype_name(dtype)}-M{m}"))
    return params


def dense_baseline(x, w, dtype):
    if dtype != torch.int8:
        return lambda: torch.nn.functional.linear(x, w)
    # torch._int_mm (cuBLAS int8) needs M > 16 and multiples of 8: pad like a caller would.
    rows = max(32, -(-x.shape[0] // 8) * 8)
    w_t = w.t()
    return lambda: torch._int_mm(torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0])), w_t)[: x.shape[0]]


def torch_cslt_baseline(x, w, dtype):
    """As torch's SparseSemiStructuredTensor calls it: pad M, then int8 -> int32 [N, M] transposed
    back, the others with the fused transpose."""
    packed = torch._cslt_compress(w)
    m, rows = x.shape[0], cusparselt.padded_rows(x.shape[0], dtype)
    pad = lambda: torch.nn.functional.pad(x, (0, 0, 0, rows - m)).t()  # noqa: E731
    if dtype == torch.int8:
        return lambda: torch._cslt_sparse_mm(packed, pad(), out_dtype=torch.int32)[:, :m].t()
    return lambda: torch._cslt_sparse_mm(packed, pad(), transpose_result=True)[:m]


def triton_baseline(x, w, pattern, notes):
    backend = dispatch.get_backend("triton") if "triton" in nxm.backends() else None
    if backend is None:
        notes.append("triton: not registered")
        return None
    why = []
    for layout in ("cutlass", "packed"):
        try:
            sw = nxm.compress(w, pattern, layout=layout)
        except (ValueError, TypeError) as error:
            why.append(f"{layout}: {error}")
            continue
        reasons = dispatch.reasons(backend, "sparse_mm", {"x": x, "sw": sw, "bias": None})
        if not reasons:
            return lambda: nxm.sparse_mm(x, sw, backend="triton")
        why.append(f"{layout}: {'; '.join(reasons)}")
    notes.append("triton: " + " / ".join(why))
    return None


@pytest.mark.parametrize("shape_name, dtype, m", grid())
def test_sparse_gemm(benchmark, profile, shape_name, dtype, m):
    import triton.testing

    if not profile.full_grid and dtype != torch.float16:
        pytest.skip("bfloat16 and int8 run in the full profile (--bench-full)")
    why = cusparselt.BACKEND.unavailable_reason() or "; ".join(
        cusparselt.BACKEND.device_problems(torch.device("cuda"), dtype))
    if why:
        pytest.skip(f"cuSPARSELt cannot run here: {why}")
    shape = cases.MODEL_SHAPES[shape_name]
    pattern = "2:4"
    w = nxm.project(cases.weight(shape, dtype, "cuda"), pattern)
    x = cases.activations(m, shape[1], dtype, "cuda")
    sw = nxm.compress(w, pattern, layout="cusparselt")
    notes = []
    impls = {
        "cusparselt": lambda: nxm.sparse_mm(x, sw),
        "cuBLAS dense": dense_baseline(x, w, dtype),
        "torch._cslt_sparse_mm": torch_cslt_baseline(x, w, dtype),
        "triton": triton_baseline(x, w, pattern, notes),
    }
    tuned = nxm.tune(sw, tokens=(m,), iterations=10, save=False)[m]
    config = (tuned["alg_id"], tuned["split_k"])
    out_dtype = cusparselt.OUTPUT_DTYPES[dtype][0]
    impls["cusparselt tuned"] = lambda: cusparselt._run(x, sw, None, None, out_dtype, config)
    notes.append(f"cusparselt tuned: algorithm {config[0]}, split-k {config[1] or 'heuristic'} for M={m}")

    samples = {name: [] for name, fn in impls.items() if fn is not None}
    for _ in range(ROUNDS):  # interleaved: every implementation sees the same conditions
        for name in samples:
            samples[name].append(triton.testing.do_bench(impls[name], warmup=10, rep=50) * 1000)
    us = {name: (statistics.median(samples[name]) if name in samples else None) for name in report.IMPLS}
    report.RESULTS.append({"shape": shape_name, "dtype": cases.dtype_name(dtype), "m": m,
                           "gpu": torch.cuda.get_device_name(), "us": us, "notes": notes})
    benchmark.extra_info.update({"us": us, "notes": notes,
                                 "speedup_vs_dense": {k: us["cuBLAS dense"] / v for k, v in us.items() if v}})

    def candidate():
        impls["cusparselt"]()
        torch.cuda.synchronize()

    benchmark.pedantic(candidate, rounds=profile.min_rounds, warmup_rounds=2)
