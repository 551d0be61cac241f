"""`nxm gpu-check` (`make gpu-check`): the one-command acceptance run on a GPU server, with the
server's own Python and torch (nothing is installed, torch is never touched).

Steps, in order, each timed against a budget and recorded as passed or failed:
  env         torch, CUDA, triton, cuSPARSELt, CuPy, nvcc and test-package versions; the GPUs
  build       nxm_kernels._C in place, for this machine's GPU architectures only
  tests       the `gpu` tests (pytest -m gpu) with compiled Triton kernels (TRITON_INTERPRET=0)
  algorithms  every cuSPARSELt algorithm id against the reference, per dtype and shape; wrong ids
              are excluded from nxm.tune and from every call (the exclusion file)
  bench       cuSPARSELt and Triton against cuBLAS dense, W4A16 against fp16 (once it exists),
              the compress kernels against a clone
and a JSON and a Markdown summary in the output folder it prints.

`make gpu-check` runs this file by path, so the package (and a stale _C) is not imported before
the build; the steps after the build run in fresh processes, which load the new _C.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # run by path: imports start at the checkout

REPO = Path(__file__).resolve().parent.parent

EXIT_OK = 0
EXIT_WRONG = 1  # a wrong result: a failed test, a benchmark output off the reference, a wrong cuSPARSELt algorithm
EXIT_USAGE = 2
EXIT_NO_GPU = 3
EXIT_BUILD = 4  # the extension did not build or load, or torch/triton are older than this package supports
EXIT_TIMEOUT = 5  # nothing wrong was seen, but a step ran out of its time budget before it finished
EXIT_MEANING = {
    EXIT_OK: "every step passed",
    EXIT_WRONG: "a wrong result or a failed test",
    EXIT_USAGE: "bad usage",
    EXIT_NO_GPU: "no CUDA GPU is visible",
    EXIT_BUILD: "the extension did not build or load (or torch/triton are too old)",
    EXIT_TIMEOUT: "a step ran out of its time budget (nothing wrong seen)",
}

# ---------------------------------------------------------------- the plan: steps, budgets, shapes

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


def cuda_home_from_nvcc() -> str | None:
    """The CUDA toolkit root, asked from nvcc itself (the nvcc on PATH may be a wrapper script)."""
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^.* TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(found.group(1).strip()) if found else None


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


# ---------------------------------------------------------------- results and the summary

PASSED, FAILED, TIMED_OUT, SKIPPED, NOT_RUN = "passed", "failed", "timed out", "skipped", "not run"


@dataclass
class StepResult:
    name: str
    budget_s: int
    status: str = NOT_RUN
    seconds: float = 0.0
    summary: str = ""
    detail: dict = field(default_factory=dict)


def exit_code(steps: list[StepResult]) -> int:
    by_name = {s.name: s for s in steps}
    env = by_name.get("env")
    if env is not None and env.detail.get("no_gpu"):
        return EXIT_NO_GPU
    if (env is not None and env.status == FAILED) or by_name.get("build", StepResult("", 0)).status == FAILED:
        return EXIT_BUILD
    if any(s.status == FAILED for s in steps):
        return EXIT_WRONG
    if any(s.status == TIMED_OUT for s in steps):
        return EXIT_TIMEOUT
    return EXIT_OK


def write_summary(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """summary.json (everything) and summary.md (for people) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    gpus = env.get("gpus") or []
    gpu = f"{gpus[0]['name']} (sm_{gpus[0]['capability'].replace('.', '')})" if gpus else "no GPU"
    code = result["exit_code"]
    lines = [f"# nxm gpu-check on {gpu}", "",
             f"**Exit code {code}: {EXIT_MEANING.get(code, 'unknown')}.** Started {result['started']}, "
             f"{result['seconds']:.0f} s in all (limit {TIME_LIMIT_S} s).", "",
             f"Command: `{result['command']}`", "", "## Steps", "",
             "| step | status | time | budget | result |", "|---|---|---|---|---|"]
    for step in result["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} s | {step['budget_s']} s | "
                     f"{_cell(step['summary'])} |")
    if env:
        lines += ["", "## Environment", "", "| what | value |", "|---|---|"]
        for key in ("python", "torch", "torch_cuda", "triton", "cusparselt", "cupy", "nvcc", "cuda_home", "packages"):
            if key in env:
                value = env[key]
                if isinstance(value, dict):
                    value = ", ".join(f"{k} {v}" for k, v in value.items())
                lines.append(f"| {key} | {_cell(value)} |")
        for g in gpus:
            lines.append(f"| GPU {g['index']} | {_cell(g['name'])}, sm_{g['capability'].replace('.', '')}, "
                         f"{g['memory_gib']:.0f} GiB |")
        for problem in env.get("compat_problems", []):
            lines.append(f"| problem | {_cell(problem)} |")
    steps = {s["name"]: s for s in result["steps"]}
    tests = steps.get("tests", {}).get("detail", {})
    if tests.get("failed"):
        lines += ["", "## Failed tests", ""] + [f"- `{t}`: {reason}" for t, reason in tests["failed"].items()]
    algorithms = steps.get("algorithms", {}).get("detail", {})
    if algorithms.get("cases"):
        lines += ["", "## cuSPARSELt algorithms", "",
                  "| dtype | shape N x K, M | ids | configurations run | wrong ids (excluded) |", "|---|---|---|---|---|"]
        for case in algorithms["cases"]:
            wrong = ", ".join(f"{i}" for i in case["wrong"]) or "none"
            lines.append(f"| {case['dtype']} | {case['shape']} | 0..{case['max_id']} | {case['runs']} | {wrong} |")
        for dtype, ids in algorithms.get("excluded", {}).items():
            for alg_id, why in ids.items():
                lines.append(f"- {dtype}, algorithm {alg_id}: {why}")
        for skipped in algorithms.get("skipped", []):
            lines.append(f"- {skipped}")
        if algorithms.get("exclusion_file"):
            lines.append(f"- exclusions written to `{algorithms['exclusion_file']}`")
    bench = steps.get("bench", {}).get("detail", {})
    if bench.get("gemm"):
        lines += ["", "## Sparse GEMM (fp16 2:4) against cuBLAS dense", "",
                  "Times in microseconds (triton.testing.do_bench medians over interleaved rounds); "
                  "speed-up = dense time / time.", ""]
        impls = bench["impls"]
        lines += ["| shape | M | " + " | ".join(impls) + " | " + " | ".join(f"{i} speed-up" for i in impls[:-1]) + " |",
                  "|" + "---|" * (2 + 2 * len(impls) - 1)]
        for row in bench["gemm"]:
            us = row["us"]
            dense = us.get(impls[-1])
            times = ["n/a" if us.get(i) is None else f"{us[i]:.1f}" for i in impls]
            speedups = ["n/a" if us.get(i) is None or dense is None else f"{dense / us[i]:.2f}x" for i in impls[:-1]]
            lines.append(f"| {row['shape']} | {row['m']} | " + " | ".join(times + speedups) + " |")
        for note in sorted({n for row in bench["gemm"] for n in row.get("notes", [])}):
            lines.append(f"- {note}")
    if bench.get("w4a16") is not None:
        lines += ["", "## W4A16 2:4 against fp16", ""]
        if isinstance(bench["w4a16"], str):
            lines.append(f"Skipped: {bench['w4a16']}")
        else:
            lines += ["| M | fp16 dense us | W4A16 2:4 us | speed-up |", "|---|---|---|---|"]
            lines += [f"| {r['m']} | {r['dense_us']:.1f} | {r['us']:.1f} | {r['dense_us'] / r['us']:.2f}x |"
                      for r in bench["w4a16"]]
    if bench.get("compress"):
        lines += ["", "## Compress against w.clone()", "", "| kernel | us | time / clone |", "|---|---|---|"]
        clone = next((r["us"] for r in bench["compress"] if r["kernel"] == "clone"), None)
        for row in bench["compress"]:
            if row.get("us") is None or clone is None:
                lines.append(f"| {row['kernel']} | n/a | {_cell(row.get('why', ''))} |")
            else:
                lines.append(f"| {row['kernel']} | {row['us']:.1f} | {row['us'] / clone:.2f} |")
    wrong = [w for s in result["steps"] for w in s["detail"].get("wrong", [])]
    if wrong:
        lines += ["", "## Wrong results", ""] + [f"- {_cell(w)}" for w in wrong]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running the steps

def _run_process(argv, log_path: Path, budget_s: float, env=None) -> tuple[int | None, float]:
    """(exit status, or None when stopped at the budget; seconds), output in ``log_path``."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # a budget overrun or Ctrl-C: the step's whole process group goes
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile
                    pass
                proc.wait()
    return rc, time.monotonic() - start


def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:].strip()


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_worker(name: str, python: str, out_dir: Path, step: StepResult, by_path: bool = False) -> list[dict]:
    """Runs ``--worker name`` in a fresh process (by path: without importing the package first)."""
    seconds = max(1, step.budget_s - WORKER_MARGIN_S)
    target = [str(Path(__file__).resolve())] if by_path else ["-m", "nxm_kernels.gpu_check"]
    argv = [python, *target, "--worker", name, "--out", str(out_dir), "--seconds", str(seconds)]
    (out_dir / f"{name}.jsonl").unlink(missing_ok=True)
    rc, step.seconds = _run_process(argv, out_dir / f"{name}.log", step.budget_s)
    records = _records(out_dir / f"{name}.jsonl")
    if rc is None:
        step.status, step.summary = TIMED_OUT, f"stopped at its {step.budget_s} s budget"
    elif rc != 0:
        step.status, step.summary = FAILED, f"crashed (exit {rc}): {_tail(out_dir / f'{name}.log', 600)}"
    return records


def step_env(python: str, out_dir: Path, step: StepResult) -> dict:
    records = _run_worker("env", python, out_dir, step, by_path=True)
    env = records[0] if records else {}
    step.detail = {"gpus": env.get("gpus", []), "no_gpu": bool(records) and not env.get("gpus")}
    if step.status != NOT_RUN:
        return env
    if step.detail["no_gpu"]:
        step.status = FAILED
        step.summary = (f"no CUDA GPU is visible (torch {env.get('torch')}, CUDA build {env.get('torch_cuda')}, "
                        f"torch.cuda.is_available() is False): run it on a GPU server")
    elif env.get("compat_problems"):
        step.status, step.summary = FAILED, "; ".join(env["compat_problems"])
    else:
        step.status = PASSED
        g = env["gpus"][0]
        step.summary = (f"{g['name']} sm_{g['capability'].replace('.', '')}, torch {env['torch']}, "
                        f"CUDA {env['torch_cuda']}, triton {env.get('triton')}, cuSPARSELt {env.get('cusparselt')}")
        missing = [name for name in ("pytest", "hypothesis", "numpy") if not env.get("packages", {}).get(name)]
        if missing:
            step.summary += f"; the tests step needs {', '.join(missing)}, which this Python lacks"
    return env


_IMPORT_CHECK = """
import json
from nxm_kernels import _extension
from nxm_kernels.backends import cusparselt
print(json.dumps({"build": _extension.build_info(), "why": _extension.unavailable_reason(),
                  "cuda_kernels": _extension.has_cuda_kernels(), "cusparselt": cusparselt.BACKEND.unavailable_reason()}))
"""


def step_build(python: str, out_dir: Path, step: StepResult, env_report: dict, mode: str) -> None:
    archs = ";".join(sorted({g["capability"] for g in env_report["gpus"]}))
    cuda_home = os.environ.get("CUDA_HOME") or env_report.get("cuda_home")
    if not cuda_home:
        step.status = FAILED
        step.summary = "nvcc was not found: put the CUDA toolkit's bin/ on PATH or set CUDA_HOME to its root"
        return
    env = {**os.environ, "NXM_CUDA_ARCHS": archs, "TORCH_CUDA_ARCH_LIST": archs, "CUDA_HOME": cuda_home,
           "NXM_FORCE_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    env.pop("NXM_SKIP_CUDA_BUILD", None)
    step.detail = {"command": " ".join(build_command(python, mode)), "archs": archs, "cuda_home": cuda_home}
    rc, step.seconds = _run_process(build_command(python, mode), out_dir / "build.log", step.budget_s, env)
    if rc is None:
        step.status, step.summary = FAILED, f"the build ran past its {step.budget_s} s budget (see build.log)"
        return
    if rc != 0:
        step.status, step.summary = FAILED, f"the build failed (exit {rc}): {_tail(out_dir / 'build.log', 800)}"
        return
    start = time.monotonic()
    try:
        check = subprocess.run([python, "-c", _IMPORT_CHECK], cwd=REPO, capture_output=True, text=True,
                               timeout=max(10, step.budget_s - step.seconds))
    except subprocess.TimeoutExpired:
        check = subprocess.CompletedProcess([], 1, "", "importing the package ran past the build's budget")
    step.seconds += time.monotonic() - start
    loaded = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else None
    if loaded is None or loaded["why"] or not loaded["cuda_kernels"] or loaded["cusparselt"]:
        why = (check.stderr[-800:] if loaded is None
               else loaded["why"] or loaded["cusparselt"] or "_C was built without its CUDA kernels")
        step.status, step.summary = FAILED, f"built, but nxm_kernels._C is not usable: {why}"
        return
    step.detail["built_for"] = loaded["build"]
    step.status = PASSED
    step.summary = f"_C for sm {archs}, torch {loaded['build']['torch']}, CUDA {loaded['build']['cuda']}"


_OUTCOME_LINE = re.compile(r"^(?P<test>\S+::\S.*?) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SHORT_SUMMARY = re.compile(r"^(?P<outcome>FAILED|ERROR) (?P<test>\S+::\S+)(?: - (?P<reason>.*))?$")
_FINAL_LINE = re.compile(r"^=+ (?P<text>.*\bin [\d.]+s.*?) =+$")


def parse_pytest(log: str) -> dict:
    """Counts per outcome, the failed tests with their reasons and pytest's last line, from ``-v -rfE`` output."""
    counts, failed = {}, {}
    final = None
    for line in log.splitlines():
        if m := _OUTCOME_LINE.match(line):
            outcome = m["outcome"].lower()
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("failed", "error"):
                failed.setdefault(m["test"], outcome)
        elif m := _SHORT_SUMMARY.match(line):
            failed[m["test"]] = m["reason"] or m["outcome"].lower()
        elif m := _FINAL_LINE.match(line):
            final = m["text"]
    return {"counts": counts, "failed": failed, "final": final}


def step_tests(python: str, out_dir: Path, step: StepResult) -> None:
    files = gpu_test_files()
    argv = [python, "-m", "pytest", "-m", "gpu", "-k", DESELECTED_TESTS, "-v", "-rfE", "-p", "no:cacheprovider",
            *files]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("NXM_BACKEND", None)  # the tests choose their backends
    rc, step.seconds = _run_process(argv, out_dir / "tests.log", step.budget_s, env)
    parsed = parse_pytest((out_dir / "tests.log").read_text(errors="replace"))
    step.detail = {"command": "TRITON_INTERPRET=0 " + " ".join(argv[1:]), **parsed}
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(parsed["counts"].items()))
    if rc is None:
        step.status, step.summary = TIMED_OUT, f"stopped at its {step.budget_s} s budget after {counts or 'no test'}"
    elif rc == 0:
        step.status, step.summary = PASSED, parsed["final"] or counts
    else:
        step.status = FAILED
        step.summary = f"pytest exit {rc}: {parsed['final'] or _tail(out_dir / 'tests.log', 400)}"
    if parsed["failed"]:
        step.status = FAILED


def step_algorithms(python: str, out_dir: Path, step: StepResult) -> None:
    records = _run_worker("algorithms", python, out_dir, step)
    cases = [r for r in records if r["kind"] == "case"]
    end = next((r for r in records if r["kind"] == "end"), None)
    first_wrong = {}  # (dtype, id) -> where it was first wrong
    for case in cases:
        for alg_id, why in case["wrong"].items():
            first_wrong.setdefault((case["dtype"], alg_id), why)
    excluded = end["excluded"] if end else {}
    step.detail = {"cases": cases, "skipped": [r["why"] for r in records if r["kind"] == "skipped"],
                   "excluded": excluded, "exclusion_file": end and end.get("exclusion_file"),
                   "wrong": [f"cuSPARSELt {dtype} algorithm {alg_id}: {why}"
                             for (dtype, alg_id), why in first_wrong.items()]}
    named = "; ".join(f"{dtype} {', '.join(sorted(ids, key=int))}" for dtype, ids in excluded.items() if ids)
    runs = sum(c["runs"] for c in cases)
    if step.status == NOT_RUN:
        complete = end is not None and end["complete"]
        step.status = FAILED if first_wrong else PASSED if complete else TIMED_OUT
        step.summary = f"{runs} runs over {len(cases)} cases" + ("" if complete else " before the budget ran out")
    if first_wrong and not named:
        step.summary += f"; wrong, not yet excluded: {', '.join(f'{d} {i}' for d, i in first_wrong)}"
    step.summary += f"; excluded from tuning: {named}" if named else ("" if first_wrong else "; no wrong algorithm id")


def step_bench(python: str, out_dir: Path, step: StepResult) -> None:
    records = _run_worker("bench", python, out_dir, step)
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


def run_check(args) -> int:
    out_dir = Path(args.out) if args.out else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    print(f"nxm gpu-check: results go to {out_dir}/", flush=True)
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    steps = {name: StepResult(name, BUDGETS[name]) for name in STEPS}

    def report(step: StepResult) -> None:
        print(f"  {step.name:<10} {step.status:<9} {step.seconds:6.1f} s  {step.summary}", flush=True)

    env_report = step_env(args.python, out_dir, steps["env"])
    report(steps["env"])
    if steps["env"].status == PASSED:
        for name in SKIPPABLE:
            step = steps[name]
            if name in args.skip:
                step.status, step.summary = SKIPPED, "--skip"
            elif name == "build":
                step_build(args.python, out_dir, step, env_report, args.build)
            else:
                {"tests": step_tests, "algorithms": step_algorithms, "bench": step_bench}[name](
                    args.python, out_dir, step)
            report(step)
            if name == "build" and step.status == FAILED:
                break  # what follows needs the extension
    code = exit_code(list(steps.values()))
    result = {"format": 1, "command": shlex.join(sys.argv), "started": started,
              "seconds": round(time.monotonic() - t0, 1), "exit_code": code, "outcome": EXIT_MEANING[code],
              "environment": env_report, "steps": [asdict(s) for s in steps.values()]}
    json_path, md_path = write_summary(result, out_dir)
    print(f"nxm gpu-check: exit {code} ({EXIT_MEANING[code]}); summary: {md_path} and {json_path.name}")
    return code


# ---------------------------------------------------------------- workers (fresh processes)

class Recorder:
    """Appends one JSON record per line and flushes, so a killed worker leaves what it finished."""

    def __init__(self, path: Path, seconds: float):
        self.file = open(path, "a")
        self.deadline = time.monotonic() + seconds

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __call__(self, **record) -> None:
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def _load_compat():
    """nxm_kernels/_compat.py without importing the package (the env step runs before the build)."""
    spec = importlib.util.spec_from_file_location("nxm_kernels_compat", REPO / "nxm_kernels" / "_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _distribution_version(*names: str) -> str | None:
    """The version of the first of ``names`` installed, naming the package when it is not the first."""
    from importlib import metadata

    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return version if name == names[0] else f"{version} ({name})"
    return None


def worker_env(record: Recorder) -> None:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": props.total_memory / 2**30})
    cusparselt = getattr(torch.backends, "cusparselt", None)
    loaded = cusparselt.version() if cusparselt is not None and cusparselt.is_available() else None
    torch_cusparselt = None if loaded is None else f"{loaded // 1000}.{loaded % 1000 // 100}.{loaded % 100}"
    nvcc = None
    try:
        nvcc_out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout
        nvcc = (re.search(r"release ([\d.]+)", nvcc_out) or [None, None])[1]
    except (OSError, subprocess.TimeoutExpired):
        pass
    record(python=f"{platform.python_version()} ({sys.executable})", torch=torch.__version__,
           torch_cuda=torch.version.cuda, gpus=gpus,
           triton=_distribution_version("triton", "pytorch-triton"),
           cusparselt=f"{torch_cusparselt} (torch's), package "
                      f"{_distribution_version('nvidia-cusparselt-cu13', 'nvidia-cusparselt-cu12')}",
           cupy=_distribution_version("cupy-cuda13x", "cupy-cuda12x", "cupy"), nvcc=nvcc,
           cuda_home=cuda_home_from_nvcc(),
           packages={name: _distribution_version(name) for name in
                     ("pytest", "hypothesis", "numpy", "safetensors", "setuptools", "ninja")},
           compat_problems=_load_compat().problems())


# ---- algorithms

class UnsupportedConfig(Exception):
    """cuSPARSELt has no such algorithm id or split-k for this problem."""


@dataclass(frozen=True)
class AlgorithmCase:
    dtype: str
    shape: tuple  # (N, K, M)
    split_k: tuple = (0,)
    repeats: int = 1

    @property
    def label(self) -> str:
        n, k, m = self.shape
        return f"{n}x{k} M={m}"


def algorithm_cases(dtypes=ALGORITHM_DTYPES) -> list[AlgorithmCase]:
    cases = []
    for dtype in dtypes:
        for shape in ALGORITHM_SHAPES[:-1]:
            cases.append(AlgorithmCase(dtype, shape))
        cases.append(AlgorithmCase(dtype, ALGORITHM_SHAPES[-1], SPLIT_K, REPEATS))
    return cases


def check_algorithms(runner, cases: list[AlgorithmCase], record, capability=None) -> dict[str, dict[int, str]]:
    """Runs every algorithm id of each case (every split-k, ``repeats`` times) through ``runner`` and
    returns {dtype: {id: why}} for the ids to exclude: wrong here, or known wrong on this GPU.

    ``runner.max_algorithm_id(case)`` gives the ids; ``runner.error(case, alg_id, split_k)`` returns
    None when the output equals the reference, what is wrong otherwise, and raises UnsupportedConfig
    for a configuration the problem does not have. ``record`` gets one record per case; it stops
    (returning None) when ``record.time_left()`` runs out.
    """
    excluded: dict[str, dict[int, str]] = {}
    for case in cases:
        if record.time_left() <= 0:
            return None
        max_id = runner.max_algorithm_id(case)
        wrong, runs, unsupported = {}, 0, 0
        for alg_id in range(max_id + 1):
            if record.time_left() <= 0:
                return None
            for split_k in case.split_k:
                for _ in range(case.repeats if split_k == 0 else 1):
                    try:
                        error = runner.error(case, alg_id, split_k)
                    except UnsupportedConfig:
                        unsupported += 1
                        break
                    runs += 1
                    if error is not None:
                        wrong.setdefault(alg_id, f"{case.label} split-k {split_k}: {error}")
        record(kind="case", dtype=case.dtype, shape=case.label, max_id=max_id, runs=runs, unsupported=unsupported,
               wrong={str(i): why for i, why in wrong.items()})
        excluded.setdefault(case.dtype, {})
        for alg_id, why in wrong.items():
            excluded[case.dtype].setdefault(alg_id, why)
    for alg_id, (known_capability, why) in KNOWN_WRONG.items():
        if capability is not None and tuple(capability) == known_capability:
            for ids in excluded.values():
                ids.setdefault(alg_id, f"known: {why}; not seen wrong in this run")
    return excluded


def write_exclusions(path: Path, keys: dict[str, dict[int, str]], checked: str) -> None:
    """Merge {exclusion key: {id: why}} into the exclusion file (the format cusparselt.read_exclusions reads);
    a key checked again replaces its old entry, so ids that are right now come back."""
    entries = json.loads(path.read_text()) if path.exists() else {}
    for key, ids in keys.items():
        entries[key] = {"alg_ids": sorted(ids), "why": {str(i): why for i, why in sorted(ids.items())},
                        "checked": checked}
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    scratch.replace(path)


class GpuAlgorithmRunner:
    """Runs one cuSPARSELt configuration on the GPU against the exact product. Inputs are in {-1, 0, 1}
    with exactly n kept per group, so every sum is an integer within 256 and every output dtype holds
    it exactly: any difference is wrong."""

    def __init__(self):
        import torch

        from nxm_kernels.backends import cusparselt

        self.torch, self.cusparselt = torch, cusparselt
        self.problems = {}

    def _problem(self, case: AlgorithmCase):
        if case in self.problems:
            return self.problems[case]
        torch, cusparselt = self.torch, self.cusparselt
        dtype = getattr(torch, case.dtype)
        n, k, m = case.shape
        keep, group = (1, 2) if dtype == torch.float32 else (2, 4)
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k * 3 + m + ALGORITHM_DTYPES.index(case.dtype))
        ranks = torch.rand(n, k // group, group, device="cuda", generator=g).argsort(-1).argsort(-1)
        signs = torch.randint(0, 2, (n, k // group, group), device="cuda", generator=g) * 2 - 1
        w = torch.where(ranks < keep, signs, 0).reshape(n, k).float()
        x = torch.randint(-1, 2, (m, k), device="cuda", generator=g).float()
        truth = x.double() @ w.double().T
        if dtype == cusparselt.FP8:
            sw = cusparselt.compress_pruned(w.to(dtype), f"{keep}:{group}")
        else:
            import nxm_kernels as nxm

            sw = nxm.compress(w.to(dtype), f"{keep}:{group}", layout="cusparselt")
        out_dtype = cusparselt.OUTPUT_DTYPES[dtype][0]
        self.problems = {case: (x.to(dtype), sw, out_dtype, truth.to(out_dtype))}  # one problem held at a time
        return self.problems[case]

    def max_algorithm_id(self, case: AlgorithmCase) -> int:
        x, sw, out_dtype, _ = self._problem(case)
        cusparselt = self.cusparselt
        rows = cusparselt.padded_rows(x.shape[0], x.dtype)
        x_kernel = self.torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0]))
        return int(self.torch.ops.nxm.cusparselt_max_algorithm_id(
            x_kernel, sw.values, sw.out_features, None, None, out_dtype, cusparselt.transposed_output(x.dtype)))

    def error(self, case: AlgorithmCase, alg_id: int, split_k: int) -> str | None:
        x, sw, out_dtype, expected = self._problem(case)
        try:
            y = self.cusparselt._run(x, sw, None, None, out_dtype, config=(alg_id, split_k))
            self.torch.cuda.synchronize()
        except RuntimeError as error:
            text = str(error)
            if any(call in text for call in ("MatmulAlgSetAttribute", "MatmulPlanInit", "MatmulGetWorkspace")):
                raise UnsupportedConfig(text) from None
            if "CUDA error" in text:
                raise  # the CUDA context is gone: no later result could be trusted, so the step fails here
            return f"raised {text.splitlines()[0]}"
        if self.torch.equal(y, expected):
            return None
        diff = (y.double() - expected.double()).abs()
        bad = int((diff != 0).sum()) + int(y.isnan().sum())
        worst = float(diff.nan_to_num(float("inf")).max())
        return f"{bad} of {y.numel()} outputs differ from the exact product (max |diff| {worst:.3g})"


def worker_algorithms(record: Recorder) -> None:
    import torch

    from nxm_kernels.backends import cusparselt

    cusparselt._EXCLUDED.ids = {}  # check every id, whatever an earlier check excluded
    capability = torch.cuda.get_device_capability()
    version = cusparselt.library_version()
    dtypes = []
    for name in ALGORITHM_DTYPES:
        why = cusparselt.device_reasons(capability, version, getattr(torch, name))
        if why:
            record(kind="skipped", why=f"{name}: {'; '.join(why)}")
        else:
            dtypes.append(name)
    gpu, path, runner = torch.cuda.get_device_name(), cusparselt.exclusions_path(), GpuAlgorithmRunner()
    excluded = {}
    for dtype in dtypes:  # each dtype's verdict is written as soon as all its cases ran
        found = check_algorithms(runner, algorithm_cases((dtype,)), record, capability)
        if found is None:
            break
        write_exclusions(path, {cusparselt.exclusion_key(gpu, version, getattr(torch, dtype)): found[dtype]},
                         datetime.datetime.now().isoformat(timespec="seconds"))
        excluded[dtype] = {str(i): why for i, why in found[dtype].items()}
    record(kind="end", complete=len(excluded) == len(dtypes), exclusion_file=str(path), excluded=excluded)


# ---- benchmarks

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
            sw = nxm.compress(w, "2:4", bits=4, group_size=128)
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


WORKERS = {"env": worker_env, "algorithms": worker_algorithms, "bench": worker_bench}


# ---------------------------------------------------------------- the command line

def build_parser(prog: str = "nxm gpu-check") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nIt finishes within "
        f"{TIME_LIMIT_S // 60} minutes on one H100/H200-class GPU, build included: each step has a time budget "
        "(env {env} s, build {build} s, tests {tests} s, algorithms {algorithms} s, bench {bench} s) and is "
        "stopped there. See the whole plan with --dry-run.".format(**BUDGETS),
        epilog="exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_MEANING.items()),
    )
    parser.add_argument("--out", metavar="DIR", help="folder for summary.json, summary.md and the step logs "
                        "(default ./gpu-check-<timestamp>/)")
    parser.add_argument("--python", default=sys.executable, metavar="PATH",
                        help="the interpreter whose torch is used for every step (default: this one, "
                        f"{sys.executable})")
    parser.add_argument("--build", choices=("inplace", "editable"), default="inplace",
                        help="inplace: python setup.py build_ext --inplace (default, installs nothing); editable: "
                        "pip install --no-build-isolation --no-deps -e . (never installs dependencies)")
    parser.add_argument("--skip", action="append", default=[], choices=SKIPPABLE, metavar="STEP",
                        help=f"leave out a step (repeatable): {', '.join(SKIPPABLE)}; e.g. --skip build to use "
                        "the _C already built")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (steps, shapes, dtypes, budgets) "
                        "and exit without running anything; works without a GPU")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str = "nxm gpu-check") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 after --help, 2 on bad usage
        return int(exit_.code or 0)
    if args.worker:
        out_dir = Path(args.out)
        with Recorder(out_dir / f"{args.worker}.jsonl", args.seconds) as record:
            WORKERS[args.worker](record)
        return EXIT_OK
    if not (REPO / "setup.py").is_file() or not (REPO / "tests").is_dir():
        print(f"{prog}: {REPO} is not a source checkout (no setup.py or tests/): gpu-check builds and tests the "
              "checkout it runs from; clone the repository and run it there", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(plan_text(args.python, Path(args.out) if args.out else Path("./gpu-check-<timestamp>"), args.skip,
                        args.build))
        return EXIT_OK
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main(prog="make gpu-check" if not __package__ else "python -m nxm_kernels.gpu_check"))
