import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import dispatch


class _Refuses(dispatch.Backend):
    name = "refuses"
    ops = frozenset({"nm_mask"})

    def not_supported_reasons(self, op, **inputs):
        return ["it refuses everything"]


@pytest.fixture
def with_refusing_backend(monkeypatch):
    backends = (_Refuses(),) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)


def test_backends_lists_reference():
    assert nxm.backends()["reference"] is None
    assert list(nxm.backends())[-1] == "reference"  # lowest priority


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda9'.*choose 'auto' or one of"):
        nxm.nm_mask(torch.ones(2, 4), "2:4", backend="cuda9")


def test_explicit_backend_that_cannot_serve_raises(with_refusing_backend):
    with pytest.raises(nxm.BackendNotSupported, match=r"backend 'refuses' cannot run nm_mask\(w=float32\[2, 4\] on cpu.*it refuses everything"):
        nxm.nm_mask(torch.ones(2, 4), "2:4", backend="refuses")
    with pytest.raises(nxm.BackendNotSupported, match="does not implement compress"):
        nxm.compress(torch.ones(2, 4), "2:4", backend="refuses")


class _StoresOnly(dispatch.Backend):
    """Stores what another backend selected, as cuSPARSELt does."""

    name = "stores-only"
    ops = frozenset({"compress"})
    calls = 0

    def compress(self, **inputs):
        self.calls += 1
        return dispatch.get_backend("reference").compress(**inputs)


@pytest.mark.parametrize("from_env", [False, True])
def test_a_backend_that_only_stores_leaves_the_selection_to_auto(monkeypatch, from_env):
    stores = _StoresOnly()
    backends = (stores,) + dispatch.registered_backends()
    monkeypatch.setattr(dispatch, "registered_backends", lambda: backends)
    if from_env:
        monkeypatch.setenv("NXM_BACKEND", stores.name)
    w = torch.randn(8, 16)
    sw = nxm.compress(w, "2:4", bits=8, backend=None if from_env else stores.name)
    assert stores.calls == 1
    expected = nxm.compress(w, "2:4", bits=8, backend="reference")
    assert torch.equal(sw.values, expected.values) and torch.equal(sw.metadata, expected.metadata)
    with pytest.raises(nxm.BackendNotSupported, match="does not implement nm_mask"):
        nxm.nm_mask(w, "2:4", backend=stores.name)  # asked directly, it still refuses


def test_auto_skips_a_backend_with_reasons(with_refusing_backend):
    inputs = {"w": torch.ones(2, 4), "pattern": nxm.Pattern(2, 4), "scores": None}
    first_that_can = next(
        b for b in dispatch.registered_backends()[1:]
        if not dispatch.reasons(b, "nm_mask", inputs) and (b.auto_devices is None or "cpu" in b.auto_devices)
    )
    assert dispatch.select("nm_mask", None, inputs) is first_that_can


def test_no_backend_can_serve_lists_every_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "registered_backends", lambda: (_Refuses(),))
    with pytest.raises(nxm.BackendNotSupported, match=r"no backend can run nm_mask.*\n  refuses: it refuses everything"):
        nxm.nm_mask(torch.ones(2, 4), "2:4")


def test_env_override(monkeypatch, with_refusing_backend):
    monkeypatch.setenv("NXM_BACKEND", "refuses")
    with pytest.raises(nxm.BackendNotSupported, match="backend 'refuses'"):
        nxm.nm_mask(torch.ones(2, 4), "2:4")
    # An explicit argument beats the environment.
    assert nxm.nm_mask(torch.ones(2, 4), "2:4", backend="reference").sum() == 4


def test_env_names_itself_in_errors(monkeypatch, with_refusing_backend):
    monkeypatch.setenv("NXM_BACKEND", "cuda9")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda9'.* \(set by NXM_BACKEND\)"):
        nxm.nm_mask(torch.ones(2, 4), "2:4")
    monkeypatch.setenv("NXM_BACKEND", "refuses")
    with pytest.raises(nxm.BackendNotSupported, match=r"backend 'refuses' \(set by NXM_BACKEND\) cannot run"):
        nxm.nm_mask(torch.ones(2, 4), "2:4")
    # An explicit argument is not attributed to the environment.
    with pytest.raises(nxm.BackendNotSupported, match=r"backend 'refuses' cannot run"):
        nxm.nm_mask(torch.ones(2, 4), "2:4", backend="refuses")
