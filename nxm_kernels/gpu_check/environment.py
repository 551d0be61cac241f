"""The env step: torch, CUDA, triton, cuSPARSELt, CuPy, nvcc and test-package versions, the GPUs, and the
guards of nxm_kernels/_compat.py. Its worker runs by path, before the build, so it imports neither the
package nor its extension."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from .outcome import FAILED, NOT_RUN, PASSED, StepResult
from .plan import REPO
from .processes import Recorder, run_worker


def step_env(python: str, out_dir: Path, step: StepResult) -> dict:
    records = run_worker("env", python, out_dir, step, by_path=True)
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


def cuda_home_from_nvcc() -> str | None:
    """The CUDA toolkit root, asked from nvcc itself (the nvcc on PATH may be a wrapper script)."""
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^.* TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(found.group(1).strip()) if found else None


def load_compat():
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
           compat_problems=load_compat().problems())
