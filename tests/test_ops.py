"""Every custom op (schemas and fakes: nxm_kernels/_ops.py) passes torch.library.opcheck, and its
fake kernel gives the real kernel's output shapes and dtypes for every dtype (fp32 cutlass too).
``nxm.sparse_mm`` compiles fullgraph."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import nxm_kernels as nxm
from nxm_kernels import _extension, _ops
from nxm_kernels.layouts.block import library_bitmaps
from nxm_kernels.layouts.cutlass import PATTERN as CUTLASS_PATTERN

from conftest import random_weight

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)
# Run only with a GPU (tests/test_cusparselt_gpu.py opchecks them there).
GPU_ONLY = {"nxm::cusparselt_version", "nxm::cusparselt_plan_cache_size", "nxm::cusparselt_release",
            "nxm::cusparselt_compress", "nxm::cusparselt_mm", "nxm::cusparselt_max_algorithm_id"}


def _triton_usable() -> bool:
    try:
        from nxm_kernels.backends import triton as backend
    except ImportError:
        return False
    return backend.BACKEND.unavailable_reason() is None


def _has_cpu_kernel(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU") or \
        torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")


def kernel_cases(namespace: str, dtypes=DTYPES):
    """(qualname, args) with small valid inputs for every kernel op of ``namespace``, per dtype."""
    ops = getattr(torch.ops, namespace)
    g = torch.Generator().manual_seed(3)
    cases = []
    for dtype in dtypes:
        w = random_weight((32, 64), dtype, g)
        scores = torch.rand(32, 64, generator=g)
        values, metadata = ops.compress_packed(w, 3, 8, None)
        cvalues, cmetadata = ops.compress_cutlass(w, None)  # 2:4, fp32 1:2
        cases += [
            ("nm_mask", (w, 2, 4, None)),
            ("project", (w, 1, 4, scores)),
            ("compress_packed", (w, 3, 8, None)),
            ("compress_packed", (w, 2, 4, scores.double())),
            ("decompress_packed", (values, metadata, 64, 3, 8)),
            ("compress_cutlass", (w, None)),
            ("decompress_cutlass", (cvalues, cmetadata)),
        ]
        if dtype.is_floating_point:
            x = random_weight((3, 64), dtype, g)
            pvalues, pmetadata = ops.compress_packed(w, 2, 4, None)
            cases.append(("sparse_mm_packed", (x, pvalues, pmetadata, random_weight((32,), dtype, g), 2, 4)))
            block = nxm.compress(w, "8:4x4", "block", backend="reference")
            cases.append(("sparse_mm_block", (x, block.values, block.metadata, None, None, 4, 4, 8)))
            library = nxm.compress(w, "2x2{9,6}", "block", backend="reference")
            masks = library_bitmaps(library.pattern, w.device)
            cases.append(("sparse_mm_block", (x, library.values, library.metadata, masks,
                                              random_weight((32,), dtype, g), 2, 2, 2)))
    return [(f"{namespace}::{name}", args) for name, args in cases
            if _has_cpu_kernel(f"{namespace}::{name}")]


def python_op_cases():
    g = torch.Generator().manual_seed(4)
    w = random_weight((32, 64), torch.float16, g)
    sw = nxm.compress(w, "2:4", layout="cutlass", backend="reference")
    x = random_weight((2, 3, 64), torch.float16, g).requires_grad_()
    bias = random_weight((32,), torch.float16, g)
    shape = list(sw.shape)
    layer = nxm.SparseLinear.from_dense(torch.nn.Linear(30, 10).half(), "2:4", layout="packed")
    xl = torch.randn(3, 30).half().requires_grad_()
    qw = nxm.compress(w, "2:4", bits=4, group_size=32, backend="reference")  # int4 codes, fp32 scales
    quantized = [("nxm::sparse_mm_packed_q", (x[0].detach(), qw.values, qw.metadata, qw.scales, bias, 2, 4, 4, 32)),
                 ("nxm::sparse_mm_packed_w8a8", (x[0].detach(), qw.values, qw.metadata, qw.scales, bias, 2, 4, 4, 32))]
    selections = [("nxm::select_2of4t", (w, None, False)),  # 2:4t (csrc/cpu_transposable.cpp)
                  ("nxm::select_2of4t", (w.float(), w.double().square(), True))]
    return (quantized + selections if _extension.unavailable_reason() is None else []) + [
        ("nxm::sparse_mm", (x, sw.values, sw.metadata, bias, shape, "2:4", "cutlass", "auto")),
        ("nxm::sparse_mm", (x, sw.values, sw.metadata, None, shape, "2:4", "cutlass", "reference")),
        ("nxm::sparse_mm_grad_input", (torch.randn(3, 32).half(), sw.values, sw.metadata, shape, "2:4", "cutlass")),
        ("nxm::sparse_linear", (xl, layer.values, layer.metadata, layer.bias, list(layer.padded_shape), 10, "2:4",
                                "packed", "auto", None, None, "", [])),
        ("nxm::sparse_linear_grad_input", (torch.randn(3, 10).half(), layer.values, layer.metadata,
                                           list(layer.padded_shape), 30, "2:4", "packed")),
    ]


def all_cases():
    cases = []
    if _extension.unavailable_reason() is None:
        cases += kernel_cases("nxm")
    if _triton_usable():  # interpreted on CPU: two dtypes (fp32: the 1:2 cutlass case)
        cases += kernel_cases("nxm_triton", (torch.float16, torch.float32))
    return cases + python_op_cases()


CASES = all_cases()


def _schema(qualname: str) -> str:
    namespace, name = qualname.split("::")
    return {**_ops.KERNEL_SCHEMAS, **_ops.NXM_SCHEMAS}[name] if namespace in _ops.KERNEL_NAMESPACES else ""


def _op(qualname):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def test_every_op_has_a_case():
    """A new op in _ops.py needs a case here (or in the GPU tests)."""
    covered = {q for q, _ in CASES} | GPU_ONLY
    expected = set(_ops.qualnames())
    if _extension.unavailable_reason() is not None:
        expected = {q for q in expected if not q.startswith("nxm::") or not q.removeprefix("nxm::") in _ops.KERNEL_SCHEMAS}
    if not _triton_usable():
        expected = {q for q in expected if not q.startswith("nxm_triton::")}
    # ops without a CPU kernel yet (e.g. a GEMM only Triton has) are checked where they have one; ops
    # without tensor arguments (build facts such as cpu_isa) have nothing for opcheck to check
    expected = {q for q in expected if (q in GPU_ONLY or _has_cpu_kernel(q)) and "Tensor" in _schema(q)}
    assert expected <= covered, sorted(expected - covered)


def test_one_schema_for_both_namespaces():
    for name in _ops.KERNEL_SCHEMAS:
        schemas = {str(_op(f"{ns}::{name}").default._schema).split("::", 1)[1] for ns in _ops.KERNEL_NAMESPACES}
        assert len(schemas) == 1, schemas


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{q}-{i}" for i, (q, _) in enumerate(CASES)])
def test_opcheck(case):
    qualname, args = CASES[case]
    torch.library.opcheck(_op(qualname), args)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{q}-{i}" for i, (q, _) in enumerate(CASES)])
def test_fake_kernel_matches_the_real_kernel(case):
    """Shapes, dtypes and devices of the fake kernel's outputs equal the real kernel's, per dtype
    (this is what catches a wrong shape in, e.g., the fp32 cutlass fake)."""
    qualname, args = CASES[case]
    op = _op(qualname)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, args)
        fake = op(*fake_args)
    real, fake = (r if isinstance(r, tuple) else (r,) for r in (real, fake))
    assert [(tuple(t.shape), t.dtype, t.device) for t in fake] == [(tuple(t.shape), t.dtype, t.device) for t in real]


def test_fp32_cutlass_is_among_the_fake_checks():
    fp32_cutlass = [q for q, args in CASES if q.endswith("compress_cutlass") and args[0].dtype == torch.float32]
    assert fp32_cutlass or _extension.unavailable_reason() is not None
    assert CUTLASS_PATTERN[torch.float32] == nxm.Pattern(1, 2)


# ------------------------------------------------------------------ nxm.sparse_mm under torch.compile


@pytest.mark.parametrize("layout", ["packed", "cutlass"])
def test_sparse_mm_compiles_fullgraph(layout):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    w = random_weight((32, 64), torch.float32, g)
    pattern = "2:4" if layout == "packed" else "1:2"
    sw = nxm.compress(w, pattern, layout=layout)
    bias = torch.randn(32, generator=g)
    x = torch.randn(2, 5, 64, generator=g)
    compiled = torch.compile(nxm.sparse_mm, fullgraph=True)
    torch.testing.assert_close(compiled(x, sw, bias), nxm.sparse_mm(x, sw, bias), rtol=1e-5, atol=1e-5)

    # a weight built from tensors inside the compiled function
    def f(x, values, metadata):
        return nxm.sparse_mm(x, nxm.NMSparseWeight(values, metadata, (32, 64), pattern, layout,
                                                   check_metadata=False), bias) * 2

    compiled_f = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled_f(x, sw.values, sw.metadata), 2 * nxm.sparse_mm(x, sw, bias),
                               rtol=1e-5, atol=1e-5)


def test_sparse_mm_op_has_a_gradient():
    w = torch.randn(16, 32)
    sw = nxm.compress(w, "2:4")
    x = torch.randn(3, 32, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    compiled = torch.compile(nxm.sparse_mm, backend="aot_eager", fullgraph=True)
    compiled(x, sw, bias).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    (x_ref @ nxm.project(w, "2:4").T + bias_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, bias_ref.grad)
