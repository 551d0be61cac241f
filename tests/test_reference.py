"""The reference path: hand-computed cases, brute force, property tests, torch's cutlass layout."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import nxm_kernels as nxm
from nxm_kernels.layouts.cutlass import multiples as cutlass_multiples
from conftest import CUTLASS_CASES, PATTERNS, VALUE_DTYPES, assert_matmul_close, random_weight

REF = {"backend": "reference"}

# ------------------------------------------------------------------ hand-computed cases
HAND_CASES = [
    # pattern, weight, kept mask, packed metadata bytes per row
    ("2:4", [[1.0, -3.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0]], [[0, 1, 1, 0, 1, 1, 0, 0]], [[0b01_00_10_01]]),
    ("1:4", [[0.1, 0.2, -0.9, 0.3], [5.0, 5.0, 5.0, 5.0]], [[0, 0, 1, 0], [1, 0, 0, 0]], [[2], [0]]),
    ("2:8", [[1, 2, 3, 4, 5, 6, 7, 8]], [[0, 0, 0, 0, 0, 0, 1, 1]], [[0b111_110]]),
    # indices 0, 2, 4, 6 at 3 bits, LSB first: 000 010 001 011 -> bytes 16, 13
    ("4:8", [[8, -1, 7, -2, 6, -3, 5, -4]], [[1, 0, 1, 0, 1, 0, 1, 0]], [[16, 13]]),
]


@pytest.mark.parametrize("pattern, weight, kept, meta", HAND_CASES)
def test_hand_computed(pattern, weight, kept, meta):
    w = torch.tensor(weight, dtype=torch.float32)
    mask = nxm.nm_mask(w, pattern, **REF)
    assert mask.tolist() == [[bool(k) for k in row] for row in kept]
    assert torch.equal(nxm.project(w, pattern, **REF), w * mask)
    sw = nxm.compress(w, pattern, layout="packed", **REF)
    assert sw.metadata.tolist() == meta
    assert torch.equal(sw.values, w[mask].reshape(len(weight), -1))
    assert torch.equal(nxm.decompress(sw, **REF), nxm.project(w, pattern, **REF))


def test_ties_go_to_lower_index():
    w = torch.tensor([[2.0, -2.0, 2.0, 1.0, 0.0, -0.0, 0.0, 0.0]])
    assert nxm.nm_mask(w, "2:4", **REF).tolist() == [[True, True, False, False, True, True, False, False]]


def test_scores_select_instead_of_magnitude():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    scores = torch.tensor([[0.0, 1.0, 5.0, 1.0]])
    assert nxm.nm_mask(w, "2:4", scores=scores, **REF).tolist() == [[False, True, True, False]]


def test_int8_minus_128_is_the_largest_magnitude():
    w = torch.tensor([[-128, 127, 1, 0]], dtype=torch.int8)
    assert nxm.nm_mask(w, "1:4", **REF).tolist() == [[True, False, False, False]]


def test_project_drops_to_positive_zero():
    z = nxm.project(torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), "2:4", **REF)
    assert torch.equal(z.signbit(), torch.tensor([[False, False, True, True]]))


# ------------------------------------------------------------------ brute force


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:4", "3:4", "2:5", "3:6"])
def test_projection_matches_brute_force(pattern):
    """Among all C(m, n) choices, the kept set maximises the kept energy (the projection), and
    among the optimal ones it is the lexicographically smallest (ties to the lower index)."""
    n, m = map(int, pattern.split(":"))
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-3, 4, (200, m), generator=g).float()  # small ints: many ties
    mask = nxm.nm_mask(w, pattern, **REF)
    for row, got in zip(w, mask):
        best = max(itertools.combinations(range(m), n), key=lambda c: (sum(row[i] ** 2 for i in c), [-i for i in c]))
        assert got.nonzero().flatten().tolist() == list(best)


# ------------------------------------------------------------------ properties

shapes = st.tuples(st.integers(1, 6), st.integers(1, 5))  # rows, groups


@given(shape=shapes, pattern=st.sampled_from(PATTERNS), dtype=st.sampled_from(VALUE_DTYPES),
       zeros=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16))
def test_round_trip_packed(shape, pattern, dtype, zeros, seed):
    p = nxm.Pattern.parse(pattern)
    w = random_weight((shape[0], shape[1] * p.m), dtype, torch.Generator().manual_seed(seed), zeros)
    mask = nxm.nm_mask(w, p, **REF)
    assert (mask.reshape(-1, p.m).sum(-1) == p.n).all()
    z = nxm.project(w, p, **REF)
    assert nxm.is_nm_sparse(z, p)
    sw = nxm.compress(w, p, layout="packed", **REF)
    assert sw.values.dtype == dtype and sw.metadata.dtype == torch.uint8
    # A weight built from the parts validates its metadata.
    rebuilt = nxm.NMSparseWeight(sw.values, sw.metadata, sw.shape, sw.pattern, sw.layout)
    assert torch.equal(nxm.decompress(rebuilt, **REF), z)


@given(rows=st.integers(1, 3), cols=st.integers(1, 4), dtype_pattern=st.sampled_from(CUTLASS_CASES),
       zeros=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2**16))
def test_cutlass_byte_identical_to_torch(rows, cols, dtype_pattern, zeros, seed):
    dtype, pattern = dtype_pattern
    row_mult, col_mult = cutlass_multiples(dtype)
    w = random_weight((rows * row_mult, cols * col_mult), dtype, torch.Generator().manual_seed(seed), zeros)
    if dtype.is_floating_point:
        w[w == 0] = -0.0  # the fill-in slots of all-zero groups must still hold project(w)'s +0
    z = nxm.project(w, pattern, **REF)
    sw = nxm.compress(w, pattern, layout="cutlass", **REF)
    values, meta = sparse_semi_structured_from_dense_cutlass(z)
    assert sw.values.dtype == values.dtype and sw.metadata.dtype == meta.dtype
    assert torch.equal(sw.values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(sw.metadata, meta)
    assert torch.equal(nxm.decompress(sw, **REF), z)
    if dtype != torch.float32:  # torch's own inverse does not round-trip its fp32 1:2 output
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(sw.values, sw.metadata), z)
    nxm.NMSparseWeight(sw.values, sw.metadata, sw.shape, sw.pattern, "cutlass")  # validates


# ------------------------------------------------------------------ sparse_mm


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("layout", ["packed", "cutlass"])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_mm_matches_masked_dense(dtype, layout, lead, with_bias):
    g = torch.Generator().manual_seed(1)
    pattern = "1:2" if (layout == "cutlass" and dtype == torch.float32) else "2:4"
    w = random_weight((64, 128), dtype, g)
    x = random_weight((*lead, 128), dtype, g)
    bias = None
    if with_bias:
        bias = torch.randint(-1000, 1000, (64,), dtype=torch.int32) if dtype == torch.int8 else torch.randn(64).to(dtype)
    sw = nxm.compress(w, pattern, layout=layout, **REF)
    y = nxm.sparse_mm(x, sw, bias, **REF)
    assert y.shape == (*lead, 64)
    assert_matmul_close(y.reshape(-1, 64), x.reshape(-1, 128), nxm.project(w, pattern, **REF), bias)


@pytest.mark.parametrize("dtype, pattern", CUTLASS_CASES)
@pytest.mark.parametrize("layout", ["packed", "cutlass"])
def test_empty_weight(dtype, pattern, layout):
    sw = nxm.compress(torch.zeros(0, 64, dtype=dtype), pattern, layout=layout, **REF)
    rebuilt = nxm.NMSparseWeight(sw.values, sw.metadata, sw.shape, sw.pattern, layout)
    assert nxm.decompress(rebuilt, **REF).shape == (0, 64)
    assert nxm.sparse_mm(torch.zeros(3, 64, dtype=dtype), sw, **REF).shape == (3, 0)
