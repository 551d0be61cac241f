"""``NMSparseWeight``: a compressed N:M weight, its tensors plus the Layout object that reads them."""

from __future__ import annotations

from dataclasses import InitVar, dataclass

import torch

from ..pattern import Pattern, as_pattern
from .base import Layout
from .registry import get_layout


@dataclass
class NMSparseWeight:
    """An N:M weight ``[out_features, in_features]`` held as kept values plus index metadata.

    ``layout`` is given as a name or a :class:`~nxm_kernels.layouts.Layout` and held as the object
    (which prints as, and compares equal to, its name). Construction validates structure (dtypes,
    shapes, devices) and, unless ``check_metadata=False`` (for trusted outputs of ``compress``),
    every index (in range, not repeated, no stray padding bits), through the layout.

    ``encoding`` (an :class:`~nxm_kernels.encodings.Encoding` or its name, default ``"float"``:
    values in the weight's dtype) says what the values are; a quantized one (``"int8"``,
    ``"int4-g128"``) adds ``scales`` and needs ``float_dtype``, the dtype the weight dequantizes to.

    A transposable pattern (``"2:4t"``) in a row layout stores W and W^T, both as the row pattern
    (``pattern.row_form``): ``values``/``metadata`` hold W, ``values_t``/``metadata_t`` hold W^T
    (shape reversed), so the backward pass multiplies with W^T as sparsely as the forward with W.
    Kernels read :attr:`stored_form` and :attr:`transposed`, which are plain row weights.
    """

    values: torch.Tensor
    metadata: torch.Tensor
    shape: tuple
    pattern: Pattern
    layout: Layout
    check_metadata: InitVar[bool] = True
    scales: torch.Tensor | None = None
    encoding: object = None  # an Encoding (None or a name is resolved)
    float_dtype: torch.dtype | None = None
    values_t: torch.Tensor | None = None
    metadata_t: torch.Tensor | None = None

    def __post_init__(self, check_metadata: bool):
        from ..encodings import as_encoding  # (the encodings read layouts: resolve at call time)

        self.pattern = as_pattern(self.pattern)
        self.shape = tuple(int(s) for s in self.shape)
        self.layout = get_layout(self.layout)
        self.encoding = as_encoding(self.encoding)
        given = {name for name in ("scales", "float_dtype") if getattr(self, name) is not None}
        needed = {"float_dtype", *self.encoding.tensor_names} if self.encoding.quantized else set()
        if given != needed:
            raise ValueError(f"a {self.encoding} weight takes {sorted(needed) or 'no scales or float_dtype'}, "
                             f"got {sorted(given) or 'none'}")
        if self._stores_transpose():
            self._check_transpose(check_metadata)
        else:
            self.encoding.validate(self, check_metadata)

    def _stores_transpose(self) -> bool:
        both = self.pattern.row_form not in (None, self.pattern)
        given = [name for name in TRANSPOSED_NAMES if getattr(self, name) is not None]
        if both and (len(given) < 2 or self.encoding.quantized):
            raise ValueError(f"a {self.pattern} weight stores W and W^T as float values: give values_t and "
                             "metadata_t (nxm.compress makes them)")
        if given and not both:
            raise ValueError(f"{'/'.join(given)} hold the transposed form of a transposable weight; "
                             f"pattern {self.pattern} has none")
        return both

    def _check_transpose(self, check_metadata: bool) -> None:
        """Both forms are valid row weights; with ``check_metadata``, W^T is W transposed. (W and W^T both
        row n:m is the transposable pattern: every m x m block n:m along rows and along columns.)"""
        forward = NMSparseWeight(self.values, self.metadata, self.shape, self.pattern.row_form, self.layout,
                                 check_metadata)
        backward = NMSparseWeight(self.values_t, self.metadata_t, self.shape[::-1], self.pattern.row_form,
                                  self.layout, check_metadata)
        if not check_metadata:
            return
        w = self.layout.decompress(forward.values, forward.metadata, forward.shape, forward.pattern)
        wt = self.layout.decompress(backward.values, backward.metadata, backward.shape, backward.pattern)
        if not torch.equal(w.T, wt):
            raise ValueError(f"values_t/metadata_t of this {self.pattern} weight are not the transpose of "
                             "values/metadata: re-create the weight with nxm.compress")

    def check(self) -> "NMSparseWeight":
        """Validate every index now (for a weight built with ``check_metadata=False``)."""
        if self._stores_transpose():
            self._check_transpose(True)
        else:
            self.layout.check_metadata(self.values, self.metadata, self.shape, self.pattern)
        return self

    @property
    def stored_form(self) -> "NMSparseWeight":
        """The weight kernels multiply with: itself, or for a transposable pattern W as its row pattern."""
        if self.values_t is None:
            return self
        return NMSparseWeight(self.values, self.metadata, self.shape, self.pattern.row_form, self.layout,
                              check_metadata=False)

    @property
    def transposed(self) -> "NMSparseWeight | None":
        """W^T as a row weight (a transposable pattern), else None."""
        if self.values_t is None:
            return None
        return NMSparseWeight(self.values_t, self.metadata_t, self.shape[::-1], self.pattern.row_form, self.layout,
                              check_metadata=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """{name: tensor} as the layout and the encoding name them, plus W^T's (what SparseLinear and
        checkpoints hold)."""
        return {name: getattr(self, name) for name in tensor_names(self.layout, self.pattern, self.encoding)}

    @property
    def dtype(self) -> torch.dtype:
        """The weight's dtype: of its values, or for a quantized weight the float dtype it dequantizes to."""
        return self.float_dtype or self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor it holds (values, metadata, scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "NMSparseWeight":
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return NMSparseWeight(**moved, shape=self.shape, pattern=self.pattern, layout=self.layout,
                              check_metadata=False, encoding=self.encoding, float_dtype=self.float_dtype)


TRANSPOSED_NAMES = ("values_t", "metadata_t")


def tensor_names(layout, pattern, encoding=None) -> tuple[str, ...]:
    """The tensors a weight of this layout, pattern and encoding is made of."""
    from ..encodings import as_encoding

    transposed = TRANSPOSED_NAMES if pattern.row_form not in (None, pattern) else ()
    return tuple(layout.tensor_names) + as_encoding(encoding).tensor_names + transposed
