import pytest

import nxm_kernels as nxm
from nxm_kernels.pattern import as_pattern


def test_parse_and_equality():
    assert nxm.Pattern.parse("2:4") == nxm.Pattern(2, 4) == as_pattern((2, 4)) == as_pattern(" 2 : 4 ")
    assert str(nxm.Pattern(1, 2)) == "1:2"


@pytest.mark.parametrize("m, bits", [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (16, 4)])
def test_index_bits(m, bits):
    assert nxm.Pattern(1, m).index_bits == bits


@pytest.mark.parametrize("n, m", [(2, 2), (3, 2), (0, 4), (1, 17), (-1, 4)])
def test_invalid_patterns(n, m):
    with pytest.raises(ValueError, match="1 <= n < m <= 16"):
        nxm.Pattern(n, m)


@pytest.mark.parametrize("text", ["2-4", "2:", "a:b", "2:4:8", ""])
def test_unparseable(text):
    with pytest.raises(ValueError, match="write it as 'n:m'"):
        nxm.Pattern.parse(text)


def test_bad_type():
    with pytest.raises(TypeError, match="Pattern, 'n:m' string or"):
        as_pattern(24)
