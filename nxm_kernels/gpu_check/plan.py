"""The plan of a gpu-check run: its steps, their time budgets, the shapes and dtypes they cover and the
commands they start, and the plan text that --dry-run prints."""

from __future__ import annotations

import datetime
from pathlib import Path

from .outcome import EXIT_MEANING

REPO = Path(__file__).resolve().parents[2]  # the checkout gpu-check builds and tests


TIME_LIMIT_S = 480  # the whole run, build included, on one H100/H200-class GPU
# Seconds per step: a step is stopped at its budget. The sum leaves SUMMARY_S for starting processes
# and writing the summary.
BUDGETS = {"env": 40, "build": 150, "tests": 165, "algorithms": 40, "bench": 70}
SUMMARY_S = 15
STEPS = tuple(BUDGETS)
SKIPPABLE = ("build", "tests", "algorithms", "bench")
WORKER_MARGIN_S = 5  # a worker stops itself this long before its step is killed

DESELECTED_TESTS = "not time_against_dense"  # timing only, and the bench step times the same kernels
ALGORITHM_DTYPES = ("float16", "bfloat16", "int8", "float8_e4m3fn", "float32")
# (N, K, M): decoding; 256 rows, where pytorch#155333 saw wrong results; a medium GEMM. K = 512 keeps
# every sum of +-1 products within 256, so every output dtype holds the exact result.
ALGORITHM_SHAPES = ((512, 512, 1), (256, 512, 64), (1024, 512, 512))
SPLIT_K = (0, 1, 2, 4, 8)  # nxm.tune's split-k values (0: cuSPARSELt's heuristic)
REPEATS = 3  # runs of each id on the medium shape: some wrong results come and go
# Known wrong results, reported beside what this run finds. On those GPUs the id is excluded even
# when this run saw it right, since its failures come and go.
KNOWN_WRONG = {
    20: ((8, 0), "pytorch#155333: wrong results that come and go, for 256 or more output rows, on A100 "
                 "(cuSPARSELt as torch 2.7.1 ships it)"),
}
BENCH_SHAPES = {"decoder-8b.attn-qo": (4096, 4096), "decoder-8b.mlp-up": (14336, 4096)}  # benchmarks/cases.py names
BENCH_M = (1, 16, 128, 4096, 16384)
W4A16_M = (1, 4, 16)
COMPRESS_SHAPE = (14336, 4096)
BENCH_ROUNDS = 2  # interleaved rounds of triton.testing.do_bench per implementation


def default_out_dir() -> Path:
    return Path(f"gpu-check-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def gpu_test_files(repo: Path = REPO) -> list[str]:
    """The test modules that hold `gpu` tests (the others are not even collected)."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def w4a16_blocker() -> str | None:
    """Why the W4A16 benchmark cannot run in this checkout (None: it can)."""
    import inspect

    import nxm_kernels

    if "bits" not in inspect.signature(nxm_kernels.compress).parameters:
        return ("nxm.compress takes no bits= yet: int4 weights come with the low-bit issue (int8/int4 values with "
                "scales), which has not landed")
    return None


def plan_text(python: str, out_dir: Path, skip=(), build_mode: str = "inplace") -> str:
    """What a run does, step by step (printed by --dry-run)."""
    try:
        w4a16 = w4a16_blocker()
    except Exception as error:  # noqa: BLE001 (the plan still prints when the package does not import)
        w4a16 = f"unknown here (nxm_kernels does not import: {error})"
    build_cmd = " ".join(build_command(python, build_mode))
    mark = lambda name: " (skipped: --skip)" if name in skip else ""  # noqa: E731
    shapes = "; ".join(f"{n}x{k} M={m}" for n, k, m in ALGORITHM_SHAPES)
    lines = [
        "nxm gpu-check plan (--dry-run: nothing is run)",
        f"interpreter   {python}",
        f"output        {out_dir}/ (summary.json, summary.md, one log per step)",
        f"time limit    {TIME_LIMIT_S} s on one H100/H200-class GPU, build included; each step stops at its budget",
        "",
        f" 1. env        {BUDGETS['env']:>3} s  torch, CUDA, triton, cuSPARSELt, CuPy, nvcc, pytest versions; GPU name "
        "and capability (no GPU: exit 3)",
        f" 2. build      {BUDGETS['build']:>3} s  {build_cmd}{mark('build')}",
        "                    for this GPU's architecture only: NXM_CUDA_ARCHS = TORCH_CUDA_ARCH_LIST from "
        "torch.cuda.get_device_capability() (e.g. 9.0)",
        "                    CUDA_HOME from nvcc, NXM_FORCE_CUDA=1; then _C must load with its CUDA kernels",
        f" 3. tests      {BUDGETS['tests']:>3} s  TRITON_INTERPRET=0 pytest -m gpu -k '{DESELECTED_TESTS}'{mark('tests')}",
        f"                    {' '.join(gpu_test_files())}",
        f" 4. algorithms {BUDGETS['algorithms']:>3} s  every cuSPARSELt algorithm id against the reference, exact "
        f"(inputs in {{-1, 0, 1}}){mark('algorithms')}",
        f"                    dtypes {', '.join(ALGORITHM_DTYPES)} (float8 on sm_89+; float32 is 1:2 through TF32)",
        f"                    shapes N x K M: {shapes}",
        f"                    split-k {', '.join(map(str, SPLIT_K))} and {REPEATS} repeats on the last shape",
        "                    wrong ids: named here, excluded from nxm.tune and from every call "
        "(~/.cache/nxm_kernels/cusparselt_excluded.json)",
        f" 5. bench      {BUDGETS['bench']:>3} s  fp16 2:4 sparse GEMM against cuBLAS dense (F.linear): cuSPARSELt "
        f"(default and tuned), torch._cslt_sparse_mm, Triton{mark('bench')}",
        "                    shapes " + ", ".join(f"{name} {n}x{k}" for name, (n, k) in BENCH_SHAPES.items())
        + f"; M = {', '.join(map(str, BENCH_M))}",
        f"                    W4A16 2:4 against fp16 at M = {', '.join(map(str, W4A16_M))}: "
        + ("int4 2:4 weights (bits=4, group 128), where a GPU kernel serves them (else skipped, with the reason)"
           if w4a16 is None else f"skipped: {w4a16}"),
        f"                    compress {COMPRESS_SHAPE[0]}x{COMPRESS_SHAPE[1]} fp16 against w.clone(): native and "
        "Triton (packed, cutlass), cuSPARSELt",
        " 6. summary          summary.json and summary.md",
        "",
        "exit codes    " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_MEANING.items()),
    ]
    return "\n".join(lines)


def build_command(python: str, mode: str) -> list[str]:
    if mode == "editable":
        return [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    return [python, "setup.py", "build_ext", "--inplace"]
