"""Quantization-aware N:M training: every sparsifier trains through nxm.fake_quant with a
straight-through gradient, ADMM's Z lies on the N:M quantized grid, finalize() leaves weights that
compress exactly, and sparsify() of the trained model (its configuration read from the marks)
gives the trained model's outputs."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm
from nxm_kernels.training import ADMMSparsifier, MagnitudePruner, SRSTESparsifier

CONFIGS = [dict(weight_bits=8), dict(weight_bits=4, group_size=16), dict(weight_bits=8, act_bits=8)]
METHODS = {
    "magnitude": lambda m, q: MagnitudePruner(m, "2:4", **q),
    "srste": lambda m, q: SRSTESparsifier(m, "2:4", **q),
    "admm": lambda m, q: ADMMSparsifier(m, "2:4", rho=0.3, update_every=2, penalty="proximal", **q),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 32))


def _train(model, sparsifier, steps, x):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        (model(x) - x.flip(-1)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sparsifier.step()


def _layer_inputs(model, names, x):
    """Each named layer's input in a forward pass of ``model`` on ``x``."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0]))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("quant", CONFIGS, ids=lambda q: "-".join(f"{k}{v}" for k, v in q.items()))
def test_finalize_then_sparsify_equals_the_trained_model(method, quant):
    model, x = _model(), torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    sparsifier = METHODS[method](model, quant)
    _train(model, sparsifier, 6, x)
    sparsifier.finalize()
    for name, module in sparsifier.targets.items():
        w = module.weight.detach()
        assert module._nxm_sparsity == {"pattern": "2:4", "by": sparsifier.kind, "weight_bits": quant["weight_bits"],
                                        "group_size": quant.get("group_size"), "act_bits": quant.get("act_bits")}
        sw = nxm.compress(w, "2:4", bits=quant["weight_bits"], group_size=quant.get("group_size"))
        assert torch.equal(nxm.decompress(sw), w), name  # exactly representable
    _train(model, sparsifier, 3, x)  # masked QAT fine-tuning: the weights leave the grid, the forward does not
    model.eval()
    trained = copy.deepcopy(model)
    report = nxm.sparsify(model)  # weight_bits/group_size/act_bits from the marks
    assert set(report.converted) == set(sparsifier.targets) == {"0", "2", "4"}
    # Layer by layer on the same inputs: the stored layer multiplies the same rounded values as the
    # fake-quantized forward (activation codes too), so only the fp32 summation order differs:
    # at most K * eps relative to the sum of |terms|.
    inputs = _layer_inputs(trained, list(report.converted), x)
    for name in report.converted:
        ours, stored = trained.get_submodule(name), model.get_submodule(name)
        with torch.no_grad():
            y, y_stored = ours(inputs[name]), stored(inputs[name])
            terms = inputs[name].abs() @ ours.weight.abs().T + ours.bias.abs()
        assert torch.all((y - y_stored).abs() <= inputs[name].shape[-1] * torch.finfo(torch.float32).eps * terms), name
    if "act_bits" not in quant:  # the whole model too (activation rounding could flip on a last-bit difference)
        with torch.no_grad():
            y, y_stored = trained(x), model(x)
        assert torch.allclose(y, y_stored, rtol=0, atol=3 * 64 * torch.finfo(torch.float32).eps * float(y.abs().max()))


def test_forward_is_fake_quant_with_a_straight_through_gradient():
    model, x = _model(), torch.randn(8, 32, requires_grad=True)
    SRSTESparsifier(model, "2:4", weight_bits=4, group_size=16, decay=0.0)
    layer = model[0]
    y = layer(x)
    w = layer.weight.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    expected = F.linear(x2, nxm.fake_quant(w, "2:4", 4, 16), layer.bias)
    assert torch.equal(y, expected)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    assert torch.equal(layer.weight.grad, g.T @ x2)  # straight through selection and rounding
    assert torch.equal(x.grad, x2.grad)


def test_admm_z_is_on_the_quantized_grid_and_its_forward_dense_rounded():
    model, x = _model(), torch.randn(24, 32)
    admm = ADMMSparsifier(model, "2:4", rho=0.3, update_every=2, penalty="proximal", weight_bits=4, group_size=16)
    _train(model, admm, 4, x)
    for name, z in admm.Z.items():
        assert nxm.is_nm_sparse(z, "2:4")
        assert torch.equal(nxm.fake_quant(z, "2:4", 4, 16), z), name
    w = model[0].weight.detach()
    y = model[0](x)
    assert int((w != 0).sum()) == w.numel()  # the W-step keeps W dense ...
    rounded = nxm.decompress(nxm.compress(w, "2:4", bits=4, group_size=16))
    assert int((F.linear(x, rounded, model[0].bias) - y).abs().max() > 0)  # ... and the forward does not prune
    admm.remove()
    assert "forward" not in model[0].__dict__ and torch.equal(model[0](x), F.linear(x, w, model[0].bias))


def test_bad_quantization_settings_are_refused():
    with pytest.raises(ValueError, match="bits=8"):
        MagnitudePruner(_model(), "2:4", weight_bits=3)
    with pytest.raises(ValueError, match="group_size=6 must be a multiple"):
        MagnitudePruner(_model(), "2:4", weight_bits=4, group_size=6)
    with pytest.raises(ValueError, match="act_bits=8 .* needs weight_bits"):
        MagnitudePruner(_model(), "2:4", act_bits=8)


@pytest.mark.slow
def test_experiment_runner_quick_writes_resumable_rows(tmp_path):
    """experiments/nxmiformer.py --quick: a tiny BERT through QAT with distillation of logits and
    block outputs, a searched plan; the JSON has the issue's fields, and a rerun adds nothing."""
    import importlib.util
    import json
    from pathlib import Path

    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "nxmiformer", Path(__file__).resolve().parent.parent / "experiments" / "nxmiformer.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    argv = ["--quick", "--quiet", "--out", str(tmp_path), "--configs", "2:4 int4 g128;search 93%", "--methods", "admm"]
    runner.main(argv)
    record = json.loads((tmp_path / "nxmiformer.json").read_text())
    assert [(c["name"], c["method"]) for c in record["configs"]] == [("2:4 int4 g128", "admm"), ("search 93%", "admm")]
    for entry in record["configs"]:
        assert {"name", "method", "compression", "compression_actual", "accuracy", "dense_accuracy", "retention",
                "seeds", "minutes"} <= set(entry)
        assert entry["retention"] == pytest.approx(entry["accuracy"] / entry["dense_accuracy"])
        assert entry["exact"] and entry["compression_actual"] < entry["compression"]
    assert record["configs"][0]["compression"] == 0.9375 and record["configs"][1]["compression"] >= 0.93
    assert "| search 93% | admm |" in (tmp_path / "nxmiformer.md").read_text()
    runner.main(argv)  # every row is there: nothing runs again
    assert len(json.loads((tmp_path / "nxmiformer.json").read_text())["runs"]) == 2
