"""Decode an original straight to a model input bucket with pyvips, refusing bad input early.

Order of checks, cheapest first, so hostile input costs next to nothing:
  1. byte count (``InputTooLarge``), empty body (``NotAnImage``);
  2. format sniffed from the magic bytes by libvips, before any parser runs: no loader at all is
     ``NotAnImage``, a loader outside our allow-list (SVG here) is ``UnsupportedFormat``;
  3. the header only (libvips opens images lazily): a header that does not parse is
     ``CorruptImage``, width × height over the limit is ``TooManyPixels`` — a 30000×30000
     "bomb" is refused here without a pixel being decoded;
  4. the pixels, from engines/pixels.py (the pipeline the TensorRT builder's calibrator shares):
     a plain JPEG at libjpeg's DCT scaling and resized, anything else ``thumbnail_buffer`` to
     the bucket size (WebP and HEIF scale-on-load), EXIF orientation applied, colour converted
     to sRGB. Its libvips facts
     (``fail_on``, colour profiles, alpha) are listed there; every libvips failure on the way
     is mapped onto a typed error here.

Steps 1-3 run once per original: the fetch runs them (``read_header``, for the size limits
and the size cached records must match, sidecar/sources.py) and hands the checked ``Header`` to
the decode, which takes it instead of parsing again when it was read from the very bytes it
is given and checked against limits at least as strict as its own; otherwise it reads it.

Facts about pyvips 3.2 / libvips 8.18 this relies on (each is checked in tests/test_decode.py):
  - Ultra HDR JPEGs are claimed by the ``uhdrload`` loader, which gives the SDR base image; they
    are JPEGs to everyone else, so they report format "jpeg".
  - This build's libheif decodes AV1 (AVIF) but has no HEVC decoder: an iPhone HEIC is
    recognised and its header reads, but decoding fails; that is ``UnsupportedFormat``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pyvips

from engines.buckets import bucket_for
from engines.pixels import WrongSize, model_pixels, open_header
from engines.pixels import needs_colour_transform as needs_colour_transform
from kernels.window import MAX_SIDE
from sidecar.errors import (
    CorruptImage,
    HeatcropError,
    InputTooLarge,
    NotAnImage,
    TooManyPixels,
    UnsupportedFormat,
)

# libvips loader nickname → the format we report. Anything else libvips can open (SVG, and in
# other builds PDF, ImageMagick, matrix, CSV, FITS ...) is refused: each loader is attack surface
# and none is a photo format the legacy server is expected to crop.
ACCEPTED_LOADERS: dict[str, str] = {
    "jpegload_buffer": "jpeg",
    "uhdrload_buffer": "jpeg",
    "pngload_buffer": "png",
    "webpload_buffer": "webp",
    "heifload_buffer": "heif",
    "gifload_buffer": "gif",
    "tiffload_buffer": "tiff",
}

# Orientations 5-8 are the transposing ones: the displayed image is the stored one on its side.
_TRANSPOSING = frozenset((5, 6, 7, 8))
# How libheif says it has no decoder for the file's codec (HEVC in this build): the bundled
# libheif prints "Support for this compression format has not been built in"; the other two are
# its wordings for the same condition in other libheif versions.
_HEIF_NO_CODEC = ("has not been built in", "No matching decoder", "Unsupported codec")

T = TypeVar("T")


@dataclass(frozen=True)
class Decoded:
    """An original, resized (squashed) to exactly its model bucket.

    pixels: uint8 [H, W, 3] sRGB, C-contiguous, (H, W) == bucket_for(width, height) unless an
        explicit bucket was asked for.
    width, height: the original's size in display orientation (after EXIF rotation); crop
        boxes are in these coordinates.
    format: "jpeg", "png", "webp", "heif", "gif" or "tiff".
    """

    pixels: npt.NDArray[np.uint8]
    width: int
    height: int
    format: str


@dataclass(frozen=True, eq=False)
class Header:
    """An original's header, opened lazily (``open_header``) and checked (steps 1-3 above)
    against ``max_bytes`` and ``max_pixels``; width and height in display orientation."""

    data: bytes = field(repr=False)  # the bytes it was read from: the same object, not a copy
    image: pyvips.Image = field(repr=False)
    width: int
    height: int
    format: str
    max_bytes: int
    max_pixels: int

    def holds_for(self, data: bytes, max_bytes: int, max_pixels: int) -> bool:
        """Whether it is the header of ``data`` and passed limits no looser than these."""
        return self.data is data and self.max_bytes <= max_bytes and self.max_pixels <= max_pixels


def configure_vips(concurrency: int = 1, cache_max: int = 0) -> None:
    """Process-wide libvips policy for the service; call once at start-up.

    concurrency: worker threads per libvips pipeline. The service decodes in its own pool
        (server.decode_threads), so parallelism comes from there; libvips' default (one thread
        per core in every pipeline) would multiply into cores² threads fighting over the cores,
        and a shrink-on-load JPEG is mostly serial entropy decoding anyway.
    cache_max: operations kept in libvips' operation cache. Every request brings a new original,
        so the cache would almost never hit, while each entry pins decoded pixels and the source
        buffer (default: up to 100 MB); 0 turns it off.
    Untrusted loaders (ImageMagick, PDF, and in libvips 8.18 also SVG) are blocked as a second
    wall behind the allow-list; after this an SVG is no longer recognised at all (NotAnImage
    instead of UnsupportedFormat). Both are 415 here, but at /crop they differ: NotAnImage is a
    415 while UnsupportedFormat falls back to the legacy crop; ``make_app`` calls this, so every
    app (``serve`` or a test's) answers an SVG with 415.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    pyvips.concurrency_set(concurrency)
    pyvips.cache_set_max(cache_max)
    pyvips.cache_set_max_files(0)
    if cache_max == 0:
        pyvips.cache_set_max_mem(0)
    pyvips.block_untrusted_set(True)


def probe(data: bytes, *, max_bytes: int, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, format) of an original from its header alone, display orientation."""
    header = read_header(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return header.width, header.height, header.format


def read_header(data: bytes, *, max_bytes: int, max_pixels: int) -> Header:
    """``data``'s header, checked against the limits (steps 1-3 above); typed errors only."""
    image, width, height, fmt = _checked_header(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return Header(data, image, width, height, fmt, max_bytes, max_pixels)


def decode(
    data: bytes, *, max_bytes: int, max_pixels: int, header: Header | None = None
) -> Decoded:
    """Decode an original to its model bucket (see ``bucket_for``); typed errors only.
    ``header``: ``read_header(data)`` when the caller has it (read again if it does not hold
    for these bytes and limits)."""
    return decode_to(data, None, max_bytes=max_bytes, max_pixels=max_pixels, header=header)


def decode_to(
    data: bytes,
    bucket: tuple[int, int] | None = None,
    *,
    max_bytes: int,
    max_pixels: int,
    header: Header | None = None,
) -> Decoded:
    """Decode an original to ``bucket`` = (height, width), or to its own bucket when None."""
    if header is None or not header.holds_for(data, max_bytes, max_pixels):
        header = read_header(data, max_bytes=max_bytes, max_pixels=max_pixels)
    target = bucket_for(header.width, header.height) if bucket is None else bucket
    if target[0] <= 0 or target[1] <= 0:
        raise ValueError(f"bucket must be positive, got {target}")
    image = header.image
    pixels = _guarded(lambda: model_pixels(data, image, target), header.format)
    return Decoded(pixels=pixels, width=header.width, height=header.height, format=header.format)


def display_pixels(data: bytes, width: int, height: int) -> npt.NDArray[np.uint8]:
    """The original as the decoder sees it, at ``width`` x ``height`` (its display size, or
    that scaled): upright, in sRGB as ``decode`` converts it, 3 bands, alpha on white; uint8
    [height, width, 3]. The debug pictures draw on it, so they show what the model was given.

    No byte or pixel limits: for an original that ``decode`` has taken already.
    """
    fmt = _guarded(lambda: sniff_format(data), None)
    header = _guarded(lambda: open_header(data), fmt)
    return _guarded(lambda: model_pixels(data, header, (height, width)), fmt)


def sniff_format(data: bytes) -> str:
    """Our format name for ``data`` from its magic bytes, or a typed error; parses nothing."""
    pointer = pyvips.vips_lib.vips_foreign_find_load_buffer(data, len(data))
    if pointer == pyvips.ffi.NULL:
        # libvips leaves "not in a known format" in its error buffer; pyvips would prepend it to
        # the next, unrelated pyvips.Error message.
        pyvips.vips_lib.vips_error_clear()
        raise NotAnImage("no image loader recognises the data")
    class_name = pyvips.ffi.string(pointer).decode()
    loader = pyvips.nickname_find(pyvips.type_from_name(class_name))
    fmt = ACCEPTED_LOADERS.get(loader)
    if fmt is None:
        raise UnsupportedFormat(f"format {loader.removesuffix('_buffer')!r} is not accepted")
    return fmt


def _checked_header(
    data: bytes, *, max_bytes: int, max_pixels: int
) -> tuple[pyvips.Image, int, int, str]:
    if not data:
        raise NotAnImage("empty body")
    if len(data) > max_bytes:
        raise InputTooLarge(f"{len(data)} bytes > limit {max_bytes}")
    fmt = _guarded(lambda: sniff_format(data), None)
    # Lazy open: libvips reads the header here and decodes nothing until pixels are asked for.
    image = _guarded(lambda: open_header(data), fmt)
    width, height = _display_size(image)
    if width <= 0 or height <= 0:
        raise CorruptImage(f"header gives an empty {width}x{height} image")
    if width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
    if max(width, height) > MAX_SIDE:
        # A 1,200,000 x 1 strip passes the pixel limit, but neither the window search nor the
        # heatmap record takes a side that long: refuse it before decoding, not after the CNN.
        raise TooManyPixels(f"{width}x{height}: a side over {MAX_SIDE} pixels")
    return image, width, height, fmt


def _display_size(image: pyvips.Image) -> tuple[int, int]:
    orientation = image.get("orientation") if image.get_typeof("orientation") else 1
    if orientation in _TRANSPOSING:
        return image.height, image.width
    return image.width, image.height


def _guarded(step: Callable[[], T], fmt: str | None) -> T:
    """Run a libvips step, turning every failure into a HeatcropError subclass."""
    try:
        return step()
    except HeatcropError:
        raise
    except pyvips.Error as exc:
        raise _vips_error(exc, fmt) from exc
    except WrongSize as exc:
        raise CorruptImage(f"{fmt} {exc}") from exc
    except Exception as exc:
        # Not the image's fault as far as we know; 500 with fallback keeps the page working.
        raise HeatcropError(f"decoder failed unexpectedly: {exc!r}") from exc


def _vips_error(exc: pyvips.Error, fmt: str | None) -> HeatcropError:
    detail = " ".join(str(exc).split())
    if fmt == "heif" and any(sign in detail for sign in _HEIF_NO_CODEC):
        return UnsupportedFormat(f"heif: {detail}")
    if fmt is None:
        return NotAnImage(detail)
    return CorruptImage(f"{fmt}: {detail}")
