import pytest

from sidecar.errors import BadSize
from sidecar.sizes import parse_size


def test_parse_plain():
    size = parse_size("400x300")
    assert (size.width, size.height, size.crops) == (400, 300, True)
    assert size.aspect == pytest.approx(4 / 3)
    assert str(size) == "400x300"


@pytest.mark.parametrize("text", ["0x300", "400x0"])
def test_zero_side_keeps_aspect(text):
    assert not parse_size(text).crops


@pytest.mark.parametrize(
    "text",
    ["0x0", "-1x300", "400x-3", "100000x100", "400", "x300", "400x300x2", "ax b", "", "4e2x3"],
)
def test_absurd_sizes_are_400(text):
    with pytest.raises(BadSize) as info:
        parse_size(text)
    assert info.value.status == 400
    assert not info.value.fallback


def test_limits_and_allow_list():
    with pytest.raises(BadSize):
        parse_size("5000x10", max_width=4000)
    assert parse_size("400x300", allowed=("400x300",)).width == 400
    with pytest.raises(BadSize, match="not allowed"):
        parse_size("401x300", allowed=("400x300",))


@pytest.mark.parametrize("text", ["4000x1", "1x4000", "3001x3"])
def test_aspects_the_search_refuses_are_400_before_any_work(text):
    with pytest.raises(BadSize, match="aspect") as info:
        parse_size(text)
    assert info.value.public_message == "aspect ratio out of range"


@pytest.mark.parametrize("text", ["1000x1", "1x1000", "4000x0", "0x4000"])
def test_extreme_but_searchable_sizes_pass(text):
    assert parse_size(text).width == int(text.split("x")[0])


# Arabic-Indic, extended Arabic-Indic, fullwidth and Devanagari digits: int() reads them all.
@pytest.mark.parametrize("text", ["٤٠٠x٣٠٠", "۴۰۰x۳۰۰", "４００x３００", "४००x३००", "4٠0x300"])
def test_sizes_are_ascii_digits_only(text):
    with pytest.raises(BadSize) as info:
        parse_size(text)
    assert info.value.public_message == "size must be WxH"
