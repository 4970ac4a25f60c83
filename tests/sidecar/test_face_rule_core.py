"""The face rule as the crop core applies it (sidecar/core.py): which faces it keeps whole
(``kernel.face_min_height``), how much room around them (``kernel.face_margin``), the zoom it
may use for them (``kernel.face_min_scale``), against the slow reference search of
tests/support/naive.py given the boxes worked out here by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from engines.faces import HeadBox
from kernels.faces import clean_faces
from kernels.window import best_window
from sidecar.codec import BoxRecord
from sidecar.core import Analysis, CropCore
from sidecar.records import BoxExpect, check_box
from sidecar.settings import KernelSettings, SourceSettings
from tests.support import naive


def _protected_by_hand(
    faces: np.ndarray, height: int, min_height: float, margin: float
) -> np.ndarray:
    head = HeadBox()
    out = []
    for x0, y0, x1, y1, _ in faces:
        w, h = (x1 - x0) / head.width, (y1 - y0) / head.height
        hx0 = (x0 + x1) / 2 - head.cx * w
        hy0 = (y0 + y1) / 2 - head.cy * h
        if h >= min_height * height:
            out.append(
                [hx0 - margin * w, hy0 - margin * h, hx0 + w + margin * w, hy0 + h + margin * h]
            )
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def _case(seed: int) -> tuple[Analysis, KernelSettings, float]:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(60, 400)), int(rng.integers(60, 400))
    grid = rng.random((3, int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float16)
    n = int(rng.integers(1, 6))
    side = rng.uniform(4, min(width, height) / 3, n)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    faces = np.stack([x0, y0, x0 + side, y0 + side * 1.1, np.full(n, 0.9)], 1).astype(np.float32)
    analysis = Analysis(width, height, grid, 0.3, "test", faces=faces)
    kernel = dataclasses.replace(
        KernelSettings(),
        steps=int(rng.integers(4, 16)),
        face_min_height=float(rng.choice([0.0, 1 / 12, 0.2])),
        face_margin=float(rng.choice([0.0, 0.1, 0.25])),
        face_min_scale=float(rng.choice([1.0, 0.9])),
        face_weight=float(rng.choice([0.0, 0.1])),
    )
    aspect = float(rng.choice([0.5, 0.8, 1.0, 16 / 9]))
    return analysis, kernel, aspect


@pytest.mark.parametrize("seed", range(40))
def test_the_core_keeps_the_faces_the_settings_name_as_the_naive_search_does(
    session_engine, seed: int
) -> None:
    analysis, kernel, aspect = _case(seed)
    core = CropCore(session_engine, kernel, SourceSettings(), "learned")
    box = core.box(analysis, aspect)
    heat = core.prepared(analysis)
    faces = _protected_by_hand(
        analysis.faces, analysis.height, kernel.face_min_height, kernel.face_margin
    )
    if len(faces) == 0:
        plain = best_window(heat, analysis.width, analysis.height, aspect, core.params)
        assert box.as_tuple() == plain.as_tuple()
        return
    params = dataclasses.replace(core.params, min_scale=kernel.face_min_scale)
    ref_box, _, _ = naive.best_window_faces(
        heat,
        analysis.width,
        analysis.height,
        aspect,
        params,
        clean_faces(faces, analysis.width, analysis.height),
        None,
        kernel.face_weight,
    )
    assert box.as_tuple() == tuple(ref_box)


def test_a_small_face_at_the_back_is_left_to_the_heat(session_engine) -> None:
    # All heat on the left; a 20-px face straddles where the heat-best window ends.
    maps = np.zeros((3, 6, 8), np.float16)
    maps[:, :, :2] = 1.0
    face = np.array([[350.0, 100.0, 370.0, 122.0, 0.9]], np.float32)
    analysis = Analysis(800, 600, maps, 0.0, "test", faces=face)
    noticed = CropCore(session_engine, KernelSettings(), SourceSettings(), "food")
    every = CropCore(session_engine, KernelSettings(face_min_height=0.0), SourceSettings(), "food")
    off = CropCore(session_engine, KernelSettings(faces=False), SourceSettings(), "food")
    assert noticed.box(analysis, 0.6).as_tuple() == off.box(analysis, 0.6).as_tuple()
    assert every.box(analysis, 0.6).as_tuple() != off.box(analysis, 0.6).as_tuple()


def test_a_zoomed_face_rule_box_passes_the_cache_check(session_engine) -> None:
    kernel = KernelSettings(face_min_scale=0.9, face_min_height=0.0)
    core = CropCore(session_engine, kernel, SourceSettings(), "learned")
    plain = CropCore(session_engine, KernelSettings(), SourceSettings(), "learned")
    sizes = core.window_sizes(800, 600, 1.0)
    assert plain.window_sizes(800, 600, 1.0) < sizes
    smallest = min(sizes)
    assert math.isclose(smallest[1], 540, abs_tol=1)
    x0 = 100
    record = BoxRecord((x0, 0, x0 + smallest[0], smallest[1]), 0.1, "a.jpg")
    check_box(record, BoxExpect("a.jpg", (800, 600), sizes))
