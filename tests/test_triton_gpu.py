"""The Triton kernels compiled and run on a CUDA GPU: checked against the reference at LLM sizes,
and timed against dense cuBLAS (printed as ratios; run with ``-s``; no timed assertions).

Run on a GPU machine with the kernels compiled, not interpreted (conftest turns the interpreter
on by default):  ``TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_gpu.py -s``
"""

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import reference
from nxm_kernels.pattern import Pattern

from conftest import assert_matmul_close

kernels = pytest.importorskip("nxm_kernels.backends.triton.kernels")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(kernels.INTERPRETED, reason="kernels are interpreted: run with TRITON_INTERPRET=0"),
]


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("pattern,layout", [("2:4", "packed"), ("4:8", "packed"), ("2:3", "packed"), ("cut", "cutlass")])
def test_select_compress_decompress_exact(dtype, pattern, layout):
    if layout == "cutlass":
        pattern = "1:2" if dtype == torch.float32 else "2:4"
    p = Pattern.parse(pattern)
    w = torch.randint(-8, 9, (2048, 96 * p.m), device="cuda").to(dtype)  # ties and zeros
    assert torch.equal(nxm.nm_mask(w, p, backend="triton"), reference.nm_mask(w, p))
    assert same_bits(nxm.project(w, p, backend="triton"), reference.project(w, p))
    sw = nxm.compress(w, p, layout=layout, backend="triton")
    values, metadata = reference.compress(w, p, layout)
    assert same_bits(sw.values, values) and torch.equal(sw.metadata, metadata)
    assert same_bits(nxm.decompress(sw, backend="triton"), reference.project(w, p))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m_rows", [1, 7, 16, 64, 65, 512])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "2:3"])
def test_sparse_mm_autotuned(dtype, m_rows, pattern):
    p = Pattern.parse(pattern)
    in_features = 1536 if p.m != 3 else 1533
    w = torch.randn(1000, in_features, device="cuda").to(dtype)
    x = torch.randn(m_rows, in_features, device="cuda").to(dtype)
    bias = torch.randn(1000, device="cuda").to(dtype)
    sw = nxm.compress(w, p, backend="triton")
    assert_matmul_close(nxm.sparse_mm(x, sw, bias, backend="triton"), x, reference.project(w, p), bias)


def test_sparse_mm_under_torch_compile():
    p = Pattern(2, 4)
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    x = torch.randn(8, 512, device="cuda", dtype=torch.float16)
    sw = nxm.compress(w, p, backend="triton")
    compiled = torch.compile(lambda x: torch.ops.nxm_triton.sparse_mm_packed(x, sw.values, sw.metadata, None, 2, 4),
                             fullgraph=True)
    assert_matmul_close(compiled(x), x, reference.project(w, p))


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m_rows", [1, 16, 64, 512, 4096])
def test_time_against_dense(shape, m_rows):
    from triton.testing import do_bench

    w = torch.randn(shape, device="cuda", dtype=torch.float16)
    x = torch.randn(m_rows, shape[1], device="cuda", dtype=torch.float16)
    sw = nxm.compress(w, "2:4", backend="triton")
    dense = nxm.project(w, "2:4", backend="triton")
    assert_matmul_close(nxm.sparse_mm(x, sw, backend="triton"), x, dense)
    t_dense = do_bench(lambda: x @ dense.T)
    t_sparse = do_bench(lambda: nxm.sparse_mm(x, sw, backend="triton"))
    print(f"\n2:4 fp16 {shape[0]}x{shape[1]} M={m_rows}: dense {t_dense * 1e3:.1f} us, "
          f"triton sparse {t_sparse * 1e3:.1f} us, speed-up {t_dense / t_sparse:.2f}x")
