"""Options, markers and machine description for the benchmark suite (see benchmarks/README.md)."""

import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

import nxm_kernels as nxm

from . import harness

LOAD_AT_START = pytest.StashKey[float]()


def pytest_addoption(parser):
    parser.addoption(
        "--bench-full", action="store_true", default=os.environ.get("NXM_BENCH_FULL") == "1",
        help="every model shape x dtype x M with more rounds (hours on 2 cores); "
        "default: a representative subset in about 10 minutes (also NXM_BENCH_FULL=1)",
    )


def pytest_configure(config):
    config.stash[LOAD_AT_START] = os.getloadavg()[0]


@pytest.fixture(scope="session")
def profile(request) -> harness.Profile:
    return harness.FULL if request.config.getoption("--bench-full") else harness.QUICK


@pytest.fixture(scope="session", autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _git_describe() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + (" + uncommitted changes" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    machine_info["nxm"] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "nxm_kernels": nxm.__version__,
        "git": _git_describe(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "backends": nxm.backends(),
        "profile": (harness.FULL if config.getoption("--bench-full") else harness.QUICK).name,
        # Other processes competing for the CPUs: the 1-minute load average when the run started and ended.
        "load_average": [config.stash.get(LOAD_AT_START, None), os.getloadavg()[0]],
    }
