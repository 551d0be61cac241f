"""The module level: SparseLinear forward against nn.Linear, and sparsify of a whole BERT-base.

Skipped, with the reason, while ``nxm.SparseLinear`` / ``nxm.sparsify`` are not in the tree.
"""

import copy
import functools
import os

import pytest
import torch
from torch import nn

import nxm_kernels as nxm

from . import cases, harness


def require_nn(name: str) -> None:
    if not hasattr(nxm, name):
        pytest.skip(f"nxm.{name} is not in this tree yet")


def in_quick_grid(shape_name, dtype, m) -> bool:
    return dtype == torch.float16 and shape_name in cases.QUICK_SHAPES and m in (1, 512)


def linear_cases():
    return [(shape_name, dtype, m) for dtype in (torch.float16, torch.bfloat16, torch.float32)
            for shape_name in cases.MODEL_SHAPES for m in cases.GEMM_M]


def pytest_generate_tests(metafunc):
    if "linear_case" in metafunc.fixturenames:
        cases.grid(metafunc, "linear_case", linear_cases, in_quick_grid)
    if "sparsify_dtype" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full")
        dtypes = [torch.float16, torch.bfloat16, torch.float32] if full else [torch.float16]
        metafunc.parametrize("sparsify_dtype", dtypes, ids=cases.dtype_name)


@pytest.mark.parametrize("backend", cases.backend_names())
def test_sparse_linear_forward(benchmark, profile, linear_case, backend):
    require_nn("SparseLinear")
    device, shape_name, dtype, m = linear_case
    out_features, in_features = cases.MODEL_SHAPES[shape_name]
    linear = nn.Linear(in_features, out_features, device=device, dtype=dtype)
    try:
        sparse = nxm.SparseLinear.from_dense(linear, "2:4", backend=backend)
    except (ValueError, TypeError, nxm.BackendNotSupported) as error:
        pytest.skip(f"SparseLinear.from_dense(backend={backend!r}) refused: {error}")
    x = cases.activations(m, in_features, dtype, device)
    cases.require_backend(backend, "sparse_mm", x=x, sw=sparse.weight_sparse, bias=sparse.bias)
    masked = sparse.to_dense()  # nn.Linear holding the projected weight
    benchmark.group = f"SparseLinear 2:4 {cases.dtype_name(dtype)} {shape_name} M={m} {device}"
    with torch.inference_mode():
        harness.measure(
            benchmark, profile, torch.device(device), functools.partial(sparse, x),
            {"nn.Linear (masked dense)": functools.partial(masked, x)},
            kind="linear", op="SparseLinear.forward", layout=sparse.layout, pattern="2:4",
            dtype=cases.dtype_name(dtype), model=shape_name, shape=[out_features, in_features], m=m,
            backend=backend, bytes=sparse.weight_sparse.nbytes, baselines_unavailable={},
        )


# all-MiniLM-L6-v2's attention projections: a layer small enough that per-call work shows.
OVERHEAD_SHAPE = (384, 384)


@pytest.mark.parametrize("entry", ["SparseLinear", "nxm.sparse_mm"])
def test_per_call_overhead(benchmark, profile, entry):
    """SparseLinear.forward (or nxm.sparse_mm) at M=1, fp32, one thread, against nn.Linear on the
    projected weight; beside it the native kernel called directly (torch.ops.nxm.sparse_mm_packed),
    the floor that the Python above it adds to. Goal: SparseLinear at most 1.5x nn.Linear."""
    require_nn("SparseLinear")
    out_features, in_features = OVERHEAD_SHAPE
    sparse = nxm.SparseLinear.from_dense(nn.Linear(in_features, out_features), "2:4", layout="packed")
    x = cases.activations(1, in_features, torch.float32, "cpu")
    sw = sparse.weight_sparse
    cases.require_backend("native", "sparse_mm", x=x, sw=sw, bias=sparse.bias)
    masked = sparse.to_dense()
    candidate = functools.partial(sparse, x) if entry == "SparseLinear" else functools.partial(nxm.sparse_mm, x, sw,
                                                                                                 sparse.bias)
    kernel = functools.partial(torch.ops.nxm.sparse_mm_packed, x, sw.values, sw.metadata, sparse.bias, 2, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    benchmark.group = f"per-call overhead {entry} 2:4 fp32 {out_features}x{in_features} M=1 1 thread"
    try:
        with torch.inference_mode():
            ratios = harness.measure(
                benchmark, profile, torch.device("cpu"), candidate,
                {"nn.Linear (masked dense)": functools.partial(masked, x), "native kernel alone": kernel},
                kind="overhead", op=entry, layout="packed", pattern="2:4", dtype="fp32", model="all-minilm-l6.attn",
                shape=[out_features, in_features], m=1, backend="auto (native)", bytes=sw.nbytes,
                baselines_unavailable={},
            )
    finally:
        torch.set_num_threads(threads)
    # On a loaded machine the fastest sample of each is the one least disturbed: their ratio beside the median.
    samples = benchmark.extra_info["samples_s"]
    fastest = {name: min(samples["candidate"]) / min(samples[name]) for name in ratios}
    cells = [f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}], fastest {fastest[name]:.2f}x"
             for name, r in ratios.items()]
    print(f"\n| {entry} | {' | '.join(cells)} | {os.getloadavg()[0]:.1f} |")


class BertBaseEncoderLinears(nn.Module):
    """The 72 linear layers of BERT-base's encoder (12 x q, k, v, o, FFN up, FFN down)."""

    def __init__(self, dtype: torch.dtype, layers: int = 12):
        super().__init__()
        shapes = {"query": (768, 768), "key": (768, 768), "value": (768, 768), "output": (768, 768),
                  "intermediate": (3072, 768), "ffn_output": (768, 3072)}
        self.layer = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(k, n, dtype=dtype) for name, (n, k) in shapes.items()})
            for _ in range(layers)
        )


def test_sparsify_bert_base(benchmark, profile, sparsify_dtype):
    require_nn("sparsify")
    dtype = sparsify_dtype
    model = BertBaseEncoderLinears(dtype).requires_grad_(False)
    dense_bytes = sum(cases.nbytes(p) for p in model.parameters())
    compress_backend = nxm.dispatch.select("compress", None, {"w": model.layer[0]["query"].weight}).name
    benchmark.group = f"sparsify 2:4 bert-base encoder {cases.dtype_name(dtype)} cpu"
    harness.measure(
        benchmark, profile, torch.device("cpu"), functools.partial(nxm.sparsify, model, "2:4", inplace=False),
        {"copy.deepcopy": functools.partial(copy.deepcopy, model)},
        kind="sparsify", op="sparsify", layout="auto", pattern="2:4", dtype=cases.dtype_name(dtype),
        model="bert-base.encoder (72 linears)", shape=None, backend=f"auto ({compress_backend})",
        bytes=dense_bytes, baselines_unavailable={},
    )
