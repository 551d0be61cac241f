"""Pattern kinds: every kind against a brute force over all its valid masks, parse/str, refusals."""

import functools
import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nxm_kernels as nxm
from nxm_kernels.pattern import as_pattern
from nxm_kernels.patterns import BlockPattern, LibraryPattern, Pattern, TransposablePattern

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Few distinct magnitudes (ties everywhere), ordinary floats, and a wide range that makes the
# exact search lose bits and settle near ties with fractions.
VALUES = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-100, 100, width=32),
    st.sampled_from([0.0, 1e20, -1e20, 1.0, 1e-20, 3e-20, 2.0 ** -30]),
)


# ------------------------------------------------------------------ brute force (its own enumeration)


@functools.lru_cache(maxsize=None)
def all_masks(text: str) -> tuple[tuple[int, ...], ...]:
    """Every valid mask of one block, as its sorted kept flat indices (library: in mask order)."""
    pattern = as_pattern(text)
    if isinstance(pattern, LibraryPattern):
        return tuple(tuple(m.flatten().nonzero().flatten().tolist()) for m in pattern.masks)
    if isinstance(pattern, BlockPattern):
        return tuple(itertools.combinations(range(pattern.rows * pattern.cols), pattern.k))
    if isinstance(pattern, Pattern):
        return tuple(itertools.combinations(range(pattern.m), pattern.n))
    n, m = pattern.n, pattern.m
    found = []
    for rows in itertools.product(itertools.combinations(range(m), n), repeat=m):
        if all(sum(c in row for row in rows) == n for c in range(m)):
            found.append(tuple(r * m + c for r, row in enumerate(rows) for c in row))
    return tuple(found)


def brute_force_mask(w: torch.Tensor, text: str, scores: torch.Tensor | None) -> torch.Tensor:
    """Per block, the mask with the largest exact sum of scores; ties to the lexicographically
    smallest kept flat indices (a library: to the lowest mask number)."""
    pattern = as_pattern(text)
    rows, cols = pattern.block
    s = (w.abs() if scores is None else scores).double()
    library = isinstance(pattern, LibraryPattern)
    out = torch.zeros(w.shape, dtype=torch.bool)
    for i in range(0, w.shape[0], rows):
        for j in range(0, w.shape[1], cols):
            block = [Fraction(v) for v in s[i:i + rows, j:j + cols].flatten().tolist()]
            scale = max(v.denominator for v in block)
            ints = [int(v * scale) for v in block]  # exact: dyadic rationals on one denominator
            candidates = list(enumerate(all_masks(text)))
            _, kept = max(candidates, key=lambda c: (sum(ints[f] for f in c[1]),
                                                     -c[0] if library else [-f for f in c[1]]))
            for f in kept:
                out[i + f // cols, j + f % cols] = True
    return out


def library_4x4() -> LibraryPattern:
    masks = torch.zeros(8, 4, 4, dtype=torch.bool)
    for k in range(8):  # 8 distinct masks that each keep 8 (rotated stripes and checkers)
        masks[k].view(-1)[torch.arange(16).roll(k)[:8]] = True
    return Pattern.library(masks)


KINDS = ["2:4", "1:2t", "2:3t", "1:4t", "2:4t", "3:4t", "2:2x2", "3:2x3", "2:1x4", "8:4x4",
         "2x2{9,6,c}", str(library_4x4())]
SLOW = {"8:4x4", "2:5t"}


@pytest.mark.parametrize("text", KINDS + ["2:5t"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scores", [False, True])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_mask_is_the_brute_force_best(text, dtype, with_scores, data):
    pattern = as_pattern(text)
    rows, cols = pattern.block
    grid = data.draw(st.sampled_from([(1, 1)] if text in SLOW else [(1, 1), (2, 1), (1, 3), (2, 2)]))
    shape = (rows * grid[0], cols * grid[1])
    values = data.draw(st.lists(VALUES, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    w = torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype)
    w = torch.where(torch.isfinite(w), w, torch.ones((), dtype=dtype))  # fp16 overflows 1e20
    scores = None
    if with_scores:
        score_values = data.draw(st.lists(VALUES, min_size=w.numel(), max_size=w.numel()))
        scores = torch.tensor(score_values, dtype=torch.float32).reshape(shape)
    mask = nxm.nm_mask(w, text, scores=scores)
    assert torch.equal(mask, brute_force_mask(w, text, scores))
    assert nxm.is_nm_sparse(torch.where(mask, w, 0), text)


def test_the_fast_2_4t_search_equals_comparing_all_90_masks():
    from nxm_kernels.patterns.base import linear_scores, mask_numbers, select_blocks

    table = TransposablePattern(2, 4).masks.flatten(1)
    g = torch.Generator().manual_seed(0)
    for w in [torch.randn(64, 128, generator=g), torch.randint(-2, 3, (64, 128), generator=g).half(),
              torch.randn(64, 128, generator=g).bfloat16() * torch.tensor(1e30).pow(torch.rand(64, 128, generator=g))]:
        every = select_blocks(w, None, 4, 4, 106, lambda wb, sb: table[mask_numbers(linear_scores(wb, sb), table)])
        assert torch.equal(nxm.nm_mask(w, "2:4t"), every)


@pytest.mark.parametrize("text", ["1:2t", "2:4t", "1:4t", "3:4t", "2:5t", "1:6t"])
def test_transposable_keeps_n_per_row_and_column_of_every_block(text):
    pattern = as_pattern(text)
    m = pattern.m
    w = torch.randn(3 * m, 2 * m, generator=torch.Generator().manual_seed(1))
    blocks = nxm.nm_mask(w, text).reshape(3, m, 2, m).transpose(1, 2)
    assert bool((blocks.sum(-1) == pattern.n).all() and (blocks.sum(-2) == pattern.n).all())
    z = nxm.project(w, text)
    assert nxm.is_nm_sparse(z, f"{pattern.n}:{m}") and nxm.is_nm_sparse(z.T.contiguous(), f"{pattern.n}:{m}")
    assert len(all_masks(text)) == pattern.masks.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_8_of_4x4_keeps_exactly_the_8_largest_of_each_block(dtype):
    w = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(2)).float().reshape(32, 32) - 500
    w = w.to(dtype)  # bf16 rounds some magnitudes together: compare with the 8th largest
    blocks = w.float().abs().reshape(8, 4, 8, 4).transpose(1, 2).reshape(64, 16)
    kept = nxm.nm_mask(w, "8:4x4").reshape(8, 4, 8, 4).transpose(1, 2).reshape(64, 16)
    assert bool((kept.sum(-1) == 8).all())
    eighth = blocks.sort(-1, descending=True).values[:, 7:8]
    assert bool((blocks[kept].reshape(64, 8) >= eighth).all() and (blocks[~kept].reshape(64, 8) <= eighth).all())


@pytest.mark.parametrize("text", ["2:4", "8:4x4", "3:2x3"])
def test_squared_scores_keep_the_same_mask_for_row_and_block_kinds(text):
    w = torch.randn(12, 24, generator=torch.Generator().manual_seed(3)).half()
    assert torch.equal(nxm.nm_mask(w, text), nxm.nm_mask(w, text, scores=w.double() ** 2))


def test_squared_scores_are_the_euclidean_projection_of_2_4t():
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = nxm.project(w, "2:4t", scores=w ** 2)
    blocks = w.reshape(2, 4, 2, 4).transpose(1, 2).reshape(4, 16)
    for b, kept in zip(blocks, nxm.nm_mask(w, "2:4t", scores=w ** 2).reshape(2, 4, 2, 4).transpose(1, 2).reshape(4, 16)):
        error = min(sum(float(b[f]) ** 2 for f in range(16) if f not in m) for m in all_masks("2:4t"))
        assert float((b[~kept] ** 2).sum()) == pytest.approx(error)
    assert torch.equal(z, torch.where(z != 0, w, 0.0))


# ------------------------------------------------------------------ text forms and refusals


@given(n=st.integers(1, 4), extra=st.integers(1, 3), k=st.integers(1, 15), r=st.integers(1, 4), c=st.integers(1, 4))
def test_parse_and_str_round_trip(n, extra, k, r, c):
    m = n + extra
    if m <= 5:
        assert as_pattern(f"{n}:{m}t") == TransposablePattern(n, m) and str(TransposablePattern(n, m)) == f"{n}:{m}t"
    if k < r * c:
        block = BlockPattern(k, r, c)
        assert as_pattern(str(block)) == block and str(block) == f"{k}:{r}x{c}"
    assert as_pattern(f" {n} : {m} ") == Pattern(n, m)


def test_library_text_form_and_masks():
    library = library_4x4()
    assert as_pattern(str(library)) == library and library.kept == 8 and library.kept_fraction == 0.5
    assert torch.equal(as_pattern("2x2{9,6}").masks, torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 0]]]).bool())
    assert str(Pattern.library([[[1, 0], [0, 1]]])) == "2x2{9}"


def test_kinds_are_distinct_and_describe_their_blocks():
    assert Pattern(2, 4) != TransposablePattern(2, 4)
    assert Pattern(2, 4).index_bits == 2 and Pattern(2, 4).block == (1, 4)
    assert TransposablePattern(2, 4).block == (4, 4) and BlockPattern(8, 4, 4).kept_fraction == 0.5


def test_a_30_row_weight_with_2_4t_is_refused_naming_the_block():
    with pytest.raises(ValueError, match=r"4x4 blocks of pattern 2:4t: pad it with zeros to 32x64"):
        nxm.project(torch.randn(30, 64), "2:4t")
    with pytest.raises(ValueError, match=r"3x2 blocks of pattern 4:3x2: pad it with zeros to 6x4"):
        nxm.nm_mask(torch.randn(4, 3), "4:3x2")
    with pytest.raises(ValueError, match="must be 2-D"):
        nxm.is_nm_sparse(torch.zeros(8), "2:4t")


@pytest.mark.parametrize("text, message", [
    ("2:8t", "more than 4096 valid masks"),
    ("4:4t", "1 <= n < m"),
    ("16:4x4", "1 <= k < R\\*C"),
    ("2x2{9,e}", "same number of entries"),
    ("2x2{9,9}", "distinct"),
    ("2x2{0,f}", "keeps no entry"),
    ("2x2{10}", "more bits than the 2x2 block"),
    ("2;4", "write it as 'n:m'.*'n:mt'.*'k:RxC'.*'RxC\\{hex masks\\}'"),
])
def test_refusals_name_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        as_pattern(text)


@pytest.mark.parametrize("text", ["8:4x4", "2x2{9,6}"])  # (2:4t: native selects it, tests/test_transposable.py)
def test_block_kinds_refuse_an_explicit_row_backend(text):
    # Backends declare the kinds they select (Support.kinds): the reason names the kind.
    kind = as_pattern(text).kind
    with pytest.raises(nxm.BackendNotSupported, match=f"handles row/transposable patterns, not the {kind} pattern"):
        nxm.nm_mask(torch.randn(4, 4), text, backend="native")
    assert torch.equal(nxm.nm_mask(torch.randn(4, 4), text, backend="reference").sum(-1).sum(), torch.tensor(8))


# ------------------------------------------------------------------ training with every kind


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _train(model, sparsifier, steps, lr=0.05):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y) + sparsifier.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()


def test_admm_with_2_4t_ends_with_w_and_its_transpose_exactly_2_4():
    from nxm_kernels.training import ADMMSparsifier, geometric_rho

    model = _tiny_model()
    admm = ADMMSparsifier(model, "2:4t", rho=1e-2, rho_schedule=geometric_rho(1000.0, 150), update_every=4,
                          include=["2", "4"])
    _train(model, admm, 200)
    assert admm.residual()["primal"] < 1e-3
    admm.finalize()
    for module in admm.targets.values():
        w = module.weight.detach()
        assert nxm.is_nm_sparse(w, "2:4") and nxm.is_nm_sparse(w.T.contiguous(), "2:4") and nxm.is_nm_sparse(w, "2:4t")
        assert int((w != 0).sum()) == w.numel() // 2


@pytest.mark.parametrize("text", ["2:4t", "8:4x4", str(library_4x4())])
@pytest.mark.parametrize("method", ["magnitude", "srste"])
def test_magnitude_and_srste_train_every_kind(text, method):
    from nxm_kernels.training import MagnitudePruner, SRSTESparsifier

    model = _tiny_model()
    make = MagnitudePruner if method == "magnitude" else SRSTESparsifier
    sparsifier = make(model, text, include=["2", "4"])
    _train(model, sparsifier, 5)
    sparsifier.finalize()
    _train(model, sparsifier, 3)
    for module in sparsifier.targets.values():
        w = module.weight.detach()
        assert nxm.is_nm_sparse(w, text) and int((w != 0).sum()) == w.numel() // 2


def test_admm_then_hard_prune_then_srste_retrain_keeps_the_kind():
    """The seed's recipe as a composition: ADMM, hard prune (finalize), release the fixed masks,
    then SR-STE retrains on the same layers (their marks carry the pattern)."""
    from nxm_kernels.training import ADMMSparsifier, SRSTESparsifier, geometric_rho

    model = _tiny_model()
    admm = ADMMSparsifier(model, "8:4x4", rho=1e-2, rho_schedule=geometric_rho(100.0, 40), update_every=4,
                          include=["2", "4"])
    _train(model, admm, 40)
    admm.finalize().remove()
    srste = SRSTESparsifier(model, "8:4x4")  # the marked layers, no include= needed
    assert list(srste.targets) == ["2", "4"]
    _train(model, srste, 20)
    srste.finalize()
    for module in srste.targets.values():
        assert nxm.is_nm_sparse(module.weight.detach(), "8:4x4")
