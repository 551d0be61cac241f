"""Every bad input raises an error that names the problem and the fix."""

import pytest
import torch

import nxm_kernels as nxm

REF = {"backend": "reference"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", [nxm.nm_mask, nxm.project, nxm.compress])
def test_non_finite_weight(op, dtype, bad):
    w = torch.ones(4, 8, dtype=dtype)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*nan_to_num"):
        op(w, "2:4", **REF)


def test_non_finite_scores():
    scores = torch.ones(4, 8)
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="scores has 1 non-finite"):
        nxm.nm_mask(torch.ones(4, 8), "2:4", scores=scores, **REF)


def test_scores_shape_and_dtype():
    with pytest.raises(ValueError, match=r"scores must be a tensor of the weight's shape \(4, 8\)"):
        nxm.nm_mask(torch.ones(4, 8), "2:4", scores=torch.ones(4, 4))
    with pytest.raises(TypeError, match="scores must be floating point"):
        nxm.nm_mask(torch.ones(4, 8), "2:4", scores=torch.ones(4, 8, dtype=torch.int32))


def test_last_dim_not_divisible():
    with pytest.raises(ValueError, match="last dimension 10 is not divisible by m=4.*pad in_features"):
        nxm.compress(torch.ones(4, 10), "2:4")


@pytest.mark.parametrize("pattern", ["4:4", "1:32", "0:4"])
def test_bad_pattern(pattern):
    with pytest.raises(ValueError, match="unsupported pattern"):
        nxm.nm_mask(torch.ones(4, 32), pattern)


def test_unsupported_dtype():
    with pytest.raises(TypeError, match="unsupported dtype torch.int32 for N:M selection"):
        nxm.nm_mask(torch.ones(4, 8, dtype=torch.int32), "2:4")
    with pytest.raises(TypeError, match="cannot hold dtype torch.float64"):
        nxm.compress(torch.ones(4, 8, dtype=torch.float64), "2:4")


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'csr'"):
        nxm.compress(torch.ones(32, 64), "2:4", layout="csr")


def test_compress_needs_2d():
    with pytest.raises(ValueError, match=r"2-D \[out_features, in_features\]"):
        nxm.compress(torch.ones(2, 4, 8), "2:4")


@pytest.mark.parametrize(
    "dtype, pattern, shape, message",
    [
        (torch.float16, "1:4", (32, 64), "holds torch.float16 only as 2:4"),
        (torch.float32, "2:4", (32, 64), "holds torch.float32 only as 1:2"),
        (torch.float16, "2:4", (16, 64), "rows divisible by 32 and columns by 32, got 16x64"),
        (torch.float16, "2:4", (32, 48), "rows divisible by 32 and columns by 32, got 32x48"),
        (torch.int8, "2:4", (16, 96), "rows divisible by 16 and columns by 64, got 16x96"),
        (torch.float32, "1:2", (32, 24), "rows divisible by 32 and columns by 16, got 32x24"),
    ],
)
def test_cutlass_cannot_hold(dtype, pattern, shape, message):
    with pytest.raises(ValueError, match=message):
        nxm.compress(torch.ones(shape, dtype=dtype), pattern, layout="cutlass")


# ------------------------------------------------------------------ NMSparseWeight validation


def _packed(pattern="2:4", shape=(4, 16)):
    w = torch.randn(shape)
    return nxm.compress(w, pattern, layout="packed", **REF)


def test_metadata_index_out_of_range():
    sw = _packed("2:6", (2, 12))  # 3-bit indices can hold 6 and 7, which are out of range
    meta = sw.metadata.clone()
    meta[0, 0] = 0b111_111  # indices 7, 7
    with pytest.raises(ValueError, match=r"group 0 of row 0 has an index out of range \[0, 6\)"):
        nxm.NMSparseWeight(sw.values, meta, sw.shape, sw.pattern, "packed")


def test_metadata_repeated_index():
    sw = _packed()
    meta = sw.metadata.clone()
    meta[1, 0] = 0b0101_0101  # indices 1, 1, 1, 1
    with pytest.raises(ValueError, match="group 0 of row 1 has an index repeated within its group"):
        nxm.NMSparseWeight(sw.values, meta, sw.shape, sw.pattern, "packed")


def test_metadata_descending():
    sw = _packed()
    meta = sw.metadata.clone()
    meta[0, 0] = 0b00_11_00_11  # indices (3, 0), (3, 0)
    with pytest.raises(ValueError, match="not in ascending order"):
        nxm.NMSparseWeight(sw.values, meta, sw.shape, sw.pattern, "packed")


def test_metadata_padding_bits():
    sw = _packed("1:4", (2, 12))  # 3 indices x 2 bits: the top 2 bits of the byte are padding
    meta = sw.metadata.clone()
    meta[0, 0] |= 0b1100_0000
    with pytest.raises(ValueError, match="padding bits"):
        nxm.NMSparseWeight(sw.values, meta, sw.shape, sw.pattern, "packed")


def test_metadata_wrong_shape_and_dtype():
    sw = _packed()
    with pytest.raises(ValueError, match=r"metadata is torch.uint8 \(4, 1\), but layout 'packed'.*\(4, 2\)"):
        nxm.NMSparseWeight(sw.values, sw.metadata[:, :1], sw.shape, sw.pattern, "packed")
    with pytest.raises(ValueError, match="metadata is torch.int16"):
        nxm.NMSparseWeight(sw.values, sw.metadata.to(torch.int16), sw.shape, sw.pattern, "packed")
    with pytest.raises(ValueError, match=r"values have shape \(4, 7\)"):
        nxm.NMSparseWeight(sw.values[:, :7], sw.metadata, sw.shape, sw.pattern, "packed")


def test_cutlass_metadata_corrupt():
    sw = nxm.compress(torch.randn(32, 64, dtype=torch.float16), "2:4", layout="cutlass", **REF)
    meta = sw.metadata.clone()
    meta[3, 1] = 0  # nibbles 0b0000: index 0 twice
    with pytest.raises(ValueError, match="corrupt cutlass metadata"):
        nxm.NMSparseWeight(sw.values, meta, sw.shape, sw.pattern, "cutlass")


def test_trusted_construction_skips_index_check():
    sw = _packed()
    meta = sw.metadata.clone()
    meta[0, 0] = 0b0101_0101
    nxm.NMSparseWeight(sw.values, meta, sw.shape, sw.pattern, "packed", check_metadata=False)


# ------------------------------------------------------------------ sparse_mm


def test_sparse_mm_mismatches():
    sw = _packed()
    with pytest.raises(ValueError, match=r"x has 8 features.*x must be \[..., 16\]"):
        nxm.sparse_mm(torch.ones(3, 8), sw)
    with pytest.raises(TypeError, match="x is torch.float16 but the weight is torch.float32"):
        nxm.sparse_mm(torch.ones(3, 16, dtype=torch.float16), sw)
    with pytest.raises(ValueError, match=r"bias must be torch.float32 \[4\]"):
        nxm.sparse_mm(torch.ones(3, 16), sw, torch.ones(5))
    with pytest.raises(ValueError, match="x is on meta but the weight on cpu"):
        nxm.sparse_mm(torch.ones(3, 16, device="meta"), sw)
    with pytest.raises(TypeError, match="takes an NMSparseWeight"):
        nxm.sparse_mm(torch.ones(3, 16), torch.ones(4, 16))
