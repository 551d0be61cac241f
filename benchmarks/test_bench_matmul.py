"""sparse_mm ``y = x @ W.T`` against dense GEMMs on the projected weight, for M from 1 to 4096.

Baselines in the same rounds: dense ``F.linear`` eager and ``torch.compile``d (``torch._int_mm``
for int8), and on a GPU torch's own 2:4 path ``torch._cslt_sparse_mm`` (cuSPARSELt); dense on a
GPU is cuBLAS. The ratio to dense eager is the speed-up the report plots against M.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import nxm_kernels as nxm

from . import cases, harness


def _linear(x, w):
    return F.linear(x, w)


@functools.cache
def compiled_linear():
    # dynamic=True: one compiled graph serves every M and shape (a dense GEMM lowers to the same
    # library call either way), so the suite does not spend minutes recompiling.
    return torch.compile(_linear, dynamic=True)


def _cslt_linear(packed, x, out_dtype):
    # cuSPARSELt multiplies sparse A [N, K] by dense B [K, M]: y.T = W @ x.T.
    return torch._cslt_sparse_mm(packed, x.t(), out_dtype=out_dtype).t()


def in_quick_grid(shape_name, dtype, m, layout) -> bool:
    if dtype == torch.float16:
        return shape_name in cases.QUICK_SHAPES
    if dtype == torch.bfloat16:
        return shape_name in cases.QUICK_SHAPES and layout == "packed"
    return shape_name == "bert-base.ffn-up" and m in (1, 64) and layout == "packed"


def all_cases():
    return [(shape_name, dtype, m, layout) for layout in nxm.LAYOUTS for dtype in cases.DTYPES
            for shape_name in cases.MODEL_SHAPES for m in cases.GEMM_M]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases.grid(metafunc, "case", all_cases, in_quick_grid)


@pytest.mark.parametrize("backend", cases.backend_names())
def test_sparse_mm(benchmark, profile, case, backend):
    device, shape_name, dtype, m, layout = case
    n, k = shape = cases.MODEL_SHAPES[shape_name]
    pattern = cases.pattern_for(dtype, layout)
    w = cases.weight(shape, dtype, device)
    sw = cases.compress_or_skip(w, pattern, layout)
    x = cases.activations(m, k, dtype, device)
    cases.require_backend(backend, "sparse_mm", x=x, sw=sw, bias=None)
    dense = nxm.project(w, pattern)  # what sw holds, stored dense

    baselines, unavailable = {}, {}
    if dtype == torch.int8:
        cases.add_baseline(baselines, unavailable, "dense torch._int_mm",
                           functools.partial(torch._int_mm, x, dense.t()))
    else:
        cases.add_baseline(baselines, unavailable, "dense F.linear", functools.partial(F.linear, x, dense))
        cases.add_baseline(baselines, unavailable, "dense F.linear compiled",
                           functools.partial(compiled_linear(), x, dense))
    if device == "cuda" and pattern == "2:4" and dtype != torch.float32:
        try:
            packed = torch._cslt_compress(dense)
        except Exception as error:  # noqa: BLE001  the reason is kept for the report
            unavailable["torch._cslt_sparse_mm"] = f"torch._cslt_compress: {type(error).__name__}: {error}"
        else:
            out_dtype = torch.int32 if dtype == torch.int8 else None
            cases.add_baseline(baselines, unavailable, "torch._cslt_sparse_mm",
                               functools.partial(_cslt_linear, packed, x, out_dtype))

    benchmark.group = f"sparse_mm {layout} {pattern} {cases.dtype_name(dtype)} {shape_name} M={m} {device}"
    harness.measure(
        benchmark, profile, torch.device(device), functools.partial(nxm.sparse_mm, x, sw, backend=backend),
        baselines, kind="sparse_mm", op="sparse_mm", layout=layout, pattern=pattern,
        dtype=cases.dtype_name(dtype), model=shape_name, shape=[n, k], m=m, backend=backend,
        bytes=sw.nbytes, flops=2 * m * n * k, baselines_unavailable=unavailable,
    )
