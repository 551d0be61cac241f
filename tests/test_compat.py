"""The torch/triton version guards (nxm_kernels/_compat.py): each decision and its message, with the
version strings or the installed modules replaced, on CPU."""

import pytest
import torch

from nxm_kernels import _compat, dispatch


@pytest.fixture(autouse=True)
def _fresh_cache():
    _compat.triton_interpreter_problem.cache_clear()
    yield
    _compat.triton_interpreter_problem.cache_clear()


@pytest.mark.parametrize("text, expected", [
    ("2.11.0", (2, 11, 0)), ("2.14.1+cu130", (2, 14, 1)), ("3.6.0.dev20251201", (3, 6, 0)),
    ("2.12.0a0+git1234", (2, 12, 0)), ("3.8", (3, 8)),
])
def test_version_tuple(text, expected):
    assert _compat.version_tuple(text) == expected


def test_version_tuple_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="not a version string"):
        _compat.version_tuple("unknown")


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0+cu130", "2.14.1", "3.0.0"])
def test_torch_from_2_11_on_is_accepted(version):
    assert _compat.torch_problem(version) is None


@pytest.mark.parametrize("version", ["2.10.1+cu128", "2.4.0", "1.13.1"])
def test_older_torch_is_refused_with_the_minimum(version):
    why = _compat.torch_problem(version)
    assert why.startswith(f"torch {version} is older than 2.11") and "upgrade torch" in why


def test_triton_minimum():
    assert _compat.triton_problem("3.6.0") is None and _compat.triton_problem("3.8.0") is None
    why = _compat.triton_problem("3.5.1")
    assert why.startswith("triton 3.5.1 is older than 3.6") and "pip show torch" in why


def test_no_triton_is_no_problem_of_the_guard(monkeypatch):
    monkeypatch.setattr(_compat, "_installed_version", lambda name: None)  # e.g. macOS: the Triton backend says so
    assert _compat.triton_problem() is None
    assert _compat.triton_interpreter_problem() is None


@pytest.mark.parametrize("triton, numpy, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.6.0", "1.26.4", False),
    ("3.7.0", "2.4.6", False), ("3.8.0", "2.4.6", False),
])
def test_triton_interpreter_with_numpy_2_4(triton, numpy, refused):
    why = _compat.triton_interpreter_problem(triton, numpy)
    assert (why is not None) == refused
    if refused:
        assert f"triton {triton}" in why and f"NumPy {numpy}" in why and "numpy<2.4" in why


def test_problems_reads_the_running_versions(monkeypatch):
    assert _compat.problems() == []  # the development pins are supported
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    assert _compat.problems() == [_compat.torch_problem("2.9.1+cu128")]
    monkeypatch.setattr(_compat, "_installed_version", lambda name: "3.4.0" if name == "triton" else None)
    assert len(_compat.problems()) == 2 and _compat.problems()[1].startswith("triton 3.4.0 is older")


def test_the_triton_backend_says_why_the_interpreter_cannot_run(monkeypatch):
    backend = dispatch.get_backend("triton")
    kernels = pytest.importorskip("nxm_kernels.backends.triton.kernels")
    if not kernels.INTERPRETED:
        pytest.skip("the kernels are compiled here (TRITON_INTERPRET=0): the interpreter guard does not apply")
    assert backend.unavailable_reason() is None or "interpreter of triton" not in backend.unavailable_reason()
    versions = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(_compat, "_installed_version", versions.get)
    _compat.triton_interpreter_problem.cache_clear()
    assert backend.unavailable_reason() == _compat.triton_interpreter_problem("3.6.0", "2.4.6")
