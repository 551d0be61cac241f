"""Every Triton kernel and every GEMM autotuning config, compiled ahead of time for sm_80 and
sm_90 as a real launch would specialise it (no GPU needed): it compiles, the fp16/bf16 GEMM uses
tensor cores (``mma`` on sm_80, ``wgmma`` or ``mma`` on sm_90) and nothing spills.

The compilation runs once, in a subprocess without TRITON_INTERPRET (the test process has its
kernels interpreted), through the same ``inspect`` entry point a developer runs by hand."""

import json
import os
import subprocess
import sys

import pytest

aot = pytest.importorskip("nxm_kernels.backends.triton.aot")

SPECS = aot.all_specs()
CASES = [(spec.label, spec.config, f"sm_{cc}") for spec in SPECS for cc in aot.ARCHS]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "nxm_kernels.backends.triton.inspect", "--json", "--workers", "2"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, f"ahead-of-time compilation failed:\n{out.stderr[-6000:]}"
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    return {(r["kernel"], r["config"], r["arch"]): r for r in rows}


def test_every_kernel_and_config_is_covered():
    gemm_labels = {spec.label for spec in SPECS if spec.kernel == "_sparse_mm_kernel"}
    assert {"sparse_mm 2:4 fp16", "sparse_mm 2:4 bf16", "sparse_mm 2:4 fp32", "sparse_mm 8:16 fp16"} <= gemm_labels
    block_labels = {spec.label for spec in SPECS if spec.kernel == "_sparse_mm_block_kernel"}
    assert {"sparse_mm block 8:4x4 fp16", "sparse_mm block 8:4x4 bf16", "sparse_mm block 8:4x4 fp32",
            "sparse_mm block library fp16"} <= block_labels
    quant_labels = {spec.label for spec in SPECS if spec.kernel == "_sparse_mm_tiled_q_kernel"}
    assert {"sparse_mm tiled_q int4-g128 fp16", "sparse_mm tiled_q int4-g128 bf16", "sparse_mm tiled_q int4-g64 fp16",
            "sparse_mm tiled_q int8 fp16"} <= quant_labels
    kernels = {spec.kernel for spec in SPECS}
    assert kernels == {"_select_kernel", "_compress_packed_kernel", "_compress_cutlass_kernel",
                       "_decompress_kernel", "_sparse_mm_kernel", "_sparse_mm_block_kernel",
                       "_sparse_mm_tiled_q_kernel"}
    assert len(set(CASES)) == len(CASES), "two specs would share a table row"


@pytest.mark.parametrize("label,config,arch", CASES, ids=[" ".join(c) for c in CASES])
def test_compiles_without_spills(compiled, label, config, arch):
    row = compiled[label, config, arch]
    assert row["spill_bytes"] == 0, f"{label} {config} spills {row['spill_bytes']} bytes on {arch}"
    if label.startswith("sparse_mm") and not label.endswith("fp32"):
        allowed = {"mma"} if arch == "sm_80" else {"wgmma", "mma"}
        assert row["tensor_core"] in allowed, f"{label} {config} on {arch} uses no tensor cores"
