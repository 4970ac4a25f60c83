"""Composition maps in the window search (issue 24) against tests/support/naive.py."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.faces import best_window_faces, clean_faces
from kernels.window import (
    COMP_CHANNELS,
    SearchParams,
    best_window,
    composition,
    composition_terms,
    largest_window,
)
from tests.support import naive


def _comp(rng: np.random.Generator) -> np.ndarray:
    """Signed maps on a grid of their own (not the heat's), sometimes with sharp spikes."""
    gh, gw = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    comp = rng.normal(0.0, float(rng.choice([0.05, 0.5, 3.0])), (COMP_CHANNELS, gh, gw))
    if rng.random() < 0.3:
        comp *= rng.random(comp.shape) > 0.8
    return comp


def _case(seed: int) -> tuple:
    rng = np.random.default_rng(2400 + seed)
    heat = rng.random((int(rng.integers(1, 10)), int(rng.integers(1, 10))))
    width, height = int(rng.integers(1, 1600)), int(rng.integers(1, 1600))
    aspect = float(rng.choice([1.0, 4 / 5, 16 / 9, 9 / 16, 3.0, width / height]))
    params = SearchParams(
        min_scale=1.0 if rng.random() < 0.5 else float(rng.uniform(0.4, 1.0)),
        scales=int(rng.integers(1, 4)),
        steps=int(rng.integers(2, 12)),
        cut_weight=float(rng.uniform(0.0, 2.0)),
        cut_band=float(rng.uniform(0.0, 0.3)),
        zoom_weight=float(rng.uniform(0.0, 0.1)),
    )
    return heat, width, height, aspect, params, _comp(rng)


@pytest.mark.parametrize("seed", range(30))
def test_terms_match_naive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    comp = _comp(rng)
    width, height = int(rng.integers(1, 900)), int(rng.integers(1, 900))
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
    got = composition_terms(comp, width, height, (x0, y0, x1, y1))
    ref = naive.composition_terms(comp, width, height, x0, y0, x1 - x0, y1 - y0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(40))
def test_search_matches_naive(seed: int) -> None:
    heat, width, height, aspect, params, comp = _case(seed)
    got = best_window(heat, width, height, aspect, params, comp=comp)
    box, score, center = naive.best_window(heat, width, height, aspect, params, comp=comp)
    assert got.as_tuple() == box
    assert got.score == pytest.approx(score, abs=1e-9)
    assert got.center_score == pytest.approx(center, abs=1e-9)


@pytest.mark.parametrize("seed", range(15))
def test_search_with_faces_and_keep_matches_naive(seed: int) -> None:
    heat, width, height, aspect, params, comp = _case(100 + seed)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    fx, fy = rng.uniform(0, width, n), rng.uniform(0, height, n)
    faces = np.stack([fx, fy, fx + rng.uniform(1, width / 3 + 1, n),
                      fy + rng.uniform(1, height / 3 + 1, n)], 1)  # fmt: skip
    keep = None
    if rng.random() < 0.5:
        kx, ky = int(rng.integers(0, width)), int(rng.integers(0, height))
        keep = (kx, ky, min(width, kx + 1 + width // 5), min(height, ky + 1 + height // 5))
    box, sliced = best_window_faces(heat, width, height, aspect, params, faces, keep, 0.2, comp)
    clean = clean_faces(faces, width, height)
    ref_box, ref_score, ref_sliced = naive.best_window_faces(
        heat, width, height, aspect, params, clean, keep, 0.2, comp
    )
    assert (box.as_tuple(), sliced) == (ref_box, ref_sliced)
    assert box.score == pytest.approx(ref_score, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_tables_made_once_search_as_the_maps(seed: int) -> None:
    heat, width, height, aspect, params, comp = _case(300 + seed)
    once = composition(comp)
    assert best_window(heat, width, height, aspect, params, comp=once) == best_window(
        heat, width, height, aspect, params, comp=comp
    )
    np.testing.assert_array_equal(
        composition_terms(once, width, height, (0, 0, width, height)),
        composition_terms(comp, width, height, (0, 0, width, height)),
    )


def test_constant_maps_give_area_shares() -> None:
    """A map of constant 1 adds its part's share of the image: a ninth of the window each, the
    rest of the image for the discarded part."""
    comp = np.ones((COMP_CHANNELS, 3, 5))
    terms = composition_terms(comp, 600, 300, (150, 0, 450, 300))
    np.testing.assert_allclose(terms[:9], np.full(9, 0.5 / 9), atol=1e-12)
    assert terms[9] == pytest.approx(0.5, abs=1e-12)


def test_zero_maps_change_nothing() -> None:
    rng = np.random.default_rng(7)
    heat = rng.random((9, 16))
    params = SearchParams()
    plain = best_window(heat, 1600, 900, 1.0, params)
    zero = best_window(heat, 1600, 900, 1.0, params, comp=np.zeros((COMP_CHANNELS, 4, 4)))
    assert zero == plain


def test_left_third_map_moves_a_centred_subject_onto_the_left_third() -> None:
    """The lever itself: the same heat, a map that rewards the subject in the window's left
    column of thirds: the window slides right until the subject sits there."""
    heat = np.zeros((10, 40))
    heat[4:6, 19:21] = 1.0  # one subject at the image's centre
    params = SearchParams(cut_weight=0.0)
    plain = best_window(heat, 4000, 1000, 1.0, params)
    comp = np.zeros((COMP_CHANNELS, 10, 40))
    for r in range(3):
        comp[3 * r, 4:6, 19:21] = 50.0  # left column of thirds, every row
    moved = best_window(heat, 4000, 1000, 1.0, params, comp=comp)
    assert (plain.x0 + plain.x1) // 2 == 2000
    third = (moved.x0 + moved.width / 6, moved.x0 + moved.width / 3)
    assert moved.x0 < 2000 and third[0] <= 2000 <= moved.x0 + moved.width / 3 + 1
    assert moved.score > plain.score


def test_discarded_part_counts_what_the_window_throws_away() -> None:
    """A positive discard map on the right half: the window leaves that half out."""
    heat = np.ones((6, 12))
    comp = np.zeros((COMP_CHANNELS, 6, 12))
    comp[9, :, 6:] = 1.0
    box = best_window(heat, 1200, 600, 1.0, SearchParams(cut_weight=0.0), comp=comp)
    assert (box.x0, box.x1) == (0, 600)
    assert largest_window(1200, 600, 1.0) == (600, 600)


@pytest.mark.parametrize(
    "comp",
    [
        np.zeros((COMP_CHANNELS - 1, 3, 3)),
        np.zeros((COMP_CHANNELS, 0, 3)),
        np.zeros((COMP_CHANNELS, 3, 3), dtype=np.int64),
        np.full((COMP_CHANNELS, 3, 3), np.nan),
        np.zeros((3, 3)),
        [[0.0]],
    ],
)
def test_bad_maps_are_refused(comp: object) -> None:
    with pytest.raises(ValueError, match="comp must"):
        best_window(np.ones((3, 3)), 100, 100, 1.0, SearchParams(), comp=comp)  # type: ignore[arg-type]


def test_terms_need_maps_and_a_box_inside() -> None:
    with pytest.raises(ValueError, match="comp must"):
        composition_terms(None, 10, 10, (0, 0, 5, 5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="box must"):
        composition_terms(np.zeros((COMP_CHANNELS, 2, 2)), 10, 10, (0, 0, 11, 5))
