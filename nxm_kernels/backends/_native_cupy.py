"""The native CUDA kernels without a CUDA build of ``_C``: CuPy compiles the same torch-free source
(``csrc/cuda/nm_kernels.cu`` with ``csrc/nm_core.h``) at run time with NVRTC, for the GPU at hand.
The launch parameters mirror the host code at the end of nm_kernels.cu.

Install with ``pip install nxm-kernels[cupy]``. Used by the native backend for CUDA tensors when
``_C`` was built without CUDA (or is absent: a pure-Python install).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from ..layouts import CUTLASS, PACKED
from ..layouts.cutlass import PATTERN as CUTLASS_PATTERN
from ..pattern import Pattern

THREADS = 256  # kThreads in nm_kernels.cu
NVRTC_OPTIONS = ("-std=c++17",)

# nm_kernels.cu spells the raw-bits types of nm_core.h; scores: NoScores (by |w|), float, double.
BITS = {torch.int8: "int8_t", torch.float16: "uint16_t", torch.bfloat16: "uint16_t", torch.float32: "uint32_t",
        torch.float64: "uint64_t"}
SCORES = {None: "nxm::NoScores", torch.float32: "float", torch.float64: "double"}
PACKED_BITS = ("int8_t", "uint16_t", "uint32_t")  # layouts hold no float64


def kernel_names() -> list[str]:
    """Every kernel instantiation the launchers below use (NVRTC name expressions)."""
    names = []
    for bits in sorted(set(BITS.values())):
        for score in SCORES.values():
            names += [f"nxm::select_kernel<{bits}, {score}, {flag}>" for flag in ("true", "false")]
            if bits in PACKED_BITS:
                names += [f"nxm::compress_packed_kernel<{bits}, {score}>", f"nxm::compress_cutlass_kernel<{bits}, {score}>"]
        if bits in PACKED_BITS:
            names += [f"nxm::decompress_packed_kernel<{bits}>", f"nxm::decompress_cutlass_kernel<{bits}>"]
    return names


def source_dir() -> Path:
    """The csrc folder: shipped in the wheel as nxm_kernels/_csrc, or the source tree's csrc/."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "cuda" / "nm_kernels.cu").exists():
            return candidate
    raise FileNotFoundError(f"nm_kernels.cu is neither in {package / '_csrc'} nor in {package.parent / 'csrc'}")


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install nxm-kernels[cupy]) to compile the CUDA kernels at run time"
    try:
        source_dir()
    except FileNotFoundError as error:
        return f"the CUDA kernel sources are missing: {error}"
    return None


@functools.cache
def _module():
    import cupy

    folder = source_dir()
    return cupy.RawModule(code=(folder / "cuda" / "nm_kernels.cu").read_text(),
                          options=NVRTC_OPTIONS + (f"-I{folder / 'cuda'}",), name_expressions=kernel_names())


def _launch(name: str, blocks: int, device: torch.device, *args) -> None:
    """Launch on torch's current stream; tensors go in as pointers, ints as the given numpy type."""
    import cupy
    import numpy as np

    if blocks == 0:
        return
    converted = [np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
    with cupy.cuda.Device(device.index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        _module().get_function(name)((blocks,), (THREADS,), tuple(converted), stream=stream)


def _row_tiles(rows: int, units_per_row: int) -> tuple[int, int]:
    if rows == 0 or units_per_row == 0:
        return 0, 1
    per_block = 1 if units_per_row >= THREADS else THREADS // units_per_row
    return -(-rows // per_block), per_block


def _scores(scores: torch.Tensor | None):
    return (None, None) if scores is None else (scores.dtype, scores.contiguous())


def select(w: torch.Tensor, pattern: Pattern, scores, project: bool) -> torch.Tensor:
    import numpy as np

    w = w.contiguous()
    score_dtype, s = _scores(scores)
    out = torch.empty(w.shape, dtype=w.dtype if project else torch.bool, device=w.device)
    n, m = pattern.n, pattern.m
    cols = w.shape[-1]
    rows = w.numel() // cols if cols else 0
    group_bytes = m * w.element_size()
    per_16_bytes = 16 // group_bytes if 16 % group_bytes == 0 else 1
    unit_groups = per_16_bytes if (cols // m) % per_16_bytes == 0 else 1
    units_per_row = cols // m // unit_groups
    blocks, rows_per_block = _row_tiles(rows, units_per_row)
    name = f"nxm::select_kernel<{BITS[w.dtype]}, {SCORES[score_dtype]}, {'true' if project else 'false'}>"
    _launch(name, blocks, w.device, w, s if s is not None else np.uint64(0), np.int64(rows), np.int64(units_per_row),
            np.int64(rows_per_block), np.int32(unit_groups), np.int32(n), np.int32(m), out)
    return out


def _chunk_groups(n: int, bits: int) -> int:
    groups = 1
    while (groups * n * bits) % 8:
        groups += 1
    return groups


def compress_packed(w: torch.Tensor, pattern: Pattern, scores):
    import numpy as np

    w = w.contiguous()
    score_dtype, s = _scores(scores)
    rows, cols = w.shape
    n, m, bits = pattern.n, pattern.m, pattern.index_bits
    values, metadata = _outputs(PACKED, w, pattern)
    chunk = _chunk_groups(n, bits)
    units_per_row = -(-(cols // m) // chunk)
    blocks, rows_per_block = _row_tiles(rows, units_per_row)
    _launch(f"nxm::compress_packed_kernel<{BITS[w.dtype]}, {SCORES[score_dtype]}>", blocks, w.device, w,
            s if s is not None else np.uint64(0), np.int64(rows), np.int64(cols), np.int64(units_per_row),
            np.int64(rows_per_block), np.int32(chunk), np.int32(n), np.int32(m), np.int32(bits), values, metadata)
    return values, metadata


def decompress_packed(values: torch.Tensor, metadata: torch.Tensor, shape, pattern: Pattern) -> torch.Tensor:
    import numpy as np

    values, metadata = values.contiguous(), metadata.contiguous()
    rows, cols = shape
    n, m, bits = pattern.n, pattern.m, pattern.index_bits
    dense = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    chunk = _chunk_groups(n, bits)
    units_per_row = -(-(cols // m) // chunk)
    blocks, rows_per_block = _row_tiles(rows, units_per_row)
    _launch(f"nxm::decompress_packed_kernel<{BITS[values.dtype]}>", blocks, values.device, values, metadata,
            np.int64(rows), np.int64(cols), np.int64(units_per_row), np.int64(rows_per_block), np.int32(chunk),
            np.int32(n), np.int32(m), np.int32(bits), dense)
    return dense


def _outputs(layout, w: torch.Tensor, pattern: Pattern):
    """Empty (values, metadata) of ``w`` in ``layout`` (the layout's storage)."""
    specs = layout.storage(w.dtype, tuple(w.shape), pattern)
    return tuple(torch.empty(specs[k].shape, dtype=specs[k].dtype, device=w.device) for k in ("values", "metadata"))


def _cutlass_cols_per_element(dtype: torch.dtype) -> int:
    """Weight columns per cutlass metadata element."""
    cols = 1024  # any multiple of every dtype's column multiple
    return cols // CUTLASS.storage(dtype, (1, cols), CUTLASS_PATTERN[dtype])["metadata"].shape[1]


def compress_cutlass(w: torch.Tensor, scores):
    import numpy as np

    w = w.contiguous()
    score_dtype, s = _scores(scores)
    rows, cols = w.shape
    per_element = _cutlass_cols_per_element(w.dtype)
    values, metadata = _outputs(CUTLASS, w, CUTLASS_PATTERN[w.dtype])
    blocks, rows_per_block = _row_tiles(rows, cols // per_element)
    _launch(f"nxm::compress_cutlass_kernel<{BITS[w.dtype]}, {SCORES[score_dtype]}>", blocks, w.device, w,
            s if s is not None else np.uint64(0), np.int64(rows), np.int64(cols), np.int64(rows_per_block), values,
            metadata)
    return values, metadata


def decompress_cutlass(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    import numpy as np

    values, metadata = values.contiguous(), metadata.contiguous()
    rows, cols = values.shape[0], values.shape[1] * 2
    dense = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    blocks, rows_per_block = _row_tiles(rows, cols // _cutlass_cols_per_element(values.dtype))
    _launch(f"nxm::decompress_cutlass_kernel<{BITS[values.dtype]}>", blocks, values.device, values, metadata,
            np.int64(rows), np.int64(cols), np.int64(rows_per_block), dense)
    return dense
