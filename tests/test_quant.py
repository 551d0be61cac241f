"""Quantized N:M weights (int8 / int4 codes with fp32 scales): compression, the exact
dequantization bound, fake_quant, the reference GEMMs (W8A16, W4A16, W8A8) and the refusals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels import reference
from nxm_kernels.encodings import IntEncoding, as_encoding
from nxm_kernels.encodings.integer import pack_int4, unpack_int4

ROW_PATTERNS = ("2:4", "1:4", "4:8", "1:2", "3:8")


def test_int8_per_row_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25, 0.0, 0.0, 3.0, -1.0]])
    sw = nxm.compress(w, "2:4", bits=8)
    scale = torch.tensor(3.0 / 127, dtype=torch.float32)
    assert sw.values.dtype == torch.int8 and sw.values.tolist() == [[42, -85, 127, -42]]
    assert sw.scales.dtype == torch.float32 and sw.scales.shape == (1, 1) and sw.scales[0, 0] == scale
    want = torch.tensor([[42.0, -85.0, 0, 0, 0, 0, 127.0, -42.0]]) * scale
    assert torch.equal(nxm.decompress(sw), want)
    assert str(sw.encoding) == "int8" and sw.dtype == torch.float32


def test_int4_groups_by_hand():
    w = torch.tensor([[1.2, -2.0, 0.5, 0.25, 0.0, 0.0, 3.0, -1.0]], dtype=torch.float16)
    sw = nxm.compress(w, "2:4", bits=4, group_size=4)
    # group 0: scale 2/7, codes 4 -7 (1.2 is stored as fp16 1.2001953); group 1: scale 3/7, codes 7 -2
    assert sw.scales.tolist() == [[torch.tensor(2 / 7).item(), torch.tensor(3 / 7).item()]]
    # nibbles low first: (4, -7) -> 0x94, (7, -2) -> 0xE7
    assert sw.values.dtype == torch.uint8 and sw.values.tolist() == [[0x94, 0xE7]]
    dense = nxm.decompress(sw)
    assert dense.dtype == torch.float16
    want = (torch.tensor([[4.0, -7, 0, 0, 0, 0, 7, -2]]) * sw.scales.repeat_interleave(4, 1)).half()
    assert torch.equal(dense, want)
    assert torch.equal(nxm.decompress(sw, dtype=torch.float32),
                       torch.tensor([[4.0, -7, 0, 0, 0, 0, 7, -2]]) * sw.scales.repeat_interleave(4, 1))


def test_int4_packing_round_trip_and_nibble_order():
    codes = torch.arange(-7, 8, dtype=torch.int8).reshape(1, 15)
    packed = pack_int4(codes)
    assert packed.shape == (1, 8) and int(packed[0, -1]) >> 4 == 0  # odd count: zero high nibble
    assert int(packed[0, 0]) == ((-7) & 0xF) | (((-6) & 0xF) << 4)
    assert torch.equal(unpack_int4(packed, 15), codes)


def test_all_zero_group_gets_scale_zero():
    w = torch.zeros(2, 16)
    w[1, 8:] = torch.arange(1.0, 9.0)
    sw = nxm.compress(w, "2:4", bits=4, group_size=8)
    assert sw.scales[0].tolist() == [0.0, 0.0] and sw.scales[1, 0] == 0 and sw.scales[1, 1] > 0
    dense = nxm.decompress(sw)
    assert not dense.isnan().any() and dense[0].abs().sum() == 0


def _half_step_bound(w, pattern, bits, group_size):
    """|q * s - project(w)| <= s / 2 exactly (float64), s = the stored scale; and s is the exact
    step absmax / qmax rounded once to fp32."""
    sw = nxm.compress(w, pattern, bits=bits, group_size=group_size)
    enc = sw.encoding
    codes = reference.decompress(enc.codes_weight(sw)).to(torch.float64)
    cols = w.shape[1]
    g = group_size or cols
    step = sw.scales.to(torch.float64).repeat_interleave(g, 1)[:, :cols]
    projected = nxm.project(w, pattern).to(torch.float64)
    assert ((codes * step - projected).abs() * 2 <= step).all()
    groups = torch.nn.functional.pad(projected.abs(), (0, -cols % g)).reshape(w.shape[0], -1, g).amax(-1)
    exact = groups / enc.qmax
    assert torch.equal(sw.scales, exact.to(torch.float32))
    assert ((sw.scales.double() - exact).abs() <= exact * 2.0**-24).all()
    assert nxm.is_nm_sparse(nxm.decompress(sw), pattern)
    assert ((codes != 0) <= (projected != 0)).all()  # nothing outside the pattern
    return sw


@settings(max_examples=25)
@given(
    rows=st.integers(1, 5), groups=st.integers(1, 6), pattern=st.sampled_from(ROW_PATTERNS),
    bits=st.sampled_from((8, 4)), group_mult=st.sampled_from((None, 1, 2, 3)),
    dtype=st.sampled_from((torch.float32, torch.float16, torch.bfloat16)), seed=st.integers(0, 2**16),
)
def test_property_half_step_and_pattern(rows, groups, pattern, bits, group_mult, dtype, seed):
    m = int(pattern.split(":")[1])
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, groups * m, generator=gen) * 10.0 ** torch.randint(-3, 3, (rows, 1), generator=gen)).to(dtype)
    w[torch.rand(w.shape, generator=gen) < 0.2] = 0
    group_size = None if group_mult is None else group_mult * m  # a last, shorter group allowed
    sw = _half_step_bound(w, pattern, bits, group_size)
    assert torch.equal(nxm.fake_quant(w, pattern, bits, group_size), nxm.decompress(sw))


def test_cutlass_int8_is_torchs_converter_of_the_codes():
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    w = torch.randn(32, 128)
    sw = nxm.compress(w, "2:4", "cutlass", bits=8, group_size=64)
    codes = reference.decompress(sw.encoding.codes_weight(sw))
    values, meta = conv.sparse_semi_structured_from_dense_cutlass(codes)
    assert torch.equal(sw.values, values) and torch.equal(sw.metadata, meta)
    packed = nxm.compress(w, "2:4", bits=8, group_size=64)
    assert torch.equal(nxm.decompress(sw), nxm.decompress(packed)) and torch.equal(sw.scales, packed.scales)


@pytest.mark.parametrize("kind", ["2:4t", "2:2x2", "8:4x4"])
def test_fake_quant_block_kinds_keep_pattern(kind):
    w = torch.randn(8, 16)
    out = nxm.fake_quant(w, kind, 4, 8)
    assert nxm.is_nm_sparse(out, kind)
    assert ((out != 0) <= (nxm.project(w, kind) != 0)).all()  # a kept value may round to code 0


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (8, 8), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_bit_exact_with_straight_through_gradient(bits, group_size, dtype):
    w = torch.randn(8, 32, dtype=dtype, requires_grad=True)
    out = nxm.fake_quant(w, "2:4", bits, group_size)
    assert torch.equal(out.detach(), nxm.decompress(nxm.compress(w.detach(), "2:4", bits=bits, group_size=group_size)))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(w.grad, grad)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (8, 64), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_mm_dequantized_within_tolerance(bits, group_size, dtype):
    w, x, bias = torch.randn(24, 128), torch.randn(5, 128).to(dtype), torch.randn(24).to(dtype)
    sw = nxm.compress(w.to(dtype), "2:4", bits=bits, group_size=group_size)
    y = nxm.sparse_mm(x, sw, bias, backend="reference")
    want = x.double() @ nxm.decompress(sw, dtype=torch.float64).T + bias.double()
    # fp32 accumulation over K terms, then one rounding to dtype.
    tol = 128 * 2.0**-23 * (x.double().abs() @ nxm.decompress(sw, dtype=torch.float64).abs().T + bias.double().abs())
    tol = tol + want.abs() * torch.finfo(dtype).eps
    assert ((y.double() - want).abs() <= tol).all()


def _w8a8_by_hand(x, sw):
    """The W8A8 definition written out with Python integers, one output at a time."""
    xq, sx = reference.quantize_activations(x)
    codes = reference.decompress(sw.encoding.codes_weight(sw)).to(torch.int64)
    g = sw.encoding.group_size or x.shape[1]
    out = torch.empty(x.shape[0], codes.shape[0], dtype=torch.float32)
    for i in range(x.shape[0]):
        for n in range(codes.shape[0]):
            y = torch.zeros((), dtype=torch.float32)
            for j in range(sw.scales.shape[1]):
                acc = int((xq[i, j * g:(j + 1) * g].to(torch.int64) * codes[n, j * g:(j + 1) * g]).sum())
                y = y + torch.tensor(float(acc), dtype=torch.float32) * sw.scales[n, j]
            out[i, n] = y * sx[i, 0]
    return out


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 16), (4, 32)])
def test_w8a8_matches_its_definition_exactly(bits, group_size):
    w, x = torch.randn(6, 64), torch.randn(3, 64)
    x[1] = 0  # a zero token: scale 0, output 0
    sw = nxm.compress(w, "2:4", bits=bits, group_size=group_size)
    y = nxm.sparse_mm(x, sw, act_bits=8)
    assert torch.equal(y, _w8a8_by_hand(x, sw))
    assert (y[1] == 0).all()
    # and it is the float product up to both quantizations
    assert torch.allclose(y, x @ nxm.decompress(sw).T, atol=0.3, rtol=0.05)


def test_activation_quantization():
    x = torch.tensor([[0.5, -1.27, 0.0, 0.01]])
    xq, sx = reference.quantize_activations(x)
    assert sx[0, 0] == torch.tensor(1.27 / 127, dtype=torch.float32) and xq.tolist() == [[50, -127, 0, 1]]


def test_encoding_names_round_trip():
    for text in ("int8", "int4", "int8-g64", "int4-g128", "float"):
        assert str(as_encoding(text)) == text
    assert IntEncoding(4, 128) == "int4-g128"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("bits", [2, 3, 16, 0, "8"])
def test_other_bits_refused(bits):
    with pytest.raises(ValueError, match="bits=8 .*bits=4"):
        nxm.compress(torch.randn(4, 8), "2:4", bits=bits)


def test_refusals_name_the_problem():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="layout 'cutlass' holds float, int8 values, not int4: use layout 'packed'"):
        nxm.compress(w, "2:4", "cutlass", bits=4)
    with pytest.raises(ValueError, match="group_size=6 must be a multiple of the pattern's block width 4"):
        nxm.compress(w, "2:4", bits=8, group_size=6)
    with pytest.raises(ValueError, match="give bits=8 or bits=4 with it"):
        nxm.compress(w, "2:4", group_size=64)
    with pytest.raises(ValueError, match="quantizes float weights"):
        nxm.compress(w.to(torch.int8), "2:4", bits=8)
    with pytest.raises(ValueError, match="2:4t"):
        nxm.compress(w, "2:4t", bits=8)
    with pytest.raises(ValueError, match="act_bits=8 .*compress the weight with bits=8"):
        nxm.sparse_mm(torch.randn(2, 64), nxm.compress(w, "2:4"), act_bits=8)
    with pytest.raises(ValueError, match="act_bits=4"):
        nxm.sparse_mm(torch.randn(2, 64), nxm.compress(w, "2:4", bits=8), act_bits=4)
    with pytest.raises(ValueError, match="fake_quant needs bits=8 or bits=4"):
        nxm.fake_quant(w, "2:4", None)


def _corrupt(sw, **changes):
    parts = dict(values=sw.values, metadata=sw.metadata, shape=sw.shape, pattern=sw.pattern, layout=sw.layout,
                 scales=sw.scales, encoding=sw.encoding, float_dtype=sw.float_dtype)
    return nxm.NMSparseWeight(**{**parts, **changes})


def test_corrupt_weights_refused():
    w = torch.randn(4, 32)
    sw4 = nxm.compress(w, "2:4", bits=4, group_size=8)
    bad = sw4.values.clone()
    bad[1, 2] = (bad[1, 2] & 0xF0) | 0x8  # nibble -8
    with pytest.raises(ValueError, match="int4 nibble -8 at row 1, slot 4 is outside \\[-7, 7\\]"):
        _corrupt(sw4, values=bad)
    sw8 = nxm.compress(w, "2:4", bits=8)
    bad = sw8.values.clone()
    bad[0, 0] = -128
    with pytest.raises(ValueError, match="int8 code -128"):
        _corrupt(sw8, values=bad)
    for value, what in ((float("nan"), "not finite"), (float("inf"), "not finite"), (-1.0, "negative"),
                        (0.0, "is 0 but its group holds non-zero codes")):
        scales = sw4.scales.clone()
        scales[2, 1] = value
        with pytest.raises(ValueError, match=f"scale 1 of row 2 .*{what}" if value != 0 else what):
            _corrupt(sw4, scales=scales)
    with pytest.raises(ValueError, match="scales of a 4x32 2:4 packed int4-g8 weight must be torch.float32"):
        _corrupt(sw4, scales=sw4.scales.half())
    with pytest.raises(ValueError, match="values of a 4x32 .* must be torch.uint8 \\(4, 8\\)"):
        _corrupt(sw4, values=sw4.values[:, :4])
    with pytest.raises(ValueError, match="takes \\['float_dtype', 'scales'\\]"):
        _corrupt(sw4, scales=None)


def test_opcheck_sparse_mm_with_scales():
    sw = nxm.compress(torch.randn(8, 32), "2:4", bits=4, group_size=16)
    x = torch.randn(3, 32)
    args = (x, sw.values, sw.metadata, None, list(sw.shape), "2:4", "packed", "reference", sw.scales, "int4-g16")
    torch.library.opcheck(torch.ops.nxm.sparse_mm.default, args)
    torch.library.opcheck(torch.ops.nxm.sparse_mm.default, args + (8,))
    assert torch.equal(torch.ops.nxm.sparse_mm(*args, 8), nxm.sparse_mm(x, sw, act_bits=8))
