"""Selection and conversion of one weight: nm_mask, project, compress and decompress per layout.

Baselines in the same rounds: ``w.clone()`` (reads and writes the dense weight once: the
memory-bandwidth floor) and torch's own converter applied to the already projected weight (it
only converts, it does not select, so it is a generous baseline):
``sparse_semi_structured_from_dense_cutlass`` for cutlass, ``torch._cslt_compress`` (on a GPU)
for cusparselt.
"""

import functools

import pytest
import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import nxm_kernels as nxm
from nxm_kernels.encodings import as_encoding
from nxm_kernels.layouts import get_layout
from nxm_kernels.pattern import as_pattern

from . import cases, harness

OPS = (("nm_mask", None), ("project", None),
       *[(op, layout) for op in ("compress", "decompress") for layout in nxm.LAYOUTS])


def in_quick_grid(op, layout, shape_name, dtype) -> bool:
    if (op, layout) == ("compress", "cutlass"):  # the conversion users run on whole checkpoints
        return dtype == torch.float16 or shape_name == "decoder-8b.attn-qo"
    return dtype == torch.float16 and shape_name in cases.QUICK_SHAPES


def all_cases():
    return [(op, layout, shape_name, dtype) for op, layout in OPS for shape_name in cases.MODEL_SHAPES
            for dtype in cases.DTYPES]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases.grid(metafunc, "case", all_cases, in_quick_grid)


@pytest.mark.parametrize("backend", cases.backend_names())
def test_convert(benchmark, profile, case, backend):
    device, op, layout, shape_name, dtype = case
    shape = cases.MODEL_SHAPES[shape_name]
    pattern = as_pattern(cases.pattern_for(dtype, layout or "packed"))
    w = cases.weight(shape, dtype, device)
    baselines, unavailable = {"clone": w.clone}, {}
    if op == "decompress":
        sw = cases.compress_or_skip(w, pattern, layout)
        cases.require_backend(backend, op, sw=sw)
        candidate = functools.partial(nxm.decompress, sw, backend=backend)
    elif op == "compress":
        try:
            get_layout(layout).check(dtype, shape, pattern)
        except (ValueError, TypeError) as error:
            pytest.skip(str(error))
        if reasons := get_layout(layout).encoding_reasons(as_encoding("float")):  # a layout of codes only
            pytest.skip(reasons[0])
        cases.require_backend(backend, op, w=w, pattern=pattern, layout=layout, scores=None)
        candidate = functools.partial(nxm.compress, w, pattern, layout=layout, backend=backend)
        if layout == "cutlass":
            cases.add_baseline(baselines, unavailable, "torch cutlass converter",
                               functools.partial(sparse_semi_structured_from_dense_cutlass, nxm.project(w, pattern)))
        if layout == "cusparselt":
            cases.add_baseline(baselines, unavailable, "torch._cslt_compress",
                               functools.partial(torch._cslt_compress, nxm.project(w, pattern)))
    else:
        cases.require_backend(backend, op, w=w, pattern=pattern, scores=None)
        candidate = functools.partial(getattr(nxm, op), w, pattern, backend=backend)
    benchmark.group = f"{op} {layout or ''} {pattern} {cases.dtype_name(dtype)} {shape_name} {device}"
    harness.measure(
        benchmark, profile, torch.device(device), candidate, baselines,
        kind="convert", op=op, layout=layout, pattern=str(pattern), dtype=cases.dtype_name(dtype),
        model=shape_name, shape=list(shape), backend=backend, bytes=cases.nbytes(w),
        baselines_unavailable=unavailable,
    )
