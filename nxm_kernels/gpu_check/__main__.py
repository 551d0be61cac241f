"""The entry of gpu-check run by path, `python nxm_kernels/gpu_check` (what `make gpu-check` runs with a
server's own Python, nothing installed), or as `python -m nxm_kernels.gpu_check` (the workers of the
steps after the build).

By path, this folder is loaded as a package of its own name, not as nxm_kernels.gpu_check: importing
that would first import nxm_kernels/__init__.py, hence torch and the extension, before the build step
has built _C for this GPU (a stale or missing _C, or a torch too old for the package, must not stop the
run before the env step can report it, and a loaded _C must not be rewritten under the running
process). The modules of this folder import each other relatively and the package only inside the
workers, so they work under either name.
"""

import importlib.util
import sys
from pathlib import Path

STANDALONE_NAME = "nxm_gpu_check"


def load_standalone():
    """This folder as the package ``nxm_gpu_check``, without importing nxm_kernels."""
    if STANDALONE_NAME in sys.modules:
        return sys.modules[STANDALONE_NAME]
    folder = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(STANDALONE_NAME, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[STANDALONE_NAME] = package  # before it runs: its relative imports look it up there
    spec.loader.exec_module(package)
    return package


if __name__ == "__main__":
    if __package__:  # python -m nxm_kernels.gpu_check
        from . import main

        sys.exit(main(prog="python -m nxm_kernels.gpu_check"))
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run by path: imports start at the checkout
    sys.exit(load_standalone().main(prog="make gpu-check"))
