"""``sparse_mm`` of the ``block`` layout (k-of-RxC bitmaps and mask-library numbers) on the Triton
GEMM (under TRITON_INTERPRET=1, set by conftest, on CPU tensors), against the reference.

Exactness: x holds -1, 0, 1 and W and the bias multiples of 1/2 in [-1, 1], so every partial sum
and the result are multiples of 1/2 below 128 in magnitude: exact in fp32 and in the output dtype
(bf16 too, whose rounding the interpreter does not do as a GPU does), whatever the summation order.
Random operands are then held to ``assert_matmul_close``. Grids stay small: the interpreter is slow."""

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels.layouts.block import library_bitmaps
from nxm_kernels.pattern import as_pattern

from conftest import assert_matmul_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# 8 distinct 4x4 masks that each keep 8; more than 256 masks store int16 numbers.
LIBRARY = nxm.Pattern.library(torch.stack([torch.arange(16).roll(k) < 8 for k in range(8)]).view(8, 4, 4))
KINDS = ["8:4x4", "3:2x3", "5:3x3", "20:4x8", LIBRARY, "2x2{9,6,c}"]


def exact_operands(pattern, grid, m_rows, dtype, seed):
    """W of ``grid`` blocks, x of ``m_rows`` rows and a bias (see the module: exact results)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = pattern.block
    shape = (rows * grid[0], cols * grid[1])
    assert shape[1] < 127, "keep |y| below 128"

    def halves(*size):
        return (torch.randint(-2, 3, size, generator=g) * 0.5).to(dtype)

    return halves(*shape), torch.randint(-1, 2, (m_rows, shape[1]), generator=g).to(dtype), halves(shape[0])


def triton_backend():
    backend = pytest.importorskip("nxm_kernels.backends.triton").BACKEND
    if backend.unavailable_reason() is not None:
        pytest.skip(backend.unavailable_reason())


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_block_gemm_is_exact(kind, dtype):
    triton_backend()
    assert_exact_against_reference(kind, dtype, "triton")


def assert_exact_against_reference(kind, dtype, backend):
    """``backend``'s block GEMM equals the reference's bit for bit, with and without bias, on exact
    operands: N spans two 32-row tiles with a ragged one, K two 32-column steps with a ragged one."""
    pattern = as_pattern(kind)
    grid = (40 // pattern.block[0], 72 // pattern.block[1])
    w, x, bias = exact_operands(pattern, grid, 17, dtype, seed=len(str(kind)))
    sw = nxm.compress(w, pattern, "block")
    for b in (bias, None):
        y = nxm.sparse_mm(x, sw, b, backend=backend)
        assert torch.equal(y, nxm.sparse_mm(x, sw, b, backend="reference")), (kind, dtype, b is None)


@pytest.mark.parametrize("kind", ["8:4x4", LIBRARY], ids=str)
def test_triton_block_gemm_random_values(kind):
    triton_backend()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=g, dtype=torch.float16)
    x = torch.randn(3, 64, generator=g, dtype=torch.float16)
    sw = nxm.compress(w, kind, "block")
    assert_matmul_close(nxm.sparse_mm(x, sw, backend="triton"), x, nxm.decompress(sw))


def test_triton_block_gemm_reads_int16_mask_numbers():
    triton_backend()
    assert_reads_int16_mask_numbers("triton")


def test_triton_block_gemm_refuses_mismatched_storage():
    triton_backend()
    sw = nxm.compress(torch.randn(8, 16), "8:4x4", "block")
    with pytest.raises(ValueError, match=r"values \[rows, 32\] and metadata \[rows, 8\]"):
        torch.ops.nxm_triton.sparse_mm_block(torch.randn(2, 16), sw.values, sw.metadata[:, :6], None, None, 4, 4, 8)


# ---------------------------------------------------------------- native CPU (csrc/cpu_block_gemm.cpp)


def native_block_gemm():
    from nxm_kernels import _extension

    if _extension.unavailable_reason() is not None:
        pytest.skip(_extension.unavailable_reason())
    if not torch._C._dispatch_has_kernel_for_dispatch_key("nxm::sparse_mm_block", "CPU"):
        pytest.skip("nxm_kernels._C predates csrc/cpu_block_gemm.cpp: rebuild it")


@pytest.fixture(params=["avx512", "portable"])
def isa(request, monkeypatch):
    """The kernel NXM_CPU_ISA asks for: AVX-512 (4x4 blocks; the portable one for other blocks, and
    on CPUs without AVX-512) or the portable one."""
    native_block_gemm()
    if request.param == "avx512" and torch.ops.nxm.cpu_isa() not in ("avx512", "amx"):
        pytest.skip(f"this CPU runs up to {torch.ops.nxm.cpu_isa()}")
    monkeypatch.setenv("NXM_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_block_gemm_is_exact(kind, dtype, isa):
    assert_exact_against_reference(kind, dtype, "native")


@pytest.mark.parametrize("kind", ["8:4x4", "4:4x4", LIBRARY], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m_rows", [1, 3, 6, 8, 15, 64])
def test_native_block_gemm_random_values_and_threads(kind, dtype, m_rows, isa, threads):
    # 84 block rows: groups of 8 and a ragged one; M: tiles of 8, 4, 2 and 1 rows of x
    g = torch.Generator().manual_seed(m_rows)
    w = torch.randn(336, 512, generator=g).to(dtype)
    x = torch.randn(m_rows, 512, generator=g).to(dtype)
    bias = torch.randn(336, generator=g).to(dtype)
    sw = nxm.compress(w, kind, "block")
    assert_matmul_close(nxm.sparse_mm(x, sw, bias, backend="native"), x, nxm.decompress(sw), bias)
    assert nxm.dispatch.select("sparse_mm", None, dict(x=x, sw=sw, bias=bias)).name == "native"  # auto on CPU


def test_native_block_gemm_skips_corrupt_mask_numbers_and_refuses_bad_shapes(isa):
    sw = nxm.compress(torch.randn(8, 16), LIBRARY, "block")
    masks = library_bitmaps(sw.pattern, sw.values.device)
    numbers = sw.metadata.clone()
    numbers[0, 0] = 200  # outside the library: the block contributes nothing instead of a wild read
    x = torch.randn(2, 16)
    y = torch.ops.nxm.sparse_mm_block(x, sw.values, numbers, masks, None, 4, 4, 8)
    dense = nxm.decompress(sw)
    dense[:4, :4] = 0
    assert_matmul_close(y, x, dense)
    with pytest.raises(RuntimeError, match=r"mask numbers must be uint8 or int16 \[2, 4\]"):
        torch.ops.nxm.sparse_mm_block(x, sw.values, numbers[:, :3], masks, None, 4, 4, 8)


def test_native_block_gemm_reads_int16_mask_numbers(isa):
    assert_reads_int16_mask_numbers("native")


def assert_reads_int16_mask_numbers(backend):
    """A library of more than 256 masks stores int16 mask numbers; ``backend`` reads them exactly."""
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([torch.randperm(16, generator=g).view(4, 4) < 8 for _ in range(300)]).unique(dim=0)
    library = nxm.Pattern.library(masks)
    w, x, bias = exact_operands(library, (4, 6), 5, torch.float16, seed=1)
    sw = nxm.compress(w, library, "block")
    assert sw.metadata.dtype == torch.int16 and int(sw.metadata.max()) >= 256
    assert torch.equal(nxm.sparse_mm(x, sw, bias, backend=backend), nxm.sparse_mm(x, sw, bias, backend="reference"))
