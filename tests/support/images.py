"""Test images made at test time with pyvips, so the repository carries no binary fixtures."""

from __future__ import annotations

import struct

import numpy as np
import pyvips

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def constant(
    width: int, height: int, values: list[float], fmt: str = "uchar", interpretation: str = "srgb"
) -> pyvips.Image:
    """One pixel value everywhere, len(values) bands, of the given format and interpretation."""
    bands = pyvips.Image.black(width, height).cast("double").new_from_image(values)
    return bands.cast(fmt).copy(interpretation=interpretation)


def solid(width: int, height: int, rgb: tuple[int, int, int] = RED) -> pyvips.Image:
    return constant(width, height, list(rgb))


def halves(
    width: int, height: int, left: tuple[int, int, int] = RED, right: tuple[int, int, int] = BLUE
) -> pyvips.Image:
    """Left half one colour, right half another: shows which way an image was turned."""
    half = width // 2
    return solid(half, height, left).join(solid(width - half, height, right), "horizontal")


def photo_like(width: int = 640, height: int = 480) -> pyvips.Image:
    """Smooth gradients plus noise: compresses like a photo, so truncation hits image data."""
    noise = pyvips.Image.gaussnoise(width, height, mean=0, sigma=25)
    ramp_x = pyvips.Image.xyz(width, height)[0] * (255 / width)
    ramp_y = pyvips.Image.xyz(width, height)[1] * (255 / height)
    rgb = ramp_x.bandjoin([ramp_y, (ramp_x + ramp_y) / 2]) + noise
    return rgb.cast("uchar").copy(interpretation="srgb")


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """A uint8 [H, W, bands] array as JPEG bytes."""
    height, width, bands = pixels.shape
    image = pyvips.Image.new_from_memory(
        np.ascontiguousarray(pixels).tobytes(), width, height, bands, "uchar"
    )
    return bytes(image.jpegsave_buffer(Q=quality))


def encode(image: pyvips.Image, suffix: str, **options: object) -> bytes:
    return bytes(image.write_to_buffer(suffix, **options))


def with_orientation(image: pyvips.Image, orientation: int) -> pyvips.Image:
    tagged = image.copy()
    tagged.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return tagged


def cmyk_jpeg(rgb: tuple[int, int, int] = RED, *, profile: bool) -> bytes:
    """A CMYK JPEG, with libvips' CMYK profile embedded or with no profile at all."""
    cmyk = solid(64, 48, rgb).icc_transform("cmyk", input_profile="srgb")
    if profile:
        return bytes(cmyk.jpegsave_buffer())
    return bytes(cmyk.jpegsave_buffer(keep="none"))


def grey(width: int, height: int, level: int, *, sixteen: bool = False) -> pyvips.Image:
    if sixteen:
        return constant(width, height, [level], "ushort", "grey16")
    return constant(width, height, [level], "uchar", "b-w")


def rgb16(width: int, height: int, rgb16_value: tuple[int, int, int]) -> pyvips.Image:
    return constant(width, height, list(rgb16_value), "ushort", "rgb16")


def rgba(width: int, height: int, rgb: tuple[int, int, int], alpha: int) -> pyvips.Image:
    return constant(width, height, [*rgb, alpha])


def animated(
    colours: list[tuple[int, int, int]], suffix: str, width: int = 40, height: int = 30
) -> bytes:
    """An animation, one solid frame per colour (GIF or WebP)."""
    frames = [solid(width, height, c) for c in colours]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", height)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * len(colours))
    return encode(strip, suffix)


def png_bomb(side: int = 30000) -> bytes:
    """A side × side PNG of one colour: ~110 KB of bytes, side² pixels once decoded."""
    return bytes(pyvips.Image.black(side, side).pngsave_buffer(bitdepth=1, compression=9))


def jpeg_bomb(side: int = 30000) -> bytes:
    """A real side × side grey JPEG (~10 MB at 30000, ~2 s to encode)."""
    return bytes(pyvips.Image.black(side, side).jpegsave_buffer(Q=10))


def jpeg_with_declared_size(width: int, height: int) -> bytes:
    """A tiny JPEG whose SOF0 header claims width × height (the cheap way to make a "bomb").

    SOF0 is FF C0, a 2-byte length, 1 byte precision, then height and width as big-endian
    16-bit numbers; libjpeg reads only this when asked for the header.
    """
    data = bytearray(encode(solid(16, 16), ".jpg", Q=90, optimize_coding=False))
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise AssertionError("libvips wrote no baseline SOF0 marker")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def jpeg_with_icc(jpeg: bytes, profile: bytes) -> bytes:
    """Insert ``profile`` as an APP2 ICC_PROFILE segment, whatever its content."""
    body = b"ICC_PROFILE\x00\x01\x01" + profile
    return jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="80">'
    b'<rect width="100" height="80" fill="red"/></svg>'
)


# --- HEIC without an HEVC decoder -----------------------------------------------------------
# This libvips build can write AVIF but has no HEVC codec at all, so a real HEIC cannot be made
# here. An AVIF rewritten to declare HEVC (item type hvc1, an hvcC config box, heic brand) is
# what an iPhone photo looks like to a loader without the codec, which is the case to test.

# A minimal HEVCDecoderConfigurationRecord (ISO/IEC 14496-15 8.3.3.1) with no parameter sets:
# version 1, Main profile, level 3.1, 4:2:0, 8 bits, 4-byte NAL lengths, zero arrays.
_HVCC_RECORD = bytes.fromhex("0101600000009000000000005df000fcfdf8f800000f00")


def heic_from_avif(avif: bytes) -> bytes:
    data = bytearray(avif)
    meta = _child(data, 0, len(data), b"meta")
    meta_body = meta[0] + 12  # meta is a full box: 4 bytes version/flags after the header
    iprp = _child(data, meta_body, meta[0] + meta[1], b"iprp")
    ipco = _child(data, iprp[0] + 8, iprp[0] + iprp[1], b"ipco")
    av1c = _child(data, ipco[0] + 8, ipco[0] + ipco[1], b"av1C")
    hvcc = struct.pack(">I4s", 8 + len(_HVCC_RECORD), b"hvcC") + _HVCC_RECORD
    delta = len(hvcc) - av1c[1]
    data[av1c[0] : av1c[0] + av1c[1]] = hvcc
    for start, size in (meta, iprp, ipco):
        struct.pack_into(">I", data, start, size + delta)
    _shift_iloc(data, meta[0], meta[1] + delta, delta)
    iinf = _child(data, meta_body, meta[0] + meta[1] + delta, b"iinf")
    item_type = data.find(b"av01", iinf[0], iinf[0] + iinf[1])
    data[item_type : item_type + 4] = b"hvc1"
    ftyp = _child(data, 0, len(data), b"ftyp")
    data[ftyp[0] : ftyp[0] + ftyp[1]] = bytes(data[ftyp[0] : ftyp[0] + ftyp[1]]).replace(
        b"avif", b"heic"
    )
    return bytes(data)


def _child(data: bytearray, start: int, end: int, kind: bytes) -> tuple[int, int]:
    """(offset, size) of the first box of ``kind`` between start and end."""
    pos = start
    while pos + 8 <= end:
        size, box = struct.unpack_from(">I4s", data, pos)
        if box == kind:
            return pos, size
        if size < 8:
            break
        pos += size
    raise AssertionError(f"no {kind!r} box")


def _shift_iloc(data: bytearray, meta_start: int, meta_size: int, delta: int) -> None:
    """Move every file-offset extent in iloc by delta (mdat follows meta, which grew)."""
    iloc, _ = _child(data, meta_start + 12, meta_start + meta_size, b"iloc")
    version = data[iloc + 8]
    pos = iloc + 12
    offset_size, length_size = data[pos] >> 4, data[pos] & 15
    base_size, index_size = data[pos + 1] >> 4, data[pos + 1] & 15
    pos += 2
    count_size = 4 if version == 2 else 2
    count = int.from_bytes(data[pos : pos + count_size])
    pos += count_size
    for _ in range(count):
        pos += count_size  # item_ID
        method = 0
        if version in (1, 2):
            method = int.from_bytes(data[pos : pos + 2]) & 15
            pos += 2
        pos += 2  # data_reference_index
        base = pos
        pos += base_size
        extents = int.from_bytes(data[pos : pos + 2])
        pos += 2
        for _ in range(extents):
            if version in (1, 2):
                pos += index_size
            if method == 0 and base_size == 0:
                _add(data, pos, offset_size, delta)
            pos += offset_size + length_size
        if method == 0 and base_size:
            _add(data, base, base_size, delta)


def _add(data: bytearray, pos: int, size: int, delta: int) -> None:
    value = int.from_bytes(data[pos : pos + size]) + delta
    data[pos : pos + size] = value.to_bytes(size)
