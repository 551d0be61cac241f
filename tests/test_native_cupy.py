"""The CuPy path of the native backend (nxm-kernels[cupy]): NVRTC compiles the torch-free CUDA sources
for sm_80 and sm_90 (no GPU needed), with every kernel instantiation its launchers use; on a GPU, its
kernels match the CPU ops bit for bit."""

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

import nxm_kernels as nxm
from conftest import CUTLASS_CASES, random_weight
from nxm_kernels import _extension
from nxm_kernels.backends import _native_cupy

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy is not installed (pip install cupy-cuda13x)")

SOURCES = sorted((_native_cupy.source_dir() / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def compile_for(source: Path, arch: str, names: list[str]) -> dict[str, str]:
    """NVRTC-compile ``source`` for ``arch``; name expression -> lowered (mangled) kernel name."""
    program = nvrtc.createProgram(source.read_text(), source.name, [], [])
    for name in names:
        nvrtc.addNameExpression(program, name)
    options = [f"--gpu-architecture={arch}", *_native_cupy.NVRTC_OPTIONS, f"-I{source.parent}"]
    try:
        nvrtc.compileProgram(program, options)
    except nvrtc.NVRTCError as error:
        pytest.fail(f"NVRTC failed on {source.name} for {arch}: {error}\n{nvrtc.getProgramLog(program)}")
    assert nvrtc.getCUBIN(program), "no cubin"
    return {name: nvrtc.getLoweredName(program, name) for name in names}


def family(name: str) -> str:
    return re.search(r"([a-z][a-z_]*_kernel)", name).group(1)  # also inside a mangled name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvrtc_compiles_every_cuda_source(source, arch):
    names = _native_cupy.kernel_names() if source.name == "nm_kernels.cu" else []
    lowered = compile_for(source, arch, names)
    assert len(set(lowered.values())) == len(names)  # every launched instantiation exists, distinct
    if names:  # ... and covers every kernel template of the source
        defined = re.findall(r"__global__ void __launch_bounds__\(\w+\)\s+(\w+)\(", source.read_text())
        assert {family(n) for n in names} == set(defined)


@pytest.mark.skipif(not _extension.has_cuda_kernels(), reason="this _C was built without CUDA kernels")
def test_cupy_launches_the_instantiations_that_nvcc_built():
    """Both launchers (nm_kernels.cu's host code and _native_cupy.py) use the same kernel set."""
    cuobjdump = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    listing = subprocess.run([cuobjdump, "-res-usage", _extension._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    sm80 = listing.split("arch = sm_80")[1].split("arch = ")[0]
    built = Counter(family(name) for name in re.findall(r"Function (\S+):", sm80) if "_kernel" in name)
    assert built == Counter(family(name) for name in _native_cupy.kernel_names())


def test_wheel_layout_or_source_tree_has_the_sources():
    folder = _native_cupy.source_dir()
    assert (folder / "nm_core.h").exists() and (folder / "cuda" / "nm_kernels.cu").exists()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, pattern", CUTLASS_CASES)
def test_cupy_kernels_match_cpu_ops(dtype, pattern):
    g = torch.Generator().manual_seed(7)
    w = random_weight((96, 256), dtype, g, zero_fraction=0.3)
    p = nxm.Pattern.parse(pattern)
    for s in (None, torch.rand(w.shape, generator=g)):
        cs = None if s is None else s.cuda()
        assert same_bits(_native_cupy.select(w.cuda(), p, cs, project=False).cpu(), nxm.nm_mask(w, p, s))
        assert same_bits(_native_cupy.select(w.cuda(), p, cs, project=True).cpu(), nxm.project(w, p, s))
        for layout, compress, decompress in (
            ("packed", lambda t: _native_cupy.compress_packed(t, p, cs),
             lambda v, m: _native_cupy.decompress_packed(v, m, w.shape, p)),
            ("cutlass", lambda t: _native_cupy.compress_cutlass(t, cs), _native_cupy.decompress_cutlass),
        ):
            values, metadata = compress(w.cuda())
            want = nxm.compress(w, p, layout=layout, scores=s, backend="native")
            assert same_bits(values.cpu(), want.values) and same_bits(metadata.cpu(), want.metadata), layout
            assert same_bits(decompress(values, metadata).cpu(), nxm.decompress(want, backend="native")), layout
