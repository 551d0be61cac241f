"""The ``block`` layout: k-of-RxC blocks and mask libraries (values + bitmap or mask number)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels.layouts import NMSparseWeight, get_layout
from nxm_kernels.layouts.block import pack_bitmaps
from nxm_kernels.pattern import as_pattern
from nxm_kernels.patterns import Pattern

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["8:4x4", "3:2x3", "2:1x4", "5:3x3", "2x2{9,6,c}", "4x4{f0f0,0f0f,ff00,00ff}"]
VALUES = st.one_of(st.integers(-3, 3).map(float), st.floats(-100, 100, width=32), st.sampled_from([-0.0, 1e-30]))


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else t


@settings(max_examples=40, deadline=None)
@given(data=st.data(), text=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES), with_scores=st.booleans())
def test_decompress_of_compress_is_project_bit_for_bit(data, text, dtype, with_scores):
    pattern = as_pattern(text)
    rows, cols = pattern.block
    shape = (rows * data.draw(st.integers(1, 3)), cols * data.draw(st.integers(1, 3)))
    w = torch.tensor(data.draw(st.lists(VALUES, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])))
    w = w.reshape(shape).to(dtype)
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) \
        if with_scores else None
    sw = nxm.compress(w, pattern, "block", scores)
    sw.check()  # every bitmap / mask number valid
    assert torch.equal(bits(nxm.decompress(sw)), bits(nxm.project(w, pattern, scores)))
    x = torch.randn(3, shape[1]).to(dtype)
    want = (x.float() @ nxm.project(w, pattern, scores).float().T).to(dtype)
    assert torch.equal(nxm.sparse_mm(x, sw, backend="reference"), want)


def test_storage_and_bytes_of_8_of_4x4():
    w = torch.randn(64, 128, dtype=torch.float16)
    sw = nxm.compress(w, "8:4x4", "block")
    assert sw.values.shape == (16, 32 * 8) and sw.metadata.shape == (16, 32 * 2) and sw.metadata.dtype == torch.uint8
    assert sw.nbytes / (w.numel() * 2) == 0.5625  # 16 bytes of values + a 2-byte bitmap per 32 dense bytes
    # The first block's bitmap is its mask, entry i at bit i of a little-endian uint16.
    mask = nxm.nm_mask(w, "8:4x4")[:4, :4].flatten()
    assert int(sw.metadata[0, 0]) | int(sw.metadata[0, 1]) << 8 == sum(1 << i for i in range(16) if mask[i])
    # Values: the kept entries of each block, row-major.
    assert torch.equal(sw.values[0, :8], w[:4, :4].flatten()[mask])


def test_library_stores_mask_numbers():
    library = Pattern.library([[[1, 0], [0, 1]], [[0, 1], [1, 0]]])
    w = torch.tensor([[1.0, 9.0], [9.0, 1.0]]).repeat(2, 3)
    sw = nxm.compress(w, library, "block")
    assert sw.metadata.dtype == torch.uint8 and sw.metadata.tolist() == [[1, 1, 1], [1, 1, 1]]
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([torch.randperm(16, generator=g).view(4, 4) < 8 for _ in range(400)]).unique(dim=0)
    many = Pattern.library(masks)
    assert len(many.codes) > 256
    assert nxm.compress(torch.randn(8, 8), many, "block").metadata.dtype == torch.int16


def _corrupt(sw, **changes):
    parts = dict(values=sw.values, metadata=sw.metadata, shape=sw.shape, pattern=sw.pattern, layout=sw.layout)
    return NMSparseWeight(**{**parts, **changes})


def test_validation_refuses_bad_bitmaps_and_mask_numbers():
    sw = nxm.compress(torch.randn(8, 8), "8:4x4", "block")
    metadata = sw.metadata.clone()
    metadata[1, 2] ^= 0x10  # one bit more or less: 7 or 9 kept
    with pytest.raises(ValueError, match="bitmap of block 3 keeps [79] entries, pattern 8:4x4 keeps 8"):
        _corrupt(sw, metadata=metadata)
    padded = nxm.compress(torch.randn(3, 3), "4:3x3", "block")  # 9 bits in 2 bytes: 7 padding bits
    metadata = padded.metadata.clone()
    metadata[0, 0] = pack_bitmaps(torch.tensor([[True] * 4 + [False] * 5]))[0, 0]
    metadata[0, 1] = 0x80
    with pytest.raises(ValueError, match="bitmap of block 0 keeps 4 entries, pattern 4:3x3 keeps 4|past the 9"):
        _corrupt(padded, metadata=metadata)
    library = nxm.compress(torch.randn(4, 4), "2x2{9,6}", "block")
    with pytest.raises(ValueError, match="mask number 2, but the library holds 2 masks"):
        _corrupt(library, metadata=torch.full_like(library.metadata, 2))


def test_refusals_name_the_layout_that_holds_the_kind():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="layout 'packed' holds row.* not the block pattern 8:4x4: use layout 'block'"):
        nxm.compress(w, "8:4x4", "packed")
    with pytest.raises(ValueError, match="layout 'block' holds block/library patterns, not the row pattern 2:4"):
        nxm.compress(w, "2:4", "block")
    with pytest.raises(ValueError, match=r"does not tile into the 4x4 blocks of pattern 8:4x4: pad it .* to 32x32"):
        nxm.compress(torch.randn(30, 32), "8:4x4", "block")
    assert get_layout("block").not_supported_reasons(torch.float64, (8, 8), as_pattern("8:4x4"))


@pytest.mark.parametrize("text", ["8:4x4", "4x4{f0f0,0f0f,ff00,00ff}", "2:4", "2:4t"])
def test_sparse_linear_and_checkpoint_round_trip(tmp_path, text):
    from nxm_kernels.checkpoint import load, save
    from nxm_kernels.nn import SparseLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(SparseLinear.from_dense(torch.nn.Linear(30, 10), pattern=text))
    save(model, tmp_path / "m.nxm")
    layer = load(tmp_path / "m.nxm").layers["0"]
    assert str(layer.pattern) == text and layer.pattern == as_pattern(text)  # the header's pattern defines the masks
    x = torch.randn(5, 30)
    assert torch.equal(layer(x), model[0](x))
    dense = torch.nn.functional.pad(model[0].to_dense().weight.detach(), (0, 2, 0, 2))
    assert nxm.is_nm_sparse(dense, text)
