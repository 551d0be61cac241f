"""The per-call work SparseLinear and sparse_mm do once instead of at every call: SparseLinear's
eager plan (checks, backend choice, bound kernel) and dispatch's memo of its choices. The cached
paths give the results of the uncached ones, and every change that can alter a result (buffers
moved, loaded, changed in place or replaced, NXM_BACKEND, x's dtype or features) makes a new plan."""

import pytest
import torch
from conftest import FLOAT_DTYPES
from torch import nn

import nxm_kernels as nxm
from nxm_kernels import dispatch
from nxm_kernels.backends.reference import ReferenceBackend
from nxm_kernels.nn import SparseLinear, sparse_linear


def random_layer(in_features, out_features, dtype=torch.float32, pattern="2:4", seed=0, **kwargs):
    torch.manual_seed(seed)
    return SparseLinear.from_dense(nn.Linear(in_features, out_features, dtype=dtype), pattern, **kwargs)


def uncached(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward through the custom op, which checks and dispatches on every call."""
    return sparse_linear(*layer._op_args(x, layer.backend_form()))


@pytest.fixture
def count_selects(monkeypatch):
    """The number of dispatch.select calls so far (a list: read it with len)."""
    calls = []
    select = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda *args: calls.append(args[0]) or select(*args))
    return calls


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("pattern, layout", [("2:4", None), ("2:4", "packed"), ("1:4", None), ("2:4t", None),
                                             ("8:4x4", None)])
@pytest.mark.parametrize("shape, bias", [((64, 32), True), ((30, 10), True), ((30, 10), False)])
def test_cached_forward_equals_the_uncached_one(dtype, pattern, layout, shape, bias):
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(nn.Linear(*shape, bias=bias, dtype=dtype), pattern, layout=layout)
    for lead in ((1,), (5,), (2, 3), ()):
        x = torch.randn(*lead, shape[0]).to(dtype)
        assert torch.equal(layer(x), uncached(layer, x))
        assert torch.equal(layer(x), uncached(layer, x))  # the second call runs the plan


def test_second_forward_does_not_dispatch(count_selects):
    layer = random_layer(64, 32)
    x = torch.randn(3, 64)
    layer(x)
    assert count_selects  # the first call chose a backend
    count_selects.clear()
    layer(x)
    layer(torch.randn(7, 2, 64))  # other batch dimensions: the same plan
    assert count_selects == []


def test_sparse_mm_memoizes_dispatch(monkeypatch):
    asked = []
    reasons = dispatch.reasons
    monkeypatch.setattr(dispatch, "reasons", lambda backend, op, inputs: asked.append(backend.name) or
                        reasons(backend, op, inputs))
    sw = nxm.compress(torch.randn(32, 64), "2:4", layout="packed")
    x = torch.randn(4, 64)
    first = nxm.sparse_mm(x, sw)
    assert asked
    asked.clear()
    assert torch.equal(nxm.sparse_mm(x, sw), first)
    assert asked == []
    nxm.sparse_mm(torch.randn(5, 64), sw)  # another shape: asked again (a backend may limit sizes)
    assert asked


def test_dispatch_memo_follows_the_registered_backends(monkeypatch):
    class Refuses(ReferenceBackend):
        name = "refuses-then-serves"
        refuse = True

        def extra_reasons(self, op, **inputs):
            return ["told to refuse"] if self.refuse else []

    inputs = {"x": torch.randn(2, 8), "sw": nxm.compress(torch.randn(4, 8), "2:4", layout="packed"), "bias": None}
    usual = dispatch.select("sparse_mm", None, inputs)
    extra = Refuses()
    backends = (extra,) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)
    assert dispatch.select("sparse_mm", None, inputs) is usual
    with pytest.raises(nxm.BackendNotSupported, match="told to refuse"):
        dispatch.select("sparse_mm", extra.name, inputs)
    extra.refuse = False  # a refusal is never remembered
    assert dispatch.select("sparse_mm", extra.name, inputs) is extra


def test_dtype_and_device_moves_make_a_new_plan(count_selects):
    layer = random_layer(64, 32)
    x = torch.randn(3, 64)
    layer(x)
    layer.to(torch.bfloat16)
    count_selects.clear()
    y = layer(x.bfloat16())
    assert count_selects  # a new plan for the moved buffers
    assert y.dtype == torch.bfloat16 and torch.equal(y, uncached(layer, x.bfloat16()))


def test_input_of_another_dtype_is_checked_again():
    layer = random_layer(64, 32)
    layer(torch.randn(3, 64))
    with pytest.raises(TypeError, match="x is torch.float16 but the weight is torch.float32"):
        layer(torch.randn(3, 64).half())
    with pytest.raises(ValueError, match="input has 63 features"):
        layer(torch.randn(3, 63))


def test_load_state_dict_is_seen():
    layer, other = random_layer(64, 32, seed=0), random_layer(64, 32, seed=1)
    x = torch.randn(3, 64)
    before = layer(x)
    layer.load_state_dict(other.state_dict())
    after = layer(x)
    assert not torch.equal(after, before) and torch.equal(after, other(x))


class DerivedForm(ReferenceBackend):
    """Makes and reads the derived 'cusparselt' layout on CPU (a dense copy plus one element), so the
    forward multiplies with a copy of the buffers that the plan holds."""

    name = "derived-form"

    def not_supported_reasons(self, op, **inputs):
        layout = inputs["sw"].layout if "sw" in inputs else inputs.get("layout")
        return [] if layout == "cusparselt" else ["reads only cusparselt"]

    def compress(self, w, pattern, layout, scores):
        z = nxm.project(w, pattern, scores, backend="reference")
        return torch.cat([z.reshape(-1), z.new_zeros(1)]), torch.empty(0, dtype=torch.uint8)

    def sparse_mm(self, x, sw, bias):
        w = sw.values[:-1].view(sw.shape).float()
        return (x.float() @ w.T + (bias.float() if bias is not None else 0)).to(x.dtype)


@pytest.mark.parametrize("change", ["values", "bias", "replace-values"])
def test_buffer_changes_are_seen(monkeypatch, change):
    """In place or replaced: with a derived form and a padded bias, the plan holds copies of both."""
    backends = (DerivedForm(),) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)
    layer = random_layer(30, 10, torch.float16)  # 10 rows: padded to 16 for the derived form, and the bias too
    x = torch.randn(3, 30).half()
    before = layer(x)
    assert layer.backend_form().layout == "cusparselt"
    with torch.no_grad():
        if change == "values":
            layer.values.mul_(2)
        elif change == "bias":
            layer.bias.add_(1)
        else:
            layer.values = layer.values * 2
    after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, uncached(layer, x))


def test_nxm_backend_change_is_seen(monkeypatch):
    ran = []
    monkeypatch.setattr(ReferenceBackend, "sparse_mm", lambda self, *args, **kwargs: ran.append(1) or
                        torch.zeros(args[0].shape[0], 32))
    layer = random_layer(64, 32)
    x = torch.randn(3, 64)
    layer(x)
    assert ran == []  # auto picks the native GEMM on CPU
    monkeypatch.setenv("NXM_BACKEND", "reference")
    assert torch.equal(layer(x), torch.zeros(3, 32)) and ran == [1]
    monkeypatch.delenv("NXM_BACKEND")
    assert torch.equal(layer(x), uncached(layer, x)) and ran == [1]


def test_input_that_requires_grad_takes_the_autograd_op():
    layer = random_layer(30, 10)
    x = torch.randn(3, 30, requires_grad=True)
    y = layer(x)
    assert y.grad_fn is not None
    assert torch.equal(y.detach(), layer(x.detach()))
    y.sum().backward()
    dense = layer.to_dense()
    x_dense = x.detach().clone().requires_grad_()
    dense(x_dense).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad)
    with torch.no_grad():
        assert layer(x).grad_fn is None
