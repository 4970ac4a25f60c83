"""Binary encodings of cached analyses and boxes: round trips, and hostile bytes refused."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest

from sidecar.codec import (
    MAX_ANALYSIS_BYTES,
    MAX_BOX_BYTES,
    BoxRecord,
    CodecError,
    decode_analysis,
    decode_box,
    encode_analysis,
    encode_box,
)
from sidecar.core import Analysis

T = TypeVar("T")

KEY = "0123456789abcdef0123456789abcdef01234567:4x3:search1"


def analysis(
    shape: tuple[int, int, int] = (2, 7, 14),
    width: int = 1600,
    height: int = 1067,
    food_mass: float = 0.8125,
    model_version: str = "lite0-cam-3f2a9c",
    seed: int = 0,
) -> Analysis:
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 4, size=shape).astype(np.float16)
    return Analysis(
        width=width,
        height=height,
        heatmaps=maps,
        food_mass=food_mass,
        model_version=model_version,
        timings_ms={"infer": 7.0},
    )


def assert_same(a: Analysis, b: Analysis) -> None:
    assert (b.width, b.height, b.food_mass, b.model_version) == (
        a.width,
        a.height,
        a.food_mass,
        a.model_version,
    )
    assert b.heatmaps.dtype == np.float16
    assert b.heatmaps.shape == a.heatmaps.shape
    np.testing.assert_array_equal(b.heatmaps, a.heatmaps)


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def raw_analysis(
    width: int = 10,
    height: int = 10,
    food_mass: float = 0.5,
    version: bytes = b"v",
    version_len: int | None = None,
    shape: tuple[int, int, int] = (2, 3, 4),
    data: bytes | None = None,
    magic: bytes = b"HCAN",
    codec_version: int = 1,
) -> bytes:
    """An analysis blob with a correct checksum and whatever fields a hostile writer chose."""
    c, h, w = shape
    if data is None:
        data = np.ones(c * h * w, dtype="<f2").tobytes()
    body = (
        magic
        + bytes([codec_version])
        + struct.pack("<IId", width, height, food_mass)
        + bytes([len(version) if version_len is None else version_len])
        + version
        + bytes(shape)
        + data
    )
    return with_crc(body)


def decode_or_none(decode: Callable[[bytes], T], blob: bytes) -> T | None:
    """The decoded value, or None for CodecError; any other exception fails the test."""
    try:
        return decode(blob)
    except CodecError:
        return None


def raw_box(
    box: tuple[int, int, int, int] = (0, 0, 10, 10),
    confidence: float = 0.5,
    path: bytes = b"smart",
    path_len: int | None = None,
) -> bytes:
    """A version 1 box blob (no key digest) with whatever fields a hostile writer chose."""
    body = (
        b"HCBX\x01"
        + struct.pack("<IIIId", *box, confidence)
        + struct.pack("<H", len(path) if path_len is None else path_len)
        + path
    )
    return with_crc(body)


# -- analyses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shape": (1, 1, 1), "width": 1, "height": 1, "food_mass": 0.0, "model_version": ""},
        {"shape": (8, 64, 64), "width": 1_000_000, "height": 1_000_000},
        {"model_version": "é" * 64},  # 128 bytes of UTF-8: the limit
        {"food_mass": -1e300},
    ],
)
def test_analysis_round_trip(kw):
    a = analysis(**kw)
    b = decode_analysis(encode_analysis(a, key=KEY))
    assert_same(a, b)
    assert b.timings_ms == {}  # per-computation timings are not cached


def test_analysis_is_compact():
    a = analysis(shape=(2, 7, 14), model_version="x" * 16)
    # 4 magic + 1 version + 16 header + 1 + 16 version + 3 shape + 392 data + 2 faces
    # + 16 key digest + 4 crc
    assert len(encode_analysis(a, key=KEY)) == 455


def test_analysis_faces_round_trip():
    faces = np.array([[1.5, 2.0, 30.0, 40.25, 0.99], [100.0, 5.0, 120.0, 30.0, 0.8]], np.float32)
    a = dataclasses.replace(analysis(), faces=faces)
    b = decode_analysis(encode_analysis(a, key=KEY))
    np.testing.assert_array_equal(b.faces, faces)
    assert b.faces.dtype == np.float32


def test_version_1_analyses_still_decode_without_faces():
    b = decode_analysis(raw_analysis(codec_version=1))
    assert b.faces.shape == (0, 5)


@pytest.mark.parametrize("bad", [np.full((1, 5), np.nan, np.float32), np.zeros((1025, 5))])
def test_bad_faces_are_refused(bad):
    with pytest.raises(CodecError, match="faces"):
        encode_analysis(dataclasses.replace(analysis(), faces=bad), key=KEY)


def test_decoded_analysis_serves_the_core():
    b = decode_analysis(encode_analysis(analysis(), key=KEY))
    raw = b.raw("generic")
    assert raw.dtype == np.float32
    assert raw.shape == (7, 14)
    b.heatmaps[0, 0, 0] = 1.0  # owns writable memory, not a view of the cached bytes


def test_analysis_from_float32_maps_and_numpy_ints():
    maps = np.linspace(-3, 3, 2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    a = Analysis(np.int64(640), np.int32(480), maps, np.float32(0.25), "v")  # type: ignore[arg-type]
    b = decode_analysis(encode_analysis(a, key=KEY))
    assert (b.width, b.height, b.food_mass) == (640, 480, 0.25)
    np.testing.assert_array_equal(b.heatmaps, maps.astype(np.float16))


def test_decode_accepts_bytearray_and_memoryview():
    blob = encode_analysis(analysis(), key=KEY)
    assert_same(decode_analysis(blob), decode_analysis(bytearray(blob)))
    assert_same(decode_analysis(blob), decode_analysis(memoryview(blob)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 0}, "width"),
        ({"height": 1_000_001}, "height"),
        ({"food_mass": float("nan")}, "food_mass"),
        ({"food_mass": float("inf")}, "food_mass"),
        ({"model_version": "x" * 129}, "model_version"),
        ({"model_version": "\ud800"}, "model_version"),
        ({"model_version": 3}, "model_version"),
        ({"heatmaps": np.zeros((7, 14), np.float16)}, "shape"),
        ({"heatmaps": np.zeros((9, 4, 4), np.float16)}, "channels"),
        ({"heatmaps": np.zeros((2, 65, 4), np.float16)}, "heatmap"),
        ({"heatmaps": np.zeros((2, 0, 4), np.float16)}, "heatmap"),
        ({"heatmaps": np.full((2, 3, 3), np.inf, np.float16)}, "non-finite"),
        ({"heatmaps": np.full((2, 3, 3), 1e6, np.float32)}, "non-finite"),  # f16 overflow
    ],
)
def test_encode_refuses_what_decode_would_refuse(change, message):
    a = analysis()
    fields = {**a.__dict__, **change}
    with pytest.raises(CodecError, match=message):
        encode_analysis(Analysis(**fields), key=KEY)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (raw_analysis(), None),  # the control: a well-formed blob decodes
        (raw_analysis(magic=b"HCBX"), "magic"),
        (raw_analysis(codec_version=4), "version"),
        (raw_analysis(width=0), "width"),
        (raw_analysis(height=2_000_000), "height"),
        (raw_analysis(food_mass=float("nan")), "food_mass"),
        (raw_analysis(version=b"x" * 129), "model_version"),
        (raw_analysis(version=b"\xff\xfe"), "UTF-8"),
        (raw_analysis(version_len=200), "model_version"),
        (raw_analysis(version_len=100, shape=(1, 1, 1), data=b"\0<"), "truncated"),
        (raw_analysis(shape=(9, 3, 4), data=bytes(9 * 24)), "channels"),
        (raw_analysis(shape=(0, 3, 4), data=b""), "channels"),
        (raw_analysis(shape=(2, 65, 1), data=bytes(2 * 65 * 2)), "heatmap"),
        (raw_analysis(shape=(2, 3, 0), data=b""), "heatmap"),
        (raw_analysis(data=bytes(2 * 3 * 4 * 2 - 2)), "truncated"),
        (raw_analysis(data=bytes(2 * 3 * 4 * 2 + 1)), "trailing"),
        (raw_analysis(data=np.full(24, np.nan, "<f2").tobytes()), "non-finite"),
        (raw_analysis(data=np.full(24, -np.inf, "<f2").tobytes()), "non-finite"),
    ],
)
def test_decode_checks_every_field_even_with_a_valid_checksum(blob, message):
    if message is None:
        assert decode_analysis(blob).heatmaps.shape == (2, 3, 4)
        return
    with pytest.raises(CodecError, match=message):
        decode_analysis(blob)


@pytest.mark.parametrize("value", [None, "HCAN", 12, [1, 2]])
def test_decode_refuses_non_bytes(value):
    with pytest.raises(CodecError, match="expected bytes"):
        decode_analysis(value)
    with pytest.raises(CodecError, match="expected bytes"):
        decode_box(value)


def test_every_truncation_is_refused():
    blob = encode_analysis(analysis(shape=(2, 4, 5)), key=KEY)
    for n in range(len(blob)):
        with pytest.raises(CodecError):
            decode_analysis(blob[:n])


def test_every_single_bit_flip_is_refused():
    blob = encode_analysis(analysis(shape=(2, 4, 5)), key=KEY)
    for i in range(len(blob) * 8):
        damaged = bytearray(blob)
        damaged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError):
            decode_analysis(bytes(damaged))


def test_random_bytes_raise_only_codec_error():
    rng = np.random.default_rng(1)
    good = encode_analysis(analysis(), key=KEY)
    for trial in range(3000):
        n = int(rng.integers(0, 600))
        blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if trial % 3 == 1:  # keep the magic and version: gets past the first checks
            blob = good[:5] + blob
        elif trial % 3 == 2:  # and a matching checksum: exercises the field checks
            blob = with_crc(good[:5] + blob)
        try:
            decoded = decode_analysis(blob)
        except CodecError:
            continue
        # Something random may be a valid encoding; then it must be a sane one.
        assert 1 <= decoded.width <= 1_000_000
        assert np.isfinite(decoded.heatmaps).all()


def test_random_splices_of_a_valid_blob_raise_only_codec_error():
    rng = np.random.default_rng(2)
    good = encode_analysis(analysis(), key=KEY)
    for _ in range(2000):
        blob = bytearray(good)
        for _ in range(int(rng.integers(1, 8))):
            blob[int(rng.integers(0, len(blob)))] = int(rng.integers(0, 256))
        body = bytes(blob[:-4])
        for candidate in (bytes(blob), with_crc(body)):
            decoded = decode_or_none(decode_analysis, candidate)
            if decoded is not None:
                assert np.isfinite(decoded.heatmaps).all()


# -- boxes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "confidence", "path"),
    [
        ((0, 0, 400, 300), 0.42, "recipes/123.jpg"),
        ((0, 0, 1, 1), -0.5, ""),
        ((999_999, 0, 1_000_000, 1_000_000), 1e-300, "smart"),
        ((10, 20, 30, 40), 0.0, "é/" * 341),  # 1023 bytes of UTF-8
    ],
)
def test_box_round_trip(box, confidence, path):
    record = decode_box(encode_box(box, confidence, path, key=KEY))
    assert record == BoxRecord(box, confidence, path)
    got_box, got_confidence, got_path = record  # unpacks as a plain triple
    assert (got_box, got_confidence, got_path) == (box, confidence, path)


def test_box_accepts_numpy_integers():
    box = tuple(np.array([1, 2, 3, 4], dtype=np.int64))
    assert decode_box(encode_box(box, np.float32(0.5), "p", key=KEY)).box == (1, 2, 3, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("box", "confidence", "path", "message"),
    [
        ((5, 0, 5, 10), 0.5, "p", "empty"),
        ((0, 7, 10, 3), 0.5, "p", "empty"),
        ((-1, 0, 10, 10), 0.5, "p", "out of"),
        ((0, 0, 1_000_001, 10), 0.5, "p", "out of"),
        ((0, 0, 10), 0.5, "p", "four integers"),
        ((0, 0, 10.0, 10), 0.5, "p", "four integers"),
        ((0, 0, 10, 10), float("nan"), "p", "confidence"),
        ((0, 0, 10, 10), "high", "p", "confidence"),
        ((0, 0, 10, 10), 0.5, "x" * 1025, "path"),
        ((0, 0, 10, 10), 0.5, b"p", "path"),
    ],
)
def test_encode_box_refuses(box, confidence, path, message):
    with pytest.raises(CodecError, match=message):
        encode_box(box, confidence, path, key=KEY)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (raw_box(box=(3, 0, 3, 10)), "empty"),
        (raw_box(box=(0, 0, 10, 1_000_001)), "out of"),
        (raw_box(confidence=float("inf")), "confidence"),
        (raw_box(path=b"\xc3"), "UTF-8"),
        (raw_box(path=b"x" * 1025), "path"),
        (raw_box(path_len=6), "truncated"),
        (raw_box(path_len=4), "trailing"),
        (encode_analysis(analysis(), key=KEY), "magic"),
    ],
)
def test_decode_box_refuses(blob, message):
    with pytest.raises(CodecError, match=message):
        decode_box(blob)


def test_box_truncations_flips_and_noise_raise_only_codec_error():
    blob = encode_box((12, 34, 560, 780), 0.37, "recipes/pasta.jpg", key=KEY)
    for n in range(len(blob)):
        with pytest.raises(CodecError):
            decode_box(blob[:n])
    for i in range(len(blob) * 8):
        damaged = bytearray(blob)
        damaged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError):
            decode_box(bytes(damaged))
    rng = np.random.default_rng(3)
    for _ in range(3000):
        noise = rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
        record = decode_or_none(decode_box, with_crc(blob[:5] + noise))
        if record is not None:  # a random valid encoding must still be a sane box
            x0, y0, x1, y1 = record.box
            assert 0 <= x0 < x1 and 0 <= y0 < y1


# -- the key a record was stored under -----------------------------------------------------


def test_a_record_read_under_another_key_is_refused():
    blob = encode_analysis(analysis(), key=KEY)
    assert_same(decode_analysis(blob, key=KEY), analysis())
    assert_same(decode_analysis(blob), analysis())  # no key named: not checked
    with pytest.raises(CodecError, match="another key"):
        decode_analysis(blob, key=KEY + "x")
    box = encode_box((0, 0, 4, 3), 0.5, "a.jpg", key=KEY)
    assert decode_box(box, key=KEY) == BoxRecord((0, 0, 4, 3), 0.5, "a.jpg")
    with pytest.raises(CodecError, match="another key"):
        decode_box(box, key="other")


def test_records_of_the_older_versions_still_decode_under_any_key():
    # Written by a sidecar before the key digest: kept readable, with the other checks.
    assert decode_analysis(raw_analysis(codec_version=1), key=KEY).width == 10
    assert decode_box(raw_box(), key=KEY) == BoxRecord((0, 0, 10, 10), 0.5, "smart")


def test_the_size_bounds_are_the_largest_records():
    faces = np.ones((1024, 5), np.float32)
    largest = dataclasses.replace(analysis(shape=(8, 64, 64), model_version="x" * 128), faces=faces)
    assert len(encode_analysis(largest, key=KEY)) == MAX_ANALYSIS_BYTES
    assert len(encode_box((0, 0, 1, 1), 0.5, "x" * 1024, key=KEY)) == MAX_BOX_BYTES
