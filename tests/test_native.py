"""The native backend (nxm_kernels._C): C++ CPU ops bit for bit against the reference, over the
shapes, patterns and dtypes of test_reference.py; opcheck on every op; error paths; CUDA kernels
against the CPU ops on a GPU."""

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import nxm_kernels as nxm
from conftest import CUTLASS_CASES, PATTERNS, VALUE_DTYPES, random_weight
from nxm_kernels import _extension, dispatch, reference
from nxm_kernels.layouts.cutlass import multiples as cutlass_multiples
from test_reference import HAND_CASES

NATIVE = {"backend": "native"}
REF = {"backend": "reference"}
SELECT_DTYPES = VALUE_DTYPES + (torch.float64,)

needs_native = pytest.mark.skipif(
    _extension.unavailable_reason() is not None, reason=f"no usable _C: {_extension.unavailable_reason()}"
)
pytestmark = needs_native

# (tests/test_build.py fails when _C is missing; here every test needs it.)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != +0.0 and NaN payloads count)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        reference.as_bits(a.contiguous()), reference.as_bits(b.contiguous())
    )


def assert_all_ops_match(w, pattern, scores=None, layouts=("packed",)):
    """Every native op against the reference, bit for bit."""
    for op in ("nm_mask", "project"):
        got, want = getattr(nxm, op)(w, pattern, scores, **NATIVE), getattr(nxm, op)(w, pattern, scores, **REF)
        assert same_bits(got, want), op
    for layout in layouts:
        got = nxm.compress(w, pattern, layout=layout, scores=scores, **NATIVE)
        want = nxm.compress(w, pattern, layout=layout, scores=scores, **REF)
        assert same_bits(got.values, want.values) and same_bits(got.metadata, want.metadata), layout
        assert same_bits(nxm.decompress(want, **NATIVE), nxm.decompress(want, **REF)), layout


# ------------------------------------------------------------------ hand-computed and edge cases


@pytest.mark.parametrize("pattern, weight, kept, meta", HAND_CASES)
def test_hand_computed(pattern, weight, kept, meta):
    w = torch.tensor(weight, dtype=torch.float32)
    assert nxm.nm_mask(w, pattern, **NATIVE).tolist() == [[bool(k) for k in row] for row in kept]
    sw = nxm.compress(w, pattern, layout="packed", **NATIVE)
    assert sw.metadata.tolist() == meta
    assert torch.equal(nxm.decompress(sw, **NATIVE), w * nxm.nm_mask(w, pattern, **NATIVE))


def test_ties_scores_int8_and_positive_zero():
    w = torch.tensor([[2.0, -2.0, 2.0, 1.0, 0.0, -0.0, 0.0, 0.0]])
    assert nxm.nm_mask(w, "2:4", **NATIVE).tolist() == [[True, True, False, False, True, True, False, False]]
    scores = torch.tensor([[0.0, 1.0, 5.0, 1.0]], dtype=torch.float16)  # converted to float32 exactly
    assert nxm.nm_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "2:4", scores=scores, **NATIVE).tolist() == [
        [False, True, True, False]
    ]
    assert nxm.nm_mask(torch.tensor([[-128, 127, 1, 0]], dtype=torch.int8), "1:4", **NATIVE).tolist() == [
        [True, False, False, False]
    ]
    z = nxm.project(torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), "2:4", **NATIVE)
    assert torch.equal(z.signbit(), torch.tensor([[False, False, True, True]]))


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:4", "3:4", "2:5", "3:6"])
def test_many_ties(pattern):
    """Small integers: nearly every group has ties, which must go to the lower index."""
    m = int(pattern.split(":")[1])
    w = torch.randint(-3, 4, (200, m), generator=torch.Generator().manual_seed(0)).float()
    assert_all_ops_match(w, pattern)


def test_leading_dims_and_non_contiguous():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 5, 16, generator=g)
    for op in ("nm_mask", "project"):
        assert same_bits(getattr(nxm, op)(w, "2:4", **NATIVE), getattr(nxm, op)(w, "2:4", **REF))
    wt = torch.randn(32, 64, generator=g).half().T  # non-contiguous [64, 32]
    assert_all_ops_match(wt, "2:4", scores=torch.rand(32, 64, generator=g).T, layouts=("packed", "cutlass"))


def test_many_rows_run_in_parallel_chunks():
    """Enough rows that at::parallel_for splits them, every layout and a pattern with 3-bit indices."""
    g = torch.Generator().manual_seed(3)
    w = random_weight((512, 256), torch.float16, g, zero_fraction=0.2)
    assert_all_ops_match(w, "2:4", layouts=("packed", "cutlass"))
    assert_all_ops_match(w, "3:8")


def test_auto_dispatch_picks_native_on_cpu():
    w = torch.randn(32, 16, dtype=torch.float16)
    inputs = dict(w=w, pattern=nxm.Pattern(2, 4), layout="cutlass", scores=None)
    assert dispatch.select("compress", None, inputs).name == "native"


# ------------------------------------------------------------------ properties (as test_reference)

shapes = st.tuples(st.integers(1, 6), st.integers(1, 5))  # rows, groups


@given(shape=shapes, pattern=st.sampled_from(PATTERNS), dtype=st.sampled_from(SELECT_DTYPES),
       zeros=st.sampled_from([0.0, 0.5]), use_scores=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_matches_reference(shape, pattern, dtype, zeros, use_scores, seed):
    p = nxm.Pattern.parse(pattern)
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float64:
        w = torch.randn(shape[0], shape[1] * p.m, generator=g, dtype=torch.float64)
    else:
        w = random_weight((shape[0], shape[1] * p.m), dtype, g, zeros)
    scores = torch.randint(0, 3, w.shape, generator=g).to(torch.float64 if seed % 2 else torch.bfloat16) \
        if use_scores else None  # few distinct values: ties in the scores too
    assert_all_ops_match(w, p, scores, layouts=() if dtype == torch.float64 else ("packed",))


@given(rows=st.integers(1, 3), cols=st.integers(1, 4), dtype_pattern=st.sampled_from(CUTLASS_CASES),
       zeros=st.sampled_from([0.0, 0.3, 0.9]), use_scores=st.booleans(), seed=st.integers(0, 2**16))
def test_cutlass_matches_reference_and_torch(rows, cols, dtype_pattern, zeros, use_scores, seed):
    dtype, pattern = dtype_pattern
    row_mult, col_mult = cutlass_multiples(dtype)
    g = torch.Generator().manual_seed(seed)
    w = random_weight((rows * row_mult, cols * col_mult), dtype, g, zeros)
    if dtype.is_floating_point and seed % 2:
        w[w == 0] = -0.0  # fill-in slots must hold project(w)'s +0, kept zeros their own sign
    scores = torch.rand(w.shape, generator=g) if use_scores else None
    assert_all_ops_match(w, pattern, scores, layouts=("cutlass",))
    if scores is None:
        values, meta = sparse_semi_structured_from_dense_cutlass(nxm.project(w, pattern, **REF))
        sw = nxm.compress(w, pattern, layout="cutlass", **NATIVE)
        assert torch.equal(sw.values.view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(sw.metadata, meta)


# ------------------------------------------------------------------ custom-op registration


def op_cases():
    g = torch.Generator().manual_seed(4)
    w16 = torch.randn(32, 32, generator=g).half()
    w8 = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8)
    scores = torch.rand(32, 32, generator=g)
    v, meta = torch.ops.nxm.compress_packed(w16, 3, 8, None)
    cv, cmeta = torch.ops.nxm.compress_cutlass(w16, None)
    iv, imeta = torch.ops.nxm.compress_cutlass(w8, None)
    ops = torch.ops.nxm
    return [
        (ops.nm_mask, (w16, 2, 4, None)),
        (ops.nm_mask, (w16.reshape(2, 16, 32), 1, 4, scores.reshape(2, 16, 32))),
        (ops.project, (w16, 2, 4, scores)),
        (ops.compress_packed, (w16, 3, 8, None)),
        (ops.compress_packed, (w16, 2, 4, scores.double())),
        (ops.decompress_packed, (v, meta, 32, 3, 8)),
        (ops.compress_cutlass, (w16, None)),
        (ops.compress_cutlass, (w8, None)),
        (ops.decompress_cutlass, (cv, cmeta)),
        (ops.decompress_cutlass, (iv, imeta)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    op, args = op_cases()[case]
    torch.library.opcheck(op, args)


def test_compiled_graph_uses_the_ops():
    def convert(w):
        values, metadata = torch.ops.nxm.compress_cutlass(w, None)
        return torch.ops.nxm.decompress_cutlass(values, metadata)

    w = torch.randn(64, 32).half()
    compiled = torch.compile(convert, backend="aot_eager", fullgraph=True)
    assert same_bits(compiled(w), nxm.project(w, "2:4", **REF))


# ------------------------------------------------------------------ errors


def test_direct_op_calls_check_their_inputs():
    w = torch.randn(32, 32).half()
    with pytest.raises(RuntimeError, match="unsupported pattern 4:4"):
        torch.ops.nxm.nm_mask(w, 4, 4, None)
    with pytest.raises(RuntimeError, match="split into groups of 3"):
        torch.ops.nxm.project(w, 1, 3, None)
    with pytest.raises(RuntimeError, match="scores must be float32 or float64"):
        torch.ops.nxm.nm_mask(w, 2, 4, w)
    with pytest.raises(RuntimeError, match="rows divisible by 32"):
        torch.ops.nxm.compress_cutlass(w[:16], None)
    values, metadata = torch.ops.nxm.compress_packed(w, 2, 4, None)
    with pytest.raises(RuntimeError, match=r"metadata must be uint8 \[32, 4\]"):
        torch.ops.nxm.decompress_packed(values, metadata[:, :3], 32, 2, 4)
    cv, cmeta = torch.ops.nxm.compress_cutlass(w, None)
    with pytest.raises(RuntimeError, match="metadata must be Short"):
        torch.ops.nxm.decompress_cutlass(cv, cmeta.int())


def test_corrupt_packed_index_is_never_written_out_of_its_group():
    """An unchecked index >= m (2 bits hold 3 for m=3) is skipped, not written past the group."""
    values = torch.ones(1, 2)
    metadata = torch.tensor([[0b11_11]], dtype=torch.uint8)
    dense = torch.ops.nxm.decompress_packed(values, metadata, 6, 1, 3)
    assert torch.equal(dense, torch.zeros(1, 6))


def test_cusparselt_layout_is_not_native():
    why = dispatch.reasons(dispatch.get_backend("native"), "compress",
                           dict(w=torch.zeros(32, 32), pattern=nxm.Pattern(2, 4), layout="cusparselt", scores=None))
    assert why and "cuSPARSELt" in why[0]


@pytest.mark.skipif(not _extension.has_cuda_kernels(), reason="this _C was built without CUDA kernels")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
@pytest.mark.parametrize("case", range(10))
def test_cuda_op_without_gpu_raises_clearly(case):
    """The CUDA kernel itself (reached through the dispatcher's CUDA key) refuses before touching CUDA."""
    op, args = op_cases()[case]
    with pytest.raises(RuntimeError, match="need an NVIDIA GPU, but CUDA finds none"):
        op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def test_version_mismatch_is_reported():
    built = types.SimpleNamespace(torch_version="2.0.0+cu118", cuda_version="11.8", cuda_archs="8.0")
    why = _extension._version_mismatch(built)
    assert f"built for torch 2.0.0+cu118 / CUDA 11.8, you have torch {torch.__version__}" in why
    same = types.SimpleNamespace(torch_version=torch.__version__, cuda_version="", cuda_archs="")
    assert _extension._version_mismatch(same) is None


# ------------------------------------------------------------------ GPU: CUDA kernels vs CPU ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", SELECT_DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_selection_and_packed_match_cpu(dtype, pattern):
    p = nxm.Pattern.parse(pattern)
    g = torch.Generator().manual_seed(5)
    # Odd row counts and widths: partial row tiles, unaligned units, a partial last chunk.
    for rows, groups in ((1, 1), (7, 13), (300, 40)):
        if dtype == torch.float64:
            w = torch.randn(rows, groups * p.m, generator=g, dtype=dtype)
        else:
            w = random_weight((rows, groups * p.m), dtype, g, zero_fraction=0.3)
        for scores in (None, torch.rand(w.shape, generator=g)):
            cuda_scores = None if scores is None else scores.cuda()
            for op in ("nm_mask", "project"):
                got = getattr(nxm, op)(w.cuda(), p, cuda_scores, **NATIVE).cpu()
                assert same_bits(got, getattr(nxm, op)(w, p, scores, **NATIVE)), op
            if dtype != torch.float64:
                got = nxm.compress(w.cuda(), p, scores=cuda_scores, **NATIVE)
                want = nxm.compress(w, p, scores=scores, **NATIVE)
                assert same_bits(got.values.cpu(), want.values) and same_bits(got.metadata.cpu(), want.metadata)
                assert same_bits(nxm.decompress(got, **NATIVE).cpu(), nxm.decompress(want, **NATIVE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, pattern", CUTLASS_CASES)
def test_cuda_cutlass_matches_cpu(dtype, pattern):
    g = torch.Generator().manual_seed(6)
    for rows, cols in ((32, 64), (96, 4096), (4096, 128)):
        w = random_weight((rows, cols), dtype, g, zero_fraction=0.3)
        for scores in (None, torch.rand(w.shape, generator=g)):
            got = nxm.compress(w.cuda(), pattern, "cutlass", None if scores is None else scores.cuda(), **NATIVE)
            want = nxm.compress(w, pattern, "cutlass", scores, **NATIVE)
            assert same_bits(got.values.cpu(), want.values) and same_bits(got.metadata.cpu(), want.metadata)
            assert same_bits(nxm.decompress(got, **NATIVE).cpu(), nxm.decompress(want, **NATIVE))


def test_every_cpu_op_refuses_an_unknown_instruction_set(monkeypatch):
    """One NXM_CPU_ISA steers every CPU op (csrc/cpu_isa.h): a name none knows is refused by each,
    naming the op, rather than silently running some kernel."""
    w = torch.randn(16, 64)
    sw = nxm.compress(w, "8:4x4", layout="block")
    monkeypatch.setenv("NXM_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="nxm::select_2of4t: unknown NXM_CPU_ISA=sse9: choose auto, amx"):
        torch.ops.nxm.select_2of4t(w, None, True)
    with pytest.raises(RuntimeError, match="nxm::sparse_mm_block: unknown NXM_CPU_ISA=sse9"):
        nxm.sparse_mm(torch.randn(2, 64), sw, backend="native")
    with pytest.raises(RuntimeError, match="nxm::sparse_mm_packed: unknown NXM_CPU_ISA=sse9"):
        nxm.sparse_mm(torch.randn(2, 64), nxm.compress(w, "2:4", layout="packed"), backend="native")
