"""The face rule (kernels/faces.py) against the slow reference in tests/support/naive.py."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.faces import (
    MAX_FACES,
    best_window_faces,
    clean_faces,
    count_sliced,
    kept_fractions,
)
from kernels.window import SearchParams, best_window
from tests.support import naive


def _case(seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(2, 9, size=2))
    heat = rng.random((h, w))
    width, height = int(rng.integers(20, 240)), int(rng.integers(20, 240))
    aspect = float(rng.choice([0.5, 0.8, 1.0, 16 / 9]))
    n = int(rng.integers(0, 7))
    x0, y0 = rng.uniform(-10, width, n), rng.uniform(-10, height, n)
    faces = np.stack(
        [x0, y0, x0 + rng.uniform(2, width / 3, n), y0 + rng.uniform(2, height / 3, n)], 1
    ).reshape(-1, 4)
    params = SearchParams(
        min_scale=float(rng.choice([1.0, 0.7])), scales=3, steps=int(rng.integers(2, 14))
    )
    return heat, width, height, aspect, faces, params, float(rng.choice([0.0, 0.1, 1.0]))


@pytest.mark.parametrize("seed", range(60))
def test_face_rule_matches_naive_search(seed: int) -> None:
    heat, width, height, aspect, faces, params, weight = _case(seed)
    box, sliced = best_window_faces(heat, width, height, aspect, params, faces, face_weight=weight)
    ref_box, ref_score, ref_sliced = naive.best_window_faces(
        heat, width, height, aspect, params, clean_faces(faces, width, height), face_weight=weight
    )
    assert box.as_tuple() == ref_box
    assert sliced == ref_sliced
    assert box.score == pytest.approx(ref_score, abs=1e-9)
    assert sliced == count_sliced(clean_faces(faces, width, height), box.as_tuple())


@pytest.mark.parametrize("seed", range(12))
def test_face_rule_with_keep_box_matches_naive(seed: int) -> None:
    heat, width, height, aspect, faces, params, weight = _case(1000 + seed)
    rng = np.random.default_rng(seed)
    kx0, ky0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
    keep = (kx0, ky0, int(rng.integers(kx0 + 1, width + 1)), int(rng.integers(ky0 + 1, height + 1)))
    box, sliced = best_window_faces(heat, width, height, aspect, params, faces, keep, weight)
    ref_box, _, ref_sliced = naive.best_window_faces(
        heat, width, height, aspect, params, clean_faces(faces, width, height), keep, weight
    )
    assert (box.as_tuple(), sliced) == (ref_box, ref_sliced)


@pytest.mark.parametrize("seed", range(10))
def test_without_faces_it_is_best_window(seed: int) -> None:
    heat, width, height, aspect, _, params, _ = _case(seed)
    box, sliced = best_window_faces(heat, width, height, aspect, params, np.zeros((0, 5)))
    plain = best_window(heat, width, height, aspect, params)
    assert (box.as_tuple(), box.score, box.confidence, sliced) == (
        plain.as_tuple(), plain.score, plain.confidence, 0
    )  # fmt: skip


def test_a_window_that_slices_loses_to_one_that_keeps_the_face_whole() -> None:
    # All heat on the left edge, a face straddling where the heat-best 1:1 window would end.
    heat = np.zeros((4, 8))
    heat[:, 0] = 1.0
    width, height = 800, 400
    params = SearchParams()
    plain = best_window(heat, width, height, 1.0, params)
    assert plain.x0 == 0
    face = np.array([[380.0, 100.0, 440.0, 160.0, 0.99]])
    assert count_sliced(face, plain.as_tuple()) == 1
    box, sliced = best_window_faces(heat, width, height, 1.0, params, face)
    assert sliced == 0
    assert kept_fractions(face, box.as_tuple())[0] >= 0.9
    # Among the windows that slice nothing, the one keeping the most heat: as far left as
    # keeping 90 % of the face allows (x0 >= 34), not a window dropping the face (x0 >= 440).
    assert 34 <= box.x0 <= 45


def test_when_every_window_slices_the_least_slicing_wins() -> None:
    heat = np.ones((4, 8))
    width, height = 800, 350
    # 90-px faces every 100 px along the row: a 350-wide window cannot avoid cutting one, but
    # one aligned on a gap cuts one instead of two.
    faces = np.array([[x, 150.0, x + 90.0, 210.0] for x in range(20, 800, 100)])
    _, sliced = best_window_faces(heat, width, height, 1.0, SearchParams(), faces)
    least = min(count_sliced(faces, (x, 0, x + 350, 350)) for x in range(0, width - 350 + 1))
    assert sliced == least == 1


def test_face_weight_prefers_windows_keeping_more_faces() -> None:
    heat = np.ones((4, 8))
    faces = np.array([[0.0, 10.0, 30.0, 40.0], [20.0, 300.0, 60.0, 340.0]])
    plain, _ = best_window_faces(heat, 800, 400, 1.0, SearchParams(), faces)
    weighted, _ = best_window_faces(heat, 800, 400, 1.0, SearchParams(), faces, face_weight=1.0)
    assert (kept_fractions(faces, weighted.as_tuple()) >= 0.9).sum() == 2
    assert (kept_fractions(faces, plain.as_tuple()) >= 0.9).sum() == 0


def test_clean_faces_clips_drops_empty_and_keeps_the_largest() -> None:
    faces = np.array([[-5.0, -5.0, 10.0, 10.0, 0.9], [50.0, 50.0, 50.0, 60.0, 0.9]])
    out = clean_faces(faces, 100, 100)
    np.testing.assert_array_equal(out, [[0.0, 0.0, 10.0, 10.0]])
    many = np.array([[i, 0.0, i + 1.0 + (i % 7), 5.0] for i in range(MAX_FACES + 40)])
    kept = clean_faces(many, 1000, 100)
    assert kept.shape == (MAX_FACES, 4)
    dropped_area = np.sort(many[:, 2] - many[:, 0])[:40].max()
    assert ((kept[:, 2] - kept[:, 0]) >= dropped_area).all()


@pytest.mark.parametrize(
    "faces",
    [np.zeros((3,)), np.full((1, 4), np.nan), np.zeros((2, 3))],
)
def test_bad_faces_are_refused(faces: np.ndarray) -> None:
    with pytest.raises(ValueError, match="faces"):
        best_window_faces(np.ones((2, 2)), 10, 10, 1.0, SearchParams(), faces)


@pytest.mark.parametrize("weight", [-0.1, float("inf"), True])
def test_bad_face_weight_is_refused(weight: object) -> None:
    with pytest.raises(ValueError, match="face_weight"):
        best_window_faces(
            np.ones((2, 2)), 10, 10, 1.0, SearchParams(), np.zeros((0, 4)), face_weight=weight
        )
