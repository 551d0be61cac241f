"""nxm-kernels: N:M semi-structured sparsity kernels for Transformer linear layers.

Builds the optional extension ``nxm_kernels._C`` (torch.ops.nxm):
- ``csrc/*.cpp``: C++ CPU ops and op schemas, always.
- ``csrc/cuda/*.cu`` (CUDA kernels, no torch headers) and ``csrc/cuda/*.cpp`` (their torch bindings
  and the cuSPARSELt ops), when nvcc and a CUDA build of torch are present. Nothing here queries a
  GPU: the machine that builds need not have one.

Switches (environment):
  NXM_SKIP_CUDA_BUILD=1   build the C++ CPU ops only
  NXM_FORCE_CUDA=1        fail, instead of building CPU-only, when the CUDA part cannot be built
  NXM_CUDA_ARCHS          GPU architectures for the CUDA part (default "8.0;9.0"; sets TORCH_CUDA_ARCH_LIST)
  CUDA_HOME               the CUDA toolkit root (torch's default search applies when unset)
"""

import fcntl
import glob
import importlib.util
import os
import platform

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CUSPARSELT_RPATH = "$ORIGIN/../nvidia/cusparselt/lib"  # _C sits in site-packages/nxm_kernels/
# CPU GEMM kernels for one instruction set each (x86-64 only), compiled with that set's flags and
# run only on CPUs that have it: csrc/cpu_gemm.cpp picks one at run time. The rest of _C keeps the
# baseline ISA; the wheel is never built with -march=native.
ISA_SOURCES = {
    "csrc/cpu_gemm_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu_gemm_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"],
    "csrc/cpu_block_gemm_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"],
    "csrc/cpu_transposable_avx512.cpp": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mf16c", "-mbmi2"],
    # W8A8: exact fp32 epilogue, so no fused multiply-adds (-ffp-contract=off)
    "csrc/cpu_gemm_w8a8_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi",
                                      "-ffp-contract=off"],
    "csrc/cpu_gemm_bf16_amx.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi2", "-mamx-tile", "-mamx-bf16"],
}
BUILD_ISA_SOURCES = platform.machine().lower() in ("x86_64", "amd64")


def _nvidia_dir(*parts):
    """A folder inside the pip-installed ``nvidia`` namespace package, or None."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, *parts)
        if os.path.isdir(path):
            return path
    return None


def _cuda_build_blocker(torch, cuda_home):
    """Why the CUDA part cannot be built here (None when it can)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={cuda_home} holds no CUDA toolkit (no include/cuda_runtime.h): set CUDA_HOME to its root"
    if _nvidia_dir("cusparselt", "include") is None:
        return "cuSPARSELt is not installed (pip install nvidia-cusparselt-cu13)"
    return None


def _write_build_info(folder, torch, cuda_version, cuda_archs):
    """A generated header with what the extension is built for; _extension.py checks it at import."""
    os.makedirs(folder, exist_ok=True)
    text = (
        f'#define NXM_TORCH_VERSION "{torch.__version__}"\n'
        f'#define NXM_CUDA_VERSION "{cuda_version}"\n'
        f'#define NXM_CUDA_ARCHS "{cuda_archs}"\n'
    )
    path = os.path.join(folder, "nxm_build_info.h")
    if not os.path.exists(path) or open(path).read() != text:  # unchanged: no rebuild
        with open(path, "w") as f:
            f.write(text)
    return folder


def extension_and_cmdclass():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    skip_cuda = os.environ.get("NXM_SKIP_CUDA_BUILD", "0") == "1"
    force_cuda = os.environ.get("NXM_FORCE_CUDA", "0") == "1"
    if skip_cuda and force_cuda:
        raise RuntimeError("NXM_SKIP_CUDA_BUILD=1 and NXM_FORCE_CUDA=1 contradict each other: unset one")
    blocker = None if skip_cuda else _cuda_build_blocker(torch, CUDA_HOME)
    if force_cuda and blocker:
        raise RuntimeError(f"NXM_FORCE_CUDA=1 but the CUDA part cannot be built: {blocker}")
    with_cuda = not skip_cuda and blocker is None
    if blocker:
        print(f"nxm-kernels: building the C++ CPU ops only: {blocker}")

    # One object folder per configuration, kept between builds (see NxmBuildExtension).
    archs = os.environ.get("NXM_CUDA_ARCHS", "8.0;9.0")
    config = f"cuda{torch.version.cuda}-sm{archs.replace('.', '').replace(';', '-sm')}" if with_cuda else "cpu"
    build_temp = os.path.join(HERE, "build", f"temp-{config}")
    NxmBuildExtension = build_extension_command(build_temp)

    sources = sorted(set(glob.glob("csrc/*.cpp")) - set(ISA_SOURCES))  # ISA_SOURCES: see NxmBuildExtension
    cxx_flags = ["-O3", "-g0", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP in torch
    link_args = ["-fopenmp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if not with_cuda:
        include_dirs.append(_write_build_info(os.path.join(build_temp, "generated"), torch, "", ""))
        ext = CppExtension("nxm_kernels._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args)
        return ext, NxmBuildExtension

    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cuda_major = torch.version.cuda.split(".")[0]
    include_dirs += [_nvidia_dir("cusparselt", "include")]
    # Headers the toolkit may lack (cusparse.h) come with torch's own nvidia wheels.
    if _nvidia_dir(f"cu{cuda_major}", "include"):
        include_dirs.append(_nvidia_dir(f"cu{cuda_major}", "include"))
    include_dirs.append(_write_build_info(os.path.join(build_temp, "generated"), torch, torch.version.cuda, archs))
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    ext = CUDAExtension(
        "nxm_kernels._C",
        sources,
        include_dirs=include_dirs,
        library_dirs=[_nvidia_dir("cusparselt", "lib")],
        extra_compile_args={"cxx": cxx_flags + ["-DNXM_WITH_CUDA"],
                            "nvcc": ["-O3", "-DNXM_WITH_CUDA", "-lineinfo"]},
        # --no-as-needed: keep the cuSPARSELt dependency even if the linker sees no use of it;
        # the rpath resolves inside an installed wheel (site-packages/nvidia/cusparselt/lib).
        extra_link_args=link_args + ["-Wl,--no-as-needed", "-l:libcusparseLt.so.0", "-Wl,--as-needed",
                                     f"-Wl,-rpath,{CUSPARSELT_RPATH}"],
    )

    return ext, NxmBuildExtension


def build_extension_command(build_temp):
    from torch.utils.cpp_extension import BuildExtension

    class NxmBuildExtension(BuildExtension):
        """torch's BuildExtension (ninja), plus:
        - one persistent object folder per configuration (build/temp-cpu, build/temp-cuda13.0-sm80-sm90),
          so that ninja recompiles only what changed: an editable install after an edit of csrc/,
          and `pip wheel .` after an editable install, cost a link instead of a full build (pip's
          default is a fresh temporary folder);
        - a lock on it, so that two builds of one tree at once take turns instead of mixing objects;
        - an in-place (editable) _C gets the absolute cuSPARSELt folder as a second rpath, since
          the wheel-relative one finds nothing in the source tree;
        - the in-place copy is an atomic rename, so a process importing nxm_kernels meanwhile
          loads the old _C or the new one, never half of one."""

        def build_extensions(self):
            self.build_temp = build_temp
            os.makedirs(self.build_temp, exist_ok=True)
            cusparselt_lib = _nvidia_dir("cusparselt", "lib")
            if (self.inplace or getattr(self, "editable_mode", False)) and cusparselt_lib:
                for extension in self.extensions:
                    if CUSPARSELT_RPATH in " ".join(extension.extra_link_args):
                        extension.extra_link_args.append(f"-Wl,-rpath,{cusparselt_lib}")
            with open(os.path.join(self.build_temp, ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if BUILD_ISA_SOURCES:
                    isa_objects = self.compile_isa_sources()
                    for extension in self.extensions:
                        extension.extra_objects.extend(isa_objects)
                super().build_extensions()

        def compile_isa_sources(self):
            """Objects of ISA_SOURCES, each with its own flags (one flag set per Extension otherwise);
            they include no torch header, only csrc/cpu_gemm.h."""
            objects = []
            for source, flags in ISA_SOURCES.items():
                objects += self.compiler.compile([source], output_dir=self.build_temp,
                                                 include_dirs=[os.path.join(HERE, "csrc")],
                                                 extra_postargs=["-O3", "-g0", "-std=c++17", "-fPIC", *flags])
            return objects

        def copy_file(self, infile, outfile, *args, **kwargs):
            partial = f"{outfile}.partial"
            copied = super().copy_file(infile, partial, *args, **kwargs)
            os.replace(partial, outfile)
            return outfile, copied[1]

    return NxmBuildExtension


class BuildPyWithKernelSources(build_py):
    """Ships the torch-free CUDA kernel sources as nxm_kernels/_csrc, for the CuPy (NVRTC) path of a
    build without CUDA (an editable install reads csrc/ itself)."""

    def run(self):
        super().run()
        for source in ["csrc/nm_core.h"] + sorted(glob.glob("csrc/cuda/*.cu")):
            target = os.path.join(self.build_lib, "nxm_kernels", "_csrc", os.path.relpath(source, "csrc"))
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)


ext, build_ext = extension_and_cmdclass()

setup(
    name="nxm-kernels",
    version="0.1.0",
    description="N:M semi-structured sparse kernels (Triton, CUDA, cuSPARSELt) for Transformer inference",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nxm_kernels", "nxm_kernels.*"]),
    # Ranges, never pins: a GPU server builds against the torch it has (oldest: nxm_kernels/_compat.py).
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "xxhash>=2"],
    extras_require={
        "checkpoint": ["safetensors"],
        # CUDA kernels compiled at run time when _C has none; the CuPy build must match torch's CUDA major.
        "cupy": ["cupy-cuda13x"],
        # nxm_kernels.integrations.hf: the Trainer callback.
        "hf": ["transformers", "accelerate"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "safetensors", "numpy"],
    },
    entry_points={"console_scripts": ["nxm = nxm_kernels.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext, "build_py": BuildPyWithKernelSources},
)
