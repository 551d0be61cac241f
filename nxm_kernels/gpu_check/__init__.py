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

`make gpu-check` runs this folder by path (see __main__.py), so the package (and a stale _C) is not
imported before the build; the steps after the build run in fresh processes, which load the new _C.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .algorithms import step_algorithms, worker_algorithms
from .bench import step_bench, worker_bench
from .build import step_build
from .environment import step_env, worker_env
from .gpu_tests import step_tests
from .outcome import EXIT_MEANING, EXIT_OK, EXIT_USAGE, FAILED, PASSED, SKIPPED, StepResult, exit_code
from .plan import BUDGETS, REPO, SKIPPABLE, STEPS, TIME_LIMIT_S, default_out_dir, plan_text
from .processes import Recorder
from .summary import write_summary


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


WORKERS = {"env": worker_env, "algorithms": worker_algorithms, "bench": worker_bench}


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
