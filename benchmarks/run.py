"""Run the benchmark suite for what this machine has, then write the report: one command.

    python -m benchmarks.run                 # quick profile (~10 min on 2 idle cores): JSON + RESULTS.md + plots
    python -m benchmarks.run --full          # every shape x dtype x M, more rounds (hours on 2 cores)
    python -m benchmarks.run --gpu-only      # only the gpu-marked cases (on a GPU machine)
    python -m benchmarks.run --out /tmp/new --baseline benchmarks/results.json   # + regression check

Writes ``OUT/results.json`` (pytest-benchmark's JSON, the raw data), ``OUT/RESULTS.md`` and
``OUT/plots/*.png``; OUT defaults to ``benchmarks/``. Extra arguments after ``--`` go to pytest
(e.g. ``-- -k sparse_mm``). ``make bench`` and ``nxm bench`` call :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import compare, report

ROOT = Path(__file__).resolve().parents[1]


def pytest_command(json_path: Path, full: bool, gpu_only: bool, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only",
               f"--benchmark-json={json_path}", "--benchmark-columns=min,median,max,rounds",
               "--benchmark-sort=name", "-p", "no:cacheprovider", "-q", "-rs"]
    if full:
        command.append("--bench-full")
    if gpu_only:
        command += ["-m", "gpu"]
    return command + extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--full", action="store_true", help="the whole grid with more rounds")
    parser.add_argument("--gpu-only", action="store_true", help="only the gpu-marked benchmarks")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks",
                        help="where results.json, RESULTS.md, plots/ go")
    parser.add_argument("--baseline", type=Path, help="a saved results.json to check this run against")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (sets OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)

    json_path = args.out / "results.json"
    if args.baseline and args.baseline.resolve() == json_path.resolve():
        parser.error(f"--baseline {args.baseline} is where this run writes its results: pass --out DIR elsewhere")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # never report a previous run's data as this one's
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NXM_BENCH_OUT"] = str(args.out / report.GPU_GEMM_DIR)  # benchmarks/gpu's report, linked from ours
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(pytest_command(json_path, args.full, args.gpu_only, args.pytest_args), cwd=ROOT, env=env)
    if done.returncode not in (0, 5):  # 5: nothing collected
        print(f"benchmarks failed (pytest exit {done.returncode}); no report written", file=sys.stderr)
        return done.returncode
    if not json_path.exists():  # pytest-benchmark writes no JSON when every benchmark was skipped
        print("no benchmark ran on this machine (each skip above says why); no report written", file=sys.stderr)
        return 1
    command = "python -m benchmarks.run" + (" --full" if args.full else "") + (" --gpu-only" if args.gpu_only else "")
    print(f"report: {report.write(json_path, args.out, command)}")
    if args.baseline:
        return compare.main([str(args.baseline), str(json_path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
