"""Loads the optional extension ``nxm_kernels._C`` (the C++/CUDA kernels of the ``torch.ops.nxm`` ops,
whose schemas and fake kernels ``_ops.py`` defines) and checks what it was built for.

The package works without ``_C`` (reference and Triton backends). When ``_C`` is absent or does not
fit this torch, :func:`unavailable_reason` says why and how to fix it; a broken build (present but
unloadable or built for another torch) also warns, once, at import.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from . import _ops  # noqa: F401  (the schemas the kernels of _C implement)

REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or `make venv`) in the source tree"


def _version_mismatch(module) -> str | None:
    """'built for torch X / CUDA Y, you have Z' when the build does not fit the running torch."""
    built_cuda = module.cuda_version or "none"
    have_cuda = torch.version.cuda or "none"
    same_cuda_major = module.cuda_version == "" or built_cuda.split(".")[0] == have_cuda.split(".")[0]
    if module.torch_version != torch.__version__ or not same_cuda_major:
        return (
            f"nxm_kernels._C was built for torch {module.torch_version} / CUDA {built_cuda}, "
            f"you have torch {torch.__version__} / CUDA {have_cuda}: {REBUILD}"
        )
    return None


def _load():
    """(module, None) when _C is usable, else (None, why)."""
    try:
        module = importlib.import_module("nxm_kernels._C")
    except ModuleNotFoundError as error:
        if error.name != "nxm_kernels._C":
            raise
        return None, (
            "nxm_kernels._C is not built (a source checkout or a build without the extension): "
            f"{REBUILD}; it needs a C++ compiler, and nvcc for the CUDA kernels"
        )
    except (ImportError, OSError) as error:
        why = f"nxm_kernels._C is present but failed to load ({error}): {REBUILD}"
        warnings.warn(why, RuntimeWarning, stacklevel=2)
        return None, why
    mismatch = _version_mismatch(module)
    if mismatch:
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
        return None, mismatch
    return module, None


_C, _REASON = _load()


def unavailable_reason() -> str | None:
    """Why the C++/CUDA ops cannot be used here (None when they can)."""
    return _REASON


def build_info() -> dict | None:
    """What the loaded _C was built for, or None without a usable _C."""
    if _C is None:
        return None
    return {"torch": _C.torch_version, "cuda": _C.cuda_version or None, "cuda_archs": _C.cuda_archs or None}


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.cuda_version)
