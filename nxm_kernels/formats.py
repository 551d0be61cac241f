"""Compressed N:M weights: the ``NMSparseWeight`` container and what each layout can hold."""

from __future__ import annotations

from dataclasses import InitVar, dataclass

import torch

from . import reference
from .pattern import Pattern, PatternLike, as_pattern, check_groups

LAYOUTS = ("packed", "cutlass", "cusparselt")
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
# cusparselt also holds fp8 weights (made by nxm_kernels.backends.cusparselt.compress_pruned).
CUSPARSELT_DTYPES = VALUE_DTYPES + (torch.float8_e4m3fn,)

# cutlass: the pattern each dtype's Sparse Tensor Core instruction implements, and the
# (rows, cols) multiples that CUTLASS's metadata reordering needs.
CUTLASS_PATTERN = {
    torch.float16: Pattern(2, 4),
    torch.bfloat16: Pattern(2, 4),
    torch.int8: Pattern(2, 4),
    torch.float32: Pattern(1, 2),
}


def cutlass_multiples(dtype: torch.dtype) -> tuple[int, int]:
    # Rows: CUTLASS reorders metadata in blocks of 32 (int16) / 16 (int32) rows. Columns: the
    # reorder swaps metadata in 2x2 blocks, so each row needs an even number of metadata elements
    # (16 values per int16 element for fp16/bf16, 8 for fp32 pairs, 32 per int32 element for int8).
    return {torch.int8: (16, 64), torch.float32: (32, 16)}.get(dtype, (32, 32))


# cusparselt: the opaque buffer of cuSPARSELt's compress, made on a GPU; the same patterns as
# cutlass (the hardware's), for fp8 too.
CUSPARSELT_PATTERN = {**CUTLASS_PATTERN, torch.float8_e4m3fn: Pattern(2, 4)}


def cusparselt_multiples(dtype: torch.dtype) -> tuple[int, int]:
    """(weight rows and cols, activation rows and cols): the multiples cuSPARSELt needs for ``dtype``
    (structured operand 32/16/8 for 8/16/32-bit values, dense operand half that)."""
    weight = {1: 32, 2: 16, 4: 8}[dtype.itemsize]
    return weight, weight // 2


# The layouts the hardware reads: (pattern per dtype, (rows, cols) multiples, why those multiples).
HARDWARE_LAYOUTS = {
    "cutlass": (CUTLASS_PATTERN, cutlass_multiples, "CUTLASS's metadata reordering"),
    "cusparselt": (
        CUSPARSELT_PATTERN, lambda dtype: (cusparselt_multiples(dtype)[0],) * 2, "cuSPARSELt's structured operand"
    ),
}


def check_layout(dtype: torch.dtype, shape, pattern: Pattern, layout: str) -> None:
    """Raise a ValueError that names what ``layout`` needs if it cannot hold this weight."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {LAYOUTS}")
    allowed = CUSPARSELT_DTYPES if layout == "cusparselt" else VALUE_DTYPES
    if dtype not in allowed:
        raise TypeError(
            f"layout {layout!r} cannot hold dtype {dtype}: use one of "
            f"{', '.join(str(d) for d in allowed)} (convert the weight first)"
        )
    if len(shape) != 2:
        raise ValueError(f"compressed weights are 2-D [out_features, in_features], got shape {tuple(shape)}")
    check_groups(shape, pattern)
    if layout in HARDWARE_LAYOUTS:
        patterns, multiples, why = HARDWARE_LAYOUTS[layout]
        need = patterns[dtype]
        if pattern != need:
            raise ValueError(
                f"layout {layout!r} holds {dtype} only as {need} (the Sparse Tensor Core pattern), "
                f"not {pattern}: use pattern '{need}' or layout='packed'"
            )
        row_mult, col_mult = multiples(dtype)
        rows, cols = shape
        if rows % row_mult or cols % col_mult:
            raise ValueError(
                f"layout {layout!r} for {dtype} needs rows divisible by {row_mult} and columns by "
                f"{col_mult}, got {rows}x{cols} ({why}): pad the weight (SparseLinear does) or use "
                "layout='packed'"
            )


def expected_storage(dtype: torch.dtype, shape, pattern: Pattern, layout: str):
    """(values shape, metadata shape, metadata dtype) of a weight in ``layout``.

    cusparselt keeps its opaque buffer (kept values and metadata, cuSPARSELt's own order) 1-D in
    ``values``, in the weight's dtype, its length set by the library (None here), and no metadata.
    """
    rows, cols = shape
    if layout == "cusparselt":
        return None, (0,), torch.uint8
    values = (rows, cols // pattern.m * pattern.n)
    if layout == "packed":
        return values, (rows, reference.packed_row_bytes(cols, pattern)), torch.uint8
    meta_dtype = reference.cutlass_meta_dtype(dtype)
    # One nibble per group of 4 values (per pair for fp32), itemsize*2 nibbles per element.
    values_per_nibble = 2 if dtype == torch.float32 else 4
    return values, (rows, cols // (values_per_nibble * meta_dtype.itemsize * 2)), meta_dtype


@dataclass
class NMSparseWeight:
    """An N:M weight ``[out_features, in_features]`` held as kept values plus index metadata.

    Construction validates structure (dtypes, shapes, devices) and, unless
    ``check_metadata=False`` (for trusted outputs of ``compress``), that every index is in range
    and that no group repeats one.
    """

    values: torch.Tensor
    metadata: torch.Tensor
    shape: tuple
    pattern: Pattern
    layout: str
    check_metadata: InitVar[bool] = True

    def __post_init__(self, check_metadata: bool):
        self.pattern = as_pattern(self.pattern)
        self.shape = tuple(int(s) for s in self.shape)
        check_layout(self.values.dtype, self.shape, self.pattern, self.layout)
        values_shape, meta_shape, meta_dtype = expected_storage(
            self.values.dtype, self.shape, self.pattern, self.layout
        )
        if values_shape is None:  # cusparselt: at least the kept values, plus the library's metadata
            kept = self.shape[0] * self.shape[1] // self.pattern.m * self.pattern.n
            if self.values.dim() != 1 or self.values.numel() <= kept:
                raise ValueError(
                    f"a cusparselt weight holds cuSPARSELt's compressed buffer as one 1-D tensor of more than "
                    f"{kept} elements, got shape {tuple(self.values.shape)}: re-create it with "
                    "nxm.compress(w, pattern, layout='cusparselt') on a GPU"
                )
        elif tuple(self.values.shape) != values_shape:
            raise ValueError(
                f"values have shape {tuple(self.values.shape)}, but a {self.shape[0]}x{self.shape[1]} "
                f"{self.pattern} weight needs {values_shape}"
            )
        if self.metadata.dtype != meta_dtype or tuple(self.metadata.shape) != meta_shape:
            raise ValueError(
                f"metadata is {self.metadata.dtype} {tuple(self.metadata.shape)}, but layout "
                f"{self.layout!r} for this weight needs {meta_dtype} {meta_shape}"
            )
        if self.values.device != self.metadata.device:
            raise ValueError(
                f"values are on {self.values.device} but metadata on {self.metadata.device}: move both"
            )
        if check_metadata:
            self._check_indices()

    def _check_indices(self) -> None:
        if self.layout == "cusparselt":
            return  # opaque: only cuSPARSELt reads it
        if self.layout == "cutlass":
            nibbles = reference.cutlass_nibbles(self.metadata)
            valid = reference.CUTLASS_VALID_NIBBLES_1_2 if self.values.dtype == torch.float32 \
                else reference.CUTLASS_VALID_NIBBLES_2_4
            bad = ~torch.isin(nibbles, torch.tensor(valid, device=nibbles.device))
            if bad.any():
                row, group = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"corrupt cutlass metadata: group {group} of row {row} has nibble "
                    f"{int(nibbles[row, group]):#06b}, which repeats an index or is out of order; "
                    "re-create the weight with nxm.compress"
                )
            return
        n, m, bits = self.pattern.n, self.pattern.m, self.pattern.index_bits
        rows, cols = self.shape
        count = cols // m * n
        idx = reference.unpack_indices(self.metadata, bits, count).reshape(rows, cols // m, n)
        problems = (
            (idx >= m, f"an index out of range [0, {m})"),
            (idx[..., 1:] == idx[..., :-1], "an index repeated within its group"),
            (idx[..., 1:] < idx[..., :-1], "indices not in ascending order"),
        )
        for bad, what in problems:
            if bad.any():
                row, group = (int(i) for i in bad.nonzero()[0][:2])
                raise ValueError(
                    f"corrupt packed metadata: group {group} of row {row} has {what} "
                    f"(indices {idx[row, group].tolist()}); re-create the weight with nxm.compress"
                )
        if reference.packed_padding_bits(self.metadata, bits, count).any():
            raise ValueError("corrupt packed metadata: padding bits at the end of a row are not zero")

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
