"""One-shot pruning time per layer: magnitude, Wanda, SparseGPT and layer-wise ADMM at 2:4, from
the layer's statistics (the calibration passes are not timed: they cost the same forward and
X^T X for every method that reads H).

Shapes are SmolLM2-135M's decoder Linears (576x576 attention, 1536x576 FFN up, 576x1536 FFN
down) and a 7-8B decoder's 4096x4096 (``--bench-full`` only: ADMM takes about a minute there on
one core). Baselines in the same rounds: the weight copy for magnitude and Wanda, magnitude for
SparseGPT, and SparseGPT for ADMM (so the ADMM/SparseGPT time ratio is read directly).
"""

import functools

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels.training.layerwise_admm import admm
from nxm_kernels.training.sparsegpt import sparsegpt

from . import harness

SHAPES = {"smollm2.attn": (576, 576), "smollm2.ffn-up": (1536, 576), "smollm2.ffn-down": (576, 1536),
          "decoder-8b.attn-qo": (4096, 4096)}
QUICK = ("smollm2.attn", "smollm2.ffn-up", "smollm2.ffn-down")
METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
PATTERN = nxm.Pattern(2, 4)


@functools.lru_cache(maxsize=None)
def layer_case(shape_name):
    """(weight, H): a random weight, and H = X^T X of 2048 tokens of correlated inputs whose
    feature scales spread over 100x (as in real activations)."""
    out_features, in_features = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, in_features, generator=g)
    x = (x + 0.5 * torch.randn(2048, in_features, generator=g)) * torch.logspace(-1, 1, in_features)
    return torch.randn(out_features, in_features, generator=g) * 0.02, x.T @ x


def pruner(method, w, h):
    if method == "magnitude":
        return functools.partial(nxm.project, w, PATTERN)
    if method == "wanda":
        norms = h.diagonal().sqrt()
        return lambda: nxm.project(w, PATTERN, scores=w.abs() * norms)
    if method == "sparsegpt":
        return functools.partial(sparsegpt, w, h, PATTERN)
    return functools.partial(admm, w, h, PATTERN)


BASELINE = {"magnitude": "w.clone()", "wanda": "w.clone()", "sparsegpt": "magnitude", "admm": "sparsegpt"}


def pytest_generate_tests(metafunc):
    if "prune_shape" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full")
        metafunc.parametrize("prune_shape", [s for s in SHAPES if full or s in QUICK])


@pytest.mark.parametrize("method", METHODS)
def test_prune_layer(benchmark, profile, prune_shape, method):
    w, h = layer_case(prune_shape)
    baseline = BASELINE[method]
    baseline_fn = w.clone if baseline == "w.clone()" else pruner(baseline, w, h)
    benchmark.group = f"prune 2:4 float32 {prune_shape} cpu"
    harness.measure(
        benchmark, profile, torch.device("cpu"), pruner(method, w, h), {baseline: baseline_fn},
        kind="prune", op=f"prune.{method}", layout=None, pattern=str(PATTERN), dtype="float32",
        model=prune_shape, shape=list(w.shape), backend="auto", bytes=w.numel() * w.element_size(),
        baselines_unavailable={},
    )
