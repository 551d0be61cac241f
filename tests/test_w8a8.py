"""W8A8 on CPU (csrc/cpu_gemm_w8a8*.cpp): x quantized per token, integer dot products, both scales.
Bit for bit the reference (reference.sparse_mm_int) for every kernel this CPU runs (AVX-512 VNNI,
portable), int8 and int4 codes, per-row and per-group scales, M from 1 to 300, tails of K and of
the output rows, zero tokens, all-zero weight groups, strided and batched x, 1 or 2 threads."""

import contextlib
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import _extension, dispatch, reference

pytestmark = pytest.mark.skipif(
    _extension.unavailable_reason() is not None, reason=f"no usable _C: {_extension.unavailable_reason()}"
)

ISAS = ("auto", "portable")  # auto: the AVX-512 kernel where the CPU has VNNI and VBMI (2:4, group_size 0 or k*64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def cpu_isa(name):
    before = os.environ.get("NXM_CPU_ISA")
    os.environ["NXM_CPU_ISA"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["NXM_CPU_ISA"]
        else:
            os.environ["NXM_CPU_ISA"] = before


@contextlib.contextmanager
def threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_w8a8(x, sw, bias=None):
    e = sw.encoding
    return torch.ops.nxm.sparse_mm_packed_w8a8(x, sw.values, sw.metadata, sw.scales, bias, sw.pattern.n,
                                               sw.pattern.m, e.bits, e.group_size or 0)


def assert_same_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    assert same.all(), f"{int((~same).sum())} of {same.numel()} outputs differ from the reference"


def test_hand_computed():
    """Scales that are powers of two, so every code and product is exact by hand: x's scale is
    254 / 127 = 2, w's 127 / 127 = 1 (row 0) and 63.5 / 127 = 0.5 (row 1). x / 2 = 0.5 and -0.5
    round to 0 and 1.5 to 2 (half to even)."""
    w = torch.tensor([[127.0, 0, -5, 0, 0, 2, 0, -1],
                      [0, 0, 31.5, 63.5, -63.5, 0, 0, 1]])
    x = torch.tensor([[254.0, 0, 2, -4, 1, 0, 0, 8],
                      [3, -1, 0, 0, 0, 0, 0, 254]])
    xq, sx = reference.quantize_activations(x)
    assert xq.tolist() == [[127, 0, 1, -2, 0, 0, 0, 4], [2, 0, 0, 0, 0, 0, 0, 127]] and sx.flatten().tolist() == [2, 2]
    sw = nxm.compress(w, "2:4", bits=8)
    assert sw.scales.flatten().tolist() == [1.0, 0.5]
    # row 0 codes [127, 0, -5, 0, 0, 2, 0, -1], row 1 [0, 0, 63, 127, -127, 0, 0, 2]:
    # x0: 127*127 - 5*1 - 1*4 = 16120 -> *1*2; 63*1 + 127*-2 + 2*4 = -183 -> *0.5*2
    # x1: 127*2 - 1*127 = 127 -> *1*2; 2*127 = 254 -> *0.5*2
    want = torch.tensor([[32240.0, -183.0], [254.0, 254.0]])
    for isa in ISAS:
        with cpu_isa(isa):
            assert torch.equal(nxm.sparse_mm(x, sw, act_bits=8, backend="native"), want)
    assert torch.equal(nxm.sparse_mm(x, sw, act_bits=8, backend="reference"), want)


def _case(rows, out_features, cols, bits, group_size, dtype, seed, zero_tokens, zero_groups, bias):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, cols, generator=gen) * torch.rand(out_features, 1, generator=gen) * 4
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 8
    if zero_tokens:
        x[torch.rand(rows, generator=gen) < 0.2] = 0
    if zero_groups:  # all-zero scale groups (and, without groups, all-zero rows): scale 0, no NaN
        g = group_size or cols
        for n in range(out_features):
            if torch.rand((), generator=gen) < 0.3:
                start = int(torch.randint(0, -(-cols // g), (), generator=gen)) * g
                w[n, start:start + g] = 0
    sw = nxm.compress(w.to(dtype), "2:4", bits=bits, group_size=group_size)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return x.to(dtype), sw, b


@given(
    rows=st.integers(1, 300), out_features=st.integers(1, 40), groups_of_4=st.integers(1, 130),
    bits=st.sampled_from([8, 4]), group_size=st.sampled_from([None, 4, 8, 32, 64, 128, 192, 256]),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), zero_tokens=st.booleans(),
    zero_groups=st.booleans(), bias=st.booleans(), isa=st.sampled_from(ISAS), thread_count=st.sampled_from([1, 2]),
)
def test_equals_the_reference_bit_for_bit(rows, out_features, groups_of_4, bits, group_size, dtype, seed, zero_tokens,
                                          zero_groups, bias, isa, thread_count):
    x, sw, b = _case(rows, out_features, 4 * groups_of_4, bits, group_size, dtype, seed, zero_tokens, zero_groups, bias)
    with cpu_isa(isa), threads(thread_count):
        y = nxm.sparse_mm(x, sw, b, act_bits=8, backend="native")
    assert_same_bits(y, reference.sparse_mm(x, sw, b, 8))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 64), (4, 128), (4, 32)])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_threads_give_the_same_bits(isa, bits, group_size, rows):
    """Threads split the output rows (and the tokens to quantize), never a dot product."""
    x, sw, b = _case(rows, 264, 384, bits, group_size, torch.bfloat16, rows, True, True, True)
    with cpu_isa(isa):
        with threads(2):
            y = native_w8a8(x, sw, b)
        with threads(1):
            assert torch.equal(y, native_w8a8(x, sw, b))
    assert_same_bits(y, reference.sparse_mm(x, sw, b, 8))


@pytest.mark.parametrize("isa", ISAS)
def test_large_sums_round_to_fp32_like_the_reference(isa):
    """Dot products far above 2**24 (all codes +-127): their rounding to fp32 is the reference's."""
    cols = 8192
    w = torch.ones(16, cols)
    w[:, 1::4] = 0.5  # 2:4 keeps columns 0 and 1 of every group: codes 127 and 64
    w[1::2] *= -1
    x = torch.full((5, cols), 3.0)
    x[2, ::3] = -2.9
    for group_size in (None, 128, 4096):
        sw = nxm.compress(w, "2:4", bits=8, group_size=group_size)
        with cpu_isa(isa):
            y = nxm.sparse_mm(x, sw, act_bits=8, backend="native")
        xq, _ = reference.quantize_activations(x)
        codes = reference.decompress(sw.encoding.codes_weight(sw))
        assert (xq.double() @ codes.double().T).abs().max() > 2**24  # with no groups: one integer sum per output
        assert_same_bits(y, reference.sparse_mm(x, sw, None, 8))


@pytest.mark.parametrize("pattern", ["1:4", "2:8", "4:8", "1:2"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_other_patterns_run_the_portable_kernel_exactly(pattern, bits, group_size):
    x, _, b = _case(9, 12, 96, bits, None, torch.float32, 0, True, False, True)
    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(1))
    sw = nxm.compress(w, pattern, bits=bits, group_size=group_size)
    assert_same_bits(nxm.sparse_mm(x, sw, b, act_bits=8, backend="native"), reference.sparse_mm(x, sw, b, 8))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_batched_x(isa, dtype):
    gen = torch.Generator().manual_seed(3)
    sw = nxm.compress(torch.randn(40, 160, generator=gen).to(dtype), "2:4", bits=8, group_size=32)
    bias = torch.randn(40, generator=gen).to(dtype)
    batched = torch.randn(3, 5, 160, generator=gen).to(dtype)
    with cpu_isa(isa):
        y = nxm.sparse_mm(batched, sw, bias, act_bits=8, backend="native")
        assert y.shape == (3, 5, 40)
        assert_same_bits(y.reshape(15, 40), reference.sparse_mm(batched.reshape(15, 160), sw, bias, 8))
        columns_strided = torch.randn(320, 6, generator=gen).to(dtype)[::2].t()  # [6, 160], strides (1, 12)
        every_other_row = torch.randn(12, 160, generator=gen).to(dtype)[::2]  # row stride 320
        for x in (columns_strided, every_other_row):
            assert not x.is_contiguous()
            assert_same_bits(nxm.sparse_mm(x, sw, None, act_bits=8, backend="native"),
                             reference.sparse_mm(x.contiguous(), sw, None, 8))


def test_auto_dispatch_picks_the_native_kernel_on_cpu():
    sw = nxm.compress(torch.randn(16, 64), "2:4", bits=4, group_size=64)
    x = torch.randn(3, 64)
    assert dispatch.select("sparse_mm", None, {"x": x, "sw": sw, "bias": None, "act_bits": 8}).name == "native"
    assert torch.equal(nxm.sparse_mm(x, sw, act_bits=8), reference.sparse_mm(x, sw, None, 8))


def test_empty_and_opcheck():
    sw = nxm.compress(torch.randn(8, 64), "2:4", bits=8, group_size=32)
    assert native_w8a8(torch.randn(0, 64), sw).shape == (0, 8)
    x, bias = torch.randn(3, 64), torch.randn(8)
    torch.library.opcheck(torch.ops.nxm.sparse_mm_packed_w8a8.default,
                          (x, sw.values, sw.metadata, sw.scales, bias, 2, 4, 8, 32))
    x16 = x.to(torch.bfloat16)
    torch.library.opcheck(torch.ops.nxm.sparse_mm_packed_w8a8.default,
                          (x16, sw.values, sw.metadata, sw.scales, None, 2, 4, 8, 32))


def test_errors_name_the_problem():
    sw = nxm.compress(torch.randn(8, 64), "2:4", bits=8, group_size=32)
    x = torch.randn(3, 64)
    op = torch.ops.nxm.sparse_mm_packed_w8a8
    with pytest.raises(RuntimeError, match=r"scales must be float32 \[8, 2\]"):
        op(x, sw.values, sw.metadata, sw.scales[:, :1], None, 2, 4, 8, 32)
    with pytest.raises(RuntimeError, match="group_size must be 0 .* or a positive multiple of m=4, got 6"):
        op(x, sw.values, sw.metadata, sw.scales, None, 2, 4, 8, 6)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        op(x.double(), sw.values, sw.metadata, sw.scales, None, 2, 4, 8, 32)
    with pytest.raises(RuntimeError, match=r"values must be Byte \[8, 16\]"):
        op(x, sw.values, sw.metadata, sw.scales, None, 2, 4, 4, 32)
    with cpu_isa("sse9"), pytest.raises(RuntimeError, match="unknown NXM_CPU_ISA=sse9"):
        op(x, sw.values, sw.metadata, sw.scales, None, 2, 4, 8, 32)


def test_the_amx_level_runs_the_avx512_kernel():
    """NXM_CPU_ISA=amx, the float GEMM's top level, is accepted here too: int8 has no AMX kernel,
    so it runs the AVX-512 one (bit for bit the same as auto)."""
    sw = nxm.compress(torch.randn(16, 128), "2:4", bits=8)
    x = torch.randn(5, 128)
    with cpu_isa("auto"):
        auto = native_w8a8(x, sw)
    with cpu_isa("amx"):
        assert torch.equal(native_w8a8(x, sw), auto)
