"""The Triton kernels under TRITON_INTERPRET=1 (conftest sets it) on CPU tensors, against the
reference: bit for bit for selection, compression and decompression; the GEMM within the
tolerance ``assert_matmul_close`` derives from the dtype."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import dispatch, reference
from nxm_kernels.layouts import cutlass
from nxm_kernels.pattern import Pattern

from conftest import CUTLASS_CASES, PATTERNS, VALUE_DTYPES, assert_matmul_close, random_weight

triton_backend = pytest.importorskip("nxm_kernels.backends.triton").BACKEND
pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason() is not None, reason=str(triton_backend.unavailable_reason())
)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def tied_weight(shape, dtype, seed):
    """Few distinct magnitudes (many ties), zeros and both signs."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-3, 4, shape, generator=g, dtype=torch.int8)
    return torch.randint(-3, 4, shape, generator=g).to(dtype) * 0.5


# ---------------------------------------------------------------- selection and compression


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_packed_matches_reference(dtype, pattern):
    p = Pattern.parse(pattern)
    for w in (tied_weight((6, 40 * p.m), dtype, 0), random_weight((6, 40 * p.m), dtype, torch.Generator().manual_seed(1))):
        assert torch.equal(nxm.nm_mask(w, p, backend="triton"), reference.nm_mask(w, p))
        projected = reference.project(w, p)
        assert same_bits(nxm.project(w, p, backend="triton"), projected)
        sw = nxm.compress(w, p, backend="triton")
        values, metadata = reference.compress(w, p, "packed")
        assert same_bits(sw.values, values) and torch.equal(sw.metadata, metadata)
        assert same_bits(nxm.decompress(sw, backend="triton"), projected)


@pytest.mark.parametrize("dtype,pattern", CUTLASS_CASES)
@pytest.mark.parametrize("zeros", [0.0, 0.6, "-0.0"])
def test_cutlass_matches_reference(dtype, pattern, zeros):
    p = Pattern.parse(pattern)
    w = random_weight((64, 64), dtype, torch.Generator().manual_seed(2), 0.6 if zeros else 0.0)
    if zeros == "-0.0" and dtype.is_floating_point:
        w[w == 0] = -0.0  # fill-in slots must hold project(w)'s +0
    sw = nxm.compress(w, p, layout="cutlass", backend="triton")
    values, metadata = reference.compress(w, p, "cutlass")
    assert same_bits(sw.values, values) and torch.equal(sw.metadata, metadata)
    dense = nxm.decompress(sw, backend="triton")
    assert same_bits(dense, cutlass.decompress(values, metadata, w.shape))
    assert torch.equal(dense, reference.project(w, p))  # a kept -0 the layout cannot name reads +0


def test_float64_selection():
    w = tied_weight((4, 64), torch.float64, 3)
    assert torch.equal(nxm.nm_mask(w, "2:8", backend="triton"), reference.nm_mask(w, Pattern(2, 8)))
    assert same_bits(nxm.project(w, "2:8", backend="triton"), reference.project(w, Pattern(2, 8)))


@pytest.mark.parametrize("score_dtype", [torch.float16, torch.float32, torch.float64])
def test_scores_select(score_dtype):
    p = Pattern(2, 4)
    w = random_weight((32, 64), torch.float16, torch.Generator().manual_seed(4))
    scores = tied_weight((32, 64), torch.float32, 5).abs().to(score_dtype)
    assert torch.equal(nxm.nm_mask(w, p, scores, backend="triton"), reference.nm_mask(w, p, scores))
    for layout in ("packed", "cutlass"):
        sw = nxm.compress(w, p, layout=layout, scores=scores, backend="triton")
        values, metadata = reference.compress(w, p, layout, scores)
        assert same_bits(sw.values, values) and torch.equal(sw.metadata, metadata)


def test_hand_computed_2_4():
    # |w| ties go to the lower index: group 0 keeps 0 and 1 of (2, -2, 2, 1); group 1 keeps 1 and 3.
    w = torch.tensor([[2.0, -2.0, 2.0, 1.0, 0.5, -4.0, 0.0, 3.0]], dtype=torch.float16)
    sw = nxm.compress(w, "2:4", backend="triton")
    assert sw.values.tolist() == [[2.0, -2.0, -4.0, 3.0]]
    # indices 0, 1, 1, 3 at 2 bits each, LSB first: 0b01_00 | 0b11_01 << 4
    assert sw.metadata.tolist() == [[0b0100 | 0b1101 << 4]]
    assert nxm.decompress(sw, backend="triton").tolist() == [[2.0, -2.0, 0, 0, 0, -4.0, 0, 3.0]]


@settings(max_examples=15)
@given(
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(VALUE_DTYPES),
    rows=st.integers(1, 5),
    groups=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(pattern, dtype, rows, groups, seed):
    p = Pattern.parse(pattern)
    w = tied_weight((rows, groups * p.m), dtype, seed)
    sw = nxm.compress(w, p, backend="triton")
    nxm.NMSparseWeight(sw.values, sw.metadata, sw.shape, p, "packed")  # valid metadata
    assert torch.equal(sw.metadata, reference.compress(w, p, "packed")[1])
    assert same_bits(nxm.decompress(sw, backend="triton"), reference.project(w, p))


# ---------------------------------------------------------------- sparse GEMM


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pattern", ["2:4", "1:2", "4:8", "2:3", "8:16"])
@pytest.mark.parametrize("m_rows,out_features,bias", [(1, 37, True), (33, 20, False)])
def test_sparse_mm(dtype, pattern, m_rows, out_features, bias):
    p = Pattern.parse(pattern)
    gen = torch.Generator().manual_seed(6)
    in_features = 13 * p.m  # not a multiple of the K tile: masked edges
    w = random_weight((out_features, in_features), dtype, gen)
    x = random_weight((m_rows, in_features), dtype, gen)
    b = random_weight((out_features,), dtype, gen) if bias else None
    sw = nxm.compress(w, p, backend="triton")
    y = nxm.sparse_mm(x, sw, b, backend="triton")
    assert_matmul_close(y, x, reference.project(w, p), b)


def test_sparse_mm_batched_strided_input():
    p = Pattern(2, 4)
    gen = torch.Generator().manual_seed(7)
    w = random_weight((24, 64), torch.float16, gen)
    x = random_weight((2, 3, 128), torch.float16, gen)[..., ::2]  # [2, 3, 64], stride 2 in K
    bias = random_weight((48,), torch.float16, gen)[::2]
    sw = nxm.compress(w, p, backend="triton")
    y = nxm.sparse_mm(x, sw, bias, backend="triton")
    assert y.shape == (2, 3, 24)
    assert_matmul_close(y.reshape(6, 24), x.reshape(6, 64), reference.project(w, p), bias)


def test_sparse_mm_catches_a_misplaced_value():
    """The GEMM must read the metadata: a weight whose indices are shifted gives another result."""
    p = Pattern(2, 4)
    w = random_weight((16, 32), torch.float16, torch.Generator().manual_seed(8))
    x = random_weight((4, 32), torch.float16, torch.Generator().manual_seed(9))
    sw = nxm.compress(w, p, backend="triton")
    y = nxm.sparse_mm(x, sw, backend="triton")
    shifted = nxm.compress(torch.roll(reference.project(w, p), 1, dims=1), p, backend="triton")
    assert not torch.allclose(nxm.sparse_mm(x, shifted, backend="triton"), y)


# ---------------------------------------------------------------- what the backend refuses


def test_refuses_cutlass_and_int8_gemm():
    w = random_weight((32, 32), torch.float16, torch.Generator().manual_seed(10))
    sw = nxm.compress(w, "2:4", layout="cutlass", backend="reference")
    with pytest.raises(dispatch.BackendNotSupported, match="compress with layout='packed'"):
        nxm.sparse_mm(torch.zeros(2, 32, dtype=torch.float16), sw, backend="triton")
    sw8 = nxm.compress(random_weight((32, 32), torch.int8), "2:4", backend="reference")
    with pytest.raises(dispatch.BackendNotSupported, match="int8 x int8"):
        nxm.sparse_mm(torch.zeros(2, 32, dtype=torch.int8), sw8, backend="triton")


def test_auto_dispatch_leaves_cpu_tensors_to_others():
    w = torch.randn(4, 8)
    chosen = dispatch.select("nm_mask", None, dict(w=w, pattern=Pattern(2, 4), scores=None))
    assert chosen.name != "triton"


def test_cpu_outside_interpreter_is_a_clear_error():
    code = (
        "import torch, nxm_kernels as nxm\n"
        "from nxm_kernels.dispatch import BackendNotSupported\n"
        "try:\n"
        "    nxm.compress(torch.randn(4, 8), '2:4', backend='triton')\n"
        "except BackendNotSupported as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in out.stdout, out.stdout


# ---------------------------------------------------------------- custom ops


def test_opcheck_custom_ops():
    """The same cases as the C++ ops (tests/test_ops.py checks every op of both namespaces)."""
    gen = torch.Generator().manual_seed(11)
    w = random_weight((32, 32), torch.float16, gen)
    x = random_weight((3, 32), torch.float16, gen)
    bias = random_weight((32,), torch.float16, gen)
    ops = torch.ops.nxm_triton
    values, metadata = ops.compress_packed(w, 2, 4, None)
    cvalues, cmetadata = ops.compress_cutlass(w, None)
    cases = [
        (ops.nm_mask, (w, 2, 4, None)),
        (ops.project, (w, 2, 4, None)),
        (ops.compress_packed, (w, 2, 4, None)),
        (ops.compress_cutlass, (w, None)),
        (ops.decompress_packed, (values, metadata, 32, 2, 4)),
        (ops.decompress_cutlass, (cvalues, cmetadata)),
        (ops.sparse_mm_packed, (x, values, metadata, bias, 2, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_sparse_mm_op_traces_under_torch_compile():
    """The fake kernel lets dynamo and AOT autograd trace the op whole (dynamic M)."""
    gen = torch.Generator().manual_seed(12)
    w = random_weight((32, 64), torch.float16, gen)
    sw = nxm.compress(w, "2:4", backend="triton")
    compiled = torch.compile(
        lambda x: torch.ops.nxm_triton.sparse_mm_packed(x, sw.values, sw.metadata, None, 2, 4),
        backend="aot_eager", fullgraph=True, dynamic=True,
    )
    for m_rows in (3, 5):
        x = random_weight((m_rows, 64), torch.float16, gen)
        assert_matmul_close(compiled(x), x, reference.project(w, Pattern(2, 4)))
