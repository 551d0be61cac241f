"""SparseLinear against the masked nn.Linear, and sparsify() on whole models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, assert_matmul_close, tiny_bert_config
from torch import nn

import nxm_kernels as nxm
from nxm_kernels import _extension, dispatch
from nxm_kernels.backends.reference import ReferenceBackend
from nxm_kernels.cli import DemoTransformer
from nxm_kernels.nn import SparseLinear, default_layout, padded_shape, sparse_linear, sparse_linear_grad_input

# Every backend that can multiply here: new backends are tested as soon as they register.
AVAILABLE = [b.name for b in dispatch.registered_backends() if b.unavailable_reason() is None and "sparse_mm" in b.ops]
# (in_features, out_features): aligned for cutlass, ragged in both, fewer outputs than a cutlass tile.
SHAPES = ((64, 32), (30, 10), (96, 64), (7, 3))


def integer_linear(in_features, out_features, dtype, bias=True, seed=0):
    """Small integers: every product and partial sum is exact in every dtype, so any correct
    kernel equals the dense result bit for bit, whatever its summation order."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(-3, 4, linear.weight.shape, generator=g))
        if bias:
            linear.bias.copy_(torch.randint(-3, 4, linear.bias.shape, generator=g))
    return linear


def integer_input(shape, dtype, seed=1):
    return torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def masked_linear(linear, pattern, scores=None):
    """nn.Linear with the projected weight: pad in_features to whole groups, project, crop."""
    m = nxm.Pattern(*map(int, pattern.split(":"))).m
    pad = -linear.in_features % m
    w = F.pad(linear.weight.detach(), (0, pad))
    if scores is not None:
        scores = F.pad(scores, (0, pad), value=torch.finfo(scores.dtype).min)
    dense = copy.deepcopy(linear)
    with torch.no_grad():
        dense.weight.copy_(nxm.project(w, pattern, scores, backend="reference")[:, : linear.in_features])
    return dense


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("pattern", ["2:4", "1:2", "2:8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_masked_linear(backend, dtype, pattern, shape):
    linear = integer_linear(*shape, dtype)
    sparse = SparseLinear.from_dense(linear, pattern, backend=backend)
    dense = masked_linear(linear, pattern)
    for lead in ((5,), (2, 3), ()):
        x = integer_input((*lead, shape[0]), dtype)
        assert torch.equal(sparse(x), dense(x))
    assert torch.equal(sparse.to_dense().weight, dense.weight)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("pattern", ["2:4", "1:2"])
@pytest.mark.parametrize("shape", [(64, 32), (40, 20)])
def test_random_weights_within_dtype_tolerance(backend, dtype, pattern, shape):
    torch.manual_seed(0)
    linear = nn.Linear(*shape, dtype=dtype)
    sparse = SparseLinear.from_dense(linear, pattern, backend=backend)
    x = torch.randn(3, shape[0]).to(dtype)
    dense = masked_linear(linear, pattern)
    assert_matmul_close(sparse(x), x, dense.weight.detach(), dense.bias.detach())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("in_features", [20, 50])
def test_cutlass_pads_any_in_features(dtype, in_features):
    pattern = "1:2" if dtype == torch.float32 else "2:4"
    linear = integer_linear(in_features, 20, dtype)
    sparse = SparseLinear.from_dense(linear, pattern, layout="cutlass")
    x = integer_input((3, in_features), dtype)
    assert torch.equal(sparse(x), masked_linear(linear, pattern)(x))


def test_layout_rule():
    assert default_layout(torch.float16, nxm.Pattern(2, 4), 64, 128) == "cutlass"
    assert default_layout(torch.bfloat16, nxm.Pattern(2, 4), 64, 128) == "cutlass"
    assert default_layout(torch.float32, nxm.Pattern(1, 2), 64, 128) == "cutlass"
    assert default_layout(torch.float32, nxm.Pattern(2, 4), 64, 128) == "packed"  # fp32 cutlass is 1:2
    assert default_layout(torch.float16, nxm.Pattern(2, 8), 64, 128) == "packed"
    assert default_layout(torch.float16, nxm.Pattern(2, 4), 10, 128) == "packed"  # would need padding
    assert padded_shape(10, 30, nxm.Pattern(2, 4), "packed", torch.float16) == (10, 32)
    # On CPU the native GEMM reads packed (block for block kinds), never cutlass.
    for dtype, pattern in ((torch.float16, "2:4"), (torch.bfloat16, "2:4"), (torch.float32, "1:2")):
        assert default_layout(dtype, nxm.Pattern(*map(int, pattern.split(":"))), 64, 128, "cpu") == "packed"
        assert default_layout(dtype, nxm.Pattern(*map(int, pattern.split(":"))), 64, 128, torch.device("cuda")) == "cutlass"


@pytest.mark.skipif(_extension.unavailable_reason() is not None, reason="no usable _C")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_layer_built_on_cpu_runs_on_the_native_gemm(dtype):
    linear = nn.Linear(128, 64).to(dtype)
    sparse = SparseLinear.from_dense(linear, "2:4")
    assert sparse.layout == "packed"
    x = torch.randn(3, 128, dtype=dtype)
    inputs = {"x": x, "sw": sparse.weight_sparse, "bias": sparse.bias}
    assert dispatch.select("sparse_mm", None, inputs).name == "native"
    assert torch.equal(sparse(x), nxm.sparse_mm(x, sparse.weight_sparse, sparse.bias, backend="native"))
    assert padded_shape(10, 30, nxm.Pattern(2, 4), "cutlass", torch.float16)[0] == 32


def test_padding_is_invisible():
    linear = integer_linear(30, 10, torch.float16)
    sparse = SparseLinear.from_dense(linear, "2:4", layout="cutlass")
    assert sparse.padded_shape[0] == 32 and sparse.padded_shape[1] >= 32
    assert sparse.bias.shape == (10,) and sparse.to_dense().weight.shape == (10, 30)
    x = integer_input((4, 30), torch.float16)
    assert sparse(x).shape == (4, 10)
    assert torch.equal(sparse(x), masked_linear(linear, "2:4")(x))
    with pytest.raises(ValueError, match="input has 32 features.*in_features=30"):
        sparse(torch.zeros(4, 32, dtype=torch.float16))


def test_ragged_group_keeps_real_weights_over_padding():
    # in_features=6 with 2:4: the last group is [a, b, pad, pad]; both real weights are kept even
    # when they are zero or when scores rank them below everything.
    linear = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]]))
    assert sparse_dense(linear).tolist() == [[0.0, 0.0, 3.0, 4.0, 5.0, 0.0]]
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1e30, -1e30]])
    assert SparseLinear.from_dense(linear, "2:4", scores=scores).to_dense().weight.tolist() == [
        [1.0, 2.0, 0.0, 0.0, 5.0, 0.0]
    ]


def sparse_dense(linear, *args, **kwargs):
    return SparseLinear.from_dense(linear, "2:4", *args, **kwargs).to_dense().weight.detach()


def test_scores_and_mask():
    linear = integer_linear(16, 8, torch.float32)
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sparse_dense(linear, scores=scores), masked_linear(linear, "2:4", scores).weight)
    mask = nxm.nm_mask(scores, "2:4")
    assert torch.equal(sparse_dense(linear, mask=mask), linear.weight.detach() * mask)
    with pytest.raises(ValueError, match="mask keeps more than pattern 2:4 allows in some 1x4 block.*nxm.nm_mask"):
        sparse_dense(linear, mask=mask | torch.eye(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask or scores, not both"):
        sparse_dense(linear, mask=mask, scores=scores)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16.*cast the layer"):
        SparseLinear.from_dense(nn.Linear(8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="takes an nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(8, 8, 1))
    with pytest.raises(ValueError, match="layout 'cutlass' holds torch.float32 only as 1:2"):
        SparseLinear.from_dense(nn.Linear(64, 64), "2:4", layout="cutlass")
    with pytest.raises(ValueError, match="stores layout 'packed' or 'cutlass'"):
        SparseLinear.from_dense(nn.Linear(64, 64), "2:4", layout="cusparselt")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        SparseLinear.from_dense(nn.Linear(64, 64), backend="nope")
    sparse = SparseLinear.from_dense(nn.Linear(64, 64).half())
    with pytest.raises(TypeError, match="x is torch.float32 but the weight is torch.float16"):
        sparse(torch.zeros(2, 64))


def test_dtype_conversion_reencodes_when_the_layout_cannot_hold_it():
    linear = integer_linear(64, 32, torch.float32)
    expected = masked_linear(linear, "1:2").weight.detach()
    sparse = SparseLinear.from_dense(linear, "1:2", layout="cutlass")
    assert sparse.half() is sparse  # in place, like nn.Module
    assert (sparse.layout, sparse.values.dtype, sparse.metadata.dtype, str(sparse.pattern)) == (
        "packed",
        torch.float16,
        torch.uint8,
        "1:2",
    )  # fp16 cutlass holds only 2:4
    assert torch.equal(sparse.to_dense().weight, expected.half())
    assert sparse.bias.dtype == torch.float16
    sparse.float()
    assert torch.equal(sparse.to_dense().weight, expected)

    half = SparseLinear.from_dense(integer_linear(64, 32, torch.float16), "2:4", layout="cutlass")
    metadata = half.metadata.clone()
    half.to(torch.bfloat16)  # same cutlass metadata for fp16 and bf16
    assert half.layout == "cutlass" and torch.equal(half.metadata, metadata)
    half.to(dtype=torch.float32)
    assert half.layout == "packed"  # fp32 cutlass holds only 1:2
    assert torch.equal(
        half(integer_input((2, 64), torch.float32)),
        masked_linear(integer_linear(64, 32, torch.float32), "2:4")(integer_input((2, 64), torch.float32)),
    )


def test_conversion_that_would_break_metadata_is_refused():
    sparse = SparseLinear.from_dense(nn.Linear(16, 8))
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(TypeError, match="metadata into torch.float16.*to_dense"):
        sparse.type(torch.float16)  # casts every tensor, metadata included
    for key, value in sparse.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key])


def test_state_dict_round_trip_and_validation():
    linear = integer_linear(30, 10, torch.float16)
    sparse = SparseLinear.from_dense(linear, "2:4")
    state = sparse.state_dict()
    assert set(state) == {"values", "metadata", "bias"}
    fresh = SparseLinear(30, 10, pattern="2:4", dtype=torch.float16)
    assert fresh.layout == sparse.layout
    fresh.load_state_dict(state)
    x = integer_input((3, 30), torch.float16)
    assert torch.equal(fresh(x), sparse(x))

    repeated = dict(state, metadata=torch.zeros_like(state["metadata"]))  # index 0 twice per group
    with pytest.raises(RuntimeError, match="index repeated within its group"):
        fresh.load_state_dict(repeated)
    with pytest.raises(RuntimeError, match="values are torch.float32 but this SparseLinear is torch.float16"):
        fresh.load_state_dict(dict(state, values=state["values"].float()))
    with pytest.raises(RuntimeError, match="values have shape"):
        fresh.load_state_dict(dict(state, values=state["values"][:, :-1]))
    assert torch.equal(fresh(x), sparse(x))  # refused loads changed nothing


def test_autograd_flows_to_the_input_only():
    linear = integer_linear(30, 10, torch.float32)
    sparse = SparseLinear.from_dense(linear, "2:4")
    dense = masked_linear(linear, "2:4")
    assert list(sparse.parameters()) == []  # frozen: buffers, not parameters
    x = integer_input((2, 3, 30), torch.float32).requires_grad_()
    x_dense = x.detach().clone().requires_grad_()
    grad = integer_input((2, 3, 10), torch.float32, seed=5)
    sparse(x).backward(grad)
    dense(x_dense).backward(grad)
    assert torch.equal(x.grad, x_dense.grad)


def test_inference_mode():
    linear = integer_linear(30, 10, torch.bfloat16)
    with torch.inference_mode():
        sparse = SparseLinear.from_dense(linear, "2:4")
        x = integer_input((4, 30), torch.bfloat16)
        assert torch.equal(sparse(x), masked_linear(linear, "2:4")(x))


def test_torch_compile_fullgraph():
    linear = integer_linear(30, 10, torch.float32)
    sparse = SparseLinear.from_dense(linear, "2:4", backend="reference")
    compiled = torch.compile(sparse, fullgraph=True)
    x = integer_input((4, 30), torch.float32)
    assert torch.equal(compiled(x), masked_linear(linear, "2:4")(x))


@pytest.mark.parametrize("layout", ["packed", "cutlass"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(layout, bias):
    sparse = SparseLinear.from_dense(nn.Linear(30, 10, bias=bias).half(), "2:4", layout=layout)
    x = torch.randn(3, 30).half().requires_grad_()
    torch.library.opcheck(
        sparse_linear,
        (x, sparse.values, sparse.metadata, sparse.bias, list(sparse.padded_shape), 10, "2:4", layout, "auto", None,
         None, "", []),
    )
    torch.library.opcheck(
        sparse_linear_grad_input,
        (torch.randn(3, 10).half(), sparse.values, sparse.metadata, list(sparse.padded_shape), 30, "2:4", layout),
    )


class _FakeCusparselt(ReferenceBackend):
    """Makes and reads the 'cusparselt' layout on CPU (a dense copy plus one element), counting calls."""

    name = "fake-cusparselt"

    def __init__(self):
        self.compressions = self.matmuls = 0

    def not_supported_reasons(self, op, **inputs):
        layout = inputs["sw"].layout if "sw" in inputs else inputs.get("layout")
        return [] if layout == "cusparselt" else ["reads only cusparselt"]

    def compress(self, w, pattern, layout, scores):
        self.compressions += 1
        z = nxm.project(w, pattern, scores, backend="reference")
        return torch.cat([z.reshape(-1), z.new_zeros(1)]), torch.empty(0, dtype=torch.uint8)

    def sparse_mm(self, x, sw, bias):
        self.matmuls += 1
        w = sw.values[:-1].view(sw.shape).float()
        return (x.float() @ w.T + (bias.float() if bias is not None else 0)).to(x.dtype)


def test_backend_form_is_made_lazily_once_and_never_saved(monkeypatch):
    fake = _FakeCusparselt()
    backends = (fake,) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)
    linear = integer_linear(30, 10, torch.float16)
    dense = masked_linear(linear, "2:4")
    sparse = SparseLinear.from_dense(linear, "2:4")
    assert fake.compressions == 0  # nothing made before the first forward
    x = integer_input((4, 30), torch.float16).requires_grad_()
    for _ in range(3):
        assert torch.equal(sparse(x), dense(x))
    assert (fake.compressions, fake.matmuls) == (1, 3)
    form = sparse.backend_form()
    assert form.layout == "cusparselt" and form.shape == (16, 32)  # padded to cuSPARSELt's multiple of 16
    assert set(sparse.state_dict()) == {"values", "metadata", "bias"}
    sparse(x).sum().backward()  # the backward reads the stored form
    x_dense = x.detach().clone().requires_grad_()
    dense(x_dense).sum().backward()
    assert torch.equal(x.grad, x_dense.grad)

    sparse.to(torch.bfloat16)  # remade after a conversion ...
    assert torch.equal(sparse(x.detach().bfloat16()), copy.deepcopy(dense).bfloat16()(x.detach().bfloat16()))
    assert fake.compressions == 2
    with torch.no_grad():
        sparse.bias.zero_()  # ... and after an in-place change of a buffer it was made from
        sparse.values.zero_()
    assert torch.equal(sparse(x.detach().bfloat16()), torch.zeros(4, 10, dtype=torch.bfloat16))
    assert fake.compressions == 3

    pinned = SparseLinear.from_dense(linear, "2:4", backend="reference")  # an explicit backend decides
    assert pinned.backend_form() is None and torch.equal(pinned(x.detach()), dense(x.detach()))
    fp32 = SparseLinear.from_dense(integer_linear(32, 16, torch.float32), "2:4")  # no 2:4 cusparselt for fp32
    assert fp32.backend_form() is None


class _Refuses(dispatch.Backend):
    name = "refuses"
    ops = frozenset(dispatch.OPS)

    def not_supported_reasons(self, op, **inputs):
        return ["it refuses everything"]


class _PackedOnly(ReferenceBackend):
    name = "packed-only"

    def not_supported_reasons(self, op, **inputs):
        sw = inputs.get("sw")
        if sw is not None and sw.layout != "packed":
            return ["its GEMM reads only packed"]
        return super().not_supported_reasons(op, **inputs)


def test_layout_follows_an_explicit_backend(monkeypatch):
    backends = (_PackedOnly(),) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)
    # The default order of a device where cutlass comes first (on CPU packed does already).
    monkeypatch.setattr(nxm.nn.policy, "DEFAULT_LAYOUTS", {})
    linear = integer_linear(64, 32, torch.float16)
    assert SparseLinear.from_dense(linear, backend="packed-only").layout == "packed"
    assert SparseLinear.from_dense(linear, backend="reference").layout == "cutlass"
    forced = SparseLinear.from_dense(linear, backend="packed-only", layout="cutlass")  # asked for: kept, and
    with pytest.raises(nxm.BackendNotSupported, match="reads only packed"):  # the forward says why not
        forced(integer_input((2, 64), torch.float16))
    half = SparseLinear.from_dense(integer_linear(64, 32, torch.float32), "1:2", backend="packed-only")
    assert half.layout == "packed" and half.to(torch.float16).layout == "packed"


def test_backend_choice_reaches_dispatch(monkeypatch):
    backends = (_Refuses(),) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)
    sparse = SparseLinear.from_dense(nn.Linear(16, 8))
    explicit = SparseLinear.from_dense(nn.Linear(16, 8), backend="refuses")
    with pytest.raises(nxm.BackendNotSupported, match="backend 'refuses' cannot run sparse_mm.*it refuses everything"):
        explicit(torch.zeros(2, 16))
    monkeypatch.setenv("NXM_BACKEND", "refuses")  # "auto" modules follow the environment
    with pytest.raises(nxm.BackendNotSupported, match="'refuses' \\(set by NXM_BACKEND\\)"):
        sparse(torch.zeros(2, 16))
    monkeypatch.setenv("NXM_BACKEND", "reference")
    assert sparse(torch.zeros(2, 16)).shape == (2, 8)


# ---------------------------------------------------------------- sparsify


def masked_model(model, names, pattern="2:4"):
    """A copy of ``model`` with the nn.Linear layers ``names`` projected (what sparsify must equal)."""
    dense = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent_name), child, masked_linear(dense.get_submodule(name), pattern))
    return dense


def test_sparsify_small_transformer_equals_masked_dense():
    torch.manual_seed(0)
    model = DemoTransformer(vocab=50, dim=64, heads=4, hidden=128, depth=2, classes=10).eval()
    tokens = torch.randint(0, 50, (2, 12))
    report = nxm.sparsify(model, "2:4", inplace=False)
    dense = masked_model(model, report.converted)
    model = report.model
    assert len(report.converted) == 12 and report.skipped == {"head": "output head (named 'head'); name it in "
                                                                      "include= to make it sparse"}
    assert all(isinstance(m, SparseLinear) for n, m in model.named_modules() if n.endswith(("query", "up")))
    torch.testing.assert_close(model(tokens), dense(tokens), rtol=1e-5, atol=1e-5)
    assert report.params_after < report.params_before and report.bytes_after < report.bytes_before
    assert "converted 12 linear layer(s), skipped 1" in str(report)
    assert report.converted["blocks.0.up"].startswith("64->128 2:4 packed float32, dropped 4,096 nonzero weights")
    # A model whose weights are already N:M (e.g. trained with ADMM) converts without dropping any.
    again = nxm.sparsify(dense, "2:4", inplace=False)
    assert all(what.endswith("already N:M, nothing dropped") for what in again.converted.values())
    torch.testing.assert_close(again.model(tokens), dense(tokens), rtol=1e-5, atol=1e-5)


def test_sparsify_include_exclude_scores_and_copy():
    model = DemoTransformer(vocab=50, dim=64, heads=4, hidden=128, depth=1, classes=10)
    report = nxm.sparsify(model, include="blocks.*", exclude=["*.query", "*.key"], inplace=False)
    assert report.model is not model and isinstance(model.blocks[0].up, nn.Linear)  # original untouched
    assert sorted(report.converted) == ["blocks.0.down", "blocks.0.out", "blocks.0.up", "blocks.0.value"]
    assert report.skipped == {
        "blocks.0.query": "excluded by '*.query'",
        "blocks.0.key": "excluded by '*.key'",
        "head": "not selected by include",
    }
    report = nxm.sparsify(model, include=lambda name, m: m.out_features == 128, inplace=False)
    assert list(report.converted) == ["blocks.0.up"]
    report = nxm.sparsify(model, scores={"blocks.0.up": torch.rand(128, 64)}, inplace=False)
    assert list(report.converted) == ["blocks.0.up"]
    assert report.skipped["blocks.0.down"] == "no scores given for this layer"
    calls = []  # include= overrides the default that keeps the head dense
    report = nxm.sparsify(model, include="head", progress=lambda done, total, name: calls.append((done, total, name)))
    assert report.model is model and isinstance(model.head, SparseLinear)  # inplace by default
    assert calls[-1] == (7, 7, "head")


def test_sparsify_skips_what_it_cannot_convert_safely():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.attention = nn.MultiheadAttention(8, 2, add_zero_attn=True)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight
            self.wide = nn.Linear(8, 8, dtype=torch.float64)

    report = nxm.sparsify(Tied(), include="*")
    assert report.converted == {}
    assert "tied to embed.weight" in report.skipped["head"]
    assert "uses add_bias_kv or add_zero_attn" in report.skipped["attention.out_proj"]
    assert "float32/float16/bfloat16" in report.skipped["wide"]


def test_sparsify_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    tokens = torch.randint(0, 100, (2, 16))
    report = nxm.sparsify(model, "2:4", inplace=False)
    dense, model = masked_model(model, report.converted), report.model
    # 6 linears per layer, the pooler-free MLM head transform; the decoder is the output head (and
    # tied to the embeddings, which keeps it dense even when include= names it).
    assert len(report.converted) == 2 * 6 + 1
    assert report.skipped["cls.predictions.decoder"].startswith("output head (the model's get_output_embeddings())")
    tied = nxm.sparsify(model, include="cls.*", inplace=False)
    assert "tied to bert.embeddings.word_embeddings.weight" in tied.skipped["cls.predictions.decoder"]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)
