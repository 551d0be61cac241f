"""Backend dispatch: each backend says why it cannot serve a call; ``auto`` runs the first that can.

There is no silent fallback: an explicitly requested backend that cannot serve raises with its
reasons, and when no backend can serve, the error lists every backend with its reasons.
The default backend is ``auto``, or ``NXM_BACKEND`` when set.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .formats import NMSparseWeight

OPS = ("nm_mask", "project", "compress", "decompress", "sparse_mm")


class BackendNotSupported(RuntimeError):
    """No backend (or not the requested one) can run this call; the message says why."""


class Backend:
    """Base class. Subclasses implement some of ``OPS`` as methods taking the op's keywords."""

    name: str = ""
    ops: frozenset = frozenset()
    # Device types where ``auto`` may pick this backend, None for any (an explicit request may
    # go further, e.g. Triton on CPU tensors under TRITON_INTERPRET=1).
    auto_devices: tuple | None = None

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all on this machine (None when it can)."""
        return None

    def not_supported_reasons(self, op: str, **inputs) -> list[str]:
        """Why this backend cannot run ``op`` on these inputs (empty when it can)."""
        return []


@functools.cache
def registered_backends() -> tuple[Backend, ...]:
    """Backends in auto-dispatch priority order (see ``backends/__init__.py``)."""
    from .backends import BACKEND_MODULES

    return tuple(
        importlib.import_module(f".backends.{module}", __package__).BACKEND for module in BACKEND_MODULES
    )


def get_backend(name: str) -> Backend:
    for backend in registered_backends():
        if backend.name == name:
            return backend
    names = ", ".join(b.name for b in registered_backends())
    raise ValueError(f"unknown backend {name!r}: choose 'auto' or one of {names}")


def _device_of(inputs: dict) -> torch.device | None:
    for value in inputs.values():
        if isinstance(value, (torch.Tensor, NMSparseWeight)):
            return value.device
    return None


def describe(op: str, inputs: dict) -> str:
    def show(value):
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)} on {value.device}"
        if isinstance(value, NMSparseWeight):
            return f"NMSparseWeight({value.pattern} {value.layout} {value.dtype} {list(value.shape)} on {value.device})"
        return str(value)

    return f"{op}(" + ", ".join(f"{k}={show(v)}" for k, v in inputs.items() if v is not None) + ")"


def reasons(backend: Backend, op: str, inputs: dict) -> list[str]:
    unavailable = backend.unavailable_reason()
    if unavailable:
        return [unavailable]
    if op not in backend.ops:
        return [f"does not implement {op}"]
    return backend.not_supported_reasons(op, **inputs)


def select(op: str, backend: str | None, inputs: dict) -> Backend:
    from_env = not backend and bool(os.environ.get("NXM_BACKEND"))
    name = backend or os.environ.get("NXM_BACKEND") or "auto"
    source = " (set by NXM_BACKEND)" if from_env else ""
    if name != "auto":
        try:
            chosen = get_backend(name)
        except ValueError as e:
            raise ValueError(f"{e}{source}") from None
        why = reasons(chosen, op, inputs)
        if why:
            raise BackendNotSupported(
                f"backend {name!r}{source} cannot run {describe(op, inputs)}: {'; '.join(why)}. "
                "Use backend='auto' or one that nxm.backends() lists as available."
            )
        return chosen
    device = _device_of(inputs)
    collected = []
    for candidate in registered_backends():
        why = reasons(candidate, op, inputs)
        allowed = candidate.auto_devices
        if not why and allowed is not None and device is not None and device.type not in allowed:
            why = [f"auto dispatch uses it only on {'/'.join(allowed)} tensors"]
        if not why:
            return candidate
        collected.append(f"  {candidate.name}: {'; '.join(why)}")
    raise BackendNotSupported(f"no backend can run {describe(op, inputs)}:\n" + "\n".join(collected))


def run(op: str, backend: str | None, **inputs):
    return getattr(select(op, backend, inputs), op)(**inputs)


def backends() -> dict[str, str | None]:
    """Every backend, in priority order, with why it is unavailable here (None: available)."""
    return {b.name: b.unavailable_reason() for b in registered_backends()}
