"""The build step: nxm_kernels._C in place (or editable), for this machine's GPU architectures only, then a
check in a fresh process that the new _C loads with its CUDA kernels."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .outcome import FAILED, PASSED, StepResult
from .plan import REPO, build_command
from .processes import log_tail, run_process

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
    rc, step.seconds = run_process(build_command(python, mode), out_dir / "build.log", step.budget_s, env)
    if rc is None:
        step.status, step.summary = FAILED, f"the build ran past its {step.budget_s} s budget (see build.log)"
        return
    if rc != 0:
        step.status, step.summary = FAILED, f"the build failed (exit {rc}): {log_tail(out_dir / 'build.log', 800)}"
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
