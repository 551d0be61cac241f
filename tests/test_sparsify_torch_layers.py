"""sparsify on PyTorch's own Transformer modules, whose fused paths read a child's ``.weight``:
their FFN Linears and attention ``out_proj`` convert, and the outputs equal the masked dense
model's in eval mode, with and without grad (the fused-path case), with masks, in every
layout of the input."""

import copy

import pytest
import torch
from torch import nn

import nxm_kernels as nxm
from nxm_kernels.nn import SparseLinear
from nxm_kernels.nn.torch_layers import SparseOutProjAttention


def masked_dense(model, names):
    """A copy of ``model`` with the weights of ``names`` projected to 2:4 (what sparsify must equal)."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            weight = dense.get_submodule(name).weight
            weight.copy_(nxm.project(weight, "2:4"))
    return dense


def assert_close_derived(actual, dense_model, run):
    """``actual`` against ``run(dense_model)`` at a derived tolerance: twice the error of the fp32
    masked dense model (on whichever path torch takes) against its float64 copy, plus one unit in
    the last place of the outputs' magnitude."""
    truth = run(copy.deepcopy(dense_model).double(), torch.float64)
    dense = run(dense_model, torch.float32)
    pairs = list(zip(*(t if isinstance(t, tuple) else (t,) for t in (actual, dense, truth))))
    for got, plain, exact in pairs:
        if exact is None:
            assert got is None and plain is None
            continue
        allowed = 2 * (plain.double() - exact).abs().max() + torch.finfo(torch.float32).eps * exact.abs().max()
        err = (got.double() - exact).abs().max()
        assert err <= allowed, f"max error {err:.3e} > allowed {allowed:.3e}"


class EncoderWithHead(nn.Module):
    def __init__(self, d=32, heads=4, hidden=64, layers=2, classes=6):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)  # nested tensors on by default
        self.head = nn.Linear(d, classes)

    def forward(self, x, padding=None, mask=None):
        return self.head(self.encoder(x, mask=mask, src_key_padding_mask=padding))


def test_transformer_encoder_converts_ffn_and_out_proj_and_matches_masked_dense():
    torch.manual_seed(0)
    model = EncoderWithHead().eval()
    report = nxm.sparsify(model, inplace=False)
    sparse = report.model
    per_layer = ["self_attn.out_proj", "linear1", "linear2"]
    assert sorted(report.converted) == sorted(f"encoder.layers.{i}.{n}" for i in range(2) for n in per_layer)
    assert list(report.skipped) == ["head"]  # the head stays dense by default
    assert isinstance(sparse.encoder.layers[0].self_attn, SparseOutProjAttention)
    assert isinstance(sparse.encoder.layers[1].linear1, SparseLinear)
    dense = masked_dense(model, report.converted)
    x = torch.randn(3, 10, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    for grad in (False, True):  # without grad, the dense model takes PyTorch's fused path
        with torch.set_grad_enabled(grad):
            assert_close_derived(sparse(x), dense, lambda m, dt: m(x.to(dt)))
            assert_close_derived(sparse(x, mask=causal), dense, lambda m, dt: m(x.to(dt), mask=causal.to(dt)))
    # With a padding mask the fused path returns zeros at padded positions (nested tensors): the
    # real positions must agree.
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 7:] = padding[2, 4:] = True
    with torch.no_grad():
        real = ~padding
        assert_close_derived(sparse(x, padding)[real], dense, lambda m, dt: m(x.to(dt), padding)[real])


def test_transformer_decoder_converts_both_attentions_and_ffn():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, norm_first=True)
    model = nn.TransformerDecoder(layer, 1).eval()
    report = nxm.sparsify(model, inplace=False)
    assert sorted(report.converted) == [
        "layers.0.linear1", "layers.0.linear2", "layers.0.multihead_attn.out_proj", "layers.0.self_attn.out_proj"
    ]
    dense = masked_dense(model, report.converted)
    tgt, memory = torch.randn(7, 2, 32), torch.randn(9, 2, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        out = report.model(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
        assert_close_derived(
            out, dense, lambda m, dt: m(tgt.to(dt), memory.to(dt), tgt_mask=causal.to(dt), tgt_is_causal=True)
        )


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_multihead_attention_with_a_sparse_out_proj(batch_first, need_weights, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=20, batch_first=batch_first).eval()
    holder = nn.ModuleDict({"attn": mha})
    report = nxm.sparsify(holder, inplace=False)
    assert list(report.converted) == ["attn.out_proj"]
    dense = masked_dense(holder, report.converted)
    shape = (lambda length: (2, length)) if batch_first else (lambda length: (length, 2))
    q, k, v = torch.randn(*shape(5), 32), torch.randn(*shape(6), 24), torch.randn(*shape(6), 20)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    attn_mask = torch.rand(5, 6) < 0.3
    attn_mask[:, 0] = False  # every query attends to something
    kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights,
                  average_attn_weights=average)
    with torch.no_grad():
        got = report.model["attn"](q, k, v, **kwargs)
        assert_close_derived(got, dense, lambda m, dt: m["attn"](q.to(dt), k.to(dt), v.to(dt), **kwargs))
        # Unbatched input, self-attention (one packed input projection in PyTorch's path).
        self_attn = nn.MultiheadAttention(32, 4).eval()
        one = nn.ModuleDict({"attn": self_attn})
        sparse_one = nxm.sparsify(one, inplace=False).model
        x = torch.randn(5, 32)
        assert_close_derived(
            sparse_one["attn"](x, x, x, need_weights=need_weights),
            masked_dense(one, ["attn.out_proj"]),
            lambda m, dt: m["attn"](x.to(dt), x.to(dt), x.to(dt), need_weights=need_weights),
        )


def test_attention_that_the_sparse_path_does_not_implement_stays_dense():
    model = nn.ModuleDict({"a": nn.MultiheadAttention(16, 2, add_bias_kv=True), "b": nn.Linear(16, 16)})
    report = nxm.sparsify(model)
    assert list(report.converted) == ["b"]
    assert "add_bias_kv or add_zero_attn" in report.skipped["a.out_proj"]


def test_sparsified_encoder_saved_and_loaded_into_a_fresh_dense_model_runs_the_same(tmp_path):
    """``nxm.load`` swaps the layers in, then makes their Transformer parents call them as modules
    (without that the fused eval path reads a ``.weight`` a SparseLinear does not have)."""
    torch.manual_seed(0)
    model = EncoderWithHead().eval()
    sparse = nxm.sparsify(model, inplace=False).model
    nxm.save(sparse, tmp_path / "encoder.safetensors")
    loaded = nxm.load(tmp_path / "encoder.safetensors", EncoderWithHead().eval())
    assert isinstance(loaded.encoder.layers[0].self_attn, SparseOutProjAttention)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=0)
