"""Loading a checkpoint of more than 100 MB with and without checksum verification.

Candidate: ``nxm.load(path)`` (reads the file once, verifies every tensor's and the header's
xxh3 checksum, validates every layer). Baselines in the same rounds: ``nxm.load(path,
verify=False)`` (the cost of verifying is the difference), the checksums alone (open the file
through safetensors, whose tensors map the file lazily, and hash every tensor's bytes: what
verification adds) and reading the file's bytes into memory (the bytes-read limit: the file is
in the page cache after the first round, so this is memory bandwidth).
"""

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

import nxm_kernels as nxm
from nxm_kernels import checkpoint

from . import harness

LAYERS = 6  # x 4096x4096 fp16 2:4 (a 7-8B decoder's attention projection): 109 MB on disk


def checksums_alone(path: Path) -> None:
    header, tensors = checkpoint._read(path)
    checkpoint._verify(path, header, tensors)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4096, 4096, dtype=torch.float16) for _ in range(LAYERS)))
    nxm.sparsify(model.requires_grad_(False), "2:4")
    path = tmp_path_factory.mktemp("checkpoint") / "decoder.nxm.safetensors"
    nxm.save(model, path)
    return path


def test_load_with_and_without_verification(benchmark, profile, checkpoint_file):
    size = checkpoint_file.stat().st_size
    assert size >= 100e6
    benchmark.group = f"load checkpoint {size / 1e6:.0f} MB cpu"
    harness.measure(
        benchmark, profile, torch.device("cpu"), functools.partial(nxm.load, checkpoint_file),
        {
            "nxm.load verify=False": functools.partial(nxm.load, checkpoint_file, verify=False),
            "checksums alone": functools.partial(checksums_alone, checkpoint_file),
            "read the file's bytes": checkpoint_file.read_bytes,
        },
        kind="checkpoint", op="load", layout="auto", pattern="2:4", dtype="float16",
        model=f"decoder-8b.attn-qo x{LAYERS}", shape=[4096, 4096], backend=None, bytes=size,
        baselines_unavailable={},
    )
