"""training/composition.py: composition priors in the largest-window search."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.window import SearchParams, best_window
from training.composition import SAMPLES, Prior, choose_box, offsets, template
from training.data import Box

NONE = Prior("thirds", 0.1, 0.0)


def _blob(gh: int, gw: int, cy: float, cx: float, s: float = 1.5) -> np.ndarray:
    yy, xx = np.mgrid[0:gh, 0:gw]
    heat = np.exp(-((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) / (2 * s**2)) + 1e-3
    return heat / heat.sum()


@pytest.mark.parametrize("seed", range(12))
def test_without_a_prior_it_is_the_kernel_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gh, gw = int(rng.integers(8, 40)), int(rng.integers(8, 40))
    heat = _blob(gh, gw, rng.uniform(0, gh), rng.uniform(0, gw)) + rng.uniform(0, 0.01, (gh, gw))
    heat /= heat.sum()
    width, height = int(rng.integers(200, 2000)), int(rng.integers(200, 2000))
    for aspect in (1.0, 4 / 5, 16 / 9, 9 / 16):
        params = SearchParams(min_scale=1.0, steps=64, cut_weight=0.0, zoom_weight=0.0)
        expected = Box.of(best_window(heat, width, height, aspect, params))
        assert choose_box(heat, width, height, aspect, NONE) == expected


@pytest.mark.parametrize("kind,sigma", [("thirds", 0.05), ("thirds", 0.1), ("centre", 0.15)])
def test_templates_have_zero_mean_so_a_flat_map_keeps_the_centre(kind: str, sigma: float) -> None:
    u = (np.arange(SAMPLES) + 0.5) / SAMPLES
    assert abs(template(kind, sigma, u).mean()) < 1e-12
    flat = np.full((20, 30), 1 / 600)
    box = choose_box(flat, 1500, 1000, 1.0, Prior(kind, sigma, 4.0))
    assert box == Box(250, 0, 1250, 1000)


def test_thirds_puts_a_centred_subject_on_a_thirds_line() -> None:
    # A small subject in the middle of a 3:1 panorama, square crop: without a prior the window
    # is centred on it; with the thirds prior the subject sits near a third of the window.
    heat = _blob(20, 60, 10.0, 30.0, s=1.0)
    plain = choose_box(heat, 3000, 1000, 1.0, NONE)
    assert plain == Box(1000, 0, 2000, 1000)
    thirds = choose_box(heat, 3000, 1000, 1.0, Prior("thirds", 0.05, 2.0))
    u = (1500 - thirds.x0) / 1000
    assert min(abs(u - 1 / 3), abs(u - 2 / 3)) < 0.03
    # and the centre template keeps it centred
    assert choose_box(heat, 3000, 1000, 1.0, Prior("centre", 0.15, 2.0)) == plain


def test_offsets_are_the_kernels() -> None:
    assert offsets(3, 64).tolist() == [0, 1, 2, 3]
    got = offsets(1000, 5)
    assert got.tolist() == [0, 250, 500, 750, 1000]
    assert 333 in offsets(667, 4).tolist()  # the centre offset is always a candidate
