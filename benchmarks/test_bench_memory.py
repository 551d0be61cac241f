"""Peak RSS of converting a stack of 7-8B-decoder-shaped layers (see memory_probe.py).

Each measurement is a fresh subprocess, so nothing allocated by other benchmarks counts. The
stack and a single layer are both measured: conversion streams when the stack needs no more
beyond its dense weights than one layer does. A hand-written loop that swaps one Linear at a
time (``--method swap``) is measured beside it as the streaming reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nxm_kernels as nxm

ROOT = Path(__file__).resolve().parents[1]
# Allowed growth of the conversion working set from one layer to the stack before we call it
# "not streaming": allocator slack, not a layer's worth (one layer's working set is ~1 GB).
SLACK_BYTES = 128 * 2**20


def probe(layers: int, method: str = "sparsify") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks.memory_probe", "--layers", str(layers), "--method", method]
    done = subprocess.run(command,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def conversion_extra(result: dict) -> int:
    """Bytes conversion needed on top of the dense model (peak RSS minus RSS with the model built)."""
    return result["rss_peak_bytes"] - result["rss_dense_bytes"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_conversion_memory(benchmark, profile):
    if not hasattr(nxm, "sparsify"):
        pytest.skip("nxm.sparsify is not in this tree yet")
    layers = 4 if profile.full_grid else 2
    one = probe(1)
    stack = benchmark.pedantic(probe, args=(layers,), rounds=1, iterations=1)
    swap = probe(layers, "swap")  # what streaming achieves: one Linear replaced at a time
    streams = conversion_extra(stack) <= conversion_extra(one) + SLACK_BYTES
    benchmark.group = "memory: sparsify a 7-8B decoder stack (cpu)"
    benchmark.extra_info.update(
        kind="memory", device="cpu", one_layer=one, stack=stack, swap_stack=swap, streams=streams,
        extra_one_layer_bytes=conversion_extra(one), extra_stack_bytes=conversion_extra(stack),
        slack_bytes=SLACK_BYTES,
    )
