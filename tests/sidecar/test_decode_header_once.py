"""The original's header is parsed once: the fetch's checked header goes to the decode.

The decode takes the fetch's ``Header`` only for the very bytes it was read from and only when
it was checked against limits at least as strict as the decode's; anything else is read and
checked again, so no limit is weaker for it. Parses are counted with a spy on
``sidecar.decode.open_header`` (libvips' lazy open, what a header parse is).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pyvips

from sidecar import decode as decode_module
from sidecar.decode import decode, read_header
from sidecar.errors import InputTooLarge, TooManyPixels
from sidecar.settings import SourceSettings
from sidecar.sources import FolderSource, Original

BIG = 10_000_000


def _jpeg(width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return bytes(pyvips.Image.new_from_array(pixels).jpegsave_buffer(Q=85))


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many times the decode module opened a header."""
    count: list[int] = []
    real = decode_module.open_header

    def counted(data: bytes) -> pyvips.Image:
        count.append(1)
        return real(data)

    monkeypatch.setattr(decode_module, "open_header", counted)
    yield count


def test_the_fetchs_header_is_not_parsed_again(parses: list[int]) -> None:
    data = _jpeg()
    header = read_header(data, max_bytes=BIG, max_pixels=BIG)
    assert len(parses) == 1
    with_header = decode(data, max_bytes=BIG, max_pixels=BIG, header=header)
    assert len(parses) == 1  # the decode took the fetch's
    alone = decode(data, max_bytes=BIG, max_pixels=BIG)
    assert len(parses) == 2
    assert np.array_equal(with_header.pixels, alone.pixels)
    assert (with_header.width, with_header.height, with_header.format) == (640, 480, "jpeg")


def test_a_header_of_other_bytes_is_read_again(parses: list[int]) -> None:
    data = _jpeg()
    header = read_header(data, max_bytes=BIG, max_pixels=BIG)
    other = bytes(bytearray(data))  # equal bytes, another object: not what was checked
    assert other is not data
    decode(other, max_bytes=BIG, max_pixels=BIG, header=header)
    assert len(parses) == 2


def test_a_header_checked_against_looser_limits_does_not_loosen_them() -> None:
    data = _jpeg(640, 480)
    loose = read_header(data, max_bytes=BIG, max_pixels=BIG)
    with pytest.raises(TooManyPixels):
        decode(data, max_bytes=BIG, max_pixels=640 * 480 - 1, header=loose)
    with pytest.raises(InputTooLarge):
        decode(data, max_bytes=len(data) - 1, max_pixels=BIG, header=loose)
    # Stricter limits at the fetch than at the decode: what passed them passes the decode's.
    strict = read_header(data, max_bytes=len(data), max_pixels=640 * 480)
    assert strict.holds_for(data, BIG, BIG)
    assert not loose.holds_for(data, BIG, 640 * 480 - 1)


def test_the_folder_source_hands_its_checked_header_on(tmp_path: Path) -> None:
    data = _jpeg(300, 200)
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "big.jpg").write_bytes(_jpeg(400, 400))
    settings = SourceSettings(root=str(tmp_path), max_pixels=300 * 300)

    async def fetch(name: str) -> Original:
        source = FolderSource(settings)
        try:
            return await source.fetch(name)
        finally:
            await source.close()

    original = asyncio.run(fetch("a.jpg"))
    assert original.size == (300, 200)
    assert original.header is not None
    assert original.header.holds_for(original.data, settings.max_bytes, settings.max_pixels)
    # Over the pixel limit: no header to hand on, and the decode refuses it as before.
    refused = asyncio.run(fetch("big.jpg"))
    assert refused.header is None and refused.size is None
    with pytest.raises(TooManyPixels):
        decode(refused.data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
