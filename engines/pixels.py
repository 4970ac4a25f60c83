"""File bytes -> model input pixels: the one pyvips pipeline the service and the builder share.

The service's decode (limits, format allow-list, typed errors) opens the header with
``open_header`` and takes its pixels from ``model_pixels``; the TensorRT builder's INT8
calibrator calls the same two, so calibration sees exactly the pixels the service feeds the
model.

``model_pixels`` is, for a plain JPEG, libjpeg's DCT scaling to no less than the bucket and a
Lanczos-3 resize to it; for anything else ``thumbnail_buffer`` to the bucket size (JPEG
shrink-on-load, WebP and HEIF scale-on-load); EXIF orientation applied either way, then
conversion to 3-band 8-bit sRGB. Facts about pyvips 3.2 / libvips 8.18 this relies on (checked
in tests/sidecar/test_decode.py):
  - ``thumbnail_buffer(..., fail_on=...)`` does not reach the loader; only
    ``option_string="fail_on=error"`` does. Without it a truncated JPEG or PNG decodes "fine",
    the missing part grey or black. With it, truncation surfaces as a ``pyvips.Error`` when the
    pixels are read (not at the call), so callers must treat the whole of ``model_pixels`` as
    the decode. ``fail_on="warning"`` would also reject the many real JPEGs with harmless
    libjpeg warnings; the price is that a JPEG whose end marker comes before its scan is
    complete (libjpeg: "premature end of data segment", a warning) decodes with the missing
    part grey.
  - Without ``export_profile`` the thumbnail keeps an embedded RGB profile's numbers (a Display
    P3 red stays (234, 51, 35)); with ``export_profile="srgb"`` it converts them. That costs
    ~11 ms a call on an untagged 1600×1067 JPEG on one thread (~3.5 ms on a P3-tagged one),
    twice the whole ~6 ms shrink-on-load decode, so it is asked for only when the embedded
    profile is not sRGB (``needs_colour_transform``).
    Untagged images are taken as sRGB; CMYK is converted by the thumbnail either way (with the
    embedded profile, else libvips' built-in CMYK profile); 16-bit, grey and float images come
    out of the thumbnail as 8-bit and the rest is done by ``_to_rgb8``.
  - For a JPEG, the thumbnail's shrink-on-load keeps a factor of 2 for its final resize: a
    1024x576 photo for a 384x224 bucket is decoded at full size. So a plain JPEG (3-band or
    grey, no profile that needs a colour transform) is loaded here at the largest libjpeg DCT
    shrink that keeps the bucket's size, and the rest resized with the thumbnail's Lanczos-3
    (``_jpeg_pixels``): decode 7.05 against 9.15 ms a photo (0.77x paired, 300 fcdb_dev photos
    x 2, ``python -m bench.bucket timing``), the model's prepared map r 0.9986-0.9997 against
    the thumbnail's, the headroom shares of ``python -m bench.bucket quality`` within -0.5 to
    +0.6 points (food's all-dishes count +4.8: one photo of 60 is ~5), every paired interval
    covering 0, on all five sets (bench/results/bucket.md, FP32).
    A linear last resize (0.73x) lost 1.2-1.7 points on fcdb_dev IoU and osie_train, and a
    shrink undershooting the bucket gained no time: neither is used. INT8's gaps to FP32 did
    not grow on this decode (``python -m bench.int8`` 12:22 against 09:30, bucket.md), which
    an earlier run with 8-bit weights had feared; the committed INT8 ranges are measured on it.
    Everything else (other formats, CMYK, colour-managed JPEGs, Ultra HDR) goes through the
    thumbnail.
  - The thumbnail premultiplies alpha before resampling, so a fully transparent pixel is black
    before flattening; we flatten on white, like a browser showing the image on a white page.

Failures: ``pyvips.Error`` for data libvips cannot open or decode, ``WrongSize`` if the result
is not the bucket's size; callers map them onto their own errors.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pyvips

_WHITE = 255.0
# libjpeg's DCT scalings, largest first; EXIF orientations that swap width and height.
_JPEG_SHRINKS = (8, 4, 2, 1)
_TRANSPOSING = frozenset((5, 6, 7, 8))

# sRGB's primaries as RGB ICC profiles store them (rXYZ, gXYZ, bXYZ: D50-adapted XYZ); the
# sRGB profiles in the wild (IEC 61966-2.1, sRGB2014, libvips' own) agree to ~0.0005.
_SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))
_COLORANT_TOLERANCE = 0.003


class WrongSize(ValueError):
    """The pipeline gave another size than the bucket asked for (a decoder bug or odd file)."""


def open_header(data: bytes) -> pyvips.Image:
    """``data`` opened lazily: libvips reads the header and decodes nothing until asked."""
    return pyvips.Image.new_from_buffer(data, "", access="sequential")


def model_pixels(
    data: bytes, header: pyvips.Image, bucket: tuple[int, int]
) -> npt.NDArray[np.uint8]:
    """``data`` squashed to ``bucket`` = (height, width): uint8 [H, W, 3] sRGB, C-contiguous.

    ``header`` is ``open_header(data)``: its ICC profile decides whether colour is converted.
    """
    height, width = bucket
    managed = needs_colour_transform(header)  # parses the ICC profile: once
    if plain_jpeg(header, managed):
        image, _ = jpeg_pixels(data, header, bucket)
    else:
        colour = {"export_profile": "srgb"} if managed else {}
        image = pyvips.Image.thumbnail_buffer(
            data,
            width,
            height=height,
            size="force",
            option_string="fail_on=error",
            **colour,
        )
    image = _to_rgb8(image)
    if (image.height, image.width) != bucket:
        raise WrongSize(f"decoded to {image.width}x{image.height}, wanted {bucket}")
    # numpy() evaluates the whole pipeline: truncation and decode errors are raised here.
    return np.ascontiguousarray(image.numpy(), dtype=np.uint8).reshape(height, width, 3)


def plain_jpeg(header: pyvips.Image, managed: bool) -> bool:
    """A JPEG whose pixels need no colour management (``managed``: needs_colour_transform of
    the header): RGB or grey, sRGB or untagged."""
    return header.get("vips-loader") == "jpegload_buffer" and header.bands in (1, 3) and not managed


def jpeg_pixels(
    data: bytes,
    header: pyvips.Image,
    bucket: tuple[int, int],
    *,
    floor: float = 1.0,
    kernel: str = "lanczos3",
) -> tuple[pyvips.Image, int]:
    """A plain JPEG at the largest DCT shrink that keeps ``floor`` x ``bucket``, resized to it
    with ``kernel``, upright; and the shrink. The service runs the defaults; bench.bucket
    measures the others."""
    height, width = bucket
    orientation = header.get("orientation") if header.get_typeof("orientation") else 1
    # The target in the file's stored orientation; turned upright after the resize (small).
    stored_h, stored_w = (width, height) if orientation in _TRANSPOSING else (height, width)
    shrink = next(
        (
            s
            for s in _JPEG_SHRINKS
            if -(-header.width // s) >= floor * stored_w
            and -(-header.height // s) >= floor * stored_h
        ),
        1,
    )
    # fail_on reaches the loader when it is called by name (the thumbnail needs option_string).
    image = pyvips.Image.jpegload_buffer(data, shrink=shrink, fail_on="error", access="sequential")
    image = image.resize(stored_w / image.width, vscale=stored_h / image.height, kernel=kernel)
    if orientation != 1:
        # A rotation reads its input out of order: from memory, not the sequential load.
        image = image.copy_memory().autorot()
    return image, shrink


def needs_colour_transform(header: pyvips.Image) -> bool:
    """Whether the embedded ICC profile would change the pixel numbers on the way to sRGB."""
    if not header.get_typeof("icc-profile-data"):
        return False
    colorants = _rgb_colorants(bytes(header.get("icc-profile-data")))
    if colorants is None:
        return True
    return any(
        abs(got - want) > _COLORANT_TOLERANCE
        for xyz, srgb in zip(colorants, _SRGB_COLORANTS, strict=True)
        for got, want in zip(xyz, srgb, strict=True)
    )


def _rgb_colorants(profile: bytes) -> list[tuple[float, ...]] | None:
    """rXYZ, gXYZ, bXYZ of an RGB matrix profile; None for anything else or anything odd."""
    if len(profile) < 132 or profile[16:20] != b"RGB ":
        return None
    count = min(int.from_bytes(profile[128:132]), (len(profile) - 132) // 12)
    offsets = {}
    for entry in range(132, 132 + 12 * count, 12):
        offsets[profile[entry : entry + 4]] = int.from_bytes(profile[entry + 4 : entry + 8])
    colorants = []
    for tag in (b"rXYZ", b"gXYZ", b"bXYZ"):
        at = offsets.get(tag)
        if at is None or at + 20 > len(profile) or profile[at : at + 4] != b"XYZ ":
            return None
        colorants.append(tuple(v / 65536 for v in struct.unpack_from(">3i", profile, at + 8)))
    return colorants


def _to_rgb8(image: pyvips.Image) -> pyvips.Image:
    """Any band count / interpretation / format the thumbnail can give → 3-band uchar sRGB."""
    if image.format != "uchar" or image.interpretation not in ("srgb", "b-w"):
        # The thumbnail has usually done this already (16-bit, CMYK, float, Lab); this covers
        # what it leaves alone, e.g. extra-band TIFFs tagged "multiband".
        image = _colourspace_or_cast(image)
    colour = 1 if image.bands < 3 else 3
    if image.hasalpha():
        # libvips takes the band after the colour ones as alpha (a TIFF may carry more extra
        # bands after it); flatten() would use the last band, so cut the extras off first.
        image = image.extract_band(0, n=colour + 1).flatten(background=[_WHITE] * colour)
    if image.bands > colour:
        image = image.extract_band(0, n=colour)
    if colour == 1:
        image = image.bandjoin([image, image])
    return image.cast("uchar")


def _colourspace_or_cast(image: pyvips.Image) -> pyvips.Image:
    try:
        return image.colourspace("srgb")
    except pyvips.Error:
        # Unknown interpretation: treat the first bands as RGB and bring the range to 8 bits.
        if image.format in ("ushort", "short"):
            return image.cast("uchar", shift=True)
        return image.cast("uchar")
