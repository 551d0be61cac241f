"""The cuSPARSELt backend on a GPU: numerics against the reference and torch._cslt_sparse_mm for
every dtype, small M, bias and alpha, the plan cache, exact decompression, tuning and opcheck.
Skipped on machines without a CUDA GPU (tests/conftest.py)."""

import pytest
import torch

import nxm_kernels as nxm
from nxm_kernels import dispatch
from nxm_kernels.backends import cusparselt

from conftest import assert_matmul_close

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn
DTYPE_PATTERN = [(torch.float16, "2:4"), (torch.bfloat16, "2:4"), (torch.int8, "2:4"), (torch.float32, "1:2")]


@pytest.fixture(autouse=True)
def _require_cusparselt():
    why = cusparselt.BACKEND.unavailable_reason()
    if why:
        pytest.fail(f"a GPU machine must run the cuSPARSELt backend, but: {why}")


def skip_unless_device_runs(dtype):
    why = cusparselt.BACKEND.device_problems(torch.device("cuda"), dtype)
    if why:
        pytest.skip("; ".join(why))


def make(shape, dtype, generator_seed=0, small=False):
    g = torch.Generator().manual_seed(generator_seed)
    if dtype == torch.int8:
        bound = 8 if small else 128
        return torch.randint(-bound, bound, shape, generator=g, dtype=torch.int8).cuda()
    return torch.randn(shape, generator=g).to(dtype).cuda()


def assert_tf32_close(actual, x, w, bias=None):
    """fp32 through TF32: each input keeps 10 mantissa bits, so each product is within 2**-9 (relative,
    truncation included) of the exact one; the bound sums that over K, plus fp32 accumulation."""
    truth = x.double() @ w.double().T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    allowed = magnitude * (2**-9 + x.shape[-1] * 2**-24) + 1e-30
    assert ((actual.double() - truth).abs() <= allowed).all(), f"max error {(actual.double() - truth).abs().max()}"


def check(y, x, w_dense, bias=None):
    if x.dtype == torch.float32:
        assert y.dtype == torch.float32
        assert_tf32_close(y, x, w_dense, bias)
    else:
        assert_matmul_close(y, x, w_dense, bias)


@pytest.mark.parametrize("dtype, pattern", DTYPE_PATTERN)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_mm_matches_the_reference(dtype, pattern, m, with_bias):
    skip_unless_device_runs(dtype)
    w = make((128, 256), dtype, 1, small=True)  # int8: |sums| < 2**24, exact through any float epilogue
    sw = nxm.compress(w, pattern, layout="cusparselt")
    x = make((m, 256), dtype, 2, small=True)
    bias = None
    if with_bias:
        bias = make((128,), torch.int8, 3).to(torch.int32) if dtype == torch.int8 else make((128,), dtype, 3)
    assert dispatch.select("sparse_mm", None, {"x": x, "sw": sw, "bias": bias}).name == "cusparselt"
    y = nxm.sparse_mm(x, sw, bias)
    assert y.shape == (m, 128) and y.is_contiguous()
    check(y, x, nxm.project(w, pattern), bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_agrees_with_torch_cslt_sparse_mm(dtype):
    skip_unless_device_runs(dtype)
    w = nxm.project(make((256, 512), dtype, 4, small=True), "2:4")
    x = make((64, 512), dtype, 5, small=True)
    ours = nxm.sparse_mm(x, nxm.compress(w, "2:4", layout="cusparselt"))
    packed = torch._cslt_compress(w)
    if dtype == torch.int8:  # torch's int8 path: row-major [N, M] output, as ours
        theirs = torch._cslt_sparse_mm(packed, x.t(), out_dtype=torch.int32).t()
        assert torch.equal(ours, theirs)
    else:
        theirs = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
        # both within the derived tolerance of the exact product
        assert_matmul_close(ours, x, w)
        assert_matmul_close(theirs, x, w)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_with_per_row_alpha(out_dtype):
    skip_unless_device_runs(torch.int8)
    w = make((128, 256), torch.int8, 6)
    x = make((9, 256), torch.int8, 7)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    alpha = torch.rand(128, device="cuda") / 1000
    truth = (x.double() @ nxm.project(w, "2:4").double().T) * alpha.double()
    y = cusparselt.matmul(x, sw, alpha=alpha, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    # exact int32 sums, scaled in fp32, rounded once to the output
    torch.testing.assert_close(y.double(), truth, rtol=2 * torch.finfo(out_dtype).eps, atol=1e-6)


def test_fp8_with_per_row_alpha():
    skip_unless_device_runs(FP8)
    w = nxm.project(torch.randn(128, 256, device="cuda"), "2:4").to(FP8)
    x = torch.randn(16, 256, device="cuda").to(FP8)
    alpha = torch.rand(128, device="cuda")
    sw = cusparselt.compress_pruned(w, "2:4")
    y = cusparselt.matmul(x, sw, alpha=alpha, out_dtype=torch.bfloat16)
    truth = (x.double() @ w.double().T) * alpha.double()  # fp8 products are exact in fp32
    torch.testing.assert_close(y.double(), truth, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-6)
    with pytest.raises(nxm.BackendNotSupported, match="float8 products need a wider output"):
        nxm.sparse_mm(x, sw, backend="cusparselt")


def test_decode_shapes_and_batched_x():
    w = make((64, 128), torch.float16, 8)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    x = make((2, 3, 128), torch.float16, 9)
    check(nxm.sparse_mm(x, sw).reshape(6, 64), x.reshape(6, 128), nxm.project(w, "2:4"))
    check(nxm.sparse_mm(x[0, :1], sw), x[0, :1], nxm.project(w, "2:4"))
    assert nxm.sparse_mm(x[:0].reshape(0, 128), sw).shape == (0, 64)


def test_hot_calls_reuse_the_plan_and_see_each_calls_bias():
    w = make((64, 128), torch.bfloat16, 10)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    dense = nxm.project(w, "2:4")
    x = make((5, 128), torch.bfloat16, 11)
    nxm.sparse_mm(x, sw, make((64,), torch.bfloat16, 12))
    plans = torch.ops.nxm.cusparselt_plan_cache_size()
    for seed in range(13, 17):  # new bias and x tensors, same shapes: no new plan, fresh pointers
        bias, x = make((64,), torch.bfloat16, seed), make((5, 128), torch.bfloat16, seed + 100)
        check(nxm.sparse_mm(x, sw, bias), x, dense, bias)
    assert torch.ops.nxm.cusparselt_plan_cache_size() == plans


def test_runs_on_the_current_stream():
    w = make((64, 128), torch.float16, 18)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    x = make((32, 128), torch.float16, 19)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = nxm.sparse_mm(x, sw)
    torch.cuda.current_stream().wait_stream(stream)
    check(y, x, nxm.project(w, "2:4"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_decompress_is_exact_and_converts_between_layouts(dtype):
    w = make((96, 160 if dtype != torch.int8 else 192), dtype, 20)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    assert (sw.shape, str(sw.pattern)) == (tuple(w.shape), "2:4")
    assert torch.equal(nxm.decompress(sw), nxm.project(w, "2:4"))
    # packed -> dense -> cusparselt, and back
    packed = nxm.compress(w, "2:4", layout="packed")
    converted = nxm.compress(nxm.decompress(packed), "2:4", layout="cusparselt")
    assert torch.equal(nxm.decompress(converted), nxm.decompress(packed))


def test_wrong_out_features_is_caught_by_the_binding():
    sw = nxm.compress(make((64, 128), torch.float16, 21), "2:4", layout="cusparselt")
    x = make((8, 128), torch.float16, 22)
    with pytest.raises(RuntimeError, match="out_features or x's columns do not match the weight"):
        torch.ops.nxm.cusparselt_mm(x, sw.values, 128, None, None, None, False, 0, 0)
    with pytest.raises(RuntimeError, match="out_features or x's columns do not match the weight"):
        torch.ops.nxm.cusparselt_mm(x[:, :64].contiguous(), sw.values, 64, None, None, None, False, 0, 0)


def test_opcheck():
    w = nxm.project(make((64, 128), torch.float16, 23), "2:4")
    packed = torch.ops.nxm.cusparselt_compress(w)
    x = make((16, 128), torch.float16, 24)
    bias = make((64,), torch.float16, 25)
    torch.library.opcheck(torch.ops.nxm.cusparselt_mm.default, (x, packed, 64, bias, None, None, False, 0, 0))
    x8 = make((16, 128), torch.int8, 26)
    packed8 = torch.ops.nxm.cusparselt_compress(nxm.project(make((64, 128), torch.int8, 27), "2:4"))
    torch.library.opcheck(torch.ops.nxm.cusparselt_mm.default,
                          (x8, packed8, 64, None, torch.ones(64, device="cuda"), torch.bfloat16, True, 0, 0))
    # compress returns a library-defined length: its fake kernel has a data-dependent size
    torch.library.opcheck(torch.ops.nxm.cusparselt_compress.default, (w,),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_tune_finds_a_config_caches_it_and_stays_correct(tmp_path):
    w = make((256, 512), torch.float16, 28)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    path = tmp_path / "tuning.json"
    results = nxm.tune(sw, tokens=(1, 64), iterations=3, path=path)
    assert set(results) == {1, 64}
    saved = cusparselt.read_tuning(path)
    for m, result in results.items():
        key = cusparselt.tuning_key(torch.cuda.get_device_name(), cusparselt.library_version(), m, 256, 512,
                                    torch.float16, torch.float16, False, False)
        assert saved[key] == (result["alg_id"], result["split_k"]) == cusparselt._TUNED.lookup(key)
        x = make((m, 512), torch.float16, 29 + m)
        check(nxm.sparse_mm(x, sw), x, nxm.project(w, "2:4"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_transposed_output_is_written_directly(dtype):
    w = make((128, 256), dtype, 30, small=True)
    sw = nxm.compress(w, "2:4", layout="cusparselt")
    x = make((5, 256), dtype, 31, small=True)
    y_t = cusparselt.matmul(x, sw, transposed=True)
    assert y_t.shape == (128, 5) and y_t.is_contiguous()
    check(y_t.t(), x, nxm.project(w, "2:4"))


# ------------------------------------------------------------------ W8A8: int8 codes x per-token int8 activations

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 17, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_equals_the_reference_bit_for_bit(dtype, m, with_bias):
    """|sums| < 127 * 127 * 512 < 2**31: the int32 products are exact, so the result is the reference's."""
    skip_unless_device_runs(torch.int8)
    w = make((128, 512), dtype, 40) * torch.rand(128, 1, device="cuda").to(dtype) * 4
    w[5] = 0  # an all-zero row: scale 0
    x = make((m, 512), dtype, 41) * 8
    x[m // 2] = 0  # a zero token: scale 0
    bias = make((128,), dtype, 42) if with_bias else None
    sw = nxm.compress(w, "2:4", layout="cusparselt", bits=8)
    packed = nxm.compress(w, "2:4", bits=8)  # the same codes and scales, in a layout the reference reads
    assert torch.equal(nxm.decompress(sw), nxm.decompress(packed)) and torch.equal(sw.scales, packed.scales)
    inputs = {"x": x, "sw": sw, "bias": bias, "act_bits": 8}
    assert dispatch.select("sparse_mm", None, inputs).name == "cusparselt"
    y = nxm.sparse_mm(x, sw, bias, act_bits=8)
    assert y.dtype == dtype and y.shape == (m, 128)
    assert torch.equal(y, nxm.sparse_mm(x, packed, bias, act_bits=8, backend="reference"))
    # and the CPU reference agrees (the quantization and epilogue are the same ops on either device)
    assert torch.equal(y.cpu(), nxm.sparse_mm(x.cpu(), packed.to("cpu"), None if bias is None else bias.cpu(),
                                              act_bits=8, backend="reference"))


def test_w8a8_batched_x_and_refusals_on_the_gpu():
    skip_unless_device_runs(torch.int8)
    w = make((64, 128), torch.bfloat16, 43)
    sw = nxm.compress(w, "2:4", layout="cusparselt", bits=8)
    x = make((2, 3, 128), torch.bfloat16, 44)
    y = nxm.sparse_mm(x, sw, act_bits=8)
    assert torch.equal(y.reshape(6, 64), nxm.sparse_mm(x.reshape(6, 128), nxm.compress(w, "2:4", bits=8), act_bits=8,
                                                       backend="reference"))
    with pytest.raises(nxm.BackendNotSupported, match="int8 codes with int8 activations only: pass act_bits=8"):
        nxm.sparse_mm(x, sw, backend="cusparselt")
    grouped = nxm.compress(w, "2:4", layout="cusparselt", bits=8, group_size=64)
    with pytest.raises(nxm.BackendNotSupported, match=r"per-group scales \(int8-g64\) cannot be applied"):
        nxm.sparse_mm(x, grouped, act_bits=8, backend="cusparselt")
