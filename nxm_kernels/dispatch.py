"""Backend dispatch: each backend says why it cannot serve a call; ``auto`` runs the first that can.

Backends register themselves (:func:`register`, at import of their module, with a priority); this
module imports none of them. Each declares, as data, what it supports per op (:class:`Support`:
layouts, dtypes, devices, patterns); :meth:`Backend.not_supported_reasons` derives its reasons from
that table and adds the backend's own (:meth:`Backend.extra_reasons`).

There is no silent fallback: an explicitly requested backend that cannot serve raises with its
reasons, and when no backend can serve, the error lists every backend with its reasons.
The default backend is ``auto``, or ``NXM_BACKEND`` when set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .layouts import NMSparseWeight, get_layout

OPS = ("nm_mask", "project", "compress", "decompress", "sparse_mm")


class BackendNotSupported(RuntimeError):
    """No backend (or not the requested one) can run this call; the message says why."""


def _names(items) -> str:
    return ", ".join(str(i).removeprefix("torch.") for i in items)


@dataclass(frozen=True)
class Support:
    """What a backend serves for one op; None: anything (the op surface has checked it)."""

    layouts: tuple[str, ...] | None = None  # layout names (compress: the target; others: the weight's)
    dtypes: tuple[torch.dtype, ...] | None = None  # of the weight (or x for sparse_mm)
    devices: tuple[str, ...] | None = None  # device types
    patterns: tuple[str, ...] | None = None  # "n:m"
    # pattern kinds (``PatternKind.kind``) of the call's pattern, or of the weight's stored form
    kinds: tuple[str, ...] | None = ("row",)
    # value encodings of the weight (sparse_mm; by kind: "float", "int8", "int4"), and the
    # activation quantizations it runs (None: none; 8: W8A8's per-token int8)
    encodings: tuple[str, ...] | None = ("float",)
    act_bits: tuple[int | None, ...] | None = (None,)
    advice: str = ""  # what to do instead, added after the reasons

    def reasons(self, layout, dtype, device, pattern, encoding=None, act_bits=None) -> list[str]:
        why = []
        if self.encodings is not None and encoding is not None and encoding.name not in self.encodings:
            why.append(f"handles {'/'.join(self.encodings)} values, not {encoding}")
        if self.act_bits is not None and act_bits not in self.act_bits:
            why.append(f"does not quantize activations to {act_bits} bits")
        if self.layouts is not None and layout is not None and layout.name not in self.layouts:
            what = f" ({layout.description})" if layout.description else ""
            why.append(f"handles layout {' or '.join(repr(n) for n in self.layouts)}, not {layout.name!r}{what}")
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            why.append(f"handles {_names(self.dtypes)}, not {str(dtype).removeprefix('torch.')}")
        if self.devices is not None and device is not None and device.type not in self.devices:
            why.append(f"runs on {'/'.join(self.devices)} tensors, not on {device.type}")
        if self.kinds is not None and pattern is not None and pattern.kind not in self.kinds:
            why.append(f"handles {'/'.join(self.kinds)} patterns, not the {pattern.kind} pattern {pattern}")
        if self.patterns is not None and pattern is not None and str(pattern) not in self.patterns:
            why.append(f"handles pattern(s) {_names(self.patterns)}, not {pattern}")
        return why + [self.advice] if why and self.advice else why


class Backend:
    """Base class. A subclass declares ``supports`` ({op: Support}) and implements those ops as
    methods taking the op's keywords; ``ops`` is the table's keys unless given."""

    name: str = ""
    supports: dict[str, Support] = {}
    ops: frozenset = frozenset()
    # Device types where ``auto`` may pick this backend, None for any (an explicit request may
    # go further, e.g. Triton on CPU tensors under TRITON_INTERPRET=1).
    auto_devices: tuple | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "supports" in cls.__dict__ and "ops" not in cls.__dict__:
            cls.ops = frozenset(cls.supports)

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all on this machine (None when it can)."""
        return None

    def not_supported_reasons(self, op: str, **inputs) -> list[str]:
        """Why this backend cannot run ``op`` on these inputs (empty when it can): the table's
        reasons, then the backend's own."""
        support = self.supports.get(op)
        sw = inputs.get("sw")
        encoding = sw.encoding if isinstance(sw, NMSparseWeight) else None
        why = support.reasons(*call_facts(inputs), encoding, inputs.get("act_bits")) if support is not None else []
        return why + self.extra_reasons(op, **inputs)

    def extra_reasons(self, op: str, **inputs) -> list[str]:
        """What the table cannot say (hardware, library versions, sizes)."""
        return []


def call_facts(inputs: dict):
    """(layout, dtype, device, pattern) of a call's inputs, as the Support tables read them."""
    sw = inputs.get("sw")
    if isinstance(sw, NMSparseWeight):
        return sw.layout, sw.dtype, sw.device, sw.pattern
    w = inputs.get("w")
    layout = inputs.get("layout")
    return (
        get_layout(layout) if layout is not None else None,
        w.dtype if isinstance(w, torch.Tensor) else None,
        w.device if isinstance(w, torch.Tensor) else None,
        inputs.get("pattern"),
    )


_REGISTERED: list[tuple[int, int, Backend]] = []
_IN_ORDER: tuple[Backend, ...] = ()  # _REGISTERED's backends, made once per register (read at every call)


def register(backend: Backend, priority: int) -> Backend:
    """Add ``backend`` to dispatch; ``auto`` tries higher priorities first. Returns it."""
    global _IN_ORDER
    if any(b.name == backend.name for _, _, b in _REGISTERED):
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTERED.append((-priority, len(_REGISTERED), backend))
    _REGISTERED.sort(key=lambda entry: entry[:2])
    _IN_ORDER = tuple(b for _, _, b in _REGISTERED)
    return backend


def registered_backends() -> tuple[Backend, ...]:
    """Backends in auto-dispatch priority order."""
    return _IN_ORDER


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
            encoding = "" if not value.encoding.quantized else f" {value.encoding}"
            return (f"NMSparseWeight({value.pattern} {value.layout}{encoding} {value.dtype} {list(value.shape)} "
                    f"on {value.device})")
        return str(value)

    return f"{op}(" + ", ".join(f"{k}={show(v)}" for k, v in inputs.items() if v is not None) + ")"


def reasons(backend: Backend, op: str, inputs: dict) -> list[str]:
    unavailable = backend.unavailable_reason()
    if unavailable:
        return [unavailable]
    if op not in backend.ops:
        return [f"does not implement {op}"]
    return backend.not_supported_reasons(op, **inputs)


# Successful selections by the facts the reasons read (see _signature). A varying batch size (prefill
# lengths) adds one entry per shape, so the table is cleared when it reaches the bound.
_SELECTED: dict = {}
_SELECTED_MAX = 4096


def _signature(value):
    """What a backend's reasons may read of one input: for tensors and weights their kinds and
    shapes (sizes matter, e.g. 32-bit offset limits), never their contents."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.device, value.shape
    if isinstance(value, NMSparseWeight):
        return (value.layout, value.pattern, value.encoding, value.dtype, value.device, value.shape,
                value.values.shape)
    return value  # patterns, layouts, numbers, None


def select(op: str, backend: str | None, inputs: dict) -> Backend:
    """The backend that runs ``op`` on ``inputs``: ``backend`` (or ``NXM_BACKEND``) when it can,
    else with ``auto`` the first in priority that can; raises with the reasons when none can.

    The reasons are a function of the inputs' signature (layout, pattern, encoding, dtype, device,
    shapes) and of the machine, so a successful choice is remembered per signature, backend name and
    set of registered backends: repeated calls (a decode step's layers) skip the reasons.
    """
    name = backend or os.environ.get("NXM_BACKEND") or "auto"
    backends = registered_backends()
    try:
        key = (op, name, backends, *[(k, _signature(v)) for k, v in inputs.items()])
        chosen = _SELECTED.get(key)
    except TypeError:  # an unhashable input: decide afresh
        key, chosen = None, None
    if chosen is not None:
        return chosen
    chosen = _select(op, backend, inputs, name, backends)
    if key is not None:
        if len(_SELECTED) >= _SELECTED_MAX:
            _SELECTED.clear()
        _SELECTED[key] = chosen
    return chosen


def _select(op: str, backend: str | None, inputs: dict, name: str, backends: tuple[Backend, ...]) -> Backend:
    from_env = not backend and bool(os.environ.get("NXM_BACKEND"))
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
    for candidate in backends:
        why = reasons(candidate, op, inputs)
        allowed = candidate.auto_devices
        if not why and allowed is not None and device is not None and device.type not in allowed:
            why = [f"auto dispatch uses it only on {'/'.join(allowed)} tensors"]
        if not why:
            return candidate
        collected.append(f"  {candidate.name}: {'; '.join(why)}")
    raise BackendNotSupported(f"no backend can run {describe(op, inputs)}:\n" + "\n".join(collected))


def selection_backend(backend: str | None) -> str | None:
    """The backend that selects for a compress through ``backend`` (or ``NXM_BACKEND``): that one,
    or ``auto`` when it implements no selection (cuSPARSELt only stores what was selected)."""
    name = backend or os.environ.get("NXM_BACKEND")
    stores_only = {b.name for b in registered_backends() if "compress" in b.ops and "nm_mask" not in b.ops}
    return "auto" if name in stores_only else backend


def run(op: str, backend: str | None, **inputs):
    return getattr(select(op, backend, inputs), op)(**inputs)


def backends() -> dict[str, str | None]:
    """Every backend, in priority order, with why it is unavailable here (None: available)."""
    return {b.name: b.unavailable_reason() for b in registered_backends()}
