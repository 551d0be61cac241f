"""Selection for every pattern kind on one weight: nm_mask and project for 2:4, 2:4t, 8:4x4 and a
library of 8 4x4 masks that each keep 8, against ``w.clone()`` in the same rounds (the
memory-bandwidth floor). Row 2:4 runs on the fastest backend; the block kinds on their exact
search (``nxm_kernels.patterns``)."""

import functools

import torch

import nxm_kernels as nxm
from nxm_kernels.pattern import as_pattern

from . import cases, harness

# 8 distinct 4x4 masks that each keep 8: rotations of the first half of the block.
LIBRARY = str(nxm.Pattern.library(torch.stack([torch.arange(16).roll(k) < 8 for k in range(8)]).view(8, 4, 4)))
KINDS = ("2:4", "2:4t", "8:4x4", LIBRARY)
OPS = ("nm_mask", "project")


def all_cases():
    return [(op, kind, shape_name, dtype) for op in OPS for kind in KINDS for shape_name in cases.MODEL_SHAPES
            for dtype in (torch.float16, torch.bfloat16, torch.float32)]


def in_quick_grid(op, kind, shape_name, dtype) -> bool:
    return op == "project" and dtype == torch.float16 and shape_name in cases.QUICK_SHAPES


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases.grid(metafunc, "case", all_cases, in_quick_grid)


def test_select(benchmark, profile, case):
    device, op, kind, shape_name, dtype = case
    shape = cases.MODEL_SHAPES[shape_name]
    pattern = as_pattern(kind)
    w = cases.weight(shape, dtype, device)
    candidate = functools.partial(getattr(nxm, op), w, pattern)
    name = "library 8 of 4x4 masks" if kind == LIBRARY else kind
    benchmark.group = f"{op} {name} {cases.dtype_name(dtype)} {shape_name} {device}"
    harness.measure(
        benchmark, profile, torch.device(device), candidate, {"clone": w.clone},
        kind="convert", op=op, layout=None, pattern=name, dtype=cases.dtype_name(dtype),
        model=shape_name, shape=list(shape), backend="auto", bytes=cases.nbytes(w), baselines_unavailable={},
    )
