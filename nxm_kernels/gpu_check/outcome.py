"""What a gpu-check run ends with: each step's result and the run's exit code."""

from __future__ import annotations

from dataclasses import dataclass, field

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
