"""Each step runs in a process of its own, stopped at the step's budget. The steps that run code of this
package on the GPU run it in a worker (`--worker NAME`), which reports through a JSON-lines file: the
Recorder writes it, ``read_records`` reads it back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .outcome import FAILED, TIMED_OUT, StepResult
from .plan import REPO, WORKER_MARGIN_S


def run_process(argv, log_path: Path, budget_s: float, env=None) -> tuple[int | None, float]:
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


def log_tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:].strip()


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_worker(name: str, python: str, out_dir: Path, step: StepResult, by_path: bool = False) -> list[dict]:
    """Runs ``--worker name`` in a fresh process (by path, this folder: without importing the package first)."""
    seconds = max(1, step.budget_s - WORKER_MARGIN_S)
    target = [str(Path(__file__).resolve().parent)] if by_path else ["-m", "nxm_kernels.gpu_check"]
    argv = [python, *target, "--worker", name, "--out", str(out_dir), "--seconds", str(seconds)]
    (out_dir / f"{name}.jsonl").unlink(missing_ok=True)
    rc, step.seconds = run_process(argv, out_dir / f"{name}.log", step.budget_s)
    records = read_records(out_dir / f"{name}.jsonl")
    if rc is None:
        step.status, step.summary = TIMED_OUT, f"stopped at its {step.budget_s} s budget"
    elif rc != 0:
        step.status, step.summary = FAILED, f"crashed (exit {rc}): {log_tail(out_dir / f'{name}.log', 600)}"
    return records


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
