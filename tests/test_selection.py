"""One layer selection for sparsify and the sparsifiers: the same defaults (heads, poolers and
embedding projections stay dense, with reasons), include/exclude, marks left by training, and the
issue's first scenario (sparsify after ADMM changes no output)."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm
from conftest import TinyTransformerNames
from nxm_kernels.selection import HEAD_NAMES, MARK, dense_by_default, select_layers
from nxm_kernels.training import ADMMSparsifier, MagnitudePruner, SRSTESparsifier, select_linears


BLOCK_LINEARS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyTransformerNames()


def test_sparsify_and_every_sparsifier_share_the_defaults():
    expected_skips = {
        "embed": "embedding projection (kept dense with the output head); name it in include= to make it sparse",
        "pooler": "pooler (kept dense with the output head); name it in include= to make it sparse",
        "classifier": "output head (named 'classifier'); name it in include= to make it sparse",
    }
    for make in (MagnitudePruner, SRSTESparsifier, ADMMSparsifier):
        sparsifier = make(_model())
        assert list(sparsifier.targets) == BLOCK_LINEARS
        assert sparsifier.skipped == expected_skips
    report = nxm.sparsify(_model())
    assert list(report.converted) == BLOCK_LINEARS and report.skipped == expected_skips
    assert "every Linear but output heads" in str(report)


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_output_heads_by_name_and_by_get_output_embeddings(head):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)  # an output head under another name
            setattr(self, head, nn.Linear(8, 8))

        def get_output_embeddings(self):
            return self.out

    model = Model()
    assert dense_by_default(model) == {
        "out": "output head (the model's get_output_embeddings())",
        head: f"output head (named {head!r})",
    }
    targets, _ = select_layers(model)
    assert list(targets) == ["body"]
    # Under a wrapper too: any submodule's get_output_embeddings() counts.
    wrapped = nn.ModuleDict({"inner": model})
    assert list(select_layers(wrapped)[0]) == ["inner.body"]


def test_include_overrides_the_defaults_exclude_adds_to_them():
    model = _model()
    targets, skipped = select_layers(model, include=["classifier", "blocks.0.*"])
    assert list(targets) == ["blocks.0.up", "blocks.0.down", "classifier"]
    assert skipped["pooler"] == "not selected by include"
    targets, skipped = select_layers(model, exclude=lambda name, m: name.endswith("down"))
    assert list(targets) == ["blocks.0.up", "blocks.1.up"]
    assert skipped["blocks.0.down"] == "excluded by the predicate" and "output head" in skipped["classifier"]
    targets, _ = select_linears(model, "2:4", include=lambda name, m: True)
    assert list(targets) == ["embed", *BLOCK_LINEARS, "pooler", "classifier"]
    with pytest.raises(TypeError, match="include must be a name glob"):
        select_layers(model, include=[3])


def test_incompatible_layers_skipped_by_default_refused_when_named():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8))
    targets, skipped = select_linears(model, "2:4")
    assert list(targets) == ["1"] and "not a multiple of m=4" in skipped["0"]
    with pytest.raises(ValueError, match="in_features 6 is not a multiple of m=4.*exclude it"):
        select_linears(model, "2:4", include=["0", "1"])
    with pytest.raises(ValueError, match="no nn.Linear layer to sparsify"):
        select_linears(model, "2:4", include="nothing*")
    # SparseLinear pads, so sparsify takes both.
    assert list(nxm.sparsify(model, inplace=False).converted) == ["0", "1"]


def test_marks_choose_exactly_the_trained_layers_with_their_pattern():
    model = _model()
    MagnitudePruner(model, "1:4", include=["blocks.0.up", "blocks.1.down"])
    assert model.blocks[0]["up"].__dict__[MARK] == {"pattern": "1:4", "by": "magnitude"}
    assert MARK not in str(model.state_dict().keys())  # no state_dict key
    with pytest.raises(ValueError, match="'blocks.0.up' was trained to 1:4 by magnitude, but 2:4 was asked"):
        nxm.sparsify(model, "2:4", inplace=False)
    report = nxm.sparsify(model, inplace=False)
    assert list(report.converted) == ["blocks.0.up", "blocks.1.down"]
    assert report.converted["blocks.0.up"] == "16->32 1:4 packed float32, trained by magnitude, already N:M, nothing dropped"
    assert report.skipped["blocks.0.down"].startswith("not trained sparse (the trained layers are marked: magnitude 1:4)")
    assert report.skipped["classifier"] == report.skipped["blocks.0.down"]  # marks replace the defaults
    assert "exactly the layers trained sparse (magnitude 1:4)" in str(report)
    # The marks follow the module through deepcopy and pickling; include= still chooses freely.
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(select_layers(copied)[0]) == ["blocks.0.up", "blocks.1.down"]
    assert list(nxm.sparsify(model, include="pooler", inplace=False).converted) == ["pooler"]
    # A sparsifier built on the marked model trains the same layers.
    assert list(MagnitudePruner(copy.deepcopy(model), "1:4").targets) == ["blocks.0.up", "blocks.1.down"]


class Scenario(nn.Module):
    """The issue's first scenario: a body and a classifier head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 8)

    def forward(self, x):
        return self.classifier(self.body(x))


def assert_same_outputs(actual, model, x):
    """``actual`` against ``model(x)`` at a derived tolerance: twice the error of the fp32 dense
    model against its float64 copy, plus one unit in the last place of the outputs' magnitude."""
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        dense = model(x)
    allowed = 2 * (dense.double() - truth).abs().max() + torch.finfo(x.dtype).eps * truth.abs().max()
    err = (actual.double() - truth).abs().max()
    assert err <= allowed, f"max error {err:.3e} > allowed {allowed:.3e}"


def test_sparsify_after_admm_defaults_changes_no_output():
    torch.manual_seed(0)
    model = Scenario()
    x, y = torch.randn(256, 32), torch.randint(0, 8, (256,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    admm = ADMMSparsifier(model)
    assert list(admm.targets) == ["body.0", "body.2"]
    for step in range(250):
        if step == 200:
            admm.finalize()
        (F.cross_entropy(model(x), y) + admm.penalty()).backward()
        opt.step()
        opt.zero_grad()
        admm.step()
    head = model.classifier.weight.detach().clone()
    report = nxm.sparsify(model, inplace=False)
    assert list(report.converted) == ["body.0", "body.2"]
    assert all("trained by admm, already N:M, nothing dropped" in what for what in report.converted.values())
    assert report.skipped["classifier"].startswith("not trained sparse")
    assert torch.equal(report.model.classifier.weight, head)  # the head was not pruned
    with torch.no_grad():
        assert_same_outputs(report.model(x), model, x)
    # The harm the marks prevent: pruning the head moves the outputs far beyond that tolerance.
    pruned_head = nxm.sparsify(model, include="*", inplace=False).model
    with pytest.raises(AssertionError, match="max error"), torch.no_grad():
        assert_same_outputs(pruned_head(x), model, x)


def test_a_finalized_model_pickles_whole():
    model = Scenario()
    MagnitudePruner(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(nxm.sparsify(loaded).converted) == ["body.0", "body.2"]
