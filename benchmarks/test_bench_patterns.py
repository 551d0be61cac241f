"""Every pattern kind on one weight: nm_mask, project and compress for 2:4, 2:4t, 8:4x4 and a
library of 8 4x4 masks that each keep 8, against ``w.clone()`` in the same rounds (the
memory-bandwidth floor; printed beside the ratio: the op's own floor, its bytes read and written
over the clone's). Row 2:4 and 2:4t run on the fastest backend (on CPU the native one; 2:4t:
csrc/cpu_transposable*.cpp); 8:4x4 and the library on their exact search (``nxm_kernels.patterns``). Compress stores 2:4 and 2:4t in ``packed`` (2:4t: W and W^T),
8:4x4 and the library in ``block``.

And ``sparse_mm`` of the ``block`` layout (auto: the native CPU GEMM, the Triton one on a GPU)
against dense ``F.linear`` on the decompressed weight, at M = 1, 8 and 64, beside the bytes ratio
(dense bytes / values + metadata bytes), the limit where both stream their weight."""

import functools
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

import nxm_kernels as nxm
from nxm_kernels.pattern import as_pattern

from . import cases, harness

# 8 distinct 4x4 masks that each keep 8: rotations of the first half of the block.
LIBRARY = str(nxm.Pattern.library(torch.stack([torch.arange(16).roll(k) < 8 for k in range(8)]).view(8, 4, 4)))
KINDS = ("2:4", "2:4t", "8:4x4", LIBRARY)
OPS = ("nm_mask", "project", "compress")
LAYOUT = {"2:4": "packed", "2:4t": "packed", "8:4x4": "block", LIBRARY: "block"}


def all_cases():
    return [(op, kind, shape_name, dtype) for op in OPS for kind in KINDS for shape_name in cases.MODEL_SHAPES
            for dtype in (torch.float16, torch.bfloat16, torch.float32)]


def in_quick_grid(op, kind, shape_name, dtype) -> bool:
    return op in ("project", "compress") and dtype == torch.float16 and shape_name in cases.QUICK_SHAPES


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases.grid(metafunc, "case", all_cases, in_quick_grid)


def test_select(benchmark, profile, case):
    device, op, kind, shape_name, dtype = case
    shape = cases.MODEL_SHAPES[shape_name]
    pattern = as_pattern(kind)
    w = cases.weight(shape, dtype, device)
    layout = LAYOUT[kind] if op == "compress" else None
    candidate = functools.partial(getattr(nxm, op), w, pattern, *([layout] if layout else []))
    name = "library 8 of 4x4 masks" if kind == LIBRARY else kind
    benchmark.group = f"{op} {name} {cases.dtype_name(dtype)} {shape_name} {device}"
    # The floor: an op that reads w once and writes its result, against the clone's read + write.
    result = candidate()
    written = sum(cases.nbytes(t) for t in (result.tensors().values() if op == "compress" else [result]))
    limit = (cases.nbytes(w) + written) / (2 * cases.nbytes(w))
    ratios = harness.measure(
        benchmark, profile, torch.device(device), candidate, {"clone": w.clone},
        kind="convert", op=op, layout=layout, pattern=name, dtype=cases.dtype_name(dtype),
        model=shape_name, shape=list(shape), backend="auto", bytes=cases.nbytes(w), baselines_unavailable={},
    )
    clone = ratios["clone"]
    benchmark.extra_info.update(bytes_limit=limit)
    seconds = statistics.median(benchmark.extra_info["samples_s"]["candidate"]) / \
        benchmark.extra_info["calls_per_sample"]["candidate"]
    print(f"\n| {op} | {name} | {cases.dtype_name(dtype)} | {shape_name} {shape[0]}x{shape[1]} | "
          f"{seconds * 1e3:.1f} ms | {clone['median']:.2f}x [{clone['min']:.2f}-{clone['max']:.2f}] | {limit:.2f}x | {torch.get_num_threads()} | "
          f"{os.getloadavg()[0]:.1f} |")


BLOCK_KINDS = ("8:4x4", LIBRARY)


@pytest.mark.parametrize("m", (1, 8, 64), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=cases.dtype_name)
@pytest.mark.parametrize("kind", BLOCK_KINDS, ids=lambda k: "library" if k == LIBRARY else k)
def test_block_sparse_mm(benchmark, profile, kind, dtype, m):
    shape = cases.MODEL_SHAPES["decoder-8b.attn-qo"]
    w = cases.weight(shape, dtype, "cpu")
    sw = nxm.compress(w, kind, "block")
    dense = nxm.decompress(sw)
    x = cases.activations(m, shape[1], dtype, "cpu")
    cases.require_backend("native", "sparse_mm", x=x, sw=sw, bias=None)
    name = "library 8 of 4x4 masks" if kind == LIBRARY else kind
    limit = cases.nbytes(dense) / (cases.nbytes(sw.values) + cases.nbytes(sw.metadata))
    benchmark.group = f"sparse_mm block {name} {cases.dtype_name(dtype)} decoder-8b.attn-qo M={m} cpu"
    ratios = harness.measure(
        benchmark, profile, torch.device("cpu"), functools.partial(nxm.sparse_mm, x, sw),
        {"dense F.linear": functools.partial(F.linear, x, dense)},
        kind="cpu_gemm", op="sparse_mm", layout="block", pattern=name, dtype=cases.dtype_name(dtype),
        model="decoder-8b.attn-qo", shape=list(shape), m=m, backend="auto", bytes=cases.nbytes(dense),
        baselines_unavailable={},
    )
    speedup = 1 / ratios["dense F.linear"]["median"]
    benchmark.extra_info.update(bytes_ratio=limit, speedup_median=speedup)
    print(f"\n| sparse_mm block {name} {cases.dtype_name(dtype)} M={m} | {speedup:.2f}x | {limit:.2f}x | "
          f"{torch.get_num_threads()} | {os.getloadavg()[0]:.1f} |")
