"""The ``tiled_q`` layout (int8/int4 2:4 codes in 16x64 tiles) and its Triton W8A16/W4A16 GEMM
(``backends/triton/quant_gemm.py``), under TRITON_INTERPRET=1 (conftest) on CPU tensors.

Exactness: with x in {-1, 0, 1}, integer codes and power-of-two scales every product and partial
sum is exact in fp32, so the kernel and the reference agree bit for bit whatever their order of
additions. fp16 outputs round the same exact value the same way (the interpreter rounds to
nearest even, as torch); bf16 outputs are made exactly representable, because the interpreter
truncates fp32 to bf16 where a GPU rounds. Random weights are held to a tolerance derived from the
output dtype and K (:func:`assert_close_to_reference`)."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import dispatch, reference
from nxm_kernels.encodings import IntEncoding
from nxm_kernels.layouts import TILED_Q, get_layout
from nxm_kernels.layouts.tiled_q import from_tiles

triton_backend = pytest.importorskip("nxm_kernels.backends.triton").BACKEND
pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason() is not None, reason=str(triton_backend.unavailable_reason())
)
quant_gemm = pytest.importorskip("nxm_kernels.backends.triton.quant_gemm")

DTYPES = (torch.float16, torch.bfloat16)
ENCODINGS = ((8, None), (4, None), (8, 64), (4, 64), (4, 128), (8, 128))
# (N, K): odd multiples of the 16x64 tile; K = 320 with g = 128 ends in a shorter group of 64
SHAPES = ((48, 192), (16, 320), (80, 384))


def encoding_id(bits, group):
    return f"int{bits}" + (f"-g{group}" if group else "")


def quantized_weight(codes: torch.Tensor, scales: torch.Tensor, bits: int, group, dtype) -> nxm.NMSparseWeight:
    """A ``tiled_q`` weight holding exactly ``codes`` (dense int8 [N, K], 2:4) and ``scales``."""
    encoding = IntEncoding(bits, group)
    values, metadata = TILED_Q.compress(codes, nxm.Pattern(2, 4), (codes != 0).float())
    return nxm.NMSparseWeight(encoding.pack(values), metadata, tuple(codes.shape), "2:4", "tiled_q", scales=scales,
                              encoding=encoding, float_dtype=dtype)


def random_codes(shape, qmax, generator) -> torch.Tensor:
    """Dense 2:4 codes in [-qmax, qmax] (the extremes included; a kept code may be 0)."""
    codes = torch.randint(-qmax, qmax + 1, shape, generator=generator, dtype=torch.int8)
    codes[0, :2] = torch.tensor([qmax, -qmax], dtype=torch.int8)
    return reference.project(codes, nxm.Pattern(2, 4), torch.rand(shape, generator=generator))


def power_of_two_scales(rows, groups, generator) -> torch.Tensor:
    return 2.0 ** torch.randint(-3, 2, (rows, groups), generator=generator).float()


def assert_close_to_reference(y, x, sw, bias=None):
    """``y`` against ``reference.sparse_mm``: both sum the same exact products in fp32 (in different
    orders) and round once to x's dtype, so they differ by at most one unit in the last place of the
    output plus twice the fp32 error bound of a K-term sum, (K + 2) * 2**-24 * sum |x| |w|."""
    ref = reference.sparse_mm(x, sw, bias)
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    w = nxm.decompress(sw, dtype=torch.float64)
    magnitude = x.double().abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0)
    finfo = torch.finfo(x.dtype)
    allowed = finfo.eps * ref.double().abs() + 2 * (sw.in_features + 2) * 2.0**-24 * magnitude \
        + finfo.smallest_normal * finfo.eps
    err = (y.double() - ref.double()).abs()
    worst = err.argmax()
    assert bool((err <= allowed).all()), \
        f"max error {float(err.max()):.3e}, allowed there {float(allowed.flatten()[worst]):.3e}"


# ---------------------------------------------------------------- the layout


def test_hand_computed_tiles():
    """Row n of a 32x128 weight keeps positions 1 and 3 of every group, codes (n, -q) in group q:
    tile (r, t) row i slot j sits at values[r, (t*16 + i)*32 + j], each nibble is 1 | 3 << 2."""
    codes = torch.zeros(32, 128, dtype=torch.int8)
    rows, groups = torch.arange(32)[:, None], torch.arange(32)[None, :]
    codes[:, 1::4] = rows.to(torch.int8).expand(32, 32)
    codes[:, 3::4] = (-groups).to(torch.int8).expand(32, 32)
    values, metadata = TILED_Q.compress(codes, nxm.Pattern(2, 4), torch.tensor([0.0, 1.0, 0.0, 1.0]).repeat(32, 32))
    assert values.shape == (2, 2 * 16 * 32) and metadata.shape == (2, 2 * 16 * 8)
    for n, q in ((0, 0), (5, 3), (17, 16), (31, 31)):
        r, i, t, local = n // 16, n % 16, q // 16, q % 16
        assert values[r, (t * 16 + i) * 32 + 2 * local] == n
        assert values[r, (t * 16 + i) * 32 + 2 * local + 1] == -q
    assert bool((metadata == (13 | 13 << 4)).all())
    assert torch.equal(TILED_Q.decompress(values, metadata, (32, 128), nxm.Pattern(2, 4)), codes)


@pytest.mark.parametrize("bits,group", ENCODINGS, ids=[encoding_id(*e) for e in ENCODINGS])
def test_a_permutation_of_packed(bits, group):
    """Same codes, metadata and scales as the packed layout, tile rows reordered; same dequantized weight."""
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(bits + (group or 0))).half()
    sw = nxm.compress(w, "2:4", layout="tiled_q", bits=bits, group_size=group)
    ref = nxm.compress(w, "2:4", layout="packed", bits=bits, group_size=group)
    per_row = 32 if bits == 8 else 16
    assert torch.equal(from_tiles(sw.values, sw.shape, per_row), ref.values)
    assert torch.equal(from_tiles(sw.metadata, sw.shape, 8), ref.metadata)
    assert torch.equal(sw.scales, ref.scales)
    assert torch.equal(nxm.decompress(sw), nxm.decompress(ref))
    assert sw.nbytes == ref.nbytes


REFUSALS = [
    (dict(pattern="1:4", bits=4), (48, 192), "holds pattern 2:4 only"),
    (dict(pattern="2:4", bits=4), (40, 192), "rows must be divisible by 16 and columns by 64, got 40x192"),
    (dict(pattern="2:4", bits=8), (48, 100), "rows must be divisible by 16 and columns by 64, got 48x100"),
    (dict(pattern="2:4", bits=4, group_size=32), (48, 192), "needs group_size a multiple of 64"),
    (dict(pattern="2:4"), (48, 192), "holds int8, int4 values, not float"),
]


@pytest.mark.parametrize("kwargs,shape,message", REFUSALS, ids=[m.split(",")[0] for _, _, m in REFUSALS])
def test_refuses_what_it_cannot_hold(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        nxm.compress(torch.randn(shape), layout="tiled_q", **kwargs)


def test_float_values_are_refused_with_the_fix():
    assert "compress with bits=8 or bits=4" in " ".join(TILED_Q.not_supported_reasons(torch.float16, (48, 192),
                                                                                     nxm.Pattern(2, 4)))
    with pytest.raises(ValueError, match="quantize it: compress with bits=8 or bits=4"):
        nxm.compress(torch.randn(48, 192), "2:4", layout="tiled_q")
    with pytest.raises(TypeError, match="holds int8/int4 codes of a quantized weight.*weight_bits="):
        nxm.SparseLinear.from_dense(torch.nn.Linear(64, 16), "2:4", layout="tiled_q")


def test_corrupt_metadata_and_codes_are_refused():
    sw = nxm.compress(torch.randn(32, 128), "2:4", layout="tiled_q", bits=4, group_size=64)
    parts = dict(shape=sw.shape, pattern="2:4", layout="tiled_q", encoding=sw.encoding, float_dtype=sw.float_dtype)
    metadata = sw.metadata.clone()
    metadata[1, (16 + 0) * 8 + 3] = 0xD5  # row block 1, tile 1, its row 0, byte 3: group 16 + 6 keeps (1, 1)
    with pytest.raises(ValueError, match=r"corrupt tiled_q metadata: group 22 of row 16 has positions \(1, 1\)"):
        nxm.NMSparseWeight(sw.values, metadata, scales=sw.scales, **parts)
    values = sw.values.clone()
    values[0, 0] = 0x08  # nibble -8
    with pytest.raises(ValueError, match="int4 nibble -8"):
        nxm.NMSparseWeight(values, sw.metadata, scales=sw.scales, **parts)
    with pytest.raises(ValueError, match="metadata is torch.uint8 \\(2, 128\\), but layout 'tiled_q'"):
        nxm.NMSparseWeight(sw.values, sw.metadata[:, :128], scales=sw.scales, **parts)


def test_checkpoint_round_trip(tmp_path):
    """A padded int4 g64 layer saves the layout's tensors and loads them back, validated, as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 40), torch.nn.GELU(), torch.nn.Linear(40, 8)).half()
    model[0] = nxm.SparseLinear.from_dense(model[0], "2:4", layout="tiled_q", weight_bits=4, group_size=64)
    layer = model[0]
    assert layer.layout == "tiled_q" and tuple(layer.padded_shape) == (48, 128)
    nxm.save(model, tmp_path / "q.safetensors")
    loaded = nxm.load(tmp_path / "q.safetensors")
    assert set(loaded.header["layers"]) == {"0"}
    got = loaded.layers["0"]
    for name in ("values", "metadata", "scales"):
        assert torch.equal(getattr(got.weight_sparse, name), getattr(layer.weight_sparse, name)), name
    assert got.layout == "tiled_q" and got.weight_sparse.encoding == "int4-g64"
    x = torch.randn(3, 100).half()
    with torch.no_grad():
        assert torch.equal(got(x), layer(x))
        assert torch.equal(nxm.load(tmp_path / "q.safetensors", model)(x), model(x))


# ---------------------------------------------------------------- the GEMM, exact


@pytest.mark.parametrize("m_rows", [1, 3, 16])
@pytest.mark.parametrize("bits,group", ENCODINGS, ids=[encoding_id(*e) for e in ENCODINGS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_exact_fp16(shape, bits, group, m_rows):
    g = torch.Generator().manual_seed(m_rows * 1000 + bits * 10 + shape[1])
    codes = random_codes(shape, 127 if bits == 8 else 7, g)
    groups = 1 if group is None else -(-shape[1] // group)
    sw = quantized_weight(codes, power_of_two_scales(shape[0], groups, g), bits, group, torch.float16)
    x = torch.randint(-1, 2, (m_rows, shape[1]), generator=g).half()
    bias = torch.randint(-4, 5, (shape[0],), generator=g).half()
    y = nxm.sparse_mm(x, sw, bias, backend="triton")
    assert torch.equal(y, reference.sparse_mm(x, sw, bias))
    assert y.abs().max() > 0


@settings(max_examples=30)
@given(blocks=st.integers(1, 4), tiles=st.integers(1, 6), m_rows=st.integers(1, 20), bits=st.sampled_from([8, 4]),
       group_tiles=st.sampled_from([None, 1, 2, 3]), seed=st.integers(0, 2**16))
def test_exact_property(blocks, tiles, m_rows, bits, group_tiles, seed):
    """Any shape of whole tiles, any M, any group of whole tiles (a shorter last one too): the kernel
    is the reference bit for bit, and the layout round-trips the codes."""
    g = torch.Generator().manual_seed(seed)
    shape = (16 * blocks, 64 * tiles)
    group = None if group_tiles is None else 64 * group_tiles
    codes = random_codes(shape, 127 if bits == 8 else 7, g)
    groups = 1 if group is None else -(-shape[1] // group)
    sw = quantized_weight(codes, power_of_two_scales(shape[0], groups, g), bits, group, torch.float16)
    assert torch.equal(TILED_Q.decompress(sw.encoding.codes_weight(sw).values, sw.metadata, shape, sw.pattern), codes)
    x = torch.randint(-1, 2, (m_rows, shape[1]), generator=g).half()
    assert torch.equal(nxm.sparse_mm(x, sw, backend="triton"), reference.sparse_mm(x, sw))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (4, 128)], ids=["int8", "int4-g64", "int4-g128"])
def test_exact_bf16(bits, group):
    """bf16 keeps 8 significant bits: codes in [-2, 2], K = 128 and one scale 2**e per row keep every
    output an integer below 256 times 2**e, so it is exact in bf16 and the reference's."""
    g = torch.Generator().manual_seed(7)
    shape = (48, 128)
    codes = random_codes(shape, 2, g)
    groups = 1 if group is None else shape[1] // group
    scales = power_of_two_scales(shape[0], 1, g).expand(shape[0], groups).contiguous()
    sw = quantized_weight(codes, scales, bits, group, torch.bfloat16)
    x = torch.randint(-1, 2, (16, shape[1]), generator=g).bfloat16()
    truth = x.double() @ nxm.decompress(sw, dtype=torch.float64).T
    assert torch.equal(truth.bfloat16().double(), truth), "the case must be exact in bf16"
    y = nxm.sparse_mm(x, sw, backend="triton")
    assert torch.equal(y, reference.sparse_mm(x, sw)) and torch.equal(y.double(), truth)


@pytest.mark.parametrize("bits", [8, 4])
def test_full_code_range_bf16(bits):
    """Every code of [-qmax, qmax] (and its sign) read right in bf16: one-hot rows of x pick single
    weights, code * 2**e, exact in bf16."""
    g = torch.Generator().manual_seed(bits)
    qmax = 127 if bits == 8 else 7
    shape = (16, 64)
    codes = torch.zeros(shape, dtype=torch.int8)
    every_code = torch.arange(-qmax, qmax + 1, dtype=torch.int8)
    codes[:, 0::4] = every_code.repeat(256 // every_code.numel() + 1)[:256].view(16, 16)
    codes[:, 2::4] = -codes[:, 0::4]
    sw = quantized_weight(codes, power_of_two_scales(16, 1, g), bits, 64, torch.bfloat16)
    x = torch.eye(64)[torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 60, 62, 1, 3])].bfloat16()
    y = nxm.sparse_mm(x, sw, backend="triton")
    assert torch.equal(y, reference.sparse_mm(x, sw))
    assert torch.equal(y[:12].double(), nxm.decompress(sw, dtype=torch.float64)[:, 0:24:2].T)


# ---------------------------------------------------------------- the GEMM, random weights


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (4, 128), (8, 128)],
                         ids=["int8", "int4-g64", "int4-g128", "int8-g128"])
def test_random_weights_within_the_derived_tolerance(dtype, bits, group):
    g = torch.Generator().manual_seed(11 + bits)
    w = torch.randn(80, 320, generator=g).to(dtype)
    sw = nxm.compress(w, "2:4", layout="tiled_q", bits=bits, group_size=group)
    bias = torch.randn(80, generator=g).to(dtype)
    for m_rows in (1, 3, 16):
        x = torch.randn(m_rows, 320, generator=g).to(dtype)
        assert_close_to_reference(nxm.sparse_mm(x, sw, bias, backend="triton"), x, sw, bias)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128),
                                    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)],
                         ids=["16x16x64", "32x64x128", "16x32x128"])
def test_any_m_and_program_tile(config):
    """M beyond one program's rows (40, and an x that is a strided view), programs of one to four
    16-row blocks (the last one partly past N = 48) and of one or two tiles per step: all exact."""
    g = torch.Generator().manual_seed(5)
    codes = random_codes((48, 384), 7, g)
    sw = quantized_weight(codes, power_of_two_scales(48, 3, g), 4, 128, torch.float16)
    x = torch.randint(-1, 2, (40, 2 * 384), generator=g).half()[:, ::2]
    assert not x.is_contiguous()
    y = quant_gemm.sparse_mm_tiled_q(x, sw.values, sw.metadata, sw.scales, None, 4, 128,
                                     config=dict(config, num_warps=4, num_stages=1))
    assert torch.equal(y, reference.sparse_mm(x, sw))


def test_kernel_checks_its_arguments():
    sw = nxm.compress(torch.randn(32, 256), "2:4", layout="tiled_q", bits=4, group_size=128)
    x = torch.randn(2, 256).half()
    with pytest.raises(ValueError, match=r"needs values \(2, 1024\).*got values \(2, 512\)"):
        quant_gemm.sparse_mm_tiled_q(x, sw.values[:, :512], sw.metadata, sw.scales, None, 4, 128)
    with pytest.raises(ValueError, match="BLOCK_K=256 must be a multiple of 64 dividing K=256 and the group size 128"):
        quant_gemm.sparse_mm_tiled_q(x, sw.values, sw.metadata, sw.scales, None, 4, 128,
                                     config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=1))


# ---------------------------------------------------------------- dispatch


def test_dispatch_reasons():
    w = torch.randn(32, 128)
    tiled = nxm.compress(w.half(), "2:4", layout="tiled_q", bits=4)
    x = torch.randn(1, 128).half()
    assert dispatch.reasons(triton_backend, "sparse_mm", {"x": x, "sw": tiled, "bias": None}) == []
    packed = nxm.compress(w.half(), "2:4", layout="packed", bits=4)
    with pytest.raises(nxm.BackendNotSupported, match="int4 weights in layout 'tiled_q' only, not 'packed'"):
        nxm.sparse_mm(x, packed, backend="triton")
    fp32 = nxm.compress(w, "2:4", layout="tiled_q", bits=8)
    with pytest.raises(nxm.BackendNotSupported, match="'tiled_q' weights with float16/bfloat16 activations"):
        nxm.sparse_mm(x.float(), fp32, backend="triton")
    with pytest.raises(nxm.BackendNotSupported, match="does not quantize activations to 8 bits"):
        nxm.sparse_mm(x, tiled, act_bits=8, backend="triton")


def test_cpu_tensors_go_to_another_backend():
    """Auto dispatch runs Triton on CUDA tensors only: on CPU a tiled_q weight goes to the reference
    (the native GEMM reads packed), and the result is the reference's."""
    sw = nxm.compress(torch.randn(32, 128).half(), "2:4", layout="tiled_q", bits=4, group_size=64)
    x = torch.randn(2, 128).half()
    chosen = dispatch.select("sparse_mm", None, {"x": x, "sw": sw, "bias": None})
    assert chosen.name == "reference"
    assert torch.equal(nxm.sparse_mm(x, sw), reference.sparse_mm(x, sw))


def test_without_the_interpreter_cpu_is_refused_with_the_reason():
    code = (
        "import torch, nxm_kernels as nxm\n"
        "sw = nxm.compress(torch.randn(32, 128).half(), '2:4', layout='tiled_q', bits=4)\n"
        "try:\n"
        "    nxm.sparse_mm(torch.randn(1, 128).half(), sw, backend='triton')\n"
        "except nxm.BackendNotSupported as e:\n"
        "    print(e)\n"
        "print(nxm.sparse_mm(torch.randn(1, 128).half(), sw).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backend 'triton' cannot run" in out.stdout and "no CUDA GPU here" in out.stdout
    assert "torch.Size([1, 32])" in out.stdout


def test_registered_as_a_stored_layout():
    assert get_layout("tiled_q") is TILED_Q and "tiled_q" in nxm.LAYOUTS and TILED_Q.stored


def test_autotuning_keeps_the_configs_that_fit():
    """BLOCK_K divides K and the group size; each table holds BLOCK_K = 64, so some config always fits."""
    assert all(any(c["BLOCK_K"] == 64 for c in configs) for configs in quant_gemm.CONFIGS.values())

    def block_k(k, m_rows, group):
        return sorted({c.kwargs["BLOCK_K"] for c in quant_gemm._configs_for_call(None, {"K": k, "M": m_rows},
                                                                                   GROUP_K=group)})

    assert block_k(4096, 1, 0) == [64, 128, 256]
    assert block_k(4096, 16, 128) == [64, 128]
    assert block_k(320, 1, 128) == [64]
    assert block_k(4096, 17, 0) == [64]


def test_sparse_linear_runs_the_kernel():
    """A padded bf16 SparseLinear in tiled_q with backend 'triton' computes the kernel's product on its
    padded weight, cropped; the same layer on the reference backend gives the reference's."""
    torch.manual_seed(3)
    dense = torch.nn.Linear(120, 40).bfloat16()
    layers = {backend: nxm.SparseLinear.from_dense(dense, "2:4", backend=backend, layout="tiled_q", weight_bits=8,
                                                   group_size=64) for backend in ("triton", "reference")}
    sw = layers["triton"].weight_sparse
    assert sw.shape == (48, 128) and torch.equal(sw.values, layers["reference"].weight_sparse.values)
    x = torch.randn(2, 3, 120).bfloat16()
    x_padded = torch.nn.functional.pad(x.reshape(6, 120), (0, 8))
    bias = torch.nn.functional.pad(layers["triton"].bias, (0, 8))
    y = nxm.sparse_mm(x_padded, sw, bias, backend="triton")
    assert_close_to_reference(y, x_padded, sw, bias)
    with torch.no_grad():
        assert torch.equal(layers["triton"](x).reshape(6, 40), y[:, :40])
        assert torch.equal(layers["reference"](x).reshape(6, 40), reference.sparse_mm(x_padded, sw, bias)[:, :40])
