"""The bench step: fp16 2:4 GEMMs (cuSPARSELt, torch._cslt_sparse_mm, Triton) against cuBLAS dense, W4A16
against fp16, and the compress kernels against a clone; every output is checked against the reference."""

from __future__ import annotations

from pathlib import Path

from .outcome import FAILED, NOT_RUN, PASSED, TIMED_OUT, StepResult
from .plan import BENCH_M, BENCH_ROUNDS, BENCH_SHAPES, COMPRESS_SHAPE, W4A16_M, w4a16_blocker
from .processes import Recorder, run_worker


def step_bench(python: str, out_dir: Path, step: StepResult) -> None:
    records = run_worker("bench", python, out_dir, step)
    gemm = [r for r in records if r["kind"] == "gemm"]
    compress = [r for r in records if r["kind"] == "compress"]
    w4a16 = next((r["rows"] if r["rows"] is not None else r["why"] for r in records if r["kind"] == "w4a16"), None)
    impls = next((r["impls"] for r in records if r["kind"] == "impls"), [])
    wrong = [w for r in records for w in r.get("wrong", [])]
    end = next((r for r in records if r["kind"] == "end"), None)
    step.detail = {"impls": impls, "gemm": gemm, "w4a16": w4a16, "compress": compress, "wrong": wrong}
    if step.status != NOT_RUN:
        return
    if wrong:
        step.status, step.summary = FAILED, f"{len(wrong)} wrong outputs: " + "; ".join(wrong[:3])
    elif end is None or not end["complete"]:
        step.status = TIMED_OUT
        step.summary = f"{len(gemm)} GEMM rows before its {step.budget_s} s budget ran out"
    else:
        step.status = PASSED
        best = max((r for r in gemm), key=lambda r: r.get("best_speedup") or 0, default=None)
        step.summary = f"{len(gemm)} GEMM rows, {len(compress)} compress rows, all outputs right" + (
            f"; best sparse speed-up {best['best_speedup']:.2f}x ({best['shape']}, M={best['m']})"
            if best and best.get("best_speedup") else "")


def _median_us(fns: dict, rounds: int = BENCH_ROUNDS) -> dict:
    """Median microseconds of each callable, measured in interleaved rounds."""
    import statistics

    import triton.testing

    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def _matmul_wrong(name: str, y, truth, plain) -> str | None:
    """A GEMM output off the fp32 product by more than twice cuBLAS's fp16 error plus an fp16 ulp."""
    import torch

    ulp = torch.finfo(torch.float16).eps * truth.abs().max()
    allowed = 2 * (plain.float() - truth).abs().max() + ulp
    err = (y.float() - truth).abs().max()
    return None if bool(err <= allowed) else f"{name}: max error {float(err):.3g} > allowed {float(allowed):.3g}"


def bench_gemm(record: Recorder) -> bool:
    import torch

    import nxm_kernels as nxm
    from benchmarks import cases
    from benchmarks.gpu.test_bench_sparse_gemm import dense_baseline, torch_cslt_baseline, triton_baseline
    from nxm_kernels.backends import cusparselt

    dtype, gpu = torch.float16, torch.cuda.get_device_name()
    impls = ["cusparselt", "cusparselt tuned", "torch._cslt_sparse_mm", "triton", "cuBLAS dense"]
    record(kind="impls", impls=impls)
    for shape_name, shape in BENCH_SHAPES.items():
        w = nxm.project(cases.weight(shape, dtype, "cuda"), "2:4")
        sw = nxm.compress(w, "2:4", layout="cusparselt")
        for m in BENCH_M:
            if record.time_left() <= 0:
                return False
            x = cases.activations(m, shape[1], dtype, "cuda")
            notes = []
            fns = {"cusparselt": lambda: nxm.sparse_mm(x, sw), "cuBLAS dense": dense_baseline(x, w, dtype),
                   "torch._cslt_sparse_mm": torch_cslt_baseline(x, w, dtype),
                   "triton": triton_baseline(x, w, "2:4", notes)}
            tuned = nxm.tune(sw, tokens=(m,), iterations=5, save=False)[m]
            config = (tuned["alg_id"], tuned["split_k"])
            fns["cusparselt tuned"] = lambda: cusparselt._run(x, sw, None, None, dtype, config)
            notes.append(f"cusparselt tuned at M={m} ({shape_name}): algorithm {config[0]}, split-k "
                         f"{config[1] or 'heuristic'}")
            fns = {name: fn for name, fn in fns.items() if fn is not None}
            truth = x.float() @ w.float().T
            plain = fns["cuBLAS dense"]()
            wrong = [why for name, fn in fns.items() if (why := _matmul_wrong(name, fn(), truth, plain))]
            us = _median_us(fns)
            speedups = [us["cuBLAS dense"] / t for name, t in us.items() if name != "cuBLAS dense"]
            record(kind="gemm", shape=f"{shape_name} {shape[0]}x{shape[1]}", m=m, gpu=gpu, us=us, notes=notes,
                   wrong=[f"{shape_name} M={m} {why}" for why in wrong], best_speedup=max(speedups, default=None))
    return True


def bench_w4a16(record: Recorder) -> bool:
    import torch

    import nxm_kernels as nxm
    from benchmarks import cases

    shape = BENCH_SHAPES["decoder-8b.attn-qo"]
    w = cases.weight(shape, torch.float16, "cuda")
    why = w4a16_blocker()
    if why is None:
        try:  # the API may exist before a GPU kernel for it does
            sw = nxm.compress(w, "2:4", layout="tiled_q", bits=4, group_size=128)
            dense_w = nxm.decompress(sw)
            nxm.sparse_mm(cases.activations(1, shape[1], torch.float16, "cuda"), sw)
        except (nxm.BackendNotSupported, NotImplementedError, TypeError, ValueError) as error:
            why = f"int4 2:4 weights do not run on this GPU yet: {error}"
    if why is not None:
        record(kind="w4a16", rows=None, why=why)
        return True
    rows, wrong = [], []
    for m in W4A16_M:
        if record.time_left() <= 0:
            return False
        x = cases.activations(m, shape[1], torch.float16, "cuda")
        truth, plain = x.float() @ dense_w.float().T, torch.nn.functional.linear(x, dense_w)
        if why := _matmul_wrong(f"W4A16 M={m}", nxm.sparse_mm(x, sw), truth, plain):
            wrong.append(why)
        us = _median_us({"w4a16": lambda: nxm.sparse_mm(x, sw), "dense": lambda: torch.nn.functional.linear(x, w)})
        rows.append({"m": m, "us": us["w4a16"], "dense_us": us["dense"]})
    record(kind="w4a16", rows=rows, why=None, wrong=wrong)
    return True


def bench_compress(record: Recorder) -> bool:
    import torch

    import nxm_kernels as nxm
    from benchmarks import cases

    w = cases.weight(COMPRESS_SHAPE, torch.float16, "cuda")
    dense = nxm.project(w, "2:4", backend="reference")
    kernels = {"clone": lambda: w.clone()}
    for layout, backend in (("packed", "native"), ("packed", "triton"), ("cutlass", "native"), ("cutlass", "triton"),
                            ("cusparselt", "cusparselt")):
        kernels[f"{backend} {layout}"] = lambda layout=layout, backend=backend: nxm.compress(
            w, "2:4", layout=layout, backend=backend)
    for name, fn in kernels.items():
        if record.time_left() <= 0:
            return False
        try:
            out = fn()
        except (nxm.BackendNotSupported, TypeError, ValueError) as error:
            record(kind="compress", kernel=name, us=None, why=str(error))
            continue
        right = torch.equal(out if name == "clone" else nxm.decompress(out), w if name == "clone" else dense)
        record(kind="compress", kernel=name, us=_median_us({name: fn})[name],
               wrong=[] if right else [f"compress {name}: decompress(compress(w)) != project(w)"])
    return True


def worker_bench(record: Recorder) -> None:
    complete = bench_gemm(record) and bench_w4a16(record) and bench_compress(record)
    record(kind="end", complete=complete)
