"""The ``Encoding`` base class: how the kept values of a compressed weight are written.

An encoding is the second of a compressed weight's three choices (pattern kind, encoding, layout;
DESIGN.md section 7). The layout places *elements* (values in the weight's dtype, or int8 codes);
the encoding says what an element means and what else a weight needs to read it back:

- :meth:`Encoding.compress` / :meth:`Encoding.decompress`: the strategy around a layout's own
  compress and decompress (quantize the projected weight, pack the codes, dequantize);
- :meth:`Encoding.storage`: the layout's tensors as this encoding stores them, plus its own
  (``tensor_names``, e.g. ``scales``): what ``NMSparseWeight``, ``SparseLinear`` and checkpoints hold;
- :meth:`Encoding.validate`: a weight read from outside, checked before any kernel trusts it.

A layout lists the encodings it holds (``Layout.encodings``); backends declare theirs in their
``Support`` tables. No call site branches on an encoding's name.
"""

from __future__ import annotations

import torch

from ..pattern import Pattern


class Encoding:
    name: str = ""  # the kind ("float", "int8", "int4"); str(encoding) adds its parameters
    bits: int | None = None  # of an integer code (None: the weight's own dtype)
    group_size: int | None = None  # input features per scale (None: one per output row)
    tensor_names: tuple = ()  # tensors it adds to the layout's ("scales")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def element_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the layout holds for a ``dtype`` weight."""
        return dtype

    def reasons(self, dtype: torch.dtype, shape, pattern, layout) -> list[str]:
        """Why a ``dtype`` weight of ``shape`` in ``pattern`` cannot be encoded so in ``layout``
        (None: in no layout, e.g. fake quantization)."""
        return layout.encoding_reasons(self) if layout is not None else []

    def check(self, dtype: torch.dtype, shape, pattern, layout) -> None:
        why = self.reasons(dtype, shape, pattern, layout)
        if why:
            raise ValueError("; ".join(why))

    def storage(self, layout, dtype: torch.dtype, shape, pattern: Pattern) -> dict:
        """{tensor name: TensorSpec} of a weight: the layout's, then this encoding's own."""
        return layout.storage(dtype, shape, pattern)

    def compress(self, w: torch.Tensor, pattern: Pattern, layout, scores, *, select, store):
        """(values, metadata, {own tensors}) of ``w``. ``select(w, scores)`` is ``nm_mask`` and
        ``store(elements, scores)`` the layout's compress, both through dispatch."""
        values, metadata = store(w, scores)
        return values, metadata, {}

    def decompress(self, sw, load, dtype: torch.dtype | None) -> torch.Tensor:
        """The dense weight in ``dtype`` (None: the weight's). ``load(sw)`` is the layout's decompress."""
        dense = load(sw)
        return dense if dtype is None else dense.to(dtype)

    def validate(self, sw, check_metadata: bool) -> None:
        """Raise (TypeError/ValueError) unless ``sw``'s tensors form a valid weight."""
        sw.layout.validate(sw.values, sw.metadata, sw.shape, sw.pattern, check_metadata)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<encoding {self}>"

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return other == str(self)
        return isinstance(other, Encoding) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))
