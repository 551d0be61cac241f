"""Conversion of a 4096x4096 fp16 weight to the 2:4 cutlass layout on this machine.

Compare within one run: ``w.clone()`` is the memory-bandwidth floor, torch's converter (on the
already projected weight) the baseline to beat.
"""

import pytest
import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import nxm_kernels as nxm

SHAPE = (4096, 4096)


@pytest.fixture(scope="module")
def weight():
    return torch.randn(SHAPE, dtype=torch.float16)


@pytest.mark.benchmark(group="compress 2:4 cutlass fp16 4096x4096")
def test_clone_floor(benchmark, weight):
    benchmark(weight.clone)


@pytest.mark.benchmark(group="compress 2:4 cutlass fp16 4096x4096")
def test_torch_converter(benchmark, weight):
    projected = nxm.project(weight, "2:4", backend="reference")
    benchmark(sparse_semi_structured_from_dense_cutlass, projected)


@pytest.mark.benchmark(group="compress 2:4 cutlass fp16 4096x4096")
@pytest.mark.parametrize("backend", [name for name, why in nxm.backends().items() if why is None])
def test_nxm_compress(benchmark, weight, backend):
    benchmark(nxm.compress, weight, "2:4", layout="cutlass", backend=backend)
