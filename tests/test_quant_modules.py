"""Quantized weights through the stack: the native CPU GEMM against the reference, SparseLinear
(W8A16, W4A16, W8A8), sparsify's quantization report, checkpoints (sizes, refusals on load)."""

import json

import pytest
import torch
from torch import nn

import nxm_kernels as nxm
from nxm_kernels import _extension

needs_native = pytest.mark.skipif(_extension.unavailable_reason() is not None, reason="nxm_kernels._C not built")


def _tolerance(x, sw, bias):
    """fp32 accumulation over K terms in two orders (code * x summed then scaled, or dequantized
    first), then one rounding to x's dtype."""
    w = nxm.decompress(sw, dtype=torch.float64)
    magnitude = x.double().abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0)
    want = x.double() @ w.T + (bias.double() if bias is not None else 0)
    return want, 2 * x.shape[-1] * 2.0**-23 * magnitude + want.abs() * torch.finfo(x.dtype).eps


@needs_native
@pytest.mark.parametrize("isa", ["auto", "portable"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (8, 64), (4, 128), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_matches_reference(monkeypatch, isa, bits, group_size, dtype):
    monkeypatch.setenv("NXM_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(bits)
    w, bias = torch.randn(36, 200, generator=gen), torch.randn(36, generator=gen).to(dtype)
    sw = nxm.compress(w.to(dtype), "2:4", bits=bits, group_size=group_size)
    for rows in (1, 3, 6):
        x = torch.randn(rows, 200, generator=gen).to(dtype)
        y = nxm.sparse_mm(x, sw, bias, backend="native")
        want, tol = _tolerance(x, sw, bias)
        assert ((y.double() - want).abs() <= tol).all()


@needs_native
def test_native_any_n_m_and_odd_int4_rows():
    sw = nxm.compress(torch.randn(5, 24), "3:8", bits=4, group_size=8)  # 9 codes a row: a half byte
    x = torch.randn(2, 24)
    want, tol = _tolerance(x, sw, None)
    assert ((nxm.sparse_mm(x, sw, backend="native").double() - want).abs() <= tol).all()


@needs_native
def test_opcheck_native_quantized_gemm():
    sw = nxm.compress(torch.randn(16, 64), "2:4", bits=4, group_size=32)
    x, bias = torch.randn(3, 64), torch.randn(16)
    args = (x, sw.values, sw.metadata, sw.scales, bias, 2, 4, 4, 32)
    torch.library.opcheck(torch.ops.nxm.sparse_mm_packed_q.default, args)


def test_w8a8_runs_where_declared_and_others_refuse():
    from nxm_kernels import dispatch

    sw = nxm.compress(torch.randn(8, 64), "2:4", bits=8)
    x = torch.randn(2, 64)
    assert dispatch.get_backend("native").supports["sparse_mm"].act_bits == (None, 8)  # tests/test_w8a8.py
    why = dispatch.get_backend("triton").not_supported_reasons("sparse_mm", x=x, sw=sw, bias=None, act_bits=8)
    assert "does not quantize activations to 8 bits" in "; ".join(why)


@pytest.mark.parametrize("bits,group_size,act_bits", [(8, None, None), (4, 32, None), (8, 64, 8), (4, None, 8)])
def test_sparse_linear_quantized(bits, group_size, act_bits):
    torch.manual_seed(0)
    linear = nn.Linear(100, 40).bfloat16()
    layer = nxm.SparseLinear.from_dense(linear, "2:4", weight_bits=bits, group_size=group_size, act_bits=act_bits)
    sw = layer.weight_sparse
    assert str(sw.encoding) == (f"int{bits}" + (f"-g{group_size}" if group_size else "")) and sw.dtype == torch.bfloat16
    assert layer.scales.dtype == torch.float32 and "scales" in layer.state_dict()
    x = torch.randn(3, 100).bfloat16().requires_grad_()
    y = layer(x)
    padded = torch.nn.functional.pad(x.detach(), (0, sw.in_features - 100))
    want = nxm.sparse_mm(padded, sw, torch.nn.functional.pad(layer.bias, (0, sw.out_features - 40)),
                         act_bits=act_bits, backend="reference")[:, :40]
    if act_bits:
        assert torch.equal(y, want)  # the integer path is exact
    else:
        assert torch.allclose(y.float(), want.float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad.shape == x.shape
    again = nxm.SparseLinear.from_dense(nn.Linear(100, 40).bfloat16(), "2:4", weight_bits=bits, group_size=group_size,
                                        act_bits=act_bits)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x.detach()), y.detach())
    as_float = layer.float()  # codes and fp32 scales unchanged; the layer computes in fp32
    assert as_float.weight_sparse.dtype == torch.float32 and as_float.scales.dtype == torch.float32
    assert torch.equal(as_float.to_dense().weight, nxm.decompress(sw, dtype=torch.float32)[:40, :100])


def test_sparse_linear_refuses_act_bits_without_weight_bits():
    with pytest.raises(ValueError, match="act_bits=8 \\(W8A8\\) needs weight_bits=8"):
        nxm.SparseLinear.from_dense(nn.Linear(16, 8), "2:4", act_bits=8)


def test_sparsify_reports_quantization_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    w = model[0].weight.detach().clone()
    report = nxm.sparsify(model, "2:4", include=["0", "2"], weight_bits=4, group_size=64)
    assert set(report.quant_error) == {"0", "2"} and all(0 < e < 0.2 for e in report.quant_error.values())
    assert "int4-g64 (error" in str(report)
    projected = nxm.project(w, "2:4").double()
    want = float((nxm.fake_quant(w, "2:4", 4, 64).double() - projected).norm() / projected.norm())
    assert report.quant_error["0"] == pytest.approx(want, rel=1e-12)


def _model(dtype=torch.float16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 1024, bias=False), nn.Linear(1024, 2048, bias=False)).to(dtype)


@pytest.mark.parametrize("bits,group_size,limit", [(4, 128, 0.21), (8, None, 0.32)])
def test_checkpoint_sizes(tmp_path, bits, group_size, limit):
    model = _model()
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model)
    nxm.sparsify(model, "2:4", include=["0", "1"], weight_bits=bits, group_size=group_size)
    nxm.save(model, tmp_path / "m.safetensors")
    checkpoint = nxm.load(tmp_path / "m.safetensors")
    stored = sum(layer.weight_sparse.nbytes for layer in checkpoint.layers.values())
    assert stored / dense_bytes <= limit
    assert checkpoint.header["layers"]["0"]["encoding"] == (f"int{bits}" + (f"-g{group_size}" if group_size else ""))
    loaded = nxm.load(tmp_path / "m.safetensors", _model())
    x = torch.randn(2, 2048).half()
    assert torch.equal(loaded(x), model(x))


def _rewrite(path, name, change):
    """The file with tensor ``name`` changed and the header kept (so only verify=False reads it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(path), metadata=header)


def _nibble_minus_8(values):
    values[0, 0] = (values[0, 0] & 0xF0) | 0x8
    return values


@pytest.mark.parametrize("name,change,message", [
    ("0.values", _nibble_minus_8, "int4 nibble -8 at row 0, slot 0 is outside \\[-7, 7\\]"),
    ("0.scales", lambda s: s.fill_(float("nan")), "scale 0 of row 0 is not finite"),
    ("0.scales", lambda s: s.fill_(float("inf")), "scale 0 of row 0 is not finite"),
    ("0.scales", lambda s: s.neg_(), "scale 0 of row 0 is negative"),
    ("0.scales", lambda s: s.zero_(), "is 0 but its group holds non-zero codes"),
    ("0.scales", lambda s: s[:, :1].contiguous(), "scales of a 8x64 2:4 packed int4-g32 weight must be torch.float32 "
                                                  "\\(8, 2\\), got torch.float32 \\(8, 1\\)"),
    ("0.scales", lambda s: s.double(), "must be torch.float32 \\(8, 2\\), got torch.float64"),
    ("0.values", lambda v: v.to(torch.int8), "values of a 8x64 .* must be torch.uint8"),
])
def test_checkpoint_refuses_corrupt_quantized_layers(tmp_path, name, change, message):
    model = nn.Sequential(nn.Linear(64, 8))
    nxm.sparsify(model, "2:4", include=["0"], weight_bits=4, group_size=32)
    path = tmp_path / "m.safetensors"
    nxm.save(model, path)
    _rewrite(path, name, change)
    with pytest.raises(nxm.CheckpointError, match="does not match its checksum|is .* but its checksum"):
        nxm.load(path)
    with pytest.raises(nxm.CheckpointError, match=message):
        nxm.load(path, verify=False)


def test_checkpoint_header_encoding_checked(tmp_path):
    model = nn.Sequential(nn.Linear(64, 8))
    nxm.sparsify(model, "2:4", include=["0"], weight_bits=8)
    path = tmp_path / "m.safetensors"
    nxm.save(model, path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        header, tensors = json.loads(f.metadata()["nxm"]), {k: f.get_tensor(k) for k in f.keys()}
    header["layers"]["0"]["encoding"] = "int3"
    save_file(tensors, str(path), metadata={"nxm": json.dumps(header)})
    with pytest.raises(nxm.CheckpointError, match="unknown encoding 'int3'"):
        nxm.load(path, verify=False)


def test_cli_sparsify_bits_and_inspect(tmp_path, capsys):
    from nxm_kernels import cli

    out = tmp_path / "demo.nxm.safetensors"
    assert cli.main(["sparsify", "demo", "-o", str(out), "--exclude", "head", "--bits", "4", "--group-size", "32",
                     "-q"]) == 0
    assert "int4-g32 (error" in capsys.readouterr().out
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "scales min/mean/max" in shown and " int4-g32 " in shown
    model = nxm.load(out, cli.DemoTransformer().half())
    assert model.blocks[0].up.weight_sparse.encoding == "int4-g32"
    assert cli.main(["sparsify", "demo", "-o", str(out), "--bits", "8", "--group-size", "6", "-q"]) == 1
    assert "group_size=6 must be a multiple of the pattern's block width 4" in capsys.readouterr().err


def test_one_shot_quantized_rows_on_a_tiny_model():
    from nxm_kernels import quant_demo

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    x = torch.randn(50, 32)
    labels = dense(x).argmax(-1)

    def make():
        model = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                                for m in dense])
        model.load_state_dict(dense.state_dict())
        return model

    rows = quant_demo.one_shot_rows(make, lambda m: float((m(x).argmax(-1) == labels).float().mean()))
    assert [r["variant"] for r in rows] == ["2:4 fp", "2:4 int8 per row", "2:4 int4 g128"]
    fp, int8, int4 = (r["weight_bytes"] / r["dense_weight_bytes"] for r in rows)
    assert int4 < int8 < fp and rows[0]["max_quant_error"] == 0 < rows[1]["max_quant_error"] < rows[2]["max_quant_error"]
    assert all(0 <= r["accuracy"] <= 1 and r["layers"] == 3 for r in rows)
    assert "| 2:4 int4 g128 |" in quant_demo.table(rows, 1.0)


def test_opcheck_sparse_linear_quantized():
    layer = nxm.SparseLinear.from_dense(nn.Linear(64, 16), "2:4", weight_bits=4, group_size=32)
    x = torch.randn(3, 64, requires_grad=True)
    args = (x, layer.values, layer.metadata, layer.bias, list(layer.padded_shape), 16, "2:4", "packed", "auto",
            None, None, "", [], None, None, layer.scales, "int4-g32", 0)
    torch.library.opcheck(torch.ops.nxm.sparse_linear.default, args)
    assert torch.equal(torch.ops.nxm.sparse_linear(*args), layer(x))


def test_sizes_count_quantized_layers_in_their_float_dtype(tmp_path):
    from nxm_kernels.checkpoint import layer_bytes

    model = nn.Sequential(nn.Linear(128, 64, bias=False)).half()
    report = nxm.sparsify(model, "2:4", include=["0"], weight_bits=4, group_size=128)
    stored, dense = layer_bytes(model[0])
    assert dense == 128 * 64 * 2 and stored == 64 * 32 + 64 * 16 + 64 * 4  # codes, metadata, scales
    assert report.params_after == 64 * 64  # the kept weights, not the bytes holding them
