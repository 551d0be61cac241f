"""The quantized 2:4 GEMM on a GPU: the Triton W4A16 / W8A16 kernel (``tiled_q`` layout) against
cuBLAS dense fp16 (``F.linear`` on the unquantized weight) at decode sizes, M = 1 .. 16, beside the
bytes bound of ``benchmarks/roofline.py``.

Timed with ``triton.testing.do_bench`` (CUDA events, L2 cleared, median) in interleaved rounds; each
output is first checked against the reference (x @ dequantized W.T in fp32). The rows go to the
report beside the sparse GEMM's (benchmarks/gpu/results/, or NXM_BENCH_OUT). Skipped without a GPU.
"""

import statistics

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import dispatch

from .. import cases, roofline
from . import report

pytestmark = pytest.mark.gpu
M_VALUES = (1, 2, 4, 8, 16)
ENCODINGS = {"int4-g128": (4, 128), "int4": (4, None), "int8": (8, None)}  # name -> (bits, group size)
QUICK_ENCODINGS = ("int4-g128",)
ROUNDS = 3


def grid():
    return [pytest.param(shape_name, encoding, m, id=f"{shape_name}-{encoding}-M{m}")
            for shape_name in roofline.QUANT_SHAPES for encoding in ENCODINGS for m in M_VALUES]


def quantized_triton(x, w, bits: int, group_size, notes: list):
    """The Triton GEMM on ``w`` compressed as ``bits``-bit 2:4 in ``tiled_q``, or None (the reason in notes)."""
    sw = nxm.compress(w, "2:4", layout="tiled_q", bits=bits, group_size=group_size)
    why = dispatch.reasons(dispatch.get_backend("triton"), "sparse_mm", {"x": x, "sw": sw, "bias": None})
    if why:
        notes.append("triton: " + "; ".join(why))
        return None, sw
    return (lambda: nxm.sparse_mm(x, sw, backend="triton")), sw


@pytest.mark.parametrize("shape_name, encoding, m", grid())
def test_quant_gemm(benchmark, profile, shape_name, encoding, m):
    import triton.testing

    if not profile.full_grid and encoding not in QUICK_ENCODINGS:
        pytest.skip("int4 per row and int8 run in the full profile (--bench-full)")
    n, k = roofline.QUANT_SHAPES[shape_name]
    bits, group = ENCODINGS[encoding]
    w = cases.weight((n, k), torch.float16, "cuda")
    x = cases.activations(m, k, torch.float16, "cuda")
    notes = []
    run, sw = quantized_triton(x, w, bits, group, notes)
    if run is None:
        pytest.skip("; ".join(notes))
    dense_w = nxm.decompress(sw)
    truth = x.float() @ dense_w.float().T
    plain = torch.nn.functional.linear(x, dense_w)
    err, allowed = (run().float() - truth).abs().max(), 2 * (plain.float() - truth).abs().max() + \
        torch.finfo(torch.float16).eps * truth.abs().max()
    assert err <= allowed, f"max error {float(err):.3g} > allowed {float(allowed):.3g}"
    impls = {"triton " + encoding: run, "cuBLAS dense": lambda: torch.nn.functional.linear(x, w)}
    samples = {name: [] for name in impls}
    for _ in range(ROUNDS):  # interleaved: both see the same conditions
        for name, fn in impls.items():
            samples[name].append(triton.testing.do_bench(fn, warmup=10, rep=50) * 1000)
    us = {name: statistics.median(values) for name, values in samples.items()}
    bound = roofline.weight_bytes(n, k) / roofline.weight_bytes(n, k, bits, group)
    report.QUANT_RESULTS.append({"shape": f"{shape_name} {n}x{k}", "encoding": encoding, "m": m,
                                 "gpu": torch.cuda.get_device_name(), "us": us["triton " + encoding],
                                 "dense_us": us["cuBLAS dense"], "bound": bound})
    benchmark.extra_info.update({"us": us, "speedup_vs_dense": us["cuBLAS dense"] / us["triton " + encoding],
                                 "weight_bytes_bound": bound})

    def candidate():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(candidate, rounds=profile.min_rounds, warmup_rounds=2)
