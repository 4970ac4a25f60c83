"""bench.bucket: its variants' buckets and decodes, and its paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bucket import Variant, decode, raw_difference, resized, share_difference
from bench.quality import CENTRE, ORACLE, SetResult
from engines import buckets
from engines.pixels import model_pixels, open_header
from tests.support import images
from training.data import EvalSet, Metric, Protocol


def test_224_variant_has_the_runtime_buckets() -> None:
    # The reference row must be what the service runs, bucket for bucket.
    v = Variant.parse("224-thumb")
    assert v.buckets() == buckets.all_buckets()
    for width, height in [(800, 600), (600, 800), (1024, 400), (300, 300), (4000, 100)]:
        assert v.bucket_for(width, height) == buckets.bucket_for(width, height)


@pytest.mark.parametrize("name", ["192-thumb", "160-dct", "224-under-linear"])
def test_smaller_buckets_are_multiples_of_32_up_to_twice_the_short_side(name: str) -> None:
    v = Variant.parse(name)
    assert v.name == name
    for h, w in v.buckets():
        assert h % 32 == 0 and w % 32 == 0
        assert min(h, w) == v.short and max(h, w) <= 2 * v.short


@pytest.mark.parametrize("name", ["200-thumb", "224-fast", "224-thumb-linear", "224-dct-cubic"])
def test_bad_variant_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Variant.parse(name)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("name", ["224-dct", "224-under-linear"])
def test_dct_decodes_upright_like_the_thumbnail(name: str, orientation: int) -> None:
    stored = images.with_orientation(images.halves(1200, 800), orientation)
    data = images.encode(stored, ".jpg")
    got = decode(data, Variant.parse(name))
    assert got.format == "jpeg" and got.shrink > 1  # the DCT path ran, at a shrink
    want = decode(data, Variant.parse("224-thumb"))
    assert want.shrink == 0  # the thumbnail's own path
    assert np.abs(got.pixels.astype(int) - want.pixels.astype(int)).mean() < 3


def test_under_shrinks_further_than_dct() -> None:
    data = images.encode(images.photo_like(800, 600), ".jpg")
    keep, under = (decode(data, Variant.parse(n)) for n in ("224-dct", "224-under"))
    # 800x600 to 288x224: 1/2 keeps the bucket's size, 1/4 (200x150) is over half of it.
    assert (keep.shrink, under.shrink) == (2, 4)
    assert keep.pixels.shape == under.pixels.shape == (224, 288, 3)


def test_png_takes_the_thumbnail_in_every_variant() -> None:
    data = images.encode(images.photo_like(800, 600), ".png")
    got = decode(data, Variant.parse("224-dct"))
    assert got.shrink == 0
    assert np.array_equal(got.pixels, decode(data, Variant.parse("224-thumb")).pixels)
    assert np.array_equal(got.pixels, model_pixels(data, open_header(data), (224, 288)))


@pytest.mark.parametrize("orientation", [1, 6])
def test_the_dct_variant_is_the_service_decode_pixel_for_pixel(orientation: int) -> None:
    # So the quality measured for 224-dct is the quality of what the service runs.
    stored = images.with_orientation(images.photo_like(1200, 800), orientation)
    data = images.encode(stored, ".jpg")
    got = decode(data, Variant.parse("224-dct"))
    service = model_pixels(data, open_header(data), got.pixels.shape[:2])
    assert np.array_equal(got.pixels, service)
    assert not np.array_equal(decode(data, Variant.parse("224-thumb")).pixels, service)


def result_of(per_image: dict[str, list[float]], key: str = "iou") -> SetResult:
    protocol = Protocol("fcdb", (Metric(key, key, True),), ("16:9",), dict, lambda i, b: {})
    eval_set = EvalSet("test", protocol, ())
    values = {m: {"16:9": {key: np.array(v, float)}} for m, v in per_image.items()}
    return SetResult(eval_set, list(values), values, {}, {}, 0.0)


def test_share_difference_is_paired() -> None:
    rng = np.random.default_rng(1)
    centre = rng.uniform(0.2, 0.4, 200)
    oracle = centre + 0.3
    ref = centre + rng.uniform(0.0, 0.3, 200)
    # The same photos, one point of headroom (0.003) better each: a wide spread per photo, but
    # the paired difference is exactly one point, with no width.
    result = result_of({CENTRE: centre, ORACLE: oracle, "ref": ref, "better": ref + 0.003})
    d, lo, hi = share_difference(result, "better", "ref", "iou")
    assert d == pytest.approx(0.01)
    assert lo == pytest.approx(0.01) and hi == pytest.approx(0.01)
    lower = ref - rng.uniform(0.0, 0.1, 200)
    worse = result_of({CENTRE: centre, ORACLE: oracle, "ref": ref, "worse": lower})
    d, lo, hi = share_difference(worse, "worse", "ref", "iou")
    assert lo < d < hi < 0


def test_raw_difference_of_equal_rows_is_zero() -> None:
    rows = [0.0, 1.0, 0.0, 1.0]
    result = result_of({"a": rows, "b": rows}, key="sliced")
    assert raw_difference(result, "a", "b", "sliced") == (0.0, 0.0, 0.0)


def test_resized_map_keeps_a_linear_ramp() -> None:
    ramp = np.tile(np.arange(8, dtype=np.float32), (4, 1))
    out = resized(ramp, (8, 16))
    assert out.shape == (8, 16)
    assert np.all(np.diff(out[:, 1:-1], axis=1) > 0)


@pytest.mark.parametrize("name", ["224-dct", "224-under-linear"])
def test_a_jpeg_smaller_than_its_bucket_is_loaded_whole_and_upsampled(name: str) -> None:
    data = images.encode(images.photo_like(200, 150), ".jpg")
    got = decode(data, Variant.parse(name))
    assert got.shrink == 1
    assert got.pixels.shape == (224, 288, 3)
