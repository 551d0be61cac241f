"""One-shot pruning: the methods against each other and against brute force, calibration forms,
sequential block calibration, marks."""

import pytest
import torch
from torch import nn

import nxm_kernels as nxm
from nxm_kernels.pattern import Pattern
from nxm_kernels.training import prune
from nxm_kernels.training.layerwise_admm import admm, ramp_mask, ramp_share
from nxm_kernels.training.oneshot import relative_error
from nxm_kernels.training.sparsegpt import sparsegpt

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")


def correlated_inputs(tokens, features, seed):
    """Inputs with a few shared factors (features correlate) and scales spread over 100x."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, features, generator=torch.Generator().manual_seed(100))
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=torch.Generator().manual_seed(101))]
    x = torch.randn(tokens, 8, generator=g) @ mixing + 0.3 * torch.randn(tokens, features, generator=g)
    return x * scales


def gram(x):
    return x.double().T @ x.double()


def layer(out_features=16, in_features=32, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, out_features, dtype=dtype))


def held_out_error(model, weight0, x):
    y0 = x @ weight0.T
    return float((model(x) - model[0].bias - y0).pow(2).sum() / y0.pow(2).sum())


def test_methods_rank_on_held_out_inputs():
    calibration, held_out = correlated_inputs(1024, 32, seed=1), correlated_inputs(1024, 32, seed=2)
    errors = {}
    for method in METHODS:
        model = layer()
        weight0 = model[0].weight.detach().clone()
        prune(model, "2:4", method=method, calibration=calibration.split(128), progress=False)
        with torch.no_grad():
            errors[method] = held_out_error(model, weight0, held_out)
    assert errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] <= 0.8 * errors["magnitude"]
    assert errors["admm"] < errors["sparsegpt"], errors


def brute_force_sparsegpt(w0, h, pattern, damp):
    """Column by column: choose each group's mask by w_j^2 / [(H_{j:,j:})^-1]_00^2 (explicit
    inverses), freeze column j (zero if pruned), then set the columns right of j to the exact
    least-squares optimum given the frozen ones."""
    h = h + damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    w = w0.clone()
    columns = w.shape[1]
    for row in range(w.shape[0]):
        keep = [True] * columns
        for j in range(columns):
            if j % pattern.m == 0:
                scores = [
                    float(w[row, c] ** 2 / torch.linalg.inv(h[c:, c:])[0, 0] ** 2) for c in range(j, j + pattern.m)
                ]
                ranked = sorted(range(pattern.m), key=lambda i: (-scores[i], i))  # ties: lower index kept
                for i in ranked[pattern.n :]:
                    keep[j + i] = False
            if not keep[j]:
                w[row, j] = 0
            frozen, rest = slice(0, j + 1), slice(j + 1, columns)
            if j + 1 < columns:
                shift = h[rest, frozen] @ (w[row, frozen] - w0[row, frozen])
                w[row, rest] = w0[row, rest] - torch.linalg.solve(h[rest, rest], shift)
    return w


@pytest.mark.parametrize("block_size", [4, 128])
def test_sparsegpt_equals_brute_force_obs(block_size):
    x = correlated_inputs(24, 8, seed=3).double()
    w0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pattern = Pattern(2, 4)
    got = sparsegpt(w0, gram(x), pattern, block_size=block_size)
    expected = brute_force_sparsegpt(w0, gram(x), pattern, damp=0.01)
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def exact_least_squares(w0, h, mask):
    """Per row, the kept weights minimising (w - w0) H (w - w0)^T with the others zero."""
    w = torch.zeros_like(w0)
    for row in range(w0.shape[0]):
        kept = mask[row]
        w[row, kept] = torch.linalg.solve(h[kept][:, kept], (h @ w0[row])[kept])
    return w


def test_admm_with_a_fixed_mask_converges_to_least_squares():
    x = correlated_inputs(64, 16, seed=5).double()
    h = gram(x)
    w0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mask = nxm.nm_mask(w0, "2:4")
    # Undamped, this H has condition number ~1600 in scaled coordinates: rho near the geometric
    # mean of its extreme eigenvalues (0.1) converges in a few hundred iterations.
    result = admm(w0, h, Pattern(2, 4), iterations=400, rho=0.1, ramp=0, damp=0.0, mask=mask)
    expected = exact_least_squares(w0, h, mask)
    assert torch.equal(result.mask, mask)
    torch.testing.assert_close(result.weight, expected, rtol=1e-8, atol=1e-10)
    # Without mask=, ramp=0 fixes Wanda's mask: |w_ij| * ||x_j||.
    wanda_mask = nxm.nm_mask(w0, "2:4", scores=w0.abs() * h.diagonal().sqrt())
    assert torch.equal(admm(w0, h, Pattern(2, 4), ramp=0).mask, wanda_mask)


def test_admm_ramp_schedule_keeps_the_pattern_winners():
    assert ramp_share(14, 15, 0.5) == 0.5  # the last ramp iteration prunes the whole share
    assert ramp_share(0, 15, 0.5) == pytest.approx(0.5 * (1 - (14 / 15) ** 3))
    shares = [ramp_share(t, 15, 0.5) for t in range(15)]
    assert all(a < b for a, b in zip(shares, shares[1:]))
    v = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    winners = nxm.nm_mask(v, "2:4")
    for share in (0.0, 0.1, 0.3, 0.5):
        kept = ramp_mask(v, winners, share)
        assert bool(kept[winners].all())
        assert int((~kept).sum()) == round(share * v.numel())
        if 0 < share < 0.5:  # the pruned entries are the smallest of the non-winners
            assert float(v.abs()[~kept].max()) < float(v.abs()[kept & ~winners].min())


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "2:8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_ends_exactly_on_the_pattern_deterministically(method, pattern):
    calibration = correlated_inputs(256, 32, seed=8).split(64)
    weights = []
    for _ in range(2):
        model = layer()
        report = prune(model, pattern, method=method, calibration=calibration, progress=False)
        weights.append(model[0].weight.detach().clone())
        assert nxm.is_nm_sparse(weights[-1], pattern)
        n, m = Pattern.parse(pattern).n, Pattern.parse(pattern).m
        assert int((weights[-1] != 0).sum()) == weights[-1].numel() * n // m
        assert list(report.layers) == ["0"] and report.layers["0"].method == method
        assert report.layers["0"].error == pytest.approx(
            relative_error(layer()[0].weight.detach(), weights[-1], gram(torch.cat(calibration)).float()), rel=1e-4
        )
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("pattern", ["2:4t", "8:4x4", "4x4{f0f0,0f0f}"])
def test_other_pattern_kinds(pattern):
    calibration = correlated_inputs(256, 32, seed=8).split(64)
    errors = {}
    for method in ("magnitude", "wanda", "admm"):
        model = layer()
        errors[method] = prune(model, pattern, method=method, calibration=calibration, progress=False).mean_error
        assert nxm.is_nm_sparse(model[0].weight.detach(), pattern)
    assert errors["admm"] < errors["wanda"] < errors["magnitude"]
    with pytest.raises(ValueError, match="knows the row n:m kind only.*use the admm or wanda method"):
        prune(layer(), pattern, method="sparsegpt", calibration=calibration, progress=False)


class Block(nn.Module):
    """A residual block whose forward takes a keyword argument from the model."""

    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, gate=None):
        h = torch.relu(self.up(x))
        return x + self.down(h if gate is None else h * gate)


class ToyModel(nn.Module):
    """Takes (tokens, gate) positionally or as keywords, like a Hugging Face model; a head."""

    def __init__(self, dim=16, vocab=32, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids, gate=None):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, gate=gate)
        return self.lm_head(x)


def toy_batches(count=4, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 32, (2, 8), generator=g), torch.rand(2, 8, 32, generator=g) + 0.5) for _ in range(count)]


def test_calibration_as_tensors_tuples_and_dicts():
    batches = toy_batches()
    results = {}
    for form, calibration in {
        "tuples": batches,
        "dicts": [{"input_ids": ids, "gate": gate} for ids, gate in batches],
    }.items():
        torch.manual_seed(0)
        model = ToyModel()
        report = prune(model, "2:4", method="sparsegpt", calibration=calibration, progress=False)
        assert list(report.layers) == ["layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"]
        assert "lm_head" in report.skipped
        results[form] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(results["tuples"], results["dicts"]))
    # Tensors: the model's single positional input (no gate).
    torch.manual_seed(0)
    model = ToyModel()
    prune(model, "2:4", method="wanda", calibration=[ids for ids, _ in batches], progress=False)
    assert nxm.is_nm_sparse(model.layers[1].down.weight.detach(), "2:4")


def test_blocks_are_calibrated_on_the_pruned_outputs_of_the_blocks_before():
    batches = toy_batches()
    torch.manual_seed(0)
    model = ToyModel()
    dense = [p.detach().clone() for p in model.layers[1].up.parameters()]
    prune(model, "2:4", method="sparsegpt", calibration=batches, progress=False)

    def inputs_of_block_1(first_block):
        with torch.no_grad():
            return torch.cat([first_block(model.embed(ids), gate=gate).flatten(0, 1) for ids, gate in batches])

    pruned_h = gram(inputs_of_block_1(model.layers[0])).float()
    expected = sparsegpt(dense[0], pruned_h, Pattern(2, 4)).float()
    torch.testing.assert_close(model.layers[1].up.weight.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    dense_model = ToyModel()
    dense_h = gram(inputs_of_block_1(dense_model.layers[0])).float()
    assert not torch.allclose(sparsegpt(dense[0], dense_h, Pattern(2, 4)).float(), expected, rtol=1e-4, atol=1e-5)


def test_sparsify_converts_exactly_the_pruned_layers():
    torch.manual_seed(0)
    model = ToyModel()
    report = prune(model, "2:4", method="wanda", calibration=toy_batches(), include="layers.0.*", progress=False)
    assert list(report.layers) == ["layers.0.up", "layers.0.down"]
    ids = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        before = model(ids)
        converted = nxm.sparsify(model)
        after = model(ids)
    assert sorted(converted.converted) == ["layers.0.down", "layers.0.up"]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_hugging_face_decoder_is_pruned_block_by_block():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(10)
    calibration = [{"input_ids": torch.randint(0, 64, (1, 16), generator=g)} for _ in range(3)]
    report = prune(model, "2:4", method="admm", calibration=calibration, progress=False)
    assert len(report.layers) == 2 * 7 and "lm_head" in report.skipped
    for name, linear in model.named_modules():
        if isinstance(linear, nn.Linear) and name != "lm_head":
            assert nxm.is_nm_sparse(linear.weight.detach(), "2:4"), name
    assert all(0 < r.error < 1 for r in report.layers.values())
    with torch.no_grad():
        assert torch.isfinite(model(**calibration[0]).logits).all()


def test_clear_errors():
    model = layer()
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        prune(model, "2:4", method="obs", calibration=[torch.randn(4, 32)])
    with pytest.raises(ValueError, match="needs calibration inputs"):
        prune(model, "2:4", method="wanda")
    with pytest.raises(TypeError, match=r"takes no option\(s\) rho \(its options: damp, block_size\)"):
        prune(model, "2:4", method="sparsegpt", calibration=[torch.randn(4, 32)], rho=1.0)
    with pytest.raises(TypeError, match="calibration input must be a tensor, a tuple"):
        prune(model, "2:4", method="wanda", calibration=["text"], progress=False)
    with pytest.raises(ValueError, match="ramp=0 with mask="):
        admm(torch.randn(4, 8), torch.eye(8), Pattern(2, 4), mask=torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt(torch.randn(2, 4), -torch.eye(4), Pattern(2, 4))


def test_progress_reports_every_layer(capsys):
    calls = []
    prune(ToyModel(), "2:4", method="magnitude", progress=lambda done, total, name: calls.append((done, total, name)))
    names = ["layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"]
    assert calls == [(i + 1, 4, n) for i, n in enumerate(names)]
    prune(ToyModel(), "2:4", method="magnitude")
    assert "[4/4] magnitude layers.1.down 32->16" in capsys.readouterr().err


def test_dead_inputs_are_pruned_first_and_kept_finite():
    x = correlated_inputs(64, 8, seed=11).double()
    x[:, 3] = 0  # a feature that is always zero
    w0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for w in (sparsegpt(w0, gram(x), Pattern(2, 4)), admm(w0, gram(x), Pattern(2, 4)).weight):
        assert torch.isfinite(w).all() and bool((w[:, 3] == 0).all()) and nxm.is_nm_sparse(w, "2:4")



def tiny_llama_directory(path):
    """A tiny LlamaForCausalLM and a word-level tokenizer, saved with save_pretrained (no download)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "to be or not that is the question whether tis nobler in mind suffer slings and arrows".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return " ".join(words * 8)


@pytest.mark.parametrize(
    "method, options", [("sparsegpt", []), ("admm", ["--iterations", "6", "--ramp", "4", "--rho", "0.5"])]
)
def test_nxm_prune_a_tiny_causal_lm(tmp_path, capsys, method, options):
    from nxm_kernels import cli

    text = tiny_llama_directory(tmp_path / "llama")
    (tmp_path / "calibration.txt").write_text(text)
    out = tmp_path / "llama.nxm.safetensors"
    argv = ["prune", str(tmp_path / "llama"), "--calibration", str(tmp_path / "calibration.txt"), "--samples", "3",
            "--seq-len", "16", "--method", method, *options, "-o", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"pruned 14 linear layer(s) to 2:4 with {method}" in captured.out and "- lm_head: " in captured.out
    assert "converted 14 layer(s)" in captured.out and "14/14" in captured.err  # the progress bar
    checkpoint = nxm.load(out)
    assert len(checkpoint.layers) == 14 and checkpoint.header["info"]["pruned"]["method"] == method
    assert cli.main(["prune", str(tmp_path / "llama"), "--calibration", str(tmp_path / "calibration.txt"),
                     "--method", "sparsegpt", "--rho", "1", "-o", str(out), "-q", "--seq-len", "16"]) == 1
    assert "takes no option(s) rho" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["magnitude", "wanda", "sparsegpt"])
def test_admm_sparsifier_starts_from_a_one_shot_mask(init):
    from nxm_kernels.training import ADMMSparsifier

    batches = toy_batches()
    torch.manual_seed(0)
    model = ToyModel()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier = ADMMSparsifier(model, "2:4", init=init, calibration=batches)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())  # the model is not pruned
    torch.manual_seed(0)
    reference = ToyModel()
    prune(reference, "2:4", method=init, calibration=batches, progress=False)
    for name in sparsifier.targets:
        torch.testing.assert_close(sparsifier.Z[name], reference.get_submodule(name).weight.detach(), rtol=0, atol=0)
        assert not sparsifier.U[name].any()
    if init != "magnitude":  # a calibrated start differs from projecting the dense weights
        projected = {n: nxm.project(m.weight.detach(), "2:4") for n, m in sparsifier.targets.items()}
        assert any(not torch.equal(sparsifier.Z[n], projected[n]) for n in projected)
    with pytest.raises(ValueError, match="init must be None or one of"):
        ADMMSparsifier(ToyModel(), "2:4", init="obs")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_half_precision_layers_are_calibrated_in_fp32(method, dtype):
    model = layer(dtype=dtype)
    calibration = correlated_inputs(256, 32, seed=15).to(dtype).split(64)
    report = prune(model, "2:4", method=method, calibration=calibration, progress=False)
    weight = model[0].weight.detach()
    assert weight.dtype == dtype and nxm.is_nm_sparse(weight, "2:4")
    magnitude = layer(dtype=dtype)
    baseline = prune(magnitude, "2:4", method="magnitude", calibration=calibration, progress=False)
    assert report.layers["0"].error < 0.5 * baseline.layers["0"].error  # calibration still pays


GRIDS = [(4, None), (4, 16), (8, None), (8, 16)]


@pytest.mark.parametrize("bits, group_size", GRIDS)
@pytest.mark.parametrize("method", METHODS)
def test_weight_bits_end_on_the_pattern_and_exactly_on_the_grid(method, bits, group_size):
    model = layer()
    calibration = correlated_inputs(256, 32, seed=8).split(64)
    prune(model, "2:4", method=method, calibration=calibration, progress=False, weight_bits=bits,
          group_size=group_size)
    weight = model[0].weight.detach()
    assert nxm.is_nm_sparse(weight, "2:4")
    requantized = nxm.fake_quant(weight, "2:4", bits, group_size)
    assert torch.equal(requantized.view(torch.int32), weight.view(torch.int32))  # bit for bit, signs of 0 too
    assert model[0]._nxm_sparsity == {"pattern": "2:4", "by": method, "weight_bits": bits, "group_size": group_size,
                                      "act_bits": None}


def pruned_then_rounded(method, bits, group_size, calibration):
    model = layer()
    prune(model, "2:4", method=method, calibration=calibration, progress=False)
    with torch.no_grad():
        model[0].weight.copy_(nxm.fake_quant(model[0].weight.detach(), "2:4", bits, group_size))
    return model


@pytest.mark.parametrize("bits, group_size", GRIDS)
def test_joint_quantization_beats_rounding_afterwards(bits, group_size):
    calibration, held_out = correlated_inputs(1024, 32, seed=1).split(128), correlated_inputs(1024, 32, seed=2)
    weight0 = layer()[0].weight.detach().clone()
    errors = {}
    with torch.no_grad():
        for method in ("sparsegpt", "admm"):
            joint = layer()
            prune(joint, "2:4", method=method, calibration=calibration, progress=False, weight_bits=bits,
                  group_size=group_size)
            errors[method] = held_out_error(joint, weight0, held_out)
        for method in ("magnitude", "sparsegpt", "admm"):
            errors[f"{method} then rounded"] = held_out_error(
                pruned_then_rounded(method, bits, group_size, calibration), weight0, held_out)
    assert errors["admm"] <= errors["admm then rounded"], errors
    assert errors["admm"] < 0.1 * errors["magnitude then rounded"], errors
    if bits == 8:  # int8's rounding error is small: the pruning decides, and ADMM prunes best
        assert errors["admm"] < errors["sparsegpt then rounded"], errors
    else:  # int4's rounding error dominates: SparseGPT's joint sweep pays, and beats ADMM's
        assert errors["sparsegpt"] < errors["sparsegpt then rounded"], errors


def test_sparsify_stores_the_quantized_pruned_layers():
    torch.manual_seed(0)
    model = ToyModel()
    prune(model, "2:4", method="sparsegpt", calibration=toy_batches(), progress=False, weight_bits=4, group_size=16)
    pruned = {name: model.get_submodule(name).weight.detach().clone() for name in ("layers.0.up", "layers.1.down")}
    ids = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        before = model(ids)
        converted = nxm.sparsify(model)
        after = model(ids)
    assert len(converted.converted) == 4
    for name, weight in pruned.items():
        layer_ = model.get_submodule(name)
        assert isinstance(layer_, nxm.SparseLinear) and str(layer_._encoding) == "int4-g16"
        assert torch.equal(layer_.to_dense().weight, weight)  # the stored codes are exactly the pruned weights
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_weight_bits_refusals():
    calibration = [torch.randn(4, 32)]
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        prune(layer(), "2:4", method="admm", calibration=calibration, weight_bits=3)
    with pytest.raises(ValueError, match="group_size=6 must be a multiple of the pattern's block width 4"):
        prune(layer(), "2:4", method="sparsegpt", calibration=calibration, weight_bits=4, group_size=6)
    with pytest.raises(ValueError, match="give bits=8 or bits=4 with it"):
        prune(layer(), "2:4", method="wanda", calibration=calibration, group_size=16)
