"""The cuSPARSELt backend on CPU: every decision it makes before reaching the GPU (availability,
GPU/library/dtype/pattern/shape reasons, padding, output order, tuning keys and file), the
cusparselt layout, and the fake kernels. The GPU numerics are in test_cusparselt_gpu.py."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import dispatch
from nxm_kernels.backends import cusparselt
from nxm_kernels.layouts import NMSparseWeight, get_layout
from nxm_kernels.layouts.cusparselt import multiples as cusparselt_multiples

FP8 = torch.float8_e4m3fn
needs_ops = pytest.mark.skipif(cusparselt._ops_problem() is not None,
                               reason=f"nxm_kernels._C has no cuSPARSELt ops: {cusparselt._ops_problem()}")


def opaque_weight(rows=64, cols=64, dtype=torch.float16, device="cpu", pattern="2:4"):
    """A cusparselt-layout weight as the library would hand it back (contents are never read here)."""
    kept = rows * cols // 2
    return NMSparseWeight(torch.zeros(kept + kept // 8, dtype=dtype, device=device),
                          torch.empty(0, dtype=torch.uint8, device=device), (rows, cols), pattern, "cusparselt")


# ------------------------------------------------------------------ availability and dispatch

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_unavailable_reason_names_the_missing_gpu():
    why = cusparselt.BACKEND.unavailable_reason()
    assert "no CUDA device" in why
    assert nxm.backends()["cusparselt"] == why


def test_unavailable_reason_names_a_missing_or_cpu_only_extension(monkeypatch):
    problem = "nxm_kernels._C was built without CUDA, so it has no cuSPARSELt ops: rebuild"
    monkeypatch.setattr(cusparselt, "_ops_problem", lambda: problem)
    assert problem in cusparselt.BACKEND.unavailable_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks dispatch on a machine without a GPU")
def test_explicit_backend_raises_with_the_reason_and_auto_moves_on():
    w = torch.randn(32, 64, dtype=torch.float16)
    x = torch.randn(3, 64, dtype=torch.float16)
    sw = nxm.compress(w, "2:4")
    with pytest.raises(nxm.BackendNotSupported, match="backend 'cusparselt' cannot run sparse_mm.*no CUDA device"):
        nxm.sparse_mm(x, sw, backend="cusparselt")
    with pytest.raises(nxm.BackendNotSupported, match="backend 'cusparselt' cannot run compress.*no CUDA device"):
        nxm.compress(w, "2:4", layout="cusparselt", backend="cusparselt")
    # auto: cusparselt is first in priority, says why not, and the next backend serves the call
    assert dispatch.registered_backends()[0].name == "cusparselt"
    assert dispatch.select("sparse_mm", None, {"x": x, "sw": sw, "bias": None}).name != "cusparselt"
    torch.testing.assert_close(nxm.sparse_mm(x, sw), nxm.sparse_mm(x, sw, backend="reference"), rtol=0, atol=0)


def test_no_backend_makes_a_cusparselt_weight_without_cusparselt():
    with pytest.raises(nxm.BackendNotSupported) as error:
        nxm.compress(torch.randn(32, 64), "1:2", layout="cusparselt")
    assert "cusparselt:" in str(error.value) and "opaque buffer" in str(error.value)


def test_reference_refuses_cusparselt_weights_with_a_reason():
    sw = opaque_weight()
    with pytest.raises(nxm.BackendNotSupported, match="opaque buffer.*backend='cusparselt'"):
        nxm.sparse_mm(torch.randn(2, 64, dtype=torch.float16), sw, backend="reference")
    with pytest.raises(nxm.BackendNotSupported, match="opaque buffer"):
        nxm.decompress(sw, backend="reference")


def test_layout_reasons_of_the_backend():
    def reasons(op, **inputs):  # the table's reasons, then the backend's own
        return "; ".join(cusparselt.BACKEND.not_supported_reasons(op, **inputs))

    packed = nxm.compress(torch.randn(32, 64, dtype=torch.float16), "2:4")
    assert "handles layout 'cusparselt', not 'packed'" in reasons("sparse_mm", x=None, sw=packed, bias=None)
    assert "layout='cusparselt'" in reasons("sparse_mm", x=None, sw=packed, bias=None)  # how to make one
    assert "handles layout 'cusparselt', not 'packed'" in reasons("compress", w=torch.zeros(32, 64), pattern=None,
                                                                   layout="packed", scores=None)
    assert "TF32" in reasons("decompress", sw=opaque_weight(dtype=torch.float32, pattern="1:2"))
    assert "out_dtype=torch.bfloat16" in reasons("sparse_mm", x=None, sw=opaque_weight(dtype=FP8), bias=None)
    assert "runs on cuda tensors, not on cpu" in reasons("sparse_mm", x=None, sw=opaque_weight(), bias=None)
    assert cusparselt.BACKEND.supports["sparse_mm"].layouts == ("cusparselt",)  # declared as data


# ------------------------------------------------------------------ GPU, library version, dtype

@pytest.mark.parametrize("capability, version, dtype, fragment", [
    ((7, 5), 801, torch.float16, "sm_75, older than sm_80"),
    ((7, 0), 801, FP8, "older than sm_80"),
    ((8, 0), 801, FP8, "float8_e4m3fn needs sm_89"),
    ((8, 6), 801, FP8, "float8_e4m3fn needs sm_89"),
    ((9, 0), 300, torch.bfloat16, "cuSPARSELt 0.3.0 has no kernels for sm_90 (they came in 0.4.0)"),
    ((8, 9), 700, FP8, "no float8_e4m3fn kernels for sm_89 (they came in 0.8.0)"),
    ((10, 0), 602, torch.int8, "no kernels for sm_100"),
    ((13, 0), 700, torch.float16, "no kernels for sm_130"),  # newer than the tables, before forward compat
])
def test_device_reasons_refuse(capability, version, dtype, fragment):
    why = cusparselt.device_reasons(capability, version, dtype)
    assert len(why) == 1 and fragment in why[0]
    assert "use" in why[0] or "pip install" in why[0]  # says what to do


@pytest.mark.parametrize("capability, version, dtype", [
    ((8, 0), 801, torch.float16), ((8, 0), 1, torch.int8), ((8, 6), 801, torch.float32),
    ((9, 0), 801, FP8), ((8, 9), 801, FP8), ((10, 0), 700, torch.bfloat16), ((13, 0), 801, torch.float16),
])
def test_device_reasons_accept(capability, version, dtype):
    assert cusparselt.device_reasons(capability, version, dtype) == []


@pytest.mark.parametrize("dtype, out_dtype, ok", [
    (torch.float16, None, True), (torch.float16, torch.float16, True), (torch.float16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, False), (torch.float32, None, True),
    (torch.int8, None, True), (torch.int8, torch.int32, True), (torch.int8, torch.bfloat16, True),
    (torch.int8, torch.int8, False), (FP8, torch.bfloat16, True), (FP8, FP8, False), (torch.float64, None, False),
])
def test_dtype_reasons(dtype, out_dtype, ok):
    assert (cusparselt.dtype_reasons(dtype, out_dtype) == []) == ok


def test_default_output_is_the_op_surface_dtype():
    assert {d: outs[0] for d, outs in cusparselt.OUTPUT_DTYPES.items() if d != FP8} == {
        torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: torch.float32,
        torch.int8: torch.int32}


# ------------------------------------------------------------------ layout

@pytest.mark.parametrize("dtype, pattern, shape, fragment", [
    (torch.float16, "1:2", (32, 64), "only as 2:4"),
    (torch.float32, "2:4", (32, 64), "only as 1:2"),
    (torch.int8, "2:8", (64, 64), "only as 2:4"),
    (torch.float16, "2:4", (24, 64), "divisible by 16"),
    (torch.int8, "2:4", (32, 48), "divisible by 32"),
    (torch.float32, "1:2", (8, 12), "divisible by 8"),
])
def test_cusparselt_layout_refuses_what_cusparselt_refuses(dtype, pattern, shape, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_layout("cusparselt").check(dtype, shape, nxm.Pattern.parse(pattern))


def test_cusparselt_layout_holds_fp8_which_others_do_not():
    get_layout("cusparselt").check(FP8, (32, 32), nxm.Pattern(2, 4))
    with pytest.raises(TypeError, match="cannot hold dtype"):
        get_layout("packed").check(FP8, (32, 32), nxm.Pattern(2, 4))


def test_cusparselt_weight_keeps_shape_and_pattern_and_checks_its_buffer():
    sw = opaque_weight(64, 128, torch.bfloat16)
    assert (sw.shape, str(sw.pattern), sw.dtype, sw.layout) == ((64, 128), "2:4", torch.bfloat16, "cusparselt")
    assert sw.to("cpu").shape == (64, 128)
    with pytest.raises(ValueError, match="1-D tensor of more than 4096 elements"):
        NMSparseWeight(torch.zeros(64, 64, dtype=torch.bfloat16), torch.empty(0, dtype=torch.uint8),
                       (64, 128), "2:4", "cusparselt")
    with pytest.raises(ValueError, match="more than 4096"):  # too small to hold the kept values
        NMSparseWeight(torch.zeros(4096, dtype=torch.bfloat16), torch.empty(0, dtype=torch.uint8),
                       (64, 128), "2:4", "cusparselt")


# ------------------------------------------------------------------ padding, output order

@pytest.mark.parametrize("dtype, m, rows", [
    (torch.float16, 1, 8), (torch.bfloat16, 8, 8), (torch.bfloat16, 9, 16), (torch.int8, 1, 16),
    (FP8, 17, 32), (torch.float32, 1, 4), (torch.float32, 6, 8), (torch.float16, 0, 0),
])
def test_padded_rows_by_hand(dtype, m, rows):
    assert cusparselt.padded_rows(m, dtype) == rows


@given(m=st.integers(0, 10_000), dtype=st.sampled_from(cusparselt.INPUT_DTYPES))
def test_padded_rows_is_the_smallest_multiple_not_below_m(m, dtype):
    rows, multiple = cusparselt.padded_rows(m, dtype), cusparselt_multiples(dtype)[1]
    assert rows % multiple == 0 and m <= rows < m + multiple


def test_multiples_per_dtype():
    assert [cusparselt_multiples(d) for d in (torch.int8, FP8, torch.float16, torch.bfloat16, torch.float32)] == [
        (32, 16), (32, 16), (16, 8), (16, 8), (8, 4)]


def test_output_order_and_bias_dtype():
    assert [cusparselt.transposed_output(d) for d in cusparselt.INPUT_DTYPES] == [False, False, False, True, True]
    assert all(cusparselt.transposed_output(d, want_transposed=True) for d in cusparselt.INPUT_DTYPES)
    assert cusparselt.kernel_bias_dtype(torch.int32) == torch.float32
    assert cusparselt.kernel_bias_dtype(torch.bfloat16) == torch.bfloat16


# ------------------------------------------------------------------ tuning cache

def test_tuning_key_separates_every_field_and_buckets_m():
    base = dict(gpu="NVIDIA H100 80GB HBM3", version=801, m=5, n=4096, k=4096, dtype=torch.float16,
                out_dtype=torch.float16, bias=False, alpha=False)
    key = cusparselt.tuning_key(**base)
    assert key == "NVIDIA H100 80GB HBM3|cusparselt 0.8.1|m<=8 n=4096 k=4096|float16->float16"
    assert cusparselt.tuning_key(**dict(base, m=8)) == key  # the same bucket
    changes = dict(gpu="NVIDIA A100", version=900, m=9, n=1024, k=1024, dtype=torch.bfloat16,
                   out_dtype=torch.bfloat16, bias=True, alpha=True)
    keys = {cusparselt.tuning_key(**dict(base, **{field: value})) for field, value in changes.items()}
    assert key not in keys and len(keys) == len(changes)


@given(m=st.integers(1, 100_000), dtype=st.sampled_from(cusparselt.INPUT_DTYPES))
def test_rows_bucket_is_a_power_of_two_covering_the_padded_rows(m, dtype):
    bucket = cusparselt.rows_bucket(m, dtype)
    rows = cusparselt.padded_rows(m, dtype)
    assert bucket & (bucket - 1) == 0 and rows <= bucket < 2 * rows


def test_tuning_file_round_trip_merges_and_reports_corruption(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    assert cusparselt.read_tuning(path) == {}
    cusparselt.write_tuning(path, {"a": {"alg_id": 3, "split_k": 2, "us": 10.5}})
    cusparselt.write_tuning(path, {"b": {"alg_id": 1, "split_k": 0, "us": 3.0}})
    assert cusparselt.read_tuning(path) == {"a": (3, 2), "b": (1, 0)}
    assert json.loads(path.read_text())["a"]["us"] == 10.5
    path.write_text('{"a": {"alg": 1}}')
    with pytest.raises(ValueError, match="delete it and run nxm.tune again"):
        cusparselt.read_tuning(path)


def test_lookup_reads_the_default_file_once_and_prefers_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cusparselt.default_tuning_path() == tmp_path / "nxm_kernels" / "cusparselt_tuning.json"
    cusparselt.write_tuning(cusparselt.default_tuning_path(),
                            {"k1": {"alg_id": 4, "split_k": 1, "us": 1}, "k2": {"alg_id": 5, "split_k": 2, "us": 1}})
    tuned = cusparselt._Tuned()
    tuned.configs["k2"] = (7, 0)  # tuned in this process before the first lookup
    assert tuned.lookup("k1") == (4, 1) and tuned.lookup("k2") == (7, 0)
    assert tuned.lookup("unknown") == cusparselt.DEFAULT_CONFIG
    cusparselt.default_tuning_path().unlink()
    assert tuned.lookup("k1") == (4, 1)  # read once


def test_a_broken_tuning_file_warns_and_runs_untuned(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cusparselt.default_tuning_path().parent.mkdir(parents=True)
    cusparselt.default_tuning_path().write_text("not json")
    with pytest.warns(RuntimeWarning, match="delete it and run nxm.tune again"):
        assert cusparselt._Tuned().lookup("k") == cusparselt.DEFAULT_CONFIG


def test_tune_and_matmul_refuse_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the refusal of a machine without a GPU")
    sw = opaque_weight()
    with pytest.raises(nxm.BackendNotSupported, match="cannot tune here: no CUDA device"):
        nxm.tune(sw, tokens=(1,))
    with pytest.raises(nxm.BackendNotSupported, match="cannot multiply here"):
        cusparselt.matmul(torch.zeros(2, 64, dtype=torch.float16), sw)
    with pytest.raises(TypeError, match="cusparselt-layout"):
        nxm.tune(nxm.compress(torch.randn(32, 64), "1:2"))


def test_matmul_checks_its_extra_arguments():
    sw = opaque_weight(32, 64, torch.int8)
    x = torch.zeros(3, 64, dtype=torch.int8)
    with pytest.raises(TypeError, match="give torch.int32, torch.float16, torch.bfloat16 outputs, not torch.int8"):
        cusparselt.matmul(x, sw, out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"alpha .* must be float32 \[32\]"):
        cusparselt.matmul(x, sw, alpha=torch.ones(32, dtype=torch.float16), out_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"bias must be torch.bfloat16 \[32\]"):
        cusparselt.matmul(x, sw, bias=torch.zeros(32, dtype=torch.int32), out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x must be torch.int8 \[\.\.\., 64\]"):
        cusparselt.matmul(x.float(), sw)


def test_compress_pruned_refuses_a_weight_that_is_not_nm():
    w = torch.ones(32, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="not 2:4 sparse: project it first"):
        cusparselt.compress_pruned(w)
    w8 = torch.ones(32, 32).to(FP8)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        cusparselt.compress_pruned(w8)


# ------------------------------------------------------------------ the ops' fake kernels (no GPU needed)

@needs_ops
def test_library_version_is_callable_without_a_gpu():
    assert cusparselt.library_version() >= 800  # the pinned nvidia-cusparselt-cu13 0.8.x


@needs_ops
@pytest.mark.parametrize("dtype, m", [(torch.float16, 1), (torch.bfloat16, 13), (torch.float32, 3),
                                      (torch.int8, 1), (torch.int8, 40), (FP8, 5)])
def test_fake_kernels_give_the_shapes_the_wrapper_slices(dtype, m):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    out_dtype = torch.bfloat16 if dtype == FP8 else None
    with FakeTensorMode(shape_env=ShapeEnv()):
        w = torch.empty(64, 96, dtype=dtype, device="cuda")
        packed = torch.ops.nxm.cusparselt_compress(w)
        assert packed.dim() == 1 and packed.dtype == dtype
        sw = NMSparseWeight(torch.empty(96 * 64, dtype=dtype, device="cuda"),
                            torch.empty(0, dtype=torch.uint8, device="cuda"), (64, 96), "1:2" if dtype ==
                            torch.float32 else "2:4", "cusparselt", check_metadata=False)
        x = torch.empty(m, 96, dtype=dtype, device="cuda")
        y = cusparselt._run(x, sw, None, None, out_dtype or cusparselt.OUTPUT_DTYPES[dtype][0], config=(0, 0))
    assert tuple(y.shape) == (m, 64) and y.is_contiguous()
    assert y.dtype == (out_dtype or cusparselt.OUTPUT_DTYPES[dtype][0])


# ------------------------------------------------------------------ the wrapper around the kernels, on CPU

@pytest.fixture
def emulated_library(monkeypatch, tmp_path):
    """CPU stand-ins for the two kernels, keeping their contract (D = W @ x.T; [N, M] when
    transpose_output, else [M, N]) and asserting what the binding requires of its callers."""

    def compress(dense):
        assert dense.is_contiguous() and dense.storage_offset() * dense.element_size() % 16 == 0
        return torch.cat([dense.flatten(), dense.new_zeros(dense.numel() // 8)])  # more than the kept values

    def mm(x, packed, out_features, bias, alpha, out_dtype, transpose_output, alg_id, split_k):
        assert x.is_contiguous() and x.shape[0] % cusparselt_multiples(x.dtype)[1] == 0, "M must come padded"
        assert transpose_output or not cusparselt.transposed_output(x.dtype), "8-bit inputs write row-major D"
        out_dtype = out_dtype or (torch.int32 if x.dtype == torch.int8 else x.dtype)
        w = packed[: out_features * x.shape[1]].reshape(out_features, -1)
        d = x.double() @ w.double().T
        if alpha is not None:
            d = d * alpha.double()
        if bias is not None:
            assert bias.dtype == cusparselt.kernel_bias_dtype(out_dtype)
            d = d + bias.double()
        d = d.to(out_dtype)
        return d.t().contiguous() if transpose_output else d

    monkeypatch.setattr(torch.ops.nxm, "cusparselt_compress", compress, raising=False)
    monkeypatch.setattr(torch.ops.nxm, "cusparselt_mm", mm, raising=False)
    monkeypatch.setattr(cusparselt, "_device_name", lambda index: "emulated GPU")
    monkeypatch.setattr(cusparselt, "_device_index", lambda device: 0)
    monkeypatch.setattr(cusparselt, "library_version", lambda: 801)
    monkeypatch.setattr(cusparselt, "_TUNED", cusparselt._Tuned())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no tuning file


def emulated_weight(w, pattern):
    values, metadata = cusparselt.BACKEND.compress(w, nxm.Pattern.parse(pattern), "cusparselt", None)
    return NMSparseWeight(values, metadata, tuple(w.shape), pattern, "cusparselt", check_metadata=False)


@pytest.mark.parametrize("dtype, pattern", [(torch.float16, "2:4"), (torch.bfloat16, "2:4"), (torch.int8, "2:4"),
                                            (torch.float32, "1:2")])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_wrapper_pads_slices_and_orders_like_the_reference(emulated_library, dtype, pattern, m):
    from conftest import assert_matmul_close, random_weight

    g = torch.Generator().manual_seed(m)
    w = random_weight((64, 96), dtype, g)
    x = random_weight((m, 96), dtype, g)
    bias = random_weight((64,), torch.int8 if dtype == torch.int8 else dtype, g)
    bias = bias.to(torch.int32) if dtype == torch.int8 else bias
    y = cusparselt.BACKEND.sparse_mm(x, emulated_weight(w, pattern), bias)
    assert y.shape == (m, 64) and y.is_contiguous()
    assert_matmul_close(y, x, nxm.project(w, pattern), bias)


def test_wrapper_int8_alpha_goes_per_output_feature(emulated_library, monkeypatch):
    monkeypatch.setattr(cusparselt, "_require", lambda *args: None)  # the emulator stands in for the GPU
    w = torch.randint(-128, 128, (64, 64), dtype=torch.int8)
    x = torch.randint(-128, 128, (3, 64), dtype=torch.int8)
    alpha = torch.rand(64)
    y = cusparselt.matmul(x, emulated_weight(w, "2:4"), alpha=alpha, out_dtype=torch.bfloat16)
    truth = (x.double() @ nxm.project(w, "2:4").double().T) * alpha.double()
    torch.testing.assert_close(y, truth.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("m", [1, 9])
def test_wrapper_transposed_output_is_w_times_x_transposed(emulated_library, monkeypatch, dtype, m):
    monkeypatch.setattr(cusparselt, "_require", lambda *args: None)
    w, x = random_weight_cpu((64, 96), dtype), random_weight_cpu((m, 96), dtype)
    sw = emulated_weight(w, "2:4")
    y_t = cusparselt.matmul(x, sw, transposed=True)
    assert y_t.shape == (64, m) and y_t.is_contiguous()
    assert torch.equal(y_t, cusparselt.matmul(x, sw).t())
    with pytest.raises(ValueError, match="2-D x"):
        cusparselt.matmul(x[None], sw, transposed=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_wrapper_decompress_is_exact_across_chunks(emulated_library, monkeypatch, dtype):
    monkeypatch.setattr(cusparselt, "DECOMPRESS_CHUNK", 32)  # 96 columns: three chunks
    w = random_weight_cpu((64, 96), dtype)
    assert torch.equal(cusparselt.BACKEND.decompress(emulated_weight(w, "2:4")), nxm.project(w, "2:4"))


def random_weight_cpu(shape, dtype):
    from conftest import random_weight

    return random_weight(shape, dtype, torch.Generator().manual_seed(1), zero_fraction=0.1)


# ------------------------------------------------------------------ W8A8 (int8 codes x per-token int8 activations)

def quantized_opaque_weight(rows=64, cols=64, dtype=torch.bfloat16, group_size=None, device="cpu"):
    """An int8-coded cusparselt weight as nxm.compress(..., layout='cusparselt', bits=8) would hand it back."""
    kept = rows * cols // 2
    groups = 1 if group_size is None else -(-cols // group_size)
    return NMSparseWeight(torch.zeros(kept + kept // 8, dtype=torch.int8, device=device),
                          torch.empty(0, dtype=torch.uint8, device=device), (rows, cols), "2:4", "cusparselt",
                          scales=torch.ones(rows, groups, device=device), encoding="int8" if group_size is None
                          else f"int8-g{group_size}", float_dtype=dtype)


@pytest.fixture
def as_if_available(monkeypatch):
    """The backend as on a GPU machine, so that its reasons for these inputs show (not 'no CUDA device')."""
    monkeypatch.setattr(cusparselt.BACKEND, "unavailable_reason", lambda: None)


def test_w8a8_is_declared_as_data():
    support = cusparselt.BACKEND.supports["sparse_mm"]
    assert support.encodings == ("float", "int8") and support.act_bits == (None, 8) and support.devices == ("cuda",)


def test_w8a8_refusals_name_the_backend_and_why(as_if_available):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    cases = [
        (quantized_opaque_weight(), 8, "runs on cuda tensors, not on cpu"),
        (quantized_opaque_weight(group_size=32), 8, r"int32 sums run over all of K, so per-group scales \(int8-g32\)"),
        (quantized_opaque_weight(), None, "int8 codes with int8 activations only: pass act_bits=8"),
    ]
    for sw, act_bits, why in cases:
        with pytest.raises(nxm.BackendNotSupported, match=f"backend 'cusparselt' cannot run sparse_mm.*{why}"):
            nxm.sparse_mm(x, sw, act_bits=act_bits, backend="cusparselt")
    # int4: no cusparselt weight holds it (the layout says so), and a packed one is refused with the reason
    with pytest.raises(ValueError, match="cusparselt"):
        nxm.compress(torch.randn(64, 64), "2:4", layout="cusparselt", bits=4)
    packed4 = nxm.compress(torch.randn(64, 64, dtype=torch.bfloat16), "2:4", bits=4)
    with pytest.raises(nxm.BackendNotSupported, match="cusparselt.*cuSPARSELt has no int4 GEMM"):
        nxm.sparse_mm(x, packed4, act_bits=8, backend="cusparselt")


def test_w8a8_auto_dispatch_moves_on_from_cusparselt(as_if_available):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for group_size in (None, 32):
        sw = nxm.compress(torch.randn(64, 64, dtype=torch.bfloat16), "2:4", bits=8, group_size=group_size)
        inputs = {"x": x, "sw": sw, "bias": None, "act_bits": 8}
        assert cusparselt.BACKEND.not_supported_reasons("sparse_mm", **inputs)  # a reason, not a silent skip
        assert dispatch.select("sparse_mm", None, inputs).name != "cusparselt"
        assert torch.equal(nxm.sparse_mm(x, sw, act_bits=8), nxm.sparse_mm(x, sw, act_bits=8, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_wrapper_w8a8_equals_the_reference_bit_for_bit(emulated_library, dtype, m):
    """x quantized per token, the emulated int32 GEMM, then the scales: the reference's bits."""
    g = torch.Generator().manual_seed(m)
    w = (torch.randn(64, 96, generator=g) * torch.rand(64, 1, generator=g) * 4).to(dtype)
    w[3] = 0  # an all-zero row: scale 0
    x = (torch.randn(m, 96, generator=g) * 8).to(dtype)
    x[0, :] = 0  # a zero token: scale 0
    bias = torch.randn(64, generator=g).to(dtype)
    packed = nxm.compress(w, "2:4", bits=8)
    codes = nxm.decompress(packed.encoding.codes_weight(packed), backend="reference")
    values, metadata = cusparselt.BACKEND.compress(codes, nxm.Pattern.parse("2:4"), "cusparselt", None)
    sw = NMSparseWeight(values, metadata, (64, 96), "2:4", "cusparselt", scales=packed.scales, encoding="int8",
                        float_dtype=dtype)
    y = cusparselt.BACKEND.sparse_mm(x, sw, bias, act_bits=8)
    assert torch.equal(y, nxm.sparse_mm(x, packed, bias, act_bits=8, backend="reference"))


def test_w8a8_end_to_end_through_dispatch(emulated_library, monkeypatch):
    """compress(bits=8, layout='cusparselt') -> decompress and auto-dispatched W8A8, with the emulated
    kernels standing in for the GPU (the backend told that CPU tensors are its device here)."""
    import dataclasses

    backend = cusparselt.BACKEND
    monkeypatch.setattr(backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(backend, "device_problems", lambda device, dtype: [])
    monkeypatch.setattr(backend, "auto_devices", None)
    monkeypatch.setattr(backend, "supports", {op: dataclasses.replace(s, devices=("cpu",))
                                              for op, s in backend.supports.items()})
    monkeypatch.setattr(dispatch, "_SELECTED", {})
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    sw = nxm.compress(w, "2:4", layout="cusparselt", bits=8)
    packed = nxm.compress(w, "2:4", bits=8)
    assert str(sw.encoding) == "int8" and sw.values.dtype == torch.int8 and torch.equal(sw.scales, packed.scales)
    assert torch.equal(nxm.decompress(sw), nxm.decompress(packed))
    x, bias = torch.randn(5, 128, generator=g).to(torch.bfloat16), torch.randn(64, generator=g).to(torch.bfloat16)
    assert dispatch.select("sparse_mm", None, {"x": x, "sw": sw, "bias": bias, "act_bits": 8}).name == "cusparselt"
    assert torch.equal(nxm.sparse_mm(x, sw, bias, act_bits=8),
                       nxm.sparse_mm(x, packed, bias, act_bits=8, backend="reference"))
    grouped = nxm.compress(w, "2:4", layout="cusparselt", bits=8, group_size=64)
    with pytest.raises(nxm.BackendNotSupported, match=r"cusparselt: .*per-group scales \(int8-g64\)"):
        nxm.sparse_mm(x, grouped, act_bits=8)
