"""After ``finalize()`` the pattern holds whatever the loop does: AdamW momentum and weight decay,
a loop that never calls ``step()`` again, ``load_state_dict`` of dense weights, copies of the
model. And the exact steps at which ADMM updates Z and U."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm
from nxm_kernels.training import ADMMSparsifier, MagnitudePruner, SRSTESparsifier, geometric_rho
from nxm_kernels.training.masking import mask_of


class Scenario(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 8)

    def forward(self, x):
        return self.classifier(self.body(x))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(128, 32, generator=g), torch.randint(0, 8, (128,), generator=g)


def _exact(sparsifier):
    return all(
        nxm.is_nm_sparse(m.weight.detach(), sparsifier.pattern)
        and torch.equal(m.weight.detach(), m.weight.detach() * sparsifier.masks[n])
        for n, m in sparsifier.targets.items()
    )


def _opt_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_adamw_without_step_calls_keeps_2_4_at_every_step_and_after_loading_dense_weights():
    """The issue's second scenario: finalize(), then 300 AdamW steps (weight decay on) that never
    call admm.step()."""
    torch.manual_seed(0)
    model = Scenario()
    x, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    admm = ADMMSparsifier(model, rho=1e-2, update_every=4)
    for _ in range(30):  # dense moments on every weight, pruned ones included
        (F.cross_entropy(model(x), y) + admm.penalty()).backward()
        opt.step()
        opt.zero_grad()
        admm.step()
    admm.finalize()
    at_finalize = {n: m.weight.detach().clone() for n, m in admm.targets.items()}
    for step in range(300):
        _opt_step(model, opt, x, y)
        assert _exact(admm), f"not 2:4 after step {step}"
    assert all(not torch.equal(m.weight, at_finalize[n]) for n, m in admm.targets.items())  # they trained

    dense = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    assert _exact(admm)
    layer = model.body[0]
    assert torch.equal(layer.weight.detach(), dense["body.0.weight"] * mask_of(layer))
    assert torch.equal(model.classifier.weight, dense["classifier.weight"])  # untouched: not a target

    # Without the masks the same loop leaves the pattern at once: the scenario is not trivial.
    admm.remove()
    _opt_step(model, opt, x, y)
    assert not any(nxm.is_nm_sparse(m.weight.detach(), "2:4") for m in admm.targets.values())


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    ],
    ids=["sgd-momentum-wd", "adam-for-loop", "rmsprop"],
)
@pytest.mark.parametrize("make", [MagnitudePruner, SRSTESparsifier])
def test_any_optimizer_any_sparsifier(make, make_opt):
    model = Scenario()
    x, y = _data()
    opt = make_opt(model.parameters())
    for _ in range(5):
        _opt_step(model, opt, x, y)
    sparsifier = make(model).finalize()
    for _ in range(10):
        _opt_step(model, opt, x, y)
        assert _exact(sparsifier)


def test_copies_of_a_finalized_model_keep_the_pattern():
    """deepcopy and pickling renew the weights, which carry the gradient and optimizer hooks:
    the copy's first forward attaches them again."""
    model = Scenario()
    x, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        _opt_step(model, opt, x, y)  # momentum on the weights about to be pruned
    MagnitudePruner(model)
    assert "_nxm_mask" not in str(model.state_dict().keys())  # the mask is no checkpoint entry
    deep = copy.deepcopy((model, opt))
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    for copied, copied_opt in (deep, torch.load(buffer, weights_only=False)):
        for _ in range(3):
            _opt_step(copied, copied_opt, x, y)
            for layer in (copied.body[0], copied.body[2]):
                assert nxm.is_nm_sparse(layer.weight.detach(), "2:4")
                assert not (layer.weight.detach() * ~mask_of(layer)).any()


def test_admm_updates_z_and_u_at_exactly_every_update_every_steps():
    """Z and U change at steps 3, 6, 9 (update_every=3) and at no other; Z is the projection of
    W + U at that step, rho follows the schedule step by step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    admm = ADMMSparsifier(model, rho=0.1, rho_schedule=lambda step: 1.0 + step, update_every=3, exclude=())
    name, weight = "0", model[0].weight
    changed = []
    for step in range(1, 11):
        with torch.no_grad():
            weight.add_(0.1 * torch.randn_like(weight))  # W moves every step, so an update is visible
        z, u, w = admm.Z[name].clone(), admm.U[name].clone(), weight.detach().clone()
        rho_before = admm.rho
        admm.step()
        if not torch.equal(admm.Z[name], z):
            changed.append(step)
            assert torch.equal(admm.Z[name], nxm.project(w + u, "2:4"))
            u = u + (w - admm.Z[name])  # at the old rho
        # The scaled dual follows rho every step: U * old rho / new rho.
        assert torch.equal(admm.U[name], u * (rho_before / admm.rho)), step
        assert admm.rho == pytest.approx(0.1 * (1.0 + step)), step
    assert changed == [3, 6, 9]
    assert admm.steps == 10


def test_geometric_rho_reaches_its_factor_at_the_given_step():
    schedule = geometric_rho(100.0, 4)
    assert [schedule(s) for s in range(6)] == pytest.approx([1.0, 100**0.25, 10.0, 100**0.75, 100.0, 100.0])


def test_srste_leaves_out_what_its_forward_cannot_reach_others_train_it():
    def model():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)

    srste = SRSTESparsifier(model())
    assert sorted(srste.targets) == ["layers.0.linear1", "layers.0.linear2"]
    assert "reads out_proj.weight directly" in srste.skipped["layers.0.self_attn.out_proj"]
    assert "layers.0.self_attn.out_proj" in MagnitudePruner(model()).targets
