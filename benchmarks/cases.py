"""What the suite measures: model shapes, dtypes, M, the quick subset, inputs, and skip reasons."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import dispatch
from nxm_kernels.layouts.cutlass import PATTERN as CUTLASS_PATTERN

# (out_features, in_features) of linear layers, named after the models they come from.
# BERT-base: hidden 768, FFN 3072. A 7-8B decoder (Llama-3-8B, Mistral-7B): hidden 4096, MLP
# 14336; its grouped-query k/v projections are 1024x4096 (used in the memory benchmark's stack).
MODEL_SHAPES = {
    "bert-base.attn": (768, 768),
    "bert-base.ffn-up": (3072, 768),
    "bert-base.ffn-down": (768, 3072),
    "decoder-8b.attn-qo": (4096, 4096),
    "decoder-8b.mlp-up": (14336, 4096),
    "decoder-8b.mlp-down": (4096, 14336),
}
GEMM_M = (1, 16, 64, 512, 4096)  # rows of x: decoding (1-64 tokens) up to prefill / encoder batches
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)

# The quick profile keeps one BERT and one decoder shape (and every shape for conversion to
# cutlass); the full profile (--bench-full) runs the whole grid.
QUICK_SHAPES = ("bert-base.ffn-up", "decoder-8b.attn-qo")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grid(metafunc, argname: str, cases_for, in_quick_grid) -> None:
    """Parametrize ``argname`` with (device, *case) over CPU and CUDA (gpu-marked, skipped
    without a GPU). The CPU runs the quick subset unless --bench-full; a GPU always runs the
    whole grid (it is fast there)."""
    full = metafunc.config.getoption("--bench-full")
    params = []
    for device in ("cpu", "cuda"):
        for case in cases_for():
            if device == "cuda" or full or in_quick_grid(*case):
                case_id = "-".join(c if isinstance(c, str) else dtype_name(c) if isinstance(c, torch.dtype)
                                   else f"M{c}" for c in case if c is not None)
                marks = [pytest.mark.gpu] if device == "cuda" else []
                params.append(pytest.param((device, *case), id=f"{device}-{case_id}", marks=marks))
    metafunc.parametrize(argname, params)


def backend_names():
    """Every registered backend: an unavailable one is skipped at run time with its reason."""
    return list(nxm.backends())


def pattern_for(dtype: torch.dtype, layout: str) -> str:
    """2:4 for packed; the hardware layouts (cutlass, cusparselt) hold their Sparse Tensor Core
    pattern (1:2 for fp32)."""
    return "2:4" if layout == "packed" else str(CUTLASS_PATTERN[dtype])


@functools.lru_cache(maxsize=2)
def weight(shape: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(shape[0] * 100_003 + shape[1] * 11 + DTYPES.index(dtype))
    if dtype == torch.int8:
        w = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    else:
        w = torch.randn(shape, generator=generator, dtype=dtype)
    return w.to(device)


def activations(m: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    return torch.randn(m, k, dtype=dtype, device=device)


def require_backend(name: str, op: str, **inputs) -> None:
    """Skip, quoting the backend's own reasons, when it cannot run ``op`` on these inputs."""
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: benchmarks time compiled Triton kernels, not the interpreter "
                    "(python -m benchmarks.run unsets it)")
    why = dispatch.reasons(dispatch.get_backend(name), op, inputs)
    if why:
        pytest.skip(f"backend {name!r} cannot run {op} here: {'; '.join(why)}")


def compress_or_skip(w: torch.Tensor, pattern: str, layout: str):
    try:
        return nxm.compress(w, pattern, layout=layout)
    except (ValueError, TypeError, nxm.BackendNotSupported) as error:
        pytest.skip(f"no {layout} weight for {dtype_name(w.dtype)} {list(w.shape)} here: {error}")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def add_baseline(baselines: dict, unavailable: dict, name: str, fn) -> None:
    """Add ``fn`` as a baseline if it runs here; otherwise record why (shown in the report)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001  torch internals raise many types; the reason is kept
        unavailable[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    else:
        baselines[name] = fn
