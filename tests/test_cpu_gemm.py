"""The native CPU sparse GEMM (csrc/cpu_gemm*.cpp) against the reference: every kernel this CPU runs
(AMX, AVX-512, AVX2, portable, forced through NXM_CPU_ISA), patterns, dtypes, M from 1 to 300, tails
of K and of the output rows, strided and batched x, bias, and 1 or 2 threads."""

from pathlib import Path

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import _extension, dispatch, reference

from conftest import assert_matmul_close

pytestmark = pytest.mark.skipif(
    _extension.unavailable_reason() is not None, reason=f"no usable _C: {_extension.unavailable_reason()}"
)

ISAS = ("amx", "avx512", "avx2", "portable")  # best first
GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def isas_here():
    best = torch.ops.nxm.cpu_isa()
    return ISAS[ISAS.index(best):]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param not in isas_here():
        pytest.skip(f"this CPU runs up to {torch.ops.nxm.cpu_isa()}, not {request.param}")
    monkeypatch.setenv("NXM_CPU_ISA", request.param)
    return request.param


def native_mm(x, sw, bias=None):
    return torch.ops.nxm.sparse_mm_packed(x, sw.values, sw.metadata, bias, sw.pattern.n, sw.pattern.m)


def check(actual, x, sw, bias):
    """Within the conftest tolerance of the exact product, and, element by element, within what two
    fp32 sums of the same terms in different orders may differ (the reference's and the kernel's:
    kept terms x eps32 x sum|x w|, the bound of recursive summation) plus one unit in the last
    place of the output dtype. A dropped or misplaced term is far outside at these sizes."""
    dense = reference.decompress(sw)
    assert_matmul_close(actual, x, dense, bias)
    expected = reference.sparse_mm(x, sw, bias).double()
    terms = x.shape[-1] // sw.pattern.m * sw.pattern.n + (bias is not None)
    magnitude = x.double().abs() @ dense.double().abs().T + (0 if bias is None else bias.double().abs())
    allowed = torch.finfo(x.dtype).eps * expected.abs() + 2 * terms * torch.finfo(torch.float32).eps * magnitude
    excess = (actual.double() - expected).abs() - allowed
    assert excess.max() <= 0, f"{int((excess > 0).sum())} elements differ from the reference by more than allowed"


# K: whole 32-column steps, and tails of 1, 5 and 7 groups (16-column steps for AVX2: 1, 1, 3);
# out_features: whole 4-row blocks and a remainder of 1 or 3.
@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(36, 128), (37, 100), (35, 116), (8, 124)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_2of4_every_kernel(isa, dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    sw = nxm.compress(torch.randn(shape, generator=gen).to(dtype), "2:4", layout="packed")
    for rows in (1, 2, 3, 4, 5, 8, 9):  # every x-row tile and remainder of the kernels
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        bias = torch.randn(shape[0], generator=gen).to(dtype) if rows % 2 else None
        check(native_mm(x, sw, bias), x, sw, bias)


# bf16 2:4 at every M from 1 to 9 and beyond, below and above the AMX kernel's M = 5 (its token
# tiles of 16 and their remainders, pairs of token tiles and a lone one, 32-row weight blocks and a
# remainder of 1 to 31 rows); K whole and with tails of 1, 6, 7 and 9 groups, metadata rows whose
# 64-byte chunks end mid-row.
@pytest.mark.parametrize("shape", [(64, 128), (37, 100), (50, 2076), (1, 36), (95, 600)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_2of4_bf16_every_m(isa, threads, shape):
    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    sw = nxm.compress(torch.randn(shape, generator=gen).to(torch.bfloat16), "2:4", layout="packed")
    bias = torch.randn(shape[0], generator=gen).to(torch.bfloat16)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 32, 33, 48, 64, 100, 300):
        x = torch.randn(rows, shape[1], generator=gen).to(torch.bfloat16)
        check(native_mm(x, sw, bias if rows % 2 else None), x, sw, bias if rows % 2 else None)


# int4 2:4 codes with bf16 x on every kernel: per-row and grouped scales whose groups end inside a
# step or at K's tail, M from 1 to 64.
@pytest.mark.parametrize("group_size", [None, 64, 128, 32])
@pytest.mark.parametrize("shape", [(36, 200), (9, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_2of4_int4_bf16(isa, threads, shape, group_size):
    gen = torch.Generator().manual_seed(shape[1] + (group_size or 0))
    sw = nxm.compress(torch.randn(shape, generator=gen).to(torch.bfloat16), "2:4", bits=4, group_size=group_size)
    bias = torch.randn(shape[0], generator=gen).to(torch.bfloat16)
    for rows in (1, 2, 3, 4, 5, 8, 9, 64):
        x = torch.randn(rows, shape[1], generator=gen).to(torch.bfloat16)
        b = bias if rows % 2 else None
        y = torch.ops.nxm.sparse_mm_packed_q(x, sw.values, sw.metadata, sw.scales, b, 2, 4, 4, group_size or 0)
        # Against the dequantized weight: fp32 sums of code * x, scaled per group (or row), in
        # another order than the reference's, then one rounding to bf16.
        w = reference.decompress(sw, torch.float64)
        want = x.double() @ w.T + (0 if b is None else b.double())
        magnitude = x.double().abs() @ w.abs().T + (0 if b is None else b.double().abs())
        allowed = 2 * shape[1] * 2.0**-23 * magnitude + want.abs() * torch.finfo(torch.bfloat16).eps
        assert ((y.double() - want).abs() <= allowed).all()


@pytest.mark.parametrize("pattern", ["1:2", "1:4", "2:8", "4:8", "3:8", "1:16"])
@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
def test_other_patterns(isa, pattern, dtype):
    gen = torch.Generator().manual_seed(7)
    sw = nxm.compress(torch.randn(19, 96, generator=gen).to(dtype), pattern, layout="packed")
    for rows in (1, 6):
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        bias = torch.randn(19, generator=gen).to(dtype)
        check(native_mm(x, sw, bias), x, sw, bias)


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
def test_threads_give_the_same_bits(threads, rows, dtype):
    """Threads split the output rows, never a dot product: any thread count gives the same bits."""
    gen = torch.Generator().manual_seed(rows)
    sw = nxm.compress(torch.randn(264, 384, generator=gen).to(dtype), "2:4", layout="packed")
    x = torch.randn(rows, 384, generator=gen).to(dtype)
    bias = torch.randn(264, generator=gen).to(dtype)
    y = native_mm(x, sw, bias)
    check(y, x, sw, bias)
    torch.set_num_threads(1)
    assert torch.equal(y, native_mm(x, sw, bias))


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
def test_strided_and_batched_x_through_sparse_mm(isa, dtype):
    gen = torch.Generator().manual_seed(3)
    sw = nxm.compress(torch.randn(40, 160, generator=gen).to(dtype), "2:4", layout="packed")
    bias = torch.randn(40, generator=gen).to(dtype)
    batched = torch.randn(3, 5, 160, generator=gen).to(dtype)
    y = nxm.sparse_mm(batched, sw, bias, backend="native")
    assert y.shape == (3, 5, 40)
    check(y.reshape(15, 40), batched.reshape(15, 160), sw, bias)
    columns_strided = torch.randn(320, 20, generator=gen).to(dtype)[::2].t()  # [20, 160], strides (1, 40)
    every_other_row = torch.randn(6, 160, generator=gen).to(dtype)[::2]  # 3 rows, row stride 320
    for x in (columns_strided, every_other_row):
        assert not x.is_contiguous()
        check(nxm.sparse_mm(x, sw, None, backend="native"), x.contiguous(), sw, None)


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
def test_no_in_features_gives_the_bias(isa, dtype):
    values, metadata = torch.empty(40, 0, dtype=dtype), torch.empty(40, 0, dtype=torch.uint8)
    bias = torch.randn(40).to(dtype)
    for rows in (1, 6, 20):
        x = torch.empty(rows, 0, dtype=dtype)
        assert torch.equal(torch.ops.nxm.sparse_mm_packed(x, values, metadata, bias, 2, 4), bias.expand(rows, 40))
        assert torch.equal(torch.ops.nxm.sparse_mm_packed(x, values, metadata, None, 2, 4), torch.zeros(rows, 40, dtype=dtype))


def test_empty_x_and_opcheck():
    sw = nxm.compress(torch.randn(8, 64), "2:4", layout="packed")
    assert native_mm(torch.randn(0, 64), sw).shape == (0, 8)
    x, bias = torch.randn(3, 64), torch.randn(8)
    torch.library.opcheck(torch.ops.nxm.sparse_mm_packed.default, (x, sw.values, sw.metadata, bias, 2, 4))


def test_errors_name_the_problem(monkeypatch):
    sw = nxm.compress(torch.randn(8, 64), "2:4", layout="packed")
    with pytest.raises(RuntimeError, match="x is BFloat16 but the weight is Float: cast one to match"):
        native_mm(torch.randn(2, 64, dtype=torch.bfloat16), sw)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        sw8 = nxm.compress(torch.randint(-9, 9, (8, 64), dtype=torch.int8), "2:4", layout="packed")
        native_mm(torch.randint(-9, 9, (2, 64), dtype=torch.int8), sw8)
    monkeypatch.setenv("NXM_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="unknown NXM_CPU_ISA=sse9: choose auto, amx, avx512, avx2 or portable"):
        native_mm(torch.randn(2, 64), sw)


def test_cpu_isa_follows_the_cpu_flags():
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    # Linux lists amx_* only where it enables the tile state, which the kernel then requests.
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "amx_tile", "amx_bf16"} <= flags:
        expected = "amx"
    elif {"avx512f", "avx512bw", "avx512vl"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        expected = "avx2"
    else:
        expected = "portable"
    assert torch.ops.nxm.cpu_isa() == expected


def test_auto_dispatch_runs_the_native_gemm_on_cpu():
    sw = nxm.compress(torch.randn(8, 64, dtype=torch.bfloat16), "2:4", layout="packed")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert dispatch.select("sparse_mm", None, {"x": x, "sw": sw, "bias": None}).name == "native"
    int8 = nxm.compress(torch.randint(-9, 9, (8, 64), dtype=torch.int8), "2:4", layout="packed")
    x8 = torch.randint(-9, 9, (2, 64), dtype=torch.int8)
    assert dispatch.select("sparse_mm", None, {"x": x8, "sw": int8, "bias": None}).name != "native"


def test_nxm_backends_names_the_isa(capsys, monkeypatch):
    from nxm_kernels import cli

    monkeypatch.delenv("NXM_CPU_ISA", raising=False)
    assert cli.main(["backends"]) == 0
    assert f"native CPU GEMM: {torch.ops.nxm.cpu_isa()} kernels on this CPU" in capsys.readouterr().out
