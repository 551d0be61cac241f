"""The ``Layout`` base class: how a compressed N:M weight sits in memory.

A layout object is the one place that knows, for its format:

- what it can hold (dtypes, patterns, shapes), with reasons when it cannot
  (:meth:`Layout.not_supported_reasons`, in the style of the backends; :meth:`Layout.check` raises);
- its storage: the tensors it keeps (``tensor_names``), their shapes and dtypes
  (:meth:`Layout.storage`) and the padding multiples of a layer (:meth:`Layout.multiples`,
  :meth:`Layout.padded_shape`);
- its reference (pure torch) compress and decompress, which the reference backend serves for any
  registered layout;
- how a weight read from outside (a checkpoint, a ``state_dict``, user tensors) is validated:
  :meth:`Layout.validate` (structure, then every index with :meth:`Layout.check_metadata`).

``stored`` says whether ``SparseLinear`` keeps and checkpoints save the layout (True), or whether it
is a backend's own form made on a device from a stored one and never saved (False).

A new layout is one module with a subclass plus ``register_layout(MyLayout())``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..pattern import Pattern, check_groups

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


class TensorSpec(NamedTuple):
    """Shape (None: the layout checks it itself, see :meth:`Layout.check_tensor`) and dtype."""

    shape: tuple | None
    dtype: torch.dtype


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class Layout:
    name: str = ""
    description: str = ""  # one phrase, used in reasons: "cuSPARSELt's opaque buffer"
    stored: bool = True
    value_dtypes: tuple = VALUE_DTYPES
    # The tensors a weight in this layout is made of: NMSparseWeight's fields, SparseLinear's
    # buffers and a checkpoint's tensors per layer.
    tensor_names: tuple = ("values", "metadata")
    # The value encodings (``nxm_kernels.encodings``, by kind) it holds: "float" (the weight's
    # dtype), "int8", "int4" (codes packed two per byte in ``values``).
    encodings: tuple = ("float",)
    # The pattern kinds (``PatternKind.kind``) it holds.
    kinds: tuple = ("row",)

    # ---------------------------------------------------------------- what it holds

    def shape_reasons(self, dtype: torch.dtype, shape: tuple, pattern: Pattern) -> list[str]:
        """Why a 2-D weight of whole groups and a held dtype does not fit (empty: it does)."""
        return []

    def dtype_reasons(self, dtype: torch.dtype) -> list[str]:
        if dtype in self.value_dtypes:
            return []
        return [f"layout {self.name!r} cannot hold dtype {dtype}: use one of "
                f"{', '.join(str(d) for d in self.value_dtypes)} (convert the weight first)"]

    def encoding_reasons(self, encoding) -> list[str]:
        """Why this layout cannot hold ``encoding`` (an Encoding), with the layouts that can."""
        if encoding.name in self.encodings:
            return []
        from .registry import registered_layouts

        can = [repr(layout.name) for layout in registered_layouts() if encoding.name in layout.encodings]
        return [f"layout {self.name!r} holds {', '.join(self.encodings)} values, not {encoding.name}"
                + (f": use layout {' or '.join(can)}" if can else "")]

    def kind_reasons(self, pattern) -> list[str]:
        """Why this layout cannot hold ``pattern``'s kind, with the layouts that can."""
        if pattern.kind in self.kinds:
            return []
        from .registry import registered_layouts

        can = [repr(layout.name) for layout in registered_layouts() if pattern.kind in layout.kinds]
        return [f"layout {self.name!r} holds {'/'.join(self.kinds)} patterns, not the {pattern.kind} pattern "
                f"{pattern}" + (f": use layout {' or '.join(can)}" if can else "")]

    def not_supported_reasons(self, dtype: torch.dtype, shape, pattern: Pattern) -> list[str]:
        """Why this layout cannot hold a ``dtype`` weight of ``shape`` in ``pattern`` (empty: it can)."""
        why = self.dtype_reasons(dtype) + self.kind_reasons(pattern)
        if len(shape) != 2:
            return why + [f"compressed weights are 2-D [out_features, in_features], got shape {tuple(shape)}"]
        try:
            check_groups(shape, pattern)
        except ValueError as e:
            return why + [str(e)]
        stored = pattern.row_form or pattern  # a transposable kind: W and W^T, each as its row pattern
        why = why or self.shape_reasons(dtype, tuple(shape), stored)
        return why or (self.shape_reasons(dtype, tuple(shape)[::-1], stored) if stored is not pattern else [])

    def check(self, dtype: torch.dtype, shape, pattern: Pattern) -> None:
        """Raise what :meth:`not_supported_reasons` says: TypeError for the dtype, else ValueError."""
        why = self.dtype_reasons(dtype)
        if why:
            raise TypeError("; ".join(why))
        why = self.not_supported_reasons(dtype, shape, pattern)
        if why:
            raise ValueError("; ".join(why))

    # ---------------------------------------------------------------- storage

    def multiples(self, dtype: torch.dtype, pattern: Pattern) -> tuple[int, int]:
        """(rows, cols) a weight's shape must be a multiple of."""
        return 1, pattern.m

    def padded_shape(self, out_features: int, in_features: int, pattern: Pattern, dtype: torch.dtype):
        """The shape a layer of this size is stored as (zeros padded to :meth:`multiples`)."""
        stored = pattern.row_form or pattern
        rows, cols = self.multiples(dtype, stored)
        if stored is not pattern:  # W^T is stored too: each dimension takes both multiples, and the blocks
            rows = cols = math.lcm(rows, cols, *pattern.block)
        return round_up(out_features, rows), round_up(in_features, cols)

    def storage(self, dtype: torch.dtype, shape, pattern: Pattern) -> dict[str, TensorSpec]:
        """{tensor name: TensorSpec} of a weight (``tensor_names`` order)."""
        raise NotImplementedError

    def check_tensor(self, name: str, tensor: torch.Tensor, shape, pattern: Pattern) -> None:
        """Check a tensor whose spec shape is None (layout-defined, e.g. an opaque buffer)."""

    def validate(self, values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern,
                 check_metadata: bool = True) -> None:
        """Raise (TypeError/ValueError) unless the tensors form a valid weight of this layout."""
        tensors = {"values": values, "metadata": metadata}
        for name, spec in self._checked_storage(values.dtype, tuple(shape), pattern).items():
            tensor = tensors[name]
            if spec.shape is None:
                self.check_tensor(name, tensor, shape, pattern)
            elif name == "values" and tuple(tensor.shape) != spec.shape:
                raise ValueError(f"values have shape {tuple(tensor.shape)}, but a {shape[0]}x{shape[1]} "
                                 f"{pattern} weight needs {spec.shape}")
            elif tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{name} is {tensor.dtype} {tuple(tensor.shape)}, but layout {self.name!r} "
                                 f"for this weight needs {spec.dtype} {spec.shape}")
        if values.device != metadata.device:
            raise ValueError(f"values are on {values.device} but metadata on {metadata.device}: move both")
        if check_metadata:
            self.check_metadata(values, metadata, shape, pattern)

    def _checked_storage(self, dtype, shape: tuple, pattern: Pattern) -> dict[str, TensorSpec]:
        """:meth:`check`, then :meth:`storage`; remembered per (dtype, shape, pattern), as a module
        rebuilds its weight from its buffers at every call."""
        cache = self.__dict__.setdefault("_storage_cache", {})
        key = (dtype, shape, pattern)
        specs = cache.get(key)
        if specs is None:
            self.check(dtype, shape, pattern)
            specs = self.storage(dtype, shape, pattern)
            if len(cache) < 4096:
                cache[key] = specs
        return specs

    def check_metadata(self, values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern) -> None:
        """Raise ValueError on any index a kernel must not trust (out of range, repeated, ...)."""

    # ---------------------------------------------------------------- reference compress / decompress

    def reference_reasons(self) -> list[str]:
        """Why the reference backend cannot write or read this layout (empty: it can)."""
        return []

    def compress(self, w: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None):
        """(values, metadata) of ``w``: select as ``reference.nm_mask`` does, then store."""
        raise NotImplementedError

    def decompress(self, values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern) -> torch.Tensor:
        """The dense weight, equal bit for bit to ``project`` of the weight that was compressed."""
        raise NotImplementedError

    # ---------------------------------------------------------------- identity

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<layout {self.name!r}>"

    # A layout compares equal to its name, so user code like ``sw.layout == "cutlass"`` keeps
    # working; inside the package nothing branches on names.
    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return other == self.name
        return self is other or (isinstance(other, Layout) and other.name == self.name)

    def __hash__(self) -> int:
        return hash(self.name)
