"""The per-layer configuration search: the knapsack is optimal, the plan meets its target and is
deterministic for a seed, both compressions are counted right, and a plan round-trips through
JSON into sparsify and the sparsifiers."""

import copy
import itertools
import json

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels.cli import DemoTransformer
from nxm_kernels.plan import LayerConfig, load_plan, parse_config
from nxm_kernels.training import MagnitudePruner, search
from nxm_kernels.training.search import choose

CANDIDATES = ["2:4 fp", "2:4 int8", "2:4 int4 g16", "1:4 int8"]


def _model():
    torch.manual_seed(0)
    return DemoTransformer(vocab=50, dim=32, heads=2, hidden=64, depth=2, classes=4).eval()


def _calibration(n=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (2, 12), generator=g) for _ in range(n)]


def test_knapsack_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        groups, options = 4, 3
        sens = torch.rand(groups, options, generator=g).tolist()
        costs = torch.randint(1, 40, (groups, options), generator=g).tolist()
        budget = int(torch.randint(40, 120, (), generator=g))
        feasible = [c for c in itertools.product(range(options), repeat=groups)
                    if sum(costs[k][i] for k, i in enumerate(c)) <= budget]
        if not feasible:
            with pytest.raises(ValueError, match="no combination"):
                choose(sens, costs, budget, resolution=budget)
            continue
        best = min(sum(sens[k][i] for k, i in enumerate(c)) for c in feasible)
        chosen = choose(sens, costs, budget, resolution=budget)  # exact
        assert sum(costs[k][i] for k, i in enumerate(chosen)) <= budget
        assert sum(sens[k][i] for k, i in enumerate(chosen)) == pytest.approx(best, abs=1e-12)
        try:  # rounded up to 1/7 of the budget: never over it (or nothing fits), maybe not optimal
            coarse = choose(sens, costs, budget, resolution=7)
        except ValueError:
            continue
        assert sum(costs[k][i] for k, i in enumerate(coarse)) <= budget


def test_search_meets_its_target_and_counts_both_compressions():
    model, calibration = _model(), _calibration()
    result = search(model, CANDIDATES, calibration, 0.9)
    assert len(result.plan) == 12  # q, k, v, o, up, down of 2 blocks; the head stays dense
    assert result.compression >= 0.9
    assert len({str(c) for c in result.plan.values()}) > 1  # heterogeneous: 2:4 int8 alone is 87.5%
    for name, config in result.plan.items():
        scores = result.sensitivity[name]
        assert set(scores) == set(CANDIDATES) and all(s > 0 for s in scores.values())  # each changes the output
    total = {c: sum(result.sensitivity[n][c] for n in result.plan) for c in CANDIDATES}
    assert total["1:4 int8"] > 2 * total["2:4 int8"]  # keeping 1 of 4 costs far more than 2 of 4
    # By hand: value bits against fp32, and the bytes compress stores
    weights = {n: model.get_submodule(n).weight.detach() for n in result.plan}
    fp32_bits = sum(w.numel() * 32 for w in weights.values())
    bits = sum(w.numel() * c.pattern.n // c.pattern.m * c.weight_bits for n, (w, c) in
               ((n, (weights[n], result.plan[n])) for n in result.plan))
    stored = sum(nxm.compress(weights[n], c.pattern, bits=c.weight_bits, group_size=c.group_size).nbytes
                 for n, c in result.plan.items())
    assert result.compression == pytest.approx(1 - bits / fp32_bits)
    assert result.compression_actual == pytest.approx(1 - stored / (fp32_bits / 8))
    assert result.compression_actual < result.compression  # metadata and scales cost bytes

    uniform = search(model, ["2:4 int8"], calibration, 0.875)  # exactly the budget: the DP counts exactly
    assert uniform.compression == 0.875  # the paper's count for 2:4 int8
    with pytest.raises(ValueError, match="at most 87.50% compression"):
        search(model, ["2:4 int8"], calibration, 0.9)


def test_search_is_deterministic_for_a_seed():
    model, calibration = _model(), _calibration(10)
    runs = [search(model, CANDIDATES, calibration, 0.9, samples=4, seed=s) for s in (1, 1, 2)]
    assert runs[0].to_dict() == runs[1].to_dict()
    assert runs[0].sensitivity != runs[2].sensitivity  # another seed draws other calibration inputs


def test_plan_round_trips_through_json_sparsify_and_the_sparsifiers(tmp_path):
    model, calibration = _model(), _calibration()
    result = search(model, CANDIDATES, calibration, 0.9)
    path = tmp_path / "plan.json"
    result.save(path)
    assert load_plan(path) == result.plan
    assert set(json.loads(path.read_text())["blocks.0.query"]) == {"pattern", "weight_bits", "group_size", "act_bits"}

    stored = copy.deepcopy(model)
    report = nxm.sparsify(stored, plan=str(path))
    assert set(report.converted) == set(result.plan) and "head" in report.skipped
    for name, config in result.plan.items():
        sw = stored.get_submodule(name).weight_sparse
        assert parse_config(f"{sw.pattern} {sw.encoding}".replace("-g", " g").replace("float", "fp")) == config, name

    trained = copy.deepcopy(model)
    pruner = MagnitudePruner(trained, plan=path)  # trains through each layer's configuration
    assert {n: c for n, c in pruner.configs.items()} == result.plan
    x = calibration[0]
    with torch.no_grad():
        expected, got = trained(x), stored(x)
    # fp32 summation order only, through 3 products of up to 64 terms each
    tol = 64 * 3 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert torch.allclose(got, expected, rtol=0, atol=tol)
    resparsified = nxm.sparsify(trained)  # the marks carry the plan's configurations
    assert set(resparsified.converted) == set(result.plan)


def test_bad_candidates_and_plans_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dense layer with weight_bits=8"):
        parse_config("dense int8")
    with pytest.raises(ValueError, match="expected fp, int8, int4"):
        parse_config("2:4 int3")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"blocks.9.query": LayerConfig.make("2:4", 8).as_dict()}))
    with pytest.raises(ValueError, match="no nn.Linear of"):
        nxm.sparsify(_model(), plan=path)
    with pytest.raises(ValueError, match="without"):
        MagnitudePruner(_model(), plan={"blocks.0.query": {"pattern": "2:4"}}, weight_bits=8)
