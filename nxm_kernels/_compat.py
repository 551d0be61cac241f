"""The oldest torch and triton this package supports (torch 2.11, triton 3.6, as GPU servers ship
them) against the ones it is developed on (requirements-dev.txt), as named checks: code that
depends on a difference asks here, and nothing else reads version strings.

What was compared, and where the two differ (checked against the torch 2.11.0 and triton 3.6.0
wheels; the extension also builds against torch 2.11's headers):
- torch.library.custom_op / define / register_kernel / register_fake / register_autograd / get_ctx /
  opcheck, torch.compiler.is_compiling, the float8 dtypes, torch._cslt_*, torch._int_mm and
  torch.sparse._semi_structured_conversions: present with the same signatures. register_fake's
  default changed (``allow_override`` False in torch 2.11, True in 2.14), which does not matter here:
  every fake kernel is registered once.
- triton.compile, ASTSource(fn, signature, constexprs, attrs), GPUTarget, triton.autotune and the
  triton.language calls of backends/triton/kernels.py: the same. tl.dot's default out_dtype changed
  (float32 in 3.6, inferred in 3.8), which our kernels never rely on: they pass an fp32 accumulator.
- Triton's interpreter (TRITON_INTERPRET=1) before 3.7 turns one-element arrays into Python ints in
  a way NumPy 2.4 refuses, so every kernel with a runtime loop bound fails there
  (:func:`triton_interpreter_problem`; triton-lang/triton#9171, fixed in 3.7.0).

Only the standard library and torch are imported here (triton and numpy lazily), so that
``nxm gpu-check`` can load this file by path before the package is built.
"""

from __future__ import annotations

import functools
import re

import torch

MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)
TRITON_INTERPRETER_NUMPY_FIX = (3, 7)  # first triton whose interpreter works with NumPy >= 2.4
NUMPY_STRICT_SCALARS = (2, 4)  # NumPy that refuses int() of a one-element array with ndim > 0


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: '2.11.0+cu130' -> (2, 11, 0), '3.6.0.dev1' -> (3, 6, 0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    if numbers is None:
        raise ValueError(f"not a version string: {version!r}")
    return tuple(int(part) for part in numbers.group(0).split("."))


def _installed_version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def torch_problem(version: str | None = None) -> str | None:
    """Why this torch is too old for the package (None: it is recent enough)."""
    version = version or torch.__version__
    if version_tuple(version)[:2] < MIN_TORCH:
        return (f"torch {version} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest nxm-kernels supports "
                "(torch.library custom ops and fake kernels as it uses them): upgrade torch")
    return None


def triton_problem(version: str | None = None) -> str | None:
    """Why this triton is too old for the Triton backend (None: recent enough, or no triton at all)."""
    version = version or _installed_version("triton")
    if version is not None and version_tuple(version)[:2] < MIN_TRITON:
        return (f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the Triton backend "
                "supports: install the triton that your torch names (pip show torch)")
    return None


@functools.cache  # the Triton backend asks at every dispatch under the interpreter
def triton_interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions (default: the installed
    ones; None: it can)."""
    triton_version = triton_version or _installed_version("triton")
    numpy_version = numpy_version or _installed_version("numpy")
    if triton_version is None or numpy_version is None:
        return None
    if (version_tuple(triton_version)[:2] < TRITON_INTERPRETER_NUMPY_FIX
            and version_tuple(numpy_version)[:2] >= NUMPY_STRICT_SCALARS):
        return (f"the interpreter of triton {triton_version} cannot run these kernels with NumPy {numpy_version} "
                "(it converts one-element arrays to int, which NumPy 2.4 refuses; fixed in triton 3.7): "
                "pip install 'numpy<2.4', or a torch whose triton is 3.7 or newer")
    return None


def problems() -> list[str]:
    """Every reason this torch and triton cannot run the package (empty: they can)."""
    return [why for why in (torch_problem(), triton_problem()) if why]
