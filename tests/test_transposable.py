"""Transposable N:M (``"2:4t"``): W and W^T both stored, and a sparse backward through W^T."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import _extension, dispatch, ops
from nxm_kernels.backends.native import _has_kernel
from nxm_kernels.layouts import NMSparseWeight
from nxm_kernels.nn import SparseLinear, sparsify

VALUES = st.one_of(st.integers(-3, 3).map(float), st.floats(-100, 100, width=32), st.sampled_from([-0.0, 1e-30]))
# (layout, dtype): packed holds every float dtype and int8; cutlass holds 2:4 for fp16/bf16.
CASES = [("packed", torch.float32), ("packed", torch.float16), ("packed", torch.bfloat16), ("packed", torch.int8),
         ("cutlass", torch.float16), ("cutlass", torch.bfloat16)]


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else t


@settings(max_examples=30, deadline=None)
@given(data=st.data(), case=st.sampled_from(CASES), text=st.sampled_from(["2:4t", "1:4t", "3:4t", "2:3t"]))
def test_compress_stores_w_and_its_transpose_bit_for_bit(data, case, text):
    layout, dtype = case
    if layout == "cutlass" and text != "2:4t":
        text = "2:4t"  # the Sparse Tensor Core layout holds 2:4 only
    pattern = nxm.pattern.as_pattern(text)
    rows, cols = nxm.get_layout(layout).padded_shape(1, 1, pattern, dtype)
    rows, cols = rows * data.draw(st.integers(1, 2)), cols * data.draw(st.integers(1, 2))
    values = data.draw(st.lists(VALUES, min_size=rows * cols, max_size=rows * cols))
    w = torch.tensor(values).reshape(rows, cols)
    w = w.clamp(-127, 127).round().to(dtype) if dtype == torch.int8 else w.to(dtype)
    sw = nxm.compress(w, pattern, layout)
    sw.check()
    projected = nxm.project(w, pattern)
    if layout == "packed":  # (cutlass writes +0 for a kept -0, as for any 2:4 weight)
        assert torch.equal(bits(nxm.decompress(sw)), bits(projected))
        assert torch.equal(bits(nxm.decompress(sw.transposed)), bits(projected.T.contiguous()))
    assert torch.equal(nxm.decompress(sw), projected) and torch.equal(nxm.decompress(sw.transposed), projected.T)
    assert nxm.is_nm_sparse(nxm.decompress(sw.transposed), pattern.row_form)
    assert set(sw.tensors()) == {"values", "metadata", "values_t", "metadata_t"}


def test_validation_refuses_a_transpose_that_does_not_match():
    w = torch.randn(8, 8)
    sw = nxm.compress(w, "2:4t")
    other = nxm.compress(torch.randn(8, 8), "2:4t")
    parts = dict(values=sw.values, metadata=sw.metadata, shape=sw.shape, pattern=sw.pattern, layout=sw.layout)
    with pytest.raises(ValueError, match="not the transpose of values/metadata"):
        NMSparseWeight(**parts, values_t=other.values_t, metadata_t=other.metadata_t)
    with pytest.raises(ValueError, match="give values_t and metadata_t"):
        NMSparseWeight(**parts)
    row = nxm.compress(w, "2:4")
    with pytest.raises(ValueError, match="pattern 2:4 has none"):
        NMSparseWeight(row.values, row.metadata, row.shape, "2:4", "packed", values_t=sw.values_t,
                       metadata_t=sw.metadata_t)
    # A 2:4 weight that is not 2:4 along columns has no 2:4 transpose: whatever is given differs.
    bad = torch.zeros(4, 4)
    bad[0, :2] = bad[1, :2] = bad[2, :2] = 1.0  # column 0 keeps 3
    forward, backward = nxm.compress(bad, "2:4"), nxm.compress(bad.T.contiguous(), "2:4")
    with pytest.raises(ValueError, match="not the transpose"):
        NMSparseWeight(forward.values, forward.metadata, (4, 4), "2:4t", "packed", values_t=backward.values,
                       metadata_t=backward.metadata)


def test_refusals():
    with pytest.raises(ValueError, match="4x4 blocks of pattern 2:4t: pad it with zeros to 32x32"):
        nxm.compress(torch.randn(30, 32), "2:4t")
    with pytest.raises(ValueError, match="layout 'cutlass' holds torch.float32 only as 1:2"):
        nxm.compress(torch.randn(64, 64), "2:4t", "cutlass")
    with pytest.raises(ValueError, match="nxm.fake_quant"):
        nxm.compress(torch.randn(8, 8), "2:4t", bits=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_backward_runs_sparse_mm_on_w_transposed(monkeypatch, dtype):
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.nn.Linear(30, 10).to(dtype), pattern="2:4t")
    assert layer.padded_shape == (12, 32)
    dense = layer.to_dense().weight.detach().float()
    calls = []
    real_select = dispatch.select

    def spy(op, backend, inputs):  # (the forward binds the chosen kernel: see linear_plan)
        if op == "sparse_mm":
            calls.append(inputs["sw"].shape)
        return real_select(op, backend, inputs)

    def no_dense(*args, **kwargs):
        raise AssertionError("the 2:4t layer decompressed its weight")

    monkeypatch.setattr(dispatch, "select", spy)
    monkeypatch.setattr(ops, "decompress", no_dense)
    x = torch.randn(4, 3, 30, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert calls == [(12, 32), (32, 12)]  # forward with W, backward with W^T: dense-free both ways
    monkeypatch.undo()
    x_ref = x.detach().float().requires_grad_()
    F.linear(x_ref, dense, layer.bias.float()).backward(grad.float())
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    else:  # fp32 accumulation, one rounding to bf16
        torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=0, atol=2 * x_ref.grad.abs().max().item() * 2**-8)


def test_sparsify_with_2_4t_and_dtype_conversion():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    sparsify(model, "2:4t", include=["0", "2"])
    for layer in (model[0], model[2]):
        assert isinstance(layer, SparseLinear) and str(layer.pattern) == "2:4t"
        w = layer.to_dense().weight.detach()
        assert nxm.is_nm_sparse(w, "2:4") and nxm.is_nm_sparse(w.T.contiguous(), "2:4")
    before = model[0].to_dense().weight.detach()
    model.half()
    assert model[0].weight_sparse.values_t.dtype == torch.float16
    model[0].weight_sparse.check()
    assert torch.equal(model[0].to_dense().weight.detach(), before.half())
    x = torch.randn(2, 32, dtype=torch.float16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16


def test_state_dict_round_trip_validates_the_transpose():
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.nn.Linear(16, 8), pattern="2:4t")
    state = layer.state_dict()
    fresh = SparseLinear(16, 8, pattern="2:4t")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.to_dense().weight, layer.to_dense().weight)
    state["values_t"] = torch.randn_like(state["values_t"])
    with pytest.raises(RuntimeError, match="not the transpose"):
        fresh.load_state_dict(state)


# ---------------------------------------------------------------- the native 2:4t selection

native_built = pytest.mark.skipif(
    _extension.unavailable_reason() is not None or not _has_kernel("nxm::select_2of4t"),
    reason="no _C with nxm::select_2of4t (csrc/cpu_transposable.cpp)",
)
SELECT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8)
# Integers (many equal magnitudes: ties), zeros and -0, and magnitudes 2**-60 .. 2**60 in one block
# (the AVX-512 kernel's integers cannot hold those: the scalar path's exact sums settle them).
TIE_VALUES = st.one_of(st.integers(-3, 3).map(float), st.sampled_from([0.0, -0.0]))
WIDE_VALUES = st.one_of(TIE_VALUES, st.floats(-100, 100, width=32),
                        st.builds(lambda m, e: m * 2.0**e, st.integers(-7, 7), st.integers(-60, 60)))


def as_weight(values, shape, dtype):
    w = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype == torch.int8:
        return w.clamp(-127, 127).round().to(dtype)
    w = w.to(dtype)
    return torch.where(torch.isfinite(w), w, torch.zeros((), dtype=dtype))  # (2**60 overflows fp16)


@native_built
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["avx512", "portable"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # (one env)
@given(data=st.data(), dtype=st.sampled_from(SELECT_DTYPES), scores_kind=st.sampled_from([None, "float32", "square"]),
       wide=st.booleans())
def test_native_2_4t_equals_the_reference_bit_for_bit(monkeypatch, threads, isa, data, dtype, scores_kind, wide):
    monkeypatch.setenv("NXM_CPU_ISA", isa)  # (on a CPU without AVX-512 both run the scalar path)
    # Widths up to 80: groups of 8 blocks (the SIMD unit) and a ragged end; a leading batch dim at times.
    shape = (*data.draw(st.sampled_from([(), (2,)])), 4 * data.draw(st.integers(1, 3)), 4 * data.draw(st.integers(1, 20)))
    values = data.draw(st.lists(WIDE_VALUES if wide else TIE_VALUES, min_size=math.prod(shape),
                                max_size=math.prod(shape)))
    w = as_weight(values, shape, dtype)
    if scores_kind is None:
        scores = None
    elif scores_kind == "float32":  # signed scores, ties included
        scores = as_weight(data.draw(st.lists(WIDE_VALUES if wide else TIE_VALUES, min_size=w.numel(),
                                              max_size=w.numel())), shape, torch.float32)
    else:  # ADMM's Z-step: w**2 in float64
        scores = nxm.pattern.as_pattern("2:4t").projection_scores(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for op in (nxm.nm_mask, nxm.project):
            got = op(w, "2:4t", scores, backend="native")
            want = op(w, "2:4t", scores, backend="reference")
            assert got.dtype == want.dtype and torch.equal(bits(got), bits(want)), op.__name__
    finally:
        torch.set_num_threads(before)


@native_built
@pytest.mark.parametrize("isa", ["avx512", "portable"])
def test_native_2_4t_hand_cases(monkeypatch, isa):
    monkeypatch.setenv("NXM_CPU_ISA", isa)
    # 9 blocks in a row (8 in the SIMD unit, 1 past it): all equal, all zero, one hand-ranked block.
    w = torch.ones(4, 36, dtype=torch.float16)
    w[:, 4:8] = 0
    w[:, 32:] = torch.tensor([[9, 8, 0, 0], [0, 0, 7, 6], [5, 4, 0, 0], [0, 0, 3, 2]])
    mask = nxm.nm_mask(w, "2:4t", backend="native")
    mask_0 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)  # lowest number
    assert torch.equal(mask[:, :4], mask_0) and torch.equal(mask[:, 4:8], mask_0)
    assert torch.equal(mask[:, 32:], w[:, 32:] != 0)  # every nonzero fits 2:4 both ways: all kept
    projected = nxm.project(-w, "2:4t", backend="native")
    assert torch.equal(projected, torch.where(mask, -w, torch.zeros(())))
    assert not torch.signbit(projected[~mask]).any()  # dropped entries are +0


@native_built
def test_auto_dispatch_runs_2_4t_natively_and_other_transposable_patterns_elsewhere():
    w = torch.randn(8, 8)
    assert dispatch.select("nm_mask", None, dict(w=w, pattern=nxm.pattern.as_pattern("2:4t"), scores=None)).name == "native"
    why = dispatch.get_backend("native").not_supported_reasons("nm_mask", w=w, pattern=nxm.pattern.as_pattern("1:4t"),
                                                               scores=None)
    assert any("2:4t on CPU tensors, not 1:4t" in reason for reason in why)
    with pytest.raises(RuntimeError, match="multiples of 4"):
        torch.ops.nxm.select_2of4t(torch.randn(6, 8), None, False)
