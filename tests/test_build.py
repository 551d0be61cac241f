"""The built extension nxm_kernels._C: sm_80 and sm_90 code for every CUDA kernel, the cuSPARSELt link
with an rpath that resolves inside an installed wheel, and a wheel of this tree that installs into a
clean environment and works there."""

import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import nxm_kernels
from nxm_kernels import _extension

REPO = Path(nxm_kernels.__file__).resolve().parent.parent
CUDA_BIN = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
KERNELS = ("select_kernel", "compress_packed_kernel", "decompress_packed_kernel", "compress_cutlass_kernel",
           "decompress_cutlass_kernel")
ARCHS = {"sm_80", "sm_90"}  # NXM_CUDA_ARCHS' default, which the Makefile builds
CUSPARSELT_RPATH = "$ORIGIN/../nvidia/cusparselt/lib"

needs_cuda_build = pytest.mark.skipif(not _extension.has_cuda_kernels(),
                                      reason="this _C was built without CUDA (no nvcc or NXM_SKIP_CUDA_BUILD=1)")


def run(*cmd, **kwargs) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def library() -> Path:
    return Path(importlib.import_module("nxm_kernels._C").__file__)


def dynamic_section(so: Path) -> tuple[list[str], list[str]]:
    """(NEEDED libraries, RUNPATH entries) from readelf -d."""
    text = run("readelf", "-d", so)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", text)
    runpath = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.+?)\]", text)
    return needed, [entry for paths in runpath for entry in paths.split(":")]


def test_extension_is_built():
    """`make test` builds _C (the editable install): a missing or unloadable build fails here."""
    assert _extension.unavailable_reason() is None, _extension.unavailable_reason()


WITHOUT_C = """
import sys, warnings
sys.modules["nxm_kernels._C"] = None  # as if never built: importing it raises ModuleNotFoundError
warnings.simplefilter("error")  # an absent build is normal: no warning
import torch, nxm_kernels as nxm
from nxm_kernels import _extension
assert "nxm_kernels._C is not built" in _extension.unavailable_reason()
w = torch.randn(32, 16)
assert torch.equal(nxm.decompress(nxm.compress(w, "1:2", layout="cutlass")), nxm.project(w, "1:2"))  # reference
try:
    nxm.compress(w, "1:2", layout="cutlass", backend="native")
except nxm.BackendNotSupported as error:
    assert "nxm_kernels._C is not built" in str(error), error
else:
    raise AssertionError("backend='native' ran without _C")
"""


def test_package_works_without_the_extension():
    run(sys.executable, "-c", WITHOUT_C, cwd=REPO)


@needs_cuda_build
def test_every_kernel_has_sm80_and_sm90_code():
    listing = run(CUDA_BIN / "cuobjdump", "-res-usage", library())
    functions: dict[str, set[str]] = {}
    arch = None
    for line in listing.splitlines():
        if found := re.match(r"\s*arch = (sm_\d+)", line):
            arch = found.group(1)
        elif found := re.match(r"\s*Function (\S+):", line):
            functions.setdefault(arch, set()).add(found.group(1))
    assert set(functions) == ARCHS, f"cubins for {sorted(functions)}, expected {sorted(ARCHS)}"
    assert functions["sm_80"] == functions["sm_90"], functions["sm_80"] ^ functions["sm_90"]
    for kernel in KERNELS:
        assert any(kernel in name for name in functions["sm_80"]), f"no cubin holds {kernel}"
    assert _extension.build_info()["cuda_archs"] == "8.0;9.0"


@needs_cuda_build
def test_links_cusparselt_with_an_rpath_inside_the_wheel():
    needed, runpath = dynamic_section(library())
    assert "libcusparseLt.so.0" in needed
    assert CUSPARSELT_RPATH in runpath
    # pip installs nvidia-cusparselt-cu13 (a dependency of CUDA torch) beside nxm_kernels in site-packages.
    site = Path(sysconfig.get_paths()["purelib"])
    origin = site / "nxm_kernels"  # where the wheel puts _C (an editable install keeps it in the tree)
    assert Path(os.path.normpath(CUSPARSELT_RPATH.replace("$ORIGIN", str(origin)))).joinpath("libcusparseLt.so.0").exists()


def same_configuration_env() -> dict:
    """The environment that builds what the development build is (CPU-only or CUDA, same toolkit),
    so the wheel's build reuses its objects."""
    env = {k: v for k, v in os.environ.items() if k not in ("NXM_SKIP_CUDA_BUILD", "NXM_FORCE_CUDA")}
    if not _extension.has_cuda_kernels():
        return {**env, "NXM_SKIP_CUDA_BUILD": "1"}
    if "CUDA_HOME" not in env:  # as the Makefile finds it: the nvcc on PATH may be a wrapper script
        dryrun = subprocess.run(["nvcc", "--dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True)
        (top,) = re.findall(r" TOP=(\S+)", dryrun.stderr + dryrun.stdout)
        env["CUDA_HOME"] = os.path.realpath(top)
    return {**env, "NXM_FORCE_CUDA": "1", "NXM_CUDA_ARCHS": _extension.build_info()["cuda_archs"]}


SMOKE = """
import torch, nxm_kernels as nxm
from nxm_kernels import _extension
assert "clean" in nxm.__file__, nxm.__file__
assert nxm.backends()["native"] is None, nxm.backends()["native"]
w = torch.randn(64, 64, dtype=torch.float16)
sw = nxm.compress(w, "2:4", layout="cutlass", backend="native")
assert torch.equal(nxm.decompress(sw, backend="native"), nxm.project(w, "2:4", backend="reference"))
from nxm_kernels.backends import _native_cupy
assert "clean" in str(_native_cupy.source_dir()), _native_cupy.source_dir()  # the wheel's _csrc
print(_extension._C.__file__)
"""


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv(tmp_path):
    """pip wheel reuses the build folder of the editable install (ninja recompiles nothing that is
    unchanged), so this costs a link and an install, not a second build."""
    run(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", tmp_path / "dist",
        REPO, cwd=REPO, env=same_configuration_env())
    (wheel,) = (tmp_path / "dist").glob("nxm_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(re.fullmatch(r"nxm_kernels/_C\..*\.so", name) for name in names), names
    assert {"nxm_kernels/_csrc/nm_core.h", "nxm_kernels/_csrc/cuda/nm_kernels.cu"} <= set(names)
    assert {"nxm_kernels/harness/data.py", "nxm_kernels/harness/protocol.py", "nxm_kernels/demo.py"} <= set(names)
    venv = tmp_path / "clean"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # torch and the rest come from the development environment (no reinstall): a path entry for the
    # imports, and the nvidia folder beside nxm_kernels, where pip puts torch's CUDA dependencies.
    dev_site = Path(sysconfig.get_paths()["purelib"])
    (site / "dev_environment.pth").write_text(f"{dev_site}\n")
    (site / "nvidia").symlink_to(dev_site / "nvidia")
    so = Path(run(python, "-c", SMOKE, cwd=tmp_path).strip().splitlines()[-1])
    assert so.is_relative_to(site)
    # The demo's command and its harness come from the wheel: nothing from a checkout's experiments/.
    demo_help = run(venv / "bin" / "nxm", "demo", "--help", cwd=tmp_path)
    assert "--method" in demo_help and "nxm_kernels.harness" in demo_help
    nxm_command = venv / "bin" / "nxm"
    assert "--target" in run(nxm_command, "search", "--help", cwd=tmp_path)
    run(nxm_command, "search", "demo", "--samples", "1", "--seq-len", "8", "--candidates", "2:4 int8", "-o",
        "plan.json", "-q", cwd=tmp_path)
    assert "int8" in run(nxm_command, "sparsify", "demo", "--plan", "plan.json", "-o", "plan.nxm.safetensors", "-q",
                         cwd=tmp_path)
    where = run(python, "-c", "import nxm_kernels.harness as h, nxm_kernels.demo as d; print(h.__file__, d.__file__)",
                cwd=tmp_path)
    assert all(Path(p).is_relative_to(site) for p in where.split()), where
    if _extension.has_cuda_kernels():
        torch_lib = dev_site / "torch" / "lib"
        cuda_lib = next((dev_site / "nvidia").glob("cu*/lib"))
        resolved = run("ldd", so, env={**os.environ, "LD_LIBRARY_PATH": f"{torch_lib}:{cuda_lib}"})
        (line,) = [line for line in resolved.splitlines() if "libcusparseLt.so.0" in line]
        assert f"{site}/nxm_kernels/../nvidia/cusparselt/lib/libcusparseLt.so.0" in line, line


DEMO_WITHOUT_EXPERIMENTS = """
import sys
from nxm_kernels import cli
try:
    cli.main(["demo", "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
import nxm_kernels.harness
files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
assert not [f for f in files if "/experiments/" in f], [f for f in files if "/experiments/" in f]
assert not [p for p in sys.path if p.rstrip("/").endswith("experiments")], sys.path
"""


def test_demo_imports_nothing_from_experiments(tmp_path):
    """The fast half of the wheel test above: `nxm demo --help` and the harness import with no
    experiments/ folder on the path."""
    assert "--method" in run(sys.executable, "-c", DEMO_WITHOUT_EXPERIMENTS, cwd=tmp_path)
