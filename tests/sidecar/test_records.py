"""What a cached record must be to be used (sidecar/records.py): what the service makes always
passes, what a hostile writer stores does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from skimage import data as skdata

from engines.base import PROFILES
from engines.buckets import bucket_for, heatmap_shape
from kernels.faces import best_window_faces
from kernels.window import SearchParams, best_window, window_sizes
from sidecar.codec import BoxRecord
from sidecar.core import Analysis, make_analysis, search_params
from sidecar.decode import decode
from sidecar.records import (
    AnalysisExpect,
    BadRecord,
    BoxExpect,
    check_analysis,
    check_box,
)
from sidecar.settings import KernelSettings
from tests.support.images import jpeg

LIMITS = {"max_bytes": 30 * 1024 * 1024, "max_pixels": 75_000_000}


def an_analysis(width: int = 600, height: int = 400, **change) -> Analysis:
    shape = (len(PROFILES), *heatmap_shape(bucket_for(width, height)))
    a = Analysis(width, height, np.ones(shape, np.float16), 0.5, "v")
    return dataclasses.replace(a, **change)


def expect_box(width: int, height: int, aspect: float, params: SearchParams) -> BoxExpect:
    return BoxExpect(
        "a.jpg", (width, height), frozenset(window_sizes(width, height, aspect, params))
    )


# -- what the service makes passes ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (400, 600), (600, 400), (2000, 1500)])
def test_every_analysis_the_engine_makes_passes(session_engine, shape):
    decoded = decode(jpeg(np.full((*shape, 3), 128, np.uint8)), **LIMITS)
    out = session_engine.infer(decoded.pixels[np.newaxis])
    analysis = make_analysis(decoded, out.heatmaps[0], out.food_mass[0], "v")
    check_analysis(analysis, AnalysisExpect((decoded.width, decoded.height), LIMITS["max_pixels"]))


def test_every_box_the_search_makes_passes():
    # Sizes, aspects, settings, must-keep boxes and faces drawn at random: a box the search
    # returns must never be taken for a hostile one (it would be searched again every time).
    rng = np.random.default_rng(7)
    settings = [search_params(KernelSettings()), SearchParams(min_scale=0.4, scales=5)]
    for trial in range(300):
        width, height = (int(v) for v in rng.integers(1, 3000, 2))
        aspect = float(np.exp(rng.uniform(np.log(0.01), np.log(100))))
        params = settings[trial % 2]
        heat = rng.random((int(rng.integers(1, 20)), int(rng.integers(1, 20)))).astype(np.float32)
        keep = None
        if trial % 3 == 0:
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            keep = (
                x0,
                y0,
                int(rng.integers(x0 + 1, width + 1)),
                int(rng.integers(y0 + 1, height + 1)),
            )
        if trial % 4 == 1:
            faces = np.array([[0.1 * width, 0.2 * height, 0.4 * width, 0.6 * height, 0.9]])
            box, _ = best_window_faces(heat, width, height, aspect, params, faces, keep, 1.0)
        else:
            box = best_window(heat, width, height, aspect, params, keep=keep)
        record = BoxRecord(box.as_tuple(), box.confidence, "a.jpg")
        check_box(record, expect_box(width, height, aspect, params))


# -- what a hostile writer stores does not -------------------------------------------------


@pytest.mark.parametrize(
    ("analysis", "expect", "message"),
    [
        (an_analysis(heatmaps=np.ones((1, 14, 21), np.float16)), (600, 400), "channels"),
        (an_analysis(heatmaps=np.ones((3, 14, 21), np.float32)), (600, 400), "float16"),
        (an_analysis(1, 1), (600, 400), "1x1 original; it is 600x400"),
        (an_analysis(10**6, 10**6), None, "beyond the limits"),
        (an_analysis(10**5, 10**5), None, "beyond the limits"),  # over max_pixels
        (an_analysis(heatmaps=np.ones((3, 7, 7), np.float16)), (600, 400), "heatmap"),
        (an_analysis(faces=np.array([[0, 0, 700, 10, 1]], np.float32)), None, "face"),
        (an_analysis(faces=np.array([[50, 0, 10, 10, 1]], np.float32)), None, "face"),
    ],
)
def test_an_analysis_that_is_not_for_this_original_is_refused(analysis, expect, message):
    with pytest.raises(BadRecord, match=message):
        check_analysis(analysis, AnalysisExpect(expect, LIMITS["max_pixels"]))


def test_a_face_a_hair_outside_the_original_passes():
    faces = np.array([[-0.5, 0.0, 600.4, 400.0, 0.9]], np.float32)
    check_analysis(an_analysis(faces=faces), AnalysisExpect((600, 400)))


PARAMS = search_params(KernelSettings())
WANT = expect_box(600, 400, 3.0, PARAMS)  # the largest 3:1 window is 600 x 200


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (BoxRecord((0, 0, 1, 1), 0.5, "a.jpg"), "no window"),
        (BoxRecord((0, 0, 10**6, 10**6), 0.5, "a.jpg"), "outside"),
        (BoxRecord((1, 100, 601, 300), 0.5, "a.jpg"), "outside"),
        (BoxRecord((0, 100, 600, 300), 0.5, "b.jpg"), "a box of 'b.jpg'"),
        (BoxRecord((100, 0, 500, 400), 0.5, "a.jpg"), "no window"),  # another aspect's
        (BoxRecord((0, 100, 600, 300), -0.5, "a.jpg"), "confidence"),
    ],
)
def test_a_box_that_is_not_for_this_request_is_refused(record, message):
    check_box(BoxRecord((0, 100, 600, 300), 0.5, "a.jpg"), WANT)  # the control
    with pytest.raises(BadRecord, match=message):
        check_box(record, WANT)


def test_a_box_a_pixel_off_the_window_sizes_passes():
    check_box(BoxRecord((0, 100, 599, 301), 0.5, "a.jpg"), WANT)


def test_the_window_sizes_are_the_searchs():
    width, height = skdata.coffee().shape[1::-1]
    sizes = window_sizes(width, height, 3.0, PARAMS)
    assert sizes[0] == (600, 200)  # the largest first
    box = best_window(np.ones((7, 7), np.float32), width, height, 3.0, PARAMS)
    assert (box.width, box.height) in sizes
