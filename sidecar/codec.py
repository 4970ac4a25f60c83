"""Compact binary encodings of what the caches hold: analyses (heatmaps) and boxes.

Cache content can come back from Redis, which other processes write to: it is not trusted.
So no pickle (unpickling runs code), and every length, size and number is checked before it
is used; anything malformed raises ``CodecError`` and nothing else. A CRC32 trailer catches
accidental damage (a flipped bit would otherwise decode as a slightly different, wrong heatmap);
it is no defence against a hostile writer, which is what the field checks are for.

Layouts (little-endian):

analysis: b"HCAN" | u8 version | u32 width | u32 height | f64 food_mass | u8 n | model_version
          (n bytes UTF-8) | u8 channels | u8 h | u8 w | channels*h*w float16 |
          (version >= 2) u16 f | f*5 float32 faces (x0, y0, x1, y1, score) |
          (version 3) 16 bytes key digest | u32 crc32
          Versions 1 (no faces) and 2 (no key digest) are still read.
box:      b"HCBX" | u8 version | u32 x0 | u32 y0 | u32 x1 | u32 y1 | f64 confidence | u16 n |
          path (n bytes UTF-8) | (version 2) 16 bytes key digest | u32 crc32
          Version 1 (no key digest) is still read.

The key digest (BLAKE2b-128 of the cache key the record was written under) ties a record to its
key: one read under another key (copied, or a bug in whoever wrote it) is refused when the reader
names its key. Records of the older versions carry none and are read without that check (their
other checks in sidecar/records.py still apply), so a new sidecar keeps the caches filled by an
older one.

``Analysis.timings_ms`` is not stored: it describes one computation, not the original.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sidecar.core import Analysis

ANALYSIS_MAGIC = b"HCAN"
BOX_MAGIC = b"HCBX"
# Analyses gained the faces block in version 2 and the key digest in 3; boxes the key digest
# in 2. Older versions still decode.
ANALYSIS_VERSION = 3
ANALYSIS_VERSIONS = (1, 2, 3)
BOX_VERSION = 2
BOX_VERSIONS = (1, 2)
KEY_DIGEST_BYTES = 16
MAX_FACES = 1024

MAX_SIDE = 1_000_000  # original width/height and box coordinates
MAX_MODEL_VERSION = 128  # bytes of UTF-8
MAX_CHANNELS = 8
MAX_MAP_SIDE = 64  # heatmap h and w
MAX_BOX_PATH = 1024  # bytes of UTF-8

_PREFIX = struct.Struct("<4sB")
_ANALYSIS_HEAD = struct.Struct("<IId")
_U8 = struct.Struct("<B")
_SHAPE = struct.Struct("<BBB")
_BOX_HEAD = struct.Struct("<IIIId")
_U16 = struct.Struct("<H")
_CRC = struct.Struct("<I")
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
_FACE_FIELDS = 5

# The largest encodings these decoders accept: a stored value over them is refused unread.
MAX_ANALYSIS_BYTES = (
    _PREFIX.size + _ANALYSIS_HEAD.size + _U8.size + MAX_MODEL_VERSION + _SHAPE.size
    + MAX_CHANNELS * MAX_MAP_SIDE**2 * _F16.itemsize
    + _U16.size + MAX_FACES * _FACE_FIELDS * _F32.itemsize + KEY_DIGEST_BYTES + _CRC.size
)  # fmt: skip
MAX_BOX_BYTES = (
    _PREFIX.size + _BOX_HEAD.size + _U16.size + MAX_BOX_PATH + KEY_DIGEST_BYTES + _CRC.size
)


class CodecError(ValueError):
    """Bytes that are not a valid encoding (or a value that cannot be encoded)."""


class BoxRecord(NamedTuple):
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in original pixels, x1/y1 exclusive
    confidence: float
    path: str


def key_digest(key: str) -> bytes:
    """What a record stores of the cache key it is written under."""
    raw = key.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=KEY_DIGEST_BYTES).digest()


def encode_analysis(a: Analysis, *, key: str) -> bytes:
    """``a`` as stored under cache key ``key``."""
    _check_size(a.width, a.height)
    _check_finite("food_mass", a.food_mass)
    version = _utf8(a.model_version, MAX_MODEL_VERSION, "model_version")
    maps = np.asarray(a.heatmaps)
    if maps.ndim != 3:
        raise CodecError(f"heatmaps must be [channels, h, w], got shape {maps.shape}")
    channels, h, w = maps.shape
    _check_shape(channels, h, w)
    with np.errstate(over="ignore"):  # float32 input may overflow to inf: refused next
        data = maps.astype(_F16)
    if not np.isfinite(data).all():
        raise CodecError("heatmaps hold non-finite values")
    faces = _checked_faces(np.asarray(a.faces, dtype=_F32).reshape(-1, _FACE_FIELDS))
    body = b"".join(
        (
            _PREFIX.pack(ANALYSIS_MAGIC, ANALYSIS_VERSION),
            _ANALYSIS_HEAD.pack(a.width, a.height, float(a.food_mass)),
            _U8.pack(len(version)),
            version,
            _SHAPE.pack(channels, h, w),
            data.tobytes(),
            _U16.pack(len(faces)),
            faces.tobytes(),
            key_digest(key),
        )
    )
    return body + _CRC.pack(zlib.crc32(body))


def _checked_faces(faces: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if len(faces) > MAX_FACES:
        raise CodecError(f"{len(faces)} faces, more than {MAX_FACES}")
    if not np.isfinite(faces).all():
        raise CodecError("faces hold non-finite values")
    return faces


def decode_analysis(b: bytes, key: str | None = None) -> Analysis:
    """The analysis in ``b``; with ``key``, CodecError too when it was stored under another."""
    body, version = _checked_body_version(b, ANALYSIS_MAGIC, ANALYSIS_VERSIONS)
    r = _Reader(body)
    width, height, food_mass = r.unpack(_ANALYSIS_HEAD)
    _check_size(width, height)
    _check_finite("food_mass", food_mass)
    model_version = r.text(r.unpack(_U8)[0], MAX_MODEL_VERSION, "model_version")
    channels, h, w = r.unpack(_SHAPE)
    _check_shape(channels, h, w)
    maps = _float16_maps(r.take(channels * h * w * _F16.itemsize), (channels, h, w))
    faces = np.zeros((0, _FACE_FIELDS), dtype=np.float32)
    if version >= 2:
        (n,) = r.unpack(_U16)
        raw = r.take(n * _FACE_FIELDS * _F32.itemsize)
        faces = _checked_faces(np.frombuffer(raw, dtype=_F32).reshape(n, _FACE_FIELDS))
        faces = faces.astype(np.float32)
    if version >= 3:
        _check_key(r.take(KEY_DIGEST_BYTES), key)
    r.end()
    return Analysis(
        width=width,
        height=height,
        heatmaps=maps,
        food_mass=food_mass,
        model_version=model_version,
        faces=faces,
    )


def encode_box(box: tuple[int, int, int, int], confidence: float, path: str, *, key: str) -> bytes:
    """The box found for ``path``, as stored under cache key ``key``."""
    if len(box) != 4 or not all(isinstance(v, int | np.integer) for v in box):
        raise CodecError(f"box must be four integers, got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    _check_box(x0, y0, x1, y1)
    _check_finite("confidence", confidence)
    raw_path = _utf8(path, MAX_BOX_PATH, "path")
    body = b"".join(
        (
            _PREFIX.pack(BOX_MAGIC, BOX_VERSION),
            _BOX_HEAD.pack(x0, y0, x1, y1, float(confidence)),
            _U16.pack(len(raw_path)),
            raw_path,
            key_digest(key),
        )
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_box(b: bytes, key: str | None = None) -> BoxRecord:
    """The box in ``b``; with ``key``, CodecError too when it was stored under another."""
    body, version = _checked_body_version(b, BOX_MAGIC, BOX_VERSIONS)
    r = _Reader(body)
    x0, y0, x1, y1, confidence = r.unpack(_BOX_HEAD)
    _check_box(x0, y0, x1, y1)
    _check_finite("confidence", confidence)
    path = r.text(r.unpack(_U16)[0], MAX_BOX_PATH, "path")
    if version >= 2:
        _check_key(r.take(KEY_DIGEST_BYTES), key)
    r.end()
    return BoxRecord((x0, y0, x1, y1), confidence, path)


class _Reader:
    """A cursor over a body whose every read is bounds-checked."""

    def __init__(self, body: memoryview) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n > len(self.body) - self.pos:
            raise CodecError(f"truncated: need {n} bytes at offset {self.pos}")
        out = self.body[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def text(self, n: int, limit: int, name: str) -> str:
        if n > limit:
            raise CodecError(f"{name} is {n} bytes, over {limit}")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"{name} is not UTF-8") from exc

    def end(self) -> None:
        if self.pos != len(self.body):
            raise CodecError(f"{len(self.body) - self.pos} trailing bytes")


def _checked_body_version(
    b: bytes, magic: bytes, versions: tuple[int, ...]
) -> tuple[memoryview, int]:
    """The bytes between prefix and checksum, and the version, once type, magic, version and
    CRC are right."""
    if not isinstance(b, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(b).__name__}")
    view = memoryview(b).cast("B")
    if len(view) < _PREFIX.size + _CRC.size:
        raise CodecError(f"truncated: {len(view)} bytes")
    found, version = _PREFIX.unpack(view[: _PREFIX.size])
    if found != magic:
        raise CodecError(f"bad magic {bytes(found)!r}, expected {magic!r}")
    if version not in versions:
        raise CodecError(f"unsupported version {version}")
    (crc,) = _CRC.unpack(view[-_CRC.size :])
    if zlib.crc32(view[: -_CRC.size]) != crc:
        raise CodecError("checksum mismatch")
    return view[_PREFIX.size : -_CRC.size], version


def _float16_maps(raw: memoryview, shape: tuple[int, int, int]) -> npt.NDArray[np.float16]:
    # A copy, so the array owns writable memory instead of pinning the cache's bytes.
    maps = np.frombuffer(raw, dtype=_F16).reshape(shape).astype(np.float16)
    if not np.isfinite(maps).all():
        raise CodecError("heatmaps hold non-finite values")
    return maps


def _check_key(digest: memoryview, key: str | None) -> None:
    if key is not None and bytes(digest) != key_digest(key):
        raise CodecError("stored under another key")


def _check_size(width: object, height: object) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int | np.integer) or not 1 <= v <= MAX_SIDE:
            raise CodecError(f"{name} {v!r} not in [1, {MAX_SIDE}]")


def _check_shape(channels: int, h: int, w: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise CodecError(f"channels {channels} not in [1, {MAX_CHANNELS}]")
    if not (1 <= h <= MAX_MAP_SIDE and 1 <= w <= MAX_MAP_SIDE):
        raise CodecError(f"heatmap {h}x{w} not within 1..{MAX_MAP_SIDE}")


def _check_box(x0: int, y0: int, x1: int, y1: int) -> None:
    if not (0 <= x0 < x1 <= MAX_SIDE and 0 <= y0 < y1 <= MAX_SIDE):
        raise CodecError(f"box {(x0, y0, x1, y1)} is empty or out of [0, {MAX_SIDE}]")


def _check_finite(name: str, v: object) -> None:
    if not isinstance(v, int | float | np.floating | np.integer) or not math.isfinite(v):
        raise CodecError(f"{name} {v!r} is not a finite number")


def _utf8(text: object, limit: int, name: str) -> bytes:
    if not isinstance(text, str):
        raise CodecError(f"{name} must be str, got {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise CodecError(f"{name} is not encodable as UTF-8") from exc
    if len(raw) > limit:
        raise CodecError(f"{name} is {len(raw)} bytes, over {limit}")
    return raw
