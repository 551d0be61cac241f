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
    """

    values: torch.Tensor
    metadata: torch.Tensor
    shape: tuple
    pattern: Pattern
    layout: Layout
    check_metadata: InitVar[bool] = True

    def __post_init__(self, check_metadata: bool):
        self.pattern = as_pattern(self.pattern)
        self.shape = tuple(int(s) for s in self.shape)
        self.layout = get_layout(self.layout)
        self.layout.validate(self.values, self.metadata, self.shape, self.pattern, check_metadata)

    def check(self) -> "NMSparseWeight":
        """Validate every index now (for a weight built with ``check_metadata=False``)."""
        self.layout.check_metadata(self.values, self.metadata, self.shape, self.pattern)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """{name: tensor} as the layout names them (what SparseLinear and checkpoints hold)."""
        return {name: getattr(self, name) for name in self.layout.tensor_names}

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

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
        """Bytes of values plus metadata."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.metadata))

    def to(self, device) -> "NMSparseWeight":
        return NMSparseWeight(
            self.values.to(device), self.metadata.to(device), self.shape, self.pattern, self.layout,
            check_metadata=False,
        )
