"""sidecar.decode: formats, orientation, colour, limits, and typed errors for any input bytes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pyvips

from engines.buckets import bucket_for
from sidecar.decode import (
    Decoded,
    configure_vips,
    decode,
    decode_to,
    needs_colour_transform,
    probe,
)
from sidecar.errors import (
    CorruptImage,
    HeatcropError,
    InputTooLarge,
    NotAnImage,
    TooManyPixels,
    UnsupportedFormat,
)
from tests.support import images

LIMITS = {"max_bytes": 30 * 1024 * 1024, "max_pixels": 100_000_000}
FCDB = Path(__file__).resolve().parents[2] / ".." / "shared" / "eval" / "fcdb_dev"

# Lossy codecs move a solid colour by a few levels; anything past this is a wrong colour.
TOL = 12


def decoded_ok(d: Decoded) -> None:
    """The invariants every Decoded must hold."""
    assert d.pixels.dtype == np.uint8
    assert d.pixels.flags["C_CONTIGUOUS"]
    assert d.pixels.shape == (*bucket_for(d.width, d.height), 3)
    assert d.format in {"jpeg", "png", "webp", "heif", "gif", "tiff"}


def centre(d: Decoded) -> np.ndarray:
    h, w, _ = d.pixels.shape
    return d.pixels[h // 2, w // 2].astype(int)


def close(pixel: np.ndarray, rgb: tuple[int, int, int], tol: int = TOL) -> bool:
    return bool(np.all(np.abs(pixel - np.array(rgb)) <= tol))


def recognised(data: bytes) -> bool:
    """Whether libvips, as configured right now, has a loader that claims ``data``."""
    return pyvips.vips_lib.vips_foreign_find_load_buffer(data, len(data)) != pyvips.ffi.NULL


# --- formats -------------------------------------------------------------------------------

FORMATS = [
    (".jpg", "jpeg"),
    (".png", "png"),
    (".webp", "webp"),
    (".gif", "gif"),
    (".tif", "tiff"),
    (".avif", "heif"),
]


@pytest.mark.parametrize(("suffix", "fmt"), FORMATS)
def test_each_format_decodes_red_to_its_bucket(suffix: str, fmt: str) -> None:
    data = images.encode(images.solid(300, 200), suffix)
    d = decode(data, **LIMITS)
    decoded_ok(d)
    assert (d.width, d.height, d.format) == (300, 200, fmt)
    assert d.pixels.shape[:2] == bucket_for(300, 200)
    assert close(centre(d), images.RED)
    assert probe(data, **LIMITS) == (300, 200, fmt)


def test_ultra_hdr_jpeg_is_a_jpeg() -> None:
    # libvips hands JPEGs carrying a gain map to its uhdr loader; the SDR base image is used.
    hdr = images.constant(64, 48, [2.0, 0.05, 0.05], "float", "scrgb")
    data = bytes(hdr.uhdrsave_buffer())
    d = decode(data, **LIMITS)
    decoded_ok(d)
    assert d.format == "jpeg"
    r, g, b = centre(d)
    assert r > 150 and g < 100 and b < 100


@pytest.mark.parametrize(
    ("width", "height"),
    [(1, 1), (100, 100), (1000, 100), (100, 1000), (1600, 1067), (1067, 1600), (4000, 100)],
)
def test_shape_is_the_bucket_of_the_original(width: int, height: int) -> None:
    d = decode(images.encode(images.solid(width, height), ".png"), **LIMITS)
    decoded_ok(d)
    assert (d.width, d.height) == (width, height)
    assert close(centre(d), images.RED, tol=0)


def test_decode_to_an_explicit_bucket() -> None:
    data = images.encode(images.halves(400, 300), ".jpg")
    d = decode_to(data, (224, 224), **LIMITS)
    assert d.pixels.shape == (224, 224, 3)
    assert (d.width, d.height) == (400, 300)
    assert close(d.pixels[112, 20].astype(int), images.RED)
    assert close(d.pixels[112, 200].astype(int), images.BLUE)
    assert decode_to(data, None, **LIMITS).pixels.shape == (*bucket_for(400, 300), 3)


# --- JPEG: DCT shrink to the bucket ----------------------------------------------------------


@pytest.fixture
def jpeg_shrinks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The DCT shrink of every JPEG load by name (the real loader runs)."""
    load = pyvips.Image.jpegload_buffer
    seen: list[int] = []

    def spied(data: bytes, **kwargs: object) -> pyvips.Image:
        seen.append(int(kwargs.get("shrink", 1)))  # type: ignore[call-overload]
        return load(data, **kwargs)

    monkeypatch.setattr(pyvips.Image, "jpegload_buffer", staticmethod(spied))
    return seen


@pytest.mark.parametrize(
    ("size", "shrink"),
    # 800x600 -> 288x224: 1/2 (400x300) keeps the bucket, where the thumbnail kept its factor
    # of 2 and decoded every pixel; 1/4 of 1600x1200, 1/8 of 2400x1800 (300x225); a photo
    # under its bucket, 1 (and upsampled).
    [((800, 600), 2), ((1600, 1200), 4), ((2400, 1800), 8), ((250, 200), 1)],
)
def test_jpeg_loads_at_the_largest_dct_shrink_that_keeps_the_bucket(
    jpeg_shrinks: list[int], size: tuple[int, int], shrink: int
) -> None:
    width, height = size
    d = decode(images.encode(images.photo_like(width, height), ".jpg"), **LIMITS)
    decoded_ok(d)
    assert jpeg_shrinks == [shrink]
    assert d.pixels.shape == (*bucket_for(width, height), 3)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_dct_shrunk_jpeg_is_turned_upright(jpeg_shrinks: list[int], orientation: int) -> None:
    stored = images.with_orientation(images.halves(1200, 800), orientation)
    d = decode(images.encode(stored, ".jpg"), **LIMITS)
    assert jpeg_shrinks == [2]
    reference = decode(
        images.encode(
            images.halves(1200, 800).rot({3: "d180", 6: "d90", 8: "d270"}[orientation]), ".jpg"
        ),
        **LIMITS,
    )
    assert (d.width, d.height) == (reference.width, reference.height)
    assert np.abs(d.pixels.astype(int) - reference.pixels.astype(int)).mean() < 2


# --- orientation ---------------------------------------------------------------------------


# Stored image: left half red, right half blue, 60 wide × 40 tall. Where red ends up on screen:
#   6 (turn 90° clockwise): top;  8 (90° anticlockwise): bottom;  3 (180°): right.
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize(
    ("orientation", "size", "red_at"),
    [
        (1, (60, 40), "left"),
        (3, (60, 40), "right"),
        (6, (40, 60), "top"),
        (8, (40, 60), "bottom"),
    ],
)
def test_exif_orientation_is_applied(
    suffix: str, orientation: int, size: tuple[int, int], red_at: str
) -> None:
    stored = images.with_orientation(images.halves(60, 40), orientation)
    data = images.encode(stored, suffix)
    assert probe(data, **LIMITS)[:2] == size
    d = decode(data, **LIMITS)
    decoded_ok(d)
    assert (d.width, d.height) == size
    h, w, _ = d.pixels.shape
    spots = {
        "left": (h // 2, w // 4),
        "right": (h // 2, 3 * w // 4),
        "top": (h // 4, w // 2),
        "bottom": (3 * h // 4, w // 2),
    }
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    assert close(d.pixels[spots[red_at]].astype(int), images.RED)
    assert close(d.pixels[spots[opposite[red_at]]].astype(int), images.BLUE)


# --- colour, depth, alpha ------------------------------------------------------------------


@pytest.mark.parametrize("profile", [True, False])
def test_cmyk_jpeg_becomes_srgb(profile: bool) -> None:
    data = images.cmyk_jpeg(images.RED, profile=profile)
    assert pyvips.Image.new_from_buffer(data, "").interpretation == "cmyk"
    d = decode(data, **LIMITS)
    decoded_ok(d)
    r, g, b = centre(d)
    # Through a CMYK profile and back, sRGB red comes out about (232, 31, 42).
    assert r > 200 and g < 60 and b < 60


def test_display_p3_jpeg_is_converted_to_srgb() -> None:
    p3 = images.solid(64, 48).icc_transform("p3", input_profile="srgb")
    data = bytes(p3.jpegsave_buffer(Q=95))
    assert close(np.array(p3(1, 1)), (234, 51, 34), tol=2)  # P3 numbers for sRGB red
    assert close(centre(decode(data, **LIMITS)), images.RED)


def header(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


def test_colour_transform_only_for_profiles_that_are_not_srgb() -> None:
    red = images.solid(64, 48)
    assert not needs_colour_transform(header(images.encode(red, ".jpg")))
    assert not needs_colour_transform(header(bytes(red.jpegsave_buffer(profile="srgb"))))
    p3 = red.icc_transform("p3", input_profile="srgb")
    assert needs_colour_transform(header(bytes(p3.jpegsave_buffer())))
    assert needs_colour_transform(header(images.cmyk_jpeg(profile=True)))
    # A profile we cannot read is left to libvips, which decides what to do with it.
    odd = red.copy()
    odd.set_type(pyvips.GValue.blob_type, "icc-profile-data", b"RGB " * 40)
    assert needs_colour_transform(odd)


@pytest.mark.parametrize("profile", [b"RGB " * 40, bytes(range(256)) * 2, b"\x00" * 200])
def test_unreadable_profile_is_ignored(profile: bytes) -> None:
    data = images.jpeg_with_icc(images.encode(images.solid(64, 48), ".jpg"), profile)
    assert bytes(header(data).get("icc-profile-data")) == profile
    # libvips ignores a profile lcms cannot use and takes the pixels as sRGB: the photo is fine.
    assert close(centre(decode(data, **LIMITS)), images.RED)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_grey_becomes_three_equal_bands(suffix: str) -> None:
    d = decode(images.encode(images.grey(64, 48, 128), suffix), **LIMITS)
    decoded_ok(d)
    assert np.all(d.pixels == d.pixels[..., :1])
    assert abs(int(d.pixels[10, 10, 0]) - 128) <= 2


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_is_scaled_to_eight(suffix: str) -> None:
    g = decode(images.encode(images.grey(64, 48, 40000, sixteen=True), suffix), **LIMITS)
    decoded_ok(g)
    assert close(centre(g), (155, 155, 155), tol=1)  # 40000 / 257 = 155.6
    c = decode(images.encode(images.rgb16(64, 48, (65535, 32768, 0)), suffix), **LIMITS)
    decoded_ok(c)
    assert close(centre(c), (255, 128, 0), tol=1)


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0, images.WHITE),
        (255, images.RED),
        (128, (255, 127, 127)),
    ],
)
def test_alpha_is_flattened_on_white(
    suffix: str, alpha: int, expected: tuple[int, int, int]
) -> None:
    d = decode(images.encode(images.rgba(64, 48, images.RED, alpha), suffix), **LIMITS)
    decoded_ok(d)
    assert close(centre(d), expected, tol=3)


def test_sixteen_bit_alpha_and_grey_alpha() -> None:
    rgba16 = images.constant(64, 48, [65535, 0, 0, 0], "ushort", "rgb16")
    assert close(centre(decode(images.encode(rgba16, ".png"), **LIMITS)), images.WHITE, tol=1)
    grey_alpha = images.constant(64, 48, [0, 255], "uchar", "b-w")
    assert close(centre(decode(images.encode(grey_alpha, ".png"), **LIMITS)), (0, 0, 0), tol=1)


def test_extra_bands_after_alpha_are_dropped() -> None:
    # A 5-band TIFF: libvips reads band 4 as alpha and the fifth as an extra sample; we flatten
    # on band 4 and drop band 5. (libvips' thumbnail premultiplies by the last band, so the
    # colours of such rare files shift a little; only the shape of the result is promised.)
    clear = images.constant(64, 48, [200, 100, 50, 0, 9], "uchar", "multiband")
    d = decode(images.encode(clear, ".tif"), **LIMITS)
    decoded_ok(d)
    assert close(centre(d), images.WHITE, tol=1)
    opaque = images.constant(64, 48, [200, 100, 50, 255, 9], "uchar", "multiband")
    r, g, b = centre(decode(images.encode(opaque, ".tif"), **LIMITS))
    assert r > g > b and r > 150


def test_float_and_lab_end_as_rgb8() -> None:
    linear = images.constant(64, 48, [0.5, 0.5, 0.5], "float", "scrgb")
    assert close(centre(decode(images.encode(linear, ".tif"), **LIMITS)), (188, 188, 188), tol=2)
    lab = images.solid(64, 48).colourspace("lab")
    assert close(centre(decode(images.encode(lab, ".tif"), **LIMITS)), images.RED, tol=2)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_uses_the_first_frame(suffix: str) -> None:
    data = images.animated([images.RED, (0, 255, 0), images.BLUE], suffix)
    assert pyvips.Image.new_from_buffer(data, "").get("n-pages") == 3
    d = decode(data, **LIMITS)
    decoded_ok(d)
    assert (d.width, d.height) == (40, 30)
    assert close(centre(d), images.RED)


# --- refusals ------------------------------------------------------------------------------


def test_empty_body_is_not_an_image() -> None:
    with pytest.raises(NotAnImage):
        decode(b"", **LIMITS)
    with pytest.raises(NotAnImage):
        probe(b"", **LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, world\n" * 20,
        b"<html><body>404</body></html>",
        b"1 2 3\n4 5 6\n",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    ],
)
def test_text_is_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImage) as info:
        decode(data, **LIMITS)
    assert info.value.status == 415


def test_svg_is_refused() -> None:
    # This libvips has librsvg (svgload_buffer): recognised, then refused by the allow-list
    # before any SVG parser runs. Where svgload is absent or blocked as untrusted (after
    # configure_vips), SVG is not recognised at all. 415 either way.
    expected = UnsupportedFormat if recognised(images.SVG) else NotAnImage
    with pytest.raises(expected) as info:
        decode(images.SVG, **LIMITS)
    assert info.value.status == 415
    with pytest.raises(expected):
        probe(images.SVG, **LIMITS)


def test_heic_without_a_decoder_is_unsupported() -> None:
    heic = images.heic_from_avif(images.encode(images.solid(64, 48), ".avif"))
    header = pyvips.Image.new_from_buffer(heic, "")
    assert header.get("heif-compression") == "hevc"
    try:
        d = decode(heic, **LIMITS)
    except UnsupportedFormat:
        return  # this build: HEVC is not built into libheif
    decoded_ok(d)  # a build with libde265 may decode it (or raise CorruptImage: bad stream)


def test_too_many_bytes_is_refused_before_anything_else() -> None:
    data = images.encode(images.solid(64, 48), ".png")
    with pytest.raises(InputTooLarge):
        decode(data, max_bytes=len(data) - 1, max_pixels=LIMITS["max_pixels"])
    with pytest.raises(InputTooLarge):
        probe(b"not even an image", max_bytes=4, max_pixels=LIMITS["max_pixels"])
    assert decode(data, max_bytes=len(data), max_pixels=LIMITS["max_pixels"]).format == "png"


def test_too_many_pixels_for_an_ordinary_image() -> None:
    data = images.encode(images.solid(100, 50), ".jpg")
    with pytest.raises(TooManyPixels):
        decode(data, max_bytes=LIMITS["max_bytes"], max_pixels=4999)
    assert probe(data, max_bytes=LIMITS["max_bytes"], max_pixels=5000) == (100, 50, "jpeg")


def test_a_side_longer_than_the_search_takes_is_refused_from_the_header(
    no_full_decode: None,
) -> None:
    # 1.2 M pixels pass the pixel limit, but no box or heatmap record takes a 1.2 M side.
    data = bytes(pyvips.Image.black(1_200_000, 1).pngsave_buffer())
    with pytest.raises(TooManyPixels, match="side over"):
        decode(data, max_bytes=LIMITS["max_bytes"], max_pixels=LIMITS["max_pixels"])


@pytest.fixture
def no_full_decode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on any pixel decode: through the thumbnail or the JPEG path (an error at once), or
    of an image opened from a buffer, however it is evaluated (libvips' preeval signal, checked
    after)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a full decode was attempted")

    opened = pyvips.Image.new_from_buffer
    evaluated: list[bool] = []

    def watched(*args: object, **kwargs: object) -> pyvips.Image:
        image = opened(*args, **kwargs)
        image.set_progress(True)
        image.signal_connect("preeval", lambda img, progress: evaluated.append(True))
        return image

    monkeypatch.setattr(pyvips.Image, "thumbnail_buffer", refuse)
    monkeypatch.setattr(pyvips.Image, "jpegload_buffer", refuse)
    monkeypatch.setattr(pyvips.Image, "new_from_buffer", staticmethod(watched))
    yield
    assert not evaluated, "the pixels of an image opened for its header were decoded"


@pytest.fixture(scope="session")
def png_bomb() -> bytes:
    return images.png_bomb(30000)


@pytest.fixture(scope="session")
def jpeg_bomb() -> bytes:
    return images.jpeg_bomb(30000)


def test_png_bomb_is_refused_from_the_header(png_bomb: bytes, no_full_decode: None) -> None:
    assert len(png_bomb) < 1_000_000
    # The header alone knows the size ...
    assert probe(png_bomb, max_bytes=LIMITS["max_bytes"], max_pixels=10**9) == (30000, 30000, "png")
    # ... and the limit refuses it without a decode (the fixture fails the test on one).
    with pytest.raises(TooManyPixels) as info:
        decode(png_bomb, **LIMITS)
    assert info.value.status == 413


def test_jpeg_bomb_is_refused_from_the_header(jpeg_bomb: bytes, no_full_decode: None) -> None:
    assert probe(jpeg_bomb, max_bytes=LIMITS["max_bytes"], max_pixels=10**9) == (
        30000,
        30000,
        "jpeg",
    )
    with pytest.raises(TooManyPixels):
        decode(jpeg_bomb, **LIMITS)


def test_crafted_jpeg_header_is_refused(no_full_decode: None) -> None:
    data = images.jpeg_with_declared_size(30000, 30000)
    assert len(data) < 2000
    assert probe(data, max_bytes=LIMITS["max_bytes"], max_pixels=10**9)[:2] == (30000, 30000)
    with pytest.raises(TooManyPixels):
        decode(data, **LIMITS)


def test_jpeg_claiming_more_than_it_holds_is_corrupt() -> None:
    # Within the limits, shrink-on-load runs and meets the end of the data: damaged, not grey.
    data = images.jpeg_with_declared_size(2000, 1600)
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(CorruptImage):
        decode(data[:-2], **LIMITS)


def test_jpeg_ending_early_with_its_end_marker_is_only_a_warning() -> None:
    # Documented limit of fail_on="error": when the EOI marker comes before the scan is done,
    # libjpeg warns ("premature end of data segment") and pads with grey; only
    # fail_on="warning" refuses it, and that would also refuse many real, harmless JPEGs.
    data = images.jpeg_with_declared_size(2000, 1600)
    d = decode(data, **LIMITS)
    decoded_ok(d)
    assert close(d.pixels[0, 0].astype(int), images.RED)  # the 16x16 that is really there
    assert close(d.pixels[-1, -1].astype(int), (128, 128, 128), tol=1)


# --- truncation and fuzzing ----------------------------------------------------------------


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    photo = images.photo_like(640, 480)
    return {suffix: images.encode(photo, suffix) for suffix, _ in FORMATS}


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".gif"])
def test_truncated_image_is_corrupt(photos: dict[str, bytes], suffix: str) -> None:
    data = photos[suffix]
    assert decode(data, **LIMITS).format  # the whole file is fine
    with pytest.raises(CorruptImage) as info:
        decode(data[: len(data) // 2], **LIMITS)
    assert info.value.status == 422 and info.value.fallback


def test_libvips_thumbnail_ignores_its_own_fail_on(photos: dict[str, bytes]) -> None:
    """Why decode passes fail_on in option_string: the keyword does not reach the loader here.

    If this starts failing, libvips has changed and the keyword alone may be enough.
    """
    cut = photos[".jpg"][: len(photos[".jpg"]) // 2]
    pyvips.Image.thumbnail_buffer(cut, 64, fail_on="error").avg()  # no error: grey rest
    with pytest.raises(pyvips.Error):
        pyvips.Image.thumbnail_buffer(cut, 64, option_string="fail_on=error").avg()


@pytest.mark.parametrize("suffix", [".webp", ".tif", ".avif"])
def test_truncation_of_container_formats_is_a_typed_error(
    photos: dict[str, bytes], suffix: str
) -> None:
    # WebP, TIFF and HEIF lose their index when cut: libvips may no longer recognise them.
    with pytest.raises((CorruptImage, NotAnImage)):
        decode(photos[suffix][: len(photos[suffix]) // 2], **LIMITS)


def outcome(data: bytes) -> str:
    """Decode and check the result; the name of the typed error otherwise."""
    try:
        d = decode(data, max_bytes=LIMITS["max_bytes"], max_pixels=20_000_000)
    except HeatcropError as exc:
        # The bare base class means an unexpected failure inside decode; fuzzing must not see it.
        assert type(exc) is not HeatcropError, exc
        return type(exc).__name__
    decoded_ok(d)
    return "ok"


def test_fuzz_random_bytes() -> None:
    rng = random.Random(1)
    results = {outcome(rng.randbytes(rng.randint(1, 4096))) for _ in range(200)}
    assert results <= {"NotAnImage", "CorruptImage", "UnsupportedFormat", "ok"}


def test_fuzz_magic_then_garbage() -> None:
    # Random bodies behind real magic numbers reach the loaders instead of the sniffer.
    rng = random.Random(2)
    magics = [
        b"\xff\xd8\xff\xe0",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\x00\x10\x00\x00WEBPVP8 ",
        b"II*\x00\x08\x00\x00\x00",
        b"MM\x00*\x00\x00\x00\x08",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00mif1avif",
        b"<svg ",
    ]
    for magic in magics:
        for _ in range(25):
            outcome(magic + rng.randbytes(rng.randint(0, 2048)))


@pytest.mark.parametrize("suffix", [s for s, _ in FORMATS])
def test_fuzz_truncations(photos: dict[str, bytes], suffix: str) -> None:
    rng = random.Random(3)
    data = photos[suffix]
    cuts = [rng.randint(0, len(data) - 1) for _ in range(15)] + [1, 2, 8, 16, 100]
    seen = {outcome(data[:cut]) for cut in cuts}
    assert seen - {"ok"}, "no truncation was noticed"


@pytest.mark.parametrize("suffix", [s for s, _ in FORMATS])
def test_fuzz_byte_flips(photos: dict[str, bytes], suffix: str) -> None:
    rng = random.Random(4)
    original = photos[suffix]
    for _ in range(20):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            # Half the flips land in the first 512 bytes, where the headers are.
            limit = 512 if rng.random() < 0.5 else len(data)
            data[rng.randrange(min(limit, len(data)))] ^= 1 << rng.randrange(8)
        outcome(bytes(data))


def test_non_vips_failures_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(pyvips.Image, "thumbnail_buffer", boom)
    with pytest.raises(HeatcropError, match="unexpectedly"):
        decode(images.encode(images.solid(8, 8), ".png"), **LIMITS)


# --- start-up policy -----------------------------------------------------------------------


def test_configure_vips_sets_the_service_policy() -> None:
    before = (
        pyvips.concurrency_get(),
        pyvips.cache_get_max(),
        pyvips.cache_get_max_mem(),
        pyvips.cache_get_max_files(),
    )
    try:
        configure_vips()
        assert pyvips.concurrency_get() == 1
        assert pyvips.cache_get_max() == 0
        data = images.encode(images.solid(300, 200), ".jpg")
        assert close(centre(decode(data, **LIMITS)), images.RED)
        assert pyvips.cache_get_size() == 0
        # svgload is marked untrusted in libvips 8.18: once blocked, SVG is not even recognised.
        assert not recognised(images.SVG)
        with pytest.raises(NotAnImage):
            decode(images.SVG, **LIMITS)
        configure_vips(concurrency=2, cache_max=10)
        assert (pyvips.concurrency_get(), pyvips.cache_get_max()) == (2, 10)
        with pytest.raises(ValueError):
            configure_vips(concurrency=0)
    finally:
        pyvips.concurrency_set(before[0])
        pyvips.cache_set_max(before[1])
        pyvips.cache_set_max_mem(before[2])
        pyvips.cache_set_max_files(before[3])
        pyvips.block_untrusted_set(False)


def test_importing_decode_changes_no_global_policy() -> None:
    # configure_vips is for the service to call at start-up; importing must not do it.
    check = (
        "import pyvips\n"
        "before = (pyvips.concurrency_get(), pyvips.cache_get_max())\n"
        "import sidecar.decode\n"
        "assert (pyvips.concurrency_get(), pyvips.cache_get_max()) == before, before\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", check], cwd=root, check=True)


# --- real photos ---------------------------------------------------------------------------


def fcdb_entries(count: int) -> list[dict[str, object]]:
    manifest = FCDB / "manifest.json"
    if not manifest.is_file():
        pytest.skip(f"eval set not present at {FCDB.resolve()} (../shared/eval/fcdb_dev)")
    entries = json.loads(manifest.read_text())
    return sorted(entries, key=lambda e: str(e["image"]))[:count]


def test_real_photos_decode_like_a_full_decode() -> None:
    for entry in fcdb_entries(3):
        data = (FCDB / "images" / str(entry["image"])).read_bytes()
        d = decode(data, **LIMITS)
        decoded_ok(d)
        assert (d.width, d.height) == (entry["width"], entry["height"])
        assert d.format == "jpeg"
        # Reference: decode every pixel, then resize; shrink-on-load must give the same picture.
        full = pyvips.Image.new_from_buffer(data, "").colourspace("srgb")
        h, w = d.pixels.shape[:2]
        ref = full.resize(w / full.width, vscale=h / full.height).numpy()[..., :3]
        diff = np.abs(ref.astype(int) - d.pixels.astype(int)).mean()
        assert diff < 6, f"{entry['image']}: mean difference {diff:.1f} levels"
        assert d.pixels.std() > 10  # a photo, not a flat fill
