"""The tests step: the `gpu` tests (pytest -m gpu) with compiled Triton kernels, and the reading of
pytest's output."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .outcome import FAILED, PASSED, TIMED_OUT, StepResult
from .plan import DESELECTED_TESTS, gpu_test_files
from .processes import log_tail, run_process

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
    rc, step.seconds = run_process(argv, out_dir / "tests.log", step.budget_s, env)
    parsed = parse_pytest((out_dir / "tests.log").read_text(errors="replace"))
    step.detail = {"command": "TRITON_INTERPRET=0 " + " ".join(argv[1:]), **parsed}
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(parsed["counts"].items()))
    if rc is None:
        step.status, step.summary = TIMED_OUT, f"stopped at its {step.budget_s} s budget after {counts or 'no test'}"
    elif rc == 0:
        step.status, step.summary = PASSED, parsed["final"] or counts
    else:
        step.status = FAILED
        step.summary = f"pytest exit {rc}: {parsed['final'] or log_tail(out_dir / 'tests.log', 400)}"
    if parsed["failed"]:
        step.status = FAILED
