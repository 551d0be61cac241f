"""Transposable N:M (``"2:4t"``): W and W^T both stored, and a sparse backward through W^T."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import dispatch, ops
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
