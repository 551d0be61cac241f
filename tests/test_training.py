"""The training library: ADMM, one-shot magnitude and SR-STE on tiny models, exact N:M results,
masked fine-tuning under momentum and weight decay, state save/resume, and a convergence test."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm
from conftest import TinyTransformerNames, tiny_bert_config
from nxm_kernels.training import ADMMSparsifier, MagnitudePruner, SRSTESparsifier, geometric_rho


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyTransformerNames()


def _assert_exact_nm(sparsifier, pattern="2:4"):
    for name, module in sparsifier.targets.items():
        w = module.weight.detach()
        assert nxm.is_nm_sparse(w, pattern), name
        assert torch.equal(w, w * sparsifier.masks[name]), name
        assert int(sparsifier.masks[name].sum()) == w.numel() // 2, name


def _train(model, sparsifier, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        (loss + sparsifier.penalty()).backward()
        opt.step()
        opt.zero_grad()
        sparsifier.step()
        losses.append(loss.item())
    return losses


# -- settings (target selection: tests/test_selection.py) ------------------------------------
def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rho must be a positive number"):
        ADMMSparsifier(_model(), rho=0)
    with pytest.raises(ValueError, match="update_every must be a positive int"):
        ADMMSparsifier(_model(), update_every=0)
    with pytest.raises(ValueError, match="penalty must be one of"):
        ADMMSparsifier(_model(), penalty="l1")


# -- ADMM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "penalty, make_opt",
    [
        ("loss", lambda p: torch.optim.SGD(p, lr=0.05)),
        ("proximal", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01)),
    ],
)
def test_admm_residual_to_zero_exact_nm_loss_decreases(penalty, make_opt):
    x, y = _data()
    model = _model()
    rho, factor = (1e-2, 1000.0) if penalty == "loss" else (1e-2, 30.0)
    admm = ADMMSparsifier(model, rho=rho, rho_schedule=geometric_rho(factor, 150), update_every=4, penalty=penalty)
    opt = make_opt(model.parameters())
    first = admm.residual()["primal"]
    losses = _train(model, admm, opt, 200, x, y)
    end = admm.residual()
    assert first > 0.3  # a dense weight is far from its 2:4 projection
    assert end["primal"] < 1e-3, end
    assert end["rho"] == pytest.approx(rho * factor)
    before = {n: m.weight.detach().clone() for n, m in admm.targets.items()}
    admm.finalize()
    _assert_exact_nm(admm)
    for name, module in admm.targets.items():
        assert torch.equal(module.weight.detach(), nxm.project(before[name], "2:4"))
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20
    assert admm.penalty().item() == 0 and admm.Z == {} and admm.U == {}


def test_admm_penalty_and_updates_by_hand():
    lin = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[4.0, -3.0, 2.0, 1.0], [0.5, 0.0, -1.0, 2.0]]))
    admm = ADMMSparsifier(lin, rho=0.5, update_every=1, exclude=())
    z0 = torch.tensor([[4.0, -3.0, 0.0, 0.0], [0.0, 0.0, -1.0, 2.0]])
    assert torch.equal(admm.Z["0"], z0) and torch.equal(admm.U["0"], torch.zeros(2, 4))
    # rho/2 ||W - Z + U||^2 = 0.25 * (2^2 + 1^2 + 0.5^2)
    assert admm.penalty().item() == pytest.approx(0.25 * 5.25)
    admm.step()  # Z = project(W + U) = z0, U = W - Z
    assert torch.equal(admm.U["0"], lin[0].weight.detach() - z0)
    # The next Z-step projects W + U: [4,-3,4,2] -> keep 4 (idx 0) and 4 (idx 2).
    admm.step()
    assert torch.equal(admm.Z["0"][0], torch.tensor([4.0, 0.0, 4.0, 0.0]))


def test_rho_change_rescales_the_scaled_dual():
    model = _model()
    admm = ADMMSparsifier(model, rho=1e-2, rho_schedule=lambda step: 1.0 if step < 3 else 4.0, update_every=3)
    for _ in range(3):
        admm.step()  # the third step updates Z/U at rho 1e-2, then rho becomes 4e-2
    assert admm.rho == pytest.approx(4e-2)
    x = torch.randn(8, 8)
    model(x).sum().backward()  # any W: the unscaled dual rho * U must not jump with rho
    name = "blocks.0.up"
    assert torch.allclose(admm.rho * admm.U[name], 1e-2 * (model.blocks[0]["up"].weight.detach() - admm.Z[name]))


def test_proximal_step_is_exact():
    model = _model()
    admm = ADMMSparsifier(model, rho=0.25, update_every=1000, penalty="proximal")
    name, module = "blocks.0.up", model.blocks[0]["up"]
    w = module.weight.detach().clone()
    assert admm.penalty().item() == 0
    admm.step()
    assert torch.allclose(module.weight.detach(), (w + 0.25 * admm.Z[name]) / 1.25)


@pytest.mark.parametrize(
    "rho, factor, update_every, lowest, highest, mask_moves",
    [(3e-3, 30.0, 4, -1.0, -0.5, True), (0.1, 1.0, 16, -0.15, 0.0, False)],  # under-damped, then damped
)
def test_proximal_dual_swings_pruned_weights_through_zero_unless_damped(
    rho, factor, update_every, lowest, highest, mask_moves
):
    """No task gradient: each pruned weight only follows the pull to Z - U. How far it overshoots
    past zero (relative to its start) is the docstring's damping rule, on the real step()."""
    model = _model()
    steps = 336
    admm = ADMMSparsifier(
        model, rho=rho, rho_schedule=geometric_rho(factor, steps), update_every=update_every, penalty="proximal"
    )
    module, name = model.blocks[0]["up"], "blocks.0.up"
    start = module.weight.detach().clone()
    pruned = admm.Z[name] == 0
    ratios = []
    for _ in range(steps):
        admm.step()
        ratios.append((module.weight.detach()[pruned] / start[pruned]).min())
    assert lowest <= float(min(ratios)) <= highest
    # The swing alone, with no gradient to ask for it, moves the mask: |W + U| of a pruned weight
    # outgrows a kept one.
    assert torch.equal(admm.Z[name] == 0, pruned) != mask_moves


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_keep_fp32_master_z_u(dtype):
    model = _model().to(dtype)
    admm = ADMMSparsifier(model, update_every=1)
    assert all(z.dtype == torch.float32 for z in admm.Z.values())
    assert all(u.dtype == torch.float32 for u in admm.U.values())
    admm.penalty().backward()
    admm.step()
    assert model.blocks[0]["up"].weight.dtype == dtype
    admm.finalize()
    _assert_exact_nm(admm)


# -- masked fine-tuning -------------------------------------------------------------------------
OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
}
SPARSIFIERS = {
    "admm": lambda m: ADMMSparsifier(m, rho=1e-2, update_every=2),
    "srste": lambda m: SRSTESparsifier(m),
    "magnitude": lambda m: MagnitudePruner(m),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(SPARSIFIERS))
def test_masked_finetune_keeps_the_pattern(kind, opt_name):
    x, y = _data()
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, _NoSparsifier(), opt, 10, x, y)  # momentum on every weight, pruned ones included
    sparsifier = SPARSIFIERS[kind](model)
    _train(model, sparsifier, opt, 10, x, y)
    sparsifier.finalize()
    masks = {n: m.clone() for n, m in sparsifier.masks.items()}
    at_finalize = {n: m.weight.detach().clone() for n, m in sparsifier.targets.items()}
    for _ in range(15):
        _train(model, sparsifier, opt, 1, x, y)
        _assert_exact_nm(sparsifier)
    assert all(torch.equal(masks[n], sparsifier.masks[n]) for n in masks)
    # The kept weights did train (a frozen model would keep the pattern trivially).
    assert all(not torch.equal(m.weight.detach(), at_finalize[n]) for n, m in sparsifier.targets.items())


class _NoSparsifier:
    def penalty(self):
        return 0

    def step(self):
        pass


def test_masked_gradients_are_zero_where_pruned():
    x, y = _data()
    model = _model()
    pruner = MagnitudePruner(model)
    F.cross_entropy(model(x), y).backward()
    for name, module in pruner.targets.items():
        assert module.weight.grad.abs().sum() > 0
        assert torch.equal(module.weight.grad * ~pruner.masks[name], torch.zeros_like(module.weight))


# -- SR-STE -------------------------------------------------------------------------------------
def test_srste_forward_projected_backward_straight_through_plus_decay():
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    x = torch.randn(5, 8)
    w = lin.weight.detach().clone()
    srste = SRSTESparsifier(model, decay=0.1, exclude=())
    out = model(x)
    assert torch.equal(out, F.linear(x, nxm.project(w, "2:4"), lin.bias))
    g = torch.randn_like(out)
    out.backward(g)
    mask = nxm.nm_mask(w, "2:4")
    assert torch.allclose(lin.weight.grad, g.T @ x + 0.1 * w * ~mask)
    srste.finalize()
    assert "forward" not in lin.__dict__
    assert torch.equal(model(x), F.linear(x, w * mask, lin.bias))


# -- state ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("finalize_at", [None, 6])
def test_state_dict_save_and_resume(finalize_at):
    x, y = _data()

    def setup():
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, opt, ADMMSparsifier(model, rho=1e-2, rho_schedule=geometric_rho(10, 20), update_every=3)

    def run(model, opt, admm, steps, start):
        for step in range(start, start + steps):
            if step == finalize_at:
                admm.finalize()
            _train(model, admm, opt, 1, x, y)

    model, opt, admm = setup()
    run(model, opt, admm, 8, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "admm": admm.state_dict()}, buffer)
    run(model, opt, admm, 8, 8)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors and containers: no pickled code
    model2, opt2, admm2 = setup()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    admm2.load_state_dict(state["admm"])
    run(model2, opt2, admm2, 8, 8)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
    assert admm.rho == admm2.rho and admm.steps == admm2.steps == 16
    if finalize_at is None:
        assert all(torch.equal(admm.Z[n], admm2.Z[n]) and torch.equal(admm.U[n], admm2.U[n]) for n in admm.Z)
    else:
        _assert_exact_nm(admm2)


def test_state_from_another_sparsifier_is_refused():
    state = ADMMSparsifier(_model()).state_dict()
    with pytest.raises(ValueError, match="state is for admm 2:4, this is magnitude 2:4"):
        MagnitudePruner(_model()).load_state_dict(state)
    with pytest.raises(ValueError, match="state targets .* differ"):
        ADMMSparsifier(_model(), include="blocks.0.*").load_state_dict(state)


# -- convergence and conversion ------------------------------------------------------------------
class _TeacherTask:
    """A learnable task: labels from a fixed random 2-layer teacher, fresh samples every batch (no
    overfitting to tune around), and a fixed test set."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(32, 16, generator=self.g) / 32**0.5
        self.w2 = torch.randn(16, 4, generator=self.g)
        self.test = self.batch(2000)

    def batch(self, n=128):
        x = torch.randn(n, 32, generator=self.g)
        return x, (torch.tanh(2 * x @ self.w1) @ self.w2).argmax(1)


@pytest.mark.slow
def test_convergence_on_a_learnable_task():
    """Dense training, then each method sparsifies and fine-tunes for the same number of steps;
    every sparse model must recover most of what hard pruning lost, with exactly 2:4 weights."""
    task = _TeacherTask()
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    exclude = ("4",)  # the head stays dense

    def fit(model, sparsifier, steps, lr):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        losses = []
        for step in range(steps):
            if sparsifier is not None and step == steps // 2:
                sparsifier.finalize()
            x, y = task.batch()
            loss = F.cross_entropy(model(x), y)
            (loss + (sparsifier.penalty() if sparsifier is not None else 0)).backward()
            opt.step()
            opt.zero_grad()
            if sparsifier is not None:
                sparsifier.step()
            losses.append(loss.item())
        return losses

    def acc(model):
        with torch.no_grad():
            return (model(task.test[0]).argmax(1) == task.test[1]).float().mean().item()

    losses = fit(dense, None, 300, lr=3e-3)
    assert sum(losses[-30:]) < 0.5 * sum(losses[:30])
    dense_acc = acc(dense)
    assert dense_acc > 0.8
    hard_pruned = copy.deepcopy(dense)
    MagnitudePruner(hard_pruned, exclude=exclude)
    results = {"pruned, no fine-tune": acc(hard_pruned)}
    for name, make in {
        "magnitude": lambda m: MagnitudePruner(m, exclude=exclude),
        "srste": lambda m: SRSTESparsifier(m, exclude=exclude),
        "admm": lambda m: ADMMSparsifier(
            m, rho=1e-2, rho_schedule=geometric_rho(30, 120), update_every=4, penalty="proximal", exclude=exclude
        ),
    }.items():
        model = copy.deepcopy(dense)
        sparsifier = make(model)
        fit(model, sparsifier, 300, lr=1e-3)
        _assert_exact_nm(sparsifier)
        results[name] = acc(model)
    lost = dense_acc - results["pruned, no fine-tune"]
    assert lost > 0.02, results  # pruning must hurt, or the recovery below proves nothing
    for name in ("magnitude", "srste", "admm"):
        assert results[name] > dense_acc - lost / 2, (dense_acc, results)


def test_sparsify_after_admm_changes_no_output():
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(num_hidden_layers=2)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 64, (3, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    admm = ADMMSparsifier(model, rho=0.1, update_every=2, penalty="proximal")
    assert len(admm.targets) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    for _ in range(4):
        model(ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        admm.step()
    admm.finalize()
    with torch.no_grad():
        masked_dense = model(ids).last_hidden_state
    report = nxm.sparsify(model, "2:4", include=list(admm.targets))
    assert sorted(report.converted) == sorted(admm.targets)
    with torch.no_grad():
        sparse = model(ids).last_hidden_state
    torch.testing.assert_close(sparse, masked_dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["2:4", "8:4x4"])
def test_admm_then_hard_prune_then_srste_retraining(pattern):
    """retrain="srste": ADMM, then finalize() hard-prunes and SR-STE retrains (the forward uses
    project(W), pruned weights still get gradients, a mask can move), then finalize() fixes masks."""
    with pytest.raises(ValueError, match="retrain must be None"):
        ADMMSparsifier(_model(), pattern, retrain="ste")
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    admm = ADMMSparsifier(model, pattern, rho=0.1, update_every=4, retrain="srste", retrain_decay=0.0)
    _train(model, admm, opt, 8, x, y)
    admm.finalize()
    assert admm.retraining and not admm.finalized and admm.Z == {}
    for module in admm.targets.values():
        assert nxm.is_nm_sparse(module.weight.detach(), pattern)  # the hard prune
    assert float(admm.penalty()) == 0.0
    pruned = {n: nxm.nm_mask(m.weight.detach(), pattern) for n, m in admm.targets.items()}
    _train(model, admm, opt, 30, x, y)
    layer = admm.targets["blocks.0.up"]
    w = layer.weight.detach()
    assert (w[~pruned["blocks.0.up"]] != 0).any()  # not a masked fine-tune: pruned weights trained on
    h = torch.randn(5, w.shape[1])
    assert torch.equal(layer(h), F.linear(h, nxm.project(w, pattern), layer.bias))  # SR-STE's forward
    assert any(not torch.equal(nxm.nm_mask(m.weight.detach(), pattern), pruned[n]) for n, m in admm.targets.items())
    state = admm.state_dict()
    admm.finalize()
    assert admm.finalized and not admm.retraining and "forward" not in layer.__dict__
    _train(model, admm, opt, 3, x, y)
    for module in admm.targets.values():
        assert nxm.is_nm_sparse(module.weight.detach(), pattern)
    resumed = ADMMSparsifier(_model(), pattern, retrain="srste")
    resumed.load_state_dict(state)
    assert resumed.retraining and "forward" in resumed.targets["blocks.0.up"].__dict__
