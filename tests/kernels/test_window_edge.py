"""best_window edge cases, must-keep boxes, determinism and input validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from kernels.heat import prepare_heatmap
from kernels.sat import summed_area_table, window_sum
from kernels.window import CropBox, SearchParams, best_window, center_box, largest_window
from sidecar import settings as settings_mod

DEFAULT = SearchParams()
ZOOM = SearchParams(min_scale=0.6)


def _aspect_ok(box: CropBox, aspect: float) -> bool:
    return min(abs(box.width - box.height * aspect), abs(box.height - box.width / aspect)) <= 1


def _prepared(seed: int, shape: tuple[int, int] = (7, 7)) -> np.ndarray:
    src = np.random.default_rng(seed).random(shape)
    out = (shape[0] * 4, shape[1] * 4)
    return prepare_heatmap(src, out, center_sigma=0.3, center_weight=0.5)


@pytest.mark.parametrize("size", [(1600, 1067), (1067, 1600), (500, 500), (7, 3)])
def test_aspect_of_the_image_gives_the_whole_image(size: tuple[int, int]) -> None:
    width, height = size
    box = best_window(_prepared(1), width, height, width / height, DEFAULT)
    assert box.as_tuple() == (0, 0, width, height)
    assert box.confidence == 0.0


@pytest.mark.parametrize("aspect", [0.1, 10.0])
@pytest.mark.parametrize("size", [(1600, 1067), (1067, 1600), (40, 4000), (4000, 40), (9, 9)])
@pytest.mark.parametrize("params", [DEFAULT, ZOOM], ids=["default", "zoom"])
def test_extreme_aspects_stay_inside_and_exact(
    aspect: float, size: tuple[int, int], params: SearchParams
) -> None:
    width, height = size
    box = best_window(_prepared(2), width, height, aspect, params)
    assert 0 <= box.x0 < box.x1 <= width and 0 <= box.y0 < box.y1 <= height
    assert _aspect_ok(box, aspect)
    assert box.width == width or box.height == height or params.min_scale < 1


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 1)])
@pytest.mark.parametrize("aspect", [1.0, 0.1, 10.0, 2 / 3, 3.0])
@pytest.mark.parametrize("params", [DEFAULT, ZOOM], ids=["default", "zoom"])
def test_tiny_images(size: tuple[int, int], aspect: float, params: SearchParams) -> None:
    width, height = size
    box = best_window(_prepared(3), width, height, aspect, params)
    assert 0 <= box.x0 < box.x1 <= width and 0 <= box.y0 < box.y1 <= height
    assert box.width >= 1 and box.height >= 1
    assert _aspect_ok(box, aspect)
    assert math.isfinite(box.score) and math.isfinite(box.confidence)


@pytest.mark.parametrize("heat", [np.ones((28, 28)), np.zeros((28, 28)), np.zeros((1, 1))])
@pytest.mark.parametrize("size", [(1600, 1067), (1067, 1600), (101, 50), (50, 101)])
@pytest.mark.parametrize("aspect", [1.0, 16 / 9, 9 / 16, 4 / 5])
@pytest.mark.parametrize("params", [DEFAULT, ZOOM], ids=["default", "zoom"])
def test_map_without_information_gives_the_centre_crop(
    heat: np.ndarray, size: tuple[int, int], aspect: float, params: SearchParams
) -> None:
    width, height = size
    box = best_window(heat, width, height, aspect, params)
    assert box.as_tuple() == center_box(width, height, aspect).as_tuple()
    assert box.confidence == 0.0
    assert box.score == box.center_score
    assert math.isfinite(box.score)


@pytest.mark.parametrize("corner", ["tl", "tr", "bl", "br"])
@pytest.mark.parametrize("size", [(1600, 1067), (1067, 1600)])
@pytest.mark.parametrize("aspect", [1.0, 4 / 5, 16 / 9])
@pytest.mark.parametrize("prior", [0.0, 0.5])
def test_hot_corner_pulls_the_box_into_that_corner(
    corner: str, size: tuple[int, int], aspect: float, prior: float
) -> None:
    width, height = size
    src = np.zeros((7, 7))
    rows = slice(0, 1) if corner[0] == "t" else slice(6, 7)
    cols = slice(0, 1) if corner[1] == "l" else slice(6, 7)
    src[rows, cols] = 1.0
    heat = prepare_heatmap(src, (28, 28), center_sigma=0.3, center_weight=prior)
    box = best_window(heat, width, height, aspect, ZOOM)
    assert (box.y0 == 0) if corner[0] == "t" else (box.y1 == height)
    assert (box.x0 == 0) if corner[1] == "l" else (box.x1 == width)
    assert box.confidence > 0.0


def test_off_centre_subject_moves_the_box_and_gains_confidence() -> None:
    src = np.zeros((7, 10))
    src[3, 7] = 1.0  # subject right of centre
    heat = prepare_heatmap(src, (28, 40), center_sigma=0.3, center_weight=0.5)
    box = best_window(heat, 1600, 1067, 1.0, DEFAULT)
    centre = center_box(1600, 1067, 1.0)
    assert box.x0 > centre.x0
    assert box.score > box.center_score and box.confidence == box.score - box.center_score


@pytest.mark.parametrize("seed", range(10))
def test_keep_box_is_contained(seed: int) -> None:
    rng = np.random.default_rng(seed)
    heat = _prepared(seed)
    width, height = 1600, 1067
    for aspect in (1.0, 16 / 9, 9 / 16):
        kx0, ky0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        keep = (kx0, ky0, kx0 + int(rng.integers(1, 200)), ky0 + int(rng.integers(1, 200)))
        box = best_window(heat, width, height, aspect, ZOOM, keep=keep)
        assert box.x0 <= keep[0] and box.y0 <= keep[1] and box.x1 >= keep[2] and box.y1 >= keep[3]
        assert _aspect_ok(box, aspect)


def _sides_and_subject() -> np.ndarray:
    """2000x1000 map: hot columns at both sides, a strong subject between them.

    Every largest 16:9 window (1778 px wide) slices a side column, a smaller one need not.
    """
    heat = np.zeros((28, 56))
    heat[:, :8] = 1.0
    heat[:, 47:] = 1.0
    heat[10:18, 22:34] = 3.0
    return heat


def test_zoom_wins_when_every_largest_window_slices_something() -> None:
    heat = _sides_and_subject()
    no_penalty = SearchParams(min_scale=0.5, cut_weight=5.0, cut_band=0.2, zoom_weight=0.0)
    box = best_window(heat, 2000, 1000, 16 / 9, no_penalty)
    assert box.width < 1778 and box.height < 1000
    # the zoom penalty is zoom_weight x (1 - s) on top of the same window's score
    s = box.height / 1000
    penalised = best_window(
        heat, 2000, 1000, 16 / 9, dataclasses.replace(no_penalty, zoom_weight=0.1)
    )
    assert penalised.as_tuple() == box.as_tuple()
    assert penalised.score == pytest.approx(box.score - 0.1 * (1 - s), abs=1e-12)


def test_a_negative_zoom_weight_rewards_tighter_windows() -> None:
    # A smaller window never holds more heat, so without a cut term only a reward zooms in;
    # the reward is bounded by the heat it gives up.
    heat = np.full((30, 40), 0.01)
    heat[12:18, 16:24] = 1.0
    base = SearchParams(min_scale=0.3, scales=8, cut_weight=0.0, zoom_weight=0.0)
    assert best_window(heat, 400, 300, 4 / 3, base).as_tuple() == (0, 0, 400, 300)
    box = best_window(heat, 400, 300, 4 / 3, dataclasses.replace(base, zoom_weight=-0.3))
    assert box.width < 400 and box.height < 300
    assert box.x0 <= 160 and box.x1 >= 240 and box.y0 <= 120 and box.y1 >= 180
    assert box.confidence > 0.0


def test_the_service_settings_keep_the_zoom_weight_non_negative() -> None:
    with pytest.raises(settings_mod.SettingsError, match="HEATCROP_KERNEL_ZOOM_WEIGHT"):
        settings_mod.load(None, {"HEATCROP_KERNEL_ZOOM_WEIGHT": "-0.3"})


def test_keep_restricts_the_scales_to_those_that_can_hold_it() -> None:
    heat = _sides_and_subject()
    params = SearchParams(min_scale=0.5, cut_weight=5.0, cut_band=0.2)
    assert best_window(heat, 2000, 1000, 16 / 9, params).width < 1700
    keep = (150, 100, 1850, 900)  # 1700 px wide: only the largest window (1778 px) holds it
    box = best_window(heat, 2000, 1000, 16 / 9, params, keep=keep)
    assert (box.width, box.height) == (1778, 1000)
    assert box.x0 <= 150 and box.x1 >= 1850


def test_keep_too_big_for_the_smaller_scales_is_still_contained() -> None:
    # ZOOM's square windows on 1600x1067 are 1067, 982, 896, ... px: only two can hold 900 px
    keep = (350, 80, 1250, 980)
    for seed in range(5):
        box = best_window(_prepared(seed, (7, 10)), 1600, 1067, 1.0, ZOOM, keep=keep)
        assert box.width >= 900
        assert box.x0 <= 350 and box.y0 <= 80 and box.x1 >= 1250 and box.y1 >= 980


def test_impossible_keep_centres_the_largest_window_on_it() -> None:
    heat = _prepared(4)
    keep = (0, 0, 1200, 100)  # wider than any square window of a 1067-high image
    box = best_window(heat, 1600, 1067, 1.0, ZOOM, keep=keep)
    assert box.as_tuple() == (66, 0, 1133, 1067)  # centred on x=600, clamped at the top
    assert math.isfinite(box.score) and box.confidence >= 0.0
    # 1100 px wide: the 1067 px window sits inside it, centred on it (x = 516 + 533.5 = 1049.5)
    inner = best_window(heat, 1600, 1067, 1.0, ZOOM, keep=(500, 10, 1600, 20))
    assert inner.as_tuple() == (516, 0, 1583, 1067)


def test_sizes_of_the_same_aspect_give_the_same_box() -> None:
    heat = _prepared(5, (7, 10))
    a = best_window(heat, 1600, 1067, 400 / 300, ZOOM)
    b = best_window(heat, 1600, 1067, 800 / 600, ZOOM)
    assert a == b


def test_same_input_same_box() -> None:
    heat = _prepared(6, (7, 12))
    boxes = {best_window(heat, 1920, 1080, 4 / 5, ZOOM) for _ in range(5)}
    assert len(boxes) == 1
    assert best_window(heat.astype(np.float64), 1920, 1080, 4 / 5, ZOOM) in boxes


def test_equal_scores_go_to_the_window_nearest_the_centre() -> None:
    heat = np.zeros((28, 28))
    heat[:, 13:15] = 1.0  # a narrow central subject: many square windows hold all of it
    box = best_window(heat, 1600, 1067, 1.0, SearchParams(cut_weight=0.0))
    assert box.as_tuple() == center_box(1600, 1067, 1.0).as_tuple()


def test_mirror_ties_at_equal_distance_go_to_the_first_in_order() -> None:
    heat = np.zeros((28, 28))
    heat[:, :3] = 1.0
    heat[:, -3:] = 1.0  # equal hot bands at both sides: the left and right windows tie
    box = best_window(heat, 1600, 1067, 1.0, SearchParams(cut_weight=0.0))
    assert box.as_tuple() == (0, 0, 1067, 1067)
    assert box.score == pytest.approx(0.5, abs=1e-12)


def test_largest_and_centre_windows() -> None:
    assert largest_window(1600, 1067, 1.0) == (1067, 1067)
    assert largest_window(1600, 1067, 16 / 9) == (1600, 900)
    assert largest_window(1, 1, 10.0) == (1, 1)
    assert center_box(1600, 1067, 1.0).as_tuple() == (266, 0, 1333, 1067)
    box = CropBox(1, 2, 11, 7)
    assert (box.width, box.height, box.as_tuple()) == (10, 5, (1, 2, 11, 7))


GOOD = np.ones((4, 4), dtype=np.float32)


@pytest.mark.parametrize(
    "call",
    [
        lambda: best_window(np.ones(4), 100, 100, 1.0, DEFAULT),
        lambda: best_window(np.ones((0, 4)), 100, 100, 1.0, DEFAULT),
        lambda: best_window(np.ones((4, 4), dtype=np.int64), 100, 100, 1.0, DEFAULT),
        lambda: best_window([[1.0]], 100, 100, 1.0, DEFAULT),
        lambda: best_window(np.full((4, 4), np.nan), 100, 100, 1.0, DEFAULT),
        lambda: best_window(np.full((4, 4), np.inf), 100, 100, 1.0, DEFAULT),
        lambda: best_window(-GOOD, 100, 100, 1.0, DEFAULT),
        lambda: best_window(GOOD, 0, 100, 1.0, DEFAULT),
        lambda: best_window(GOOD, 100, 1_000_001, 1.0, DEFAULT),
        lambda: best_window(GOOD, 100.0, 100, 1.0, DEFAULT),
        lambda: best_window(GOOD, True, 100, 1.0, DEFAULT),
        lambda: best_window(GOOD, 100, 100, 0.0, DEFAULT),
        lambda: best_window(GOOD, 100, 100, -1.0, DEFAULT),
        lambda: best_window(GOOD, 100, 100, float("nan"), DEFAULT),
        lambda: best_window(GOOD, 100, 100, float("inf"), DEFAULT),
        lambda: best_window(GOOD, 100, 100, 1e-4, DEFAULT),
        lambda: best_window(GOOD, 100, 100, 1e4, DEFAULT),
        lambda: best_window(GOOD, 100, 100, "1", DEFAULT),
        lambda: best_window(GOOD, 100, 100, 1.0, None),
        lambda: best_window(GOOD, 100, 100, 1.0, DEFAULT, keep=(10, 10, 10, 20)),
        lambda: best_window(GOOD, 100, 100, 1.0, DEFAULT, keep=(-1, 10, 10, 20)),
        lambda: best_window(GOOD, 100, 100, 1.0, DEFAULT, keep=(0, 0, 101, 20)),
        lambda: best_window(GOOD, 100, 100, 1.0, DEFAULT, keep=(0, 0, 10)),
        lambda: best_window(GOOD, 100, 100, 1.0, DEFAULT, keep=(0, 0, 10.5, 10)),
        lambda: SearchParams(min_scale=0.0),
        lambda: SearchParams(min_scale=1.5),
        lambda: SearchParams(min_scale=float("nan")),
        lambda: SearchParams(scales=0),
        lambda: SearchParams(scales=2.5),
        lambda: SearchParams(steps=1),
        lambda: SearchParams(steps=100_000),
        lambda: SearchParams(cut_weight=-1.0),
        lambda: SearchParams(cut_band=0.9),
        lambda: SearchParams(zoom_weight=float("inf")),
        lambda: largest_window(0, 10, 1.0),
        lambda: center_box(10, 10, 0.0),
        lambda: summed_area_table(np.ones(3)),
        lambda: summed_area_table(np.ones((2, 2), dtype=np.int32)),
        lambda: window_sum(summed_area_table(GOOD), 2.0, 0.0, 1.0, 1.0),
        lambda: window_sum(summed_area_table(GOOD), float("nan"), 0.0, 1.0, 1.0),
        lambda: window_sum(np.ones((3, 3), dtype=np.float32), 0.0, 0.0, 1.0, 1.0),
        lambda: prepare_heatmap(np.ones(7), (28, 28), center_sigma=0.3, center_weight=0.5),
        lambda: prepare_heatmap(np.ones((0, 7)), (28, 28), center_sigma=0.3, center_weight=0.5),
        lambda: prepare_heatmap(GOOD.astype(complex), (8, 8), center_sigma=0.3, center_weight=0.5),
        lambda: prepare_heatmap(GOOD, (0, 8), center_sigma=0.3, center_weight=0.5),
        lambda: prepare_heatmap(GOOD, (8,), center_sigma=0.3, center_weight=0.5),
        lambda: prepare_heatmap(GOOD, (8, 8.0), center_sigma=0.3, center_weight=0.5),
        lambda: prepare_heatmap(GOOD, (8, 8), center_sigma=0.0, center_weight=0.5),
        lambda: prepare_heatmap(GOOD, (8, 8), center_sigma=float("nan"), center_weight=0.5),
        lambda: prepare_heatmap(GOOD, (8, 8), center_sigma=0.3, center_weight=1.5),
        lambda: prepare_heatmap(GOOD, (8, 8), center_sigma=0.3, center_weight=-0.1),
    ],
)
def test_invalid_inputs_raise(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_float16_cached_heatmap_gives_the_same_box() -> None:
    # The caches keep heatmaps in float16: quantising must not move the box found on the
    # float32 map the engine produced.
    heat = _prepared(7, (7, 10))
    assert heat.dtype == np.float32
    cached = best_window(heat.astype(np.float16), 1600, 1067, 4 / 5, ZOOM)
    assert cached.as_tuple() == best_window(heat, 1600, 1067, 4 / 5, ZOOM).as_tuple()


def test_argument_types_never_add_a_numba_specialisation() -> None:
    """Another signature would mean a multi-second compile in the middle of a request."""
    from kernels import window

    odd = SearchParams(min_scale=1, scales=np.int32(3), steps=np.int64(9), cut_weight=1, cut_band=0)
    keep = (np.int32(1), np.int32(1), np.int32(5), np.int32(5))
    best_window(GOOD, np.int32(100), np.int64(80), np.float32(1.5), odd, keep=keep)
    best_window(GOOD, 100, 80, 1.5, DEFAULT, keep=(0, 0, 100, 80))  # fallback path
    best_window(GOOD.astype(np.float64), 100, 80, 2, DEFAULT)
    for kernel in (window._search_kernel, window._box_score, window._sat_kernel):
        assert len(kernel.signatures) == 1, kernel.signatures
