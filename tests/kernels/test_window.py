"""kernels/ against the slow references in tests/support/naive.py, on seeded random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels.heat import prepare_heatmap
from kernels.sat import summed_area_table, window_sum
from kernels.window import SearchParams, best_window, largest_window
from tests.support import naive


def _aspect_ok(cw: int, ch: int, aspect: float) -> bool:
    """Exact aspect within a pixel on whichever side was derived from the other."""
    return min(abs(cw - ch * aspect), abs(ch - cw / aspect)) <= 1.0


# --- summed-area table and fractional sums ---------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sat_matches_naive(seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 9, size=2))
    heat = rng.random((h, w)).astype(dtype)
    sat = summed_area_table(heat)
    assert sat.dtype == np.float64
    assert sat.shape == (h + 1, w + 1)
    np.testing.assert_allclose(sat, naive.naive_sat(heat), rtol=0, atol=1e-12)
    assert not sat[0].any() and not sat[:, 0].any()


def test_rect_mass_reference_agrees_with_plain_loops() -> None:
    rng = np.random.default_rng(11)
    heat = rng.random((5, 7))
    for _ in range(50):
        x0, x1 = sorted(rng.uniform(-1, 8, size=2))
        y0, y1 = sorted(rng.uniform(-1, 6, size=2))
        assert naive.rect_mass(heat, x0, y0, x1, y1) == pytest.approx(
            naive.rect_mass_loops(heat, x0, y0, x1, y1), abs=1e-12
        )


@pytest.mark.parametrize("seed", range(10))
def test_fractional_window_sum_is_exact_integral(seed: int) -> None:
    """Bilinear interpolation of the table == explicit partial-cell areas, also off the map."""
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(1, 12, size=2))
    heat = rng.random((h, w))
    sat = summed_area_table(heat)
    for _ in range(40):
        x0, x1 = sorted(float(v) for v in rng.uniform(-0.5, w + 0.5, size=2))
        y0, y1 = sorted(float(v) for v in rng.uniform(-0.5, h + 0.5, size=2))
        expected = naive.rect_mass(heat, x0, y0, x1, y1)
        assert window_sum(sat, x0, y0, x1, y1) == pytest.approx(expected, abs=1e-12)


def test_fractional_window_sum_partial_cell_by_hand() -> None:
    heat = np.array([[1.0, 2.0], [3.0, 4.0]])
    sat = summed_area_table(heat)
    # a quarter of cell (0,0) + a quarter of (0,1) + a quarter of (1,0) + a quarter of (1,1)
    assert window_sum(sat, 0.5, 0.5, 1.5, 1.5) == pytest.approx(2.5, abs=1e-15)
    assert window_sum(sat, 0.0, 0.0, 2.0, 2.0) == pytest.approx(10.0, abs=1e-15)
    assert window_sum(sat, 1.0, 0.0, 1.0, 2.0) == 0.0
    assert window_sum(sat, -3.0, -3.0, 0.0, 5.0) == 0.0


# --- heatmap preparation ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_prepare_upsample_matches_naive_bilinear(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    h, w = int(rng.integers(1, 8)), int(rng.integers(1, 15))
    gh, gw = int(rng.integers(1, 40)), int(rng.integers(1, 60))
    src = rng.random((h, w)) + 0.01
    out = prepare_heatmap(src, (gh, gw), center_sigma=0.3, center_weight=0.0)
    expected = naive.naive_bilinear(src, gh, gw)
    np.testing.assert_allclose(out, expected / expected.sum(), rtol=1e-5, atol=1e-8)


def test_prepare_upsample_agrees_with_skimage() -> None:
    skt = pytest.importorskip("skimage.transform")
    src = np.random.default_rng(3).random((7, 10)) + 0.1
    ours = prepare_heatmap(src, (28, 40), center_sigma=0.3, center_weight=0.0)
    ref = skt.resize(src, (28, 40), order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(ours, ref / ref.sum(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_prepare_is_a_normalised_nonnegative_float32_map(weight: float) -> None:
    src = np.random.default_rng(5).normal(size=(7, 14)).astype(np.float32)  # has negatives
    out = prepare_heatmap(src, (28, 56), center_sigma=0.3, center_weight=weight)
    assert out.dtype == np.float32 and out.shape == (28, 56)
    assert float(out.min()) >= 0.0
    assert float(out.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)


def test_prepare_clips_negatives_before_upsampling() -> None:
    src = np.array([[-5.0, 1.0], [1.0, 1.0]])
    out = prepare_heatmap(src, (2, 2), center_sigma=0.3, center_weight=0.0)
    np.testing.assert_allclose(out, [[0.0, 1 / 3], [1 / 3, 1 / 3]], atol=1e-7)


@pytest.mark.parametrize(
    "src",
    [
        np.zeros((7, 7)),
        -np.ones((7, 7)),
        np.full((7, 7), np.nan),
        np.where(np.eye(7) > 0, np.inf, 1.0),
        np.where(np.eye(7) > 0, np.nan, 1.0),
        np.full((7, 7), 3.0),
    ],
    ids=["zero", "negative", "nan", "inf", "some-nan", "constant"],
)
def test_prepare_without_information_is_flat(src: np.ndarray) -> None:
    out = prepare_heatmap(src, (28, 28), center_sigma=0.3, center_weight=0.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.full((28, 28), 1 / 784), rtol=1e-6)


def test_prepare_prior_is_a_centred_gaussian_of_relative_sigma() -> None:
    gh, gw, sigma = 20, 30, 0.25
    g = prepare_heatmap(np.zeros((7, 7)), (gh, gw), center_sigma=sigma, center_weight=1.0)
    ys = (np.arange(gh) + 0.5 - gh / 2) / (sigma * gh)
    xs = (np.arange(gw) + 0.5 - gw / 2) / (sigma * gw)
    expected = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    np.testing.assert_allclose(g, expected / expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(g, g[::-1, ::-1], rtol=1e-6)


def test_prepare_blend_is_linear() -> None:
    src = np.random.default_rng(9).random((7, 9))
    kw = {"center_sigma": 0.3}
    h = prepare_heatmap(src, (21, 27), center_weight=0.0, **kw).astype(np.float64)
    g = prepare_heatmap(src, (21, 27), center_weight=1.0, **kw).astype(np.float64)
    mix = prepare_heatmap(src, (21, 27), center_weight=0.4, **kw)
    np.testing.assert_allclose(mix, 0.6 * h + 0.4 * g, rtol=1e-5, atol=1e-9)


def test_prepare_tiny_sigma_stays_finite() -> None:
    g = prepare_heatmap(np.ones((7, 7)), (4, 4), center_sigma=1e-6, center_weight=1.0)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g[1:3, 1:3], 0.25, rtol=1e-6)


# --- window search against the naive search -------------------------------------------------


def _random_heat(rng: np.random.Generator) -> np.ndarray:
    gh, gw = int(rng.integers(1, 11)), int(rng.integers(1, 11))
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return rng.random((gh, gw))
    if kind == 1:  # sparse: a few hot cells
        return (rng.random((gh, gw)) > 0.85) * rng.random((gh, gw))
    if kind == 2:  # flat: everything is a tie, the tie-break decides
        return np.ones((gh, gw), dtype=np.float32)
    if kind == 3:  # hot columns at both sides, a subject between: zooming in can pay
        heat = np.zeros((gh, gw))
        heat[:, : max(1, gw // 4)] = 1.0
        heat[:, gw - max(1, gw // 4) :] = 1.0
        heat[gh // 3 : gh - gh // 3, gw // 3 : gw - gw // 3] = 3.0
        return heat if rng.random() < 0.5 else heat.T.copy()
    yy, xx = np.mgrid[0:gh, 0:gw]
    cy, cx = rng.uniform(0, gh), rng.uniform(0, gw)
    return np.exp(-((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) / 4.0)


def _random_params(rng: np.random.Generator) -> SearchParams:
    return SearchParams(
        min_scale=1.0 if rng.random() < 0.3 else float(rng.uniform(0.3, 1.0)),
        scales=int(rng.integers(1, 5)),
        steps=int(rng.integers(2, 13)),
        cut_weight=float(rng.uniform(0.0, 2.0) if rng.random() < 0.6 else rng.uniform(2.0, 10.0)),
        cut_band=float(rng.uniform(0.0, 0.5)),
        # negative: a reward for tighter windows, the lever training/tune.py measures
        zoom_weight=float(rng.uniform(-0.5, 0.2)),
    )


def _random_case(seed: int) -> tuple:
    rng = np.random.default_rng(1000 + seed)
    heat = _random_heat(rng)
    big = rng.random() < 0.7
    width = int(rng.integers(1, 2400 if big else 8))
    height = int(rng.integers(1, 2400 if big else 8))
    aspects = [1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 4 / 5, 10.0, 0.1, width / height]
    aspect = float(rng.choice(aspects)) if rng.random() < 0.6 else math.exp(rng.uniform(-2, 2))
    keep = None
    if rng.random() < 0.35:
        kx0, ky0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        kx1 = int(rng.integers(kx0 + 1, min(width, kx0 + 1 + width // 3) + 1))
        ky1 = int(rng.integers(ky0 + 1, min(height, ky0 + 1 + height // 3) + 1))
        keep = (kx0, ky0, kx1, ky1)
    return heat, width, height, aspect, _random_params(rng), keep


@pytest.mark.parametrize("seed", range(50))
def test_best_window_matches_naive_search(seed: int) -> None:
    heat, width, height, aspect, params, keep = _random_case(seed)
    got = best_window(heat, width, height, aspect, params, keep)
    box, score, center = naive.best_window(heat, width, height, aspect, params, keep)
    assert got.as_tuple() == box
    assert got.score == pytest.approx(score, abs=1e-9)
    assert got.center_score == pytest.approx(center, abs=1e-9)
    assert got.confidence == pytest.approx(max(0.0, score - center), abs=1e-9)
    assert 0 <= got.x0 < got.x1 <= width and 0 <= got.y0 < got.y1 <= height
    assert _aspect_ok(got.width, got.height, aspect)


def _zoom_case(seed: int) -> tuple:
    """Hot side columns that every largest window slices: here a smaller window usually wins."""
    rng = np.random.default_rng(5000 + seed)
    heat = np.zeros((28, 56))
    heat[:, :8] = 1.0
    heat[:, 47:] = 1.0
    heat[10:18, 22:34] = 3.0
    heat += rng.random(heat.shape) * 0.05
    width, height = int(rng.integers(1900, 2100)), int(rng.integers(950, 1050))
    aspect = (width - float(rng.uniform(40, 250))) / height  # a left-edge range inside a column
    if rng.random() < 0.5:
        heat, width, height, aspect = heat.T.copy(), height, width, 1 / aspect
    params = SearchParams(
        min_scale=float(rng.uniform(0.4, 0.9)),
        scales=int(rng.integers(2, 6)),
        steps=int(rng.integers(2, 13)),
        cut_weight=float(rng.uniform(3.0, 10.0)),
        cut_band=float(rng.uniform(0.1, 0.3)),
        zoom_weight=float(rng.uniform(0.0, 0.1)),
    )
    return heat, width, height, aspect, params


@pytest.mark.parametrize("seed", range(12))
def test_best_window_matches_naive_search_when_zooming_pays(seed: int) -> None:
    heat, width, height, aspect, params = _zoom_case(seed)
    got = best_window(heat, width, height, aspect, params)
    box, score, center = naive.best_window(heat, width, height, aspect, params)
    assert got.as_tuple() == box
    assert got.score == pytest.approx(score, abs=1e-9)
    assert got.center_score == pytest.approx(center, abs=1e-9)


def test_zoom_cases_do_zoom() -> None:
    """Keeps the family above meaningful: most of its winners are smaller than the largest."""
    zoomed = 0
    for seed in range(12):
        heat, width, height, aspect, params = _zoom_case(seed)
        box = best_window(heat, width, height, aspect, params)
        zoomed += (box.width, box.height) != largest_window(width, height, aspect)
    assert zoomed >= 6


@pytest.mark.parametrize("seed", range(20))
def test_largest_window_is_largest_and_exact(seed: int) -> None:
    rng = np.random.default_rng(3000 + seed)
    for _ in range(50):
        width, height = (int(v) for v in rng.integers(1, 5000, size=2))
        aspect = math.exp(rng.uniform(math.log(1e-3), math.log(1e3)))
        cw, ch = largest_window(width, height, aspect)
        assert 1 <= cw <= width and 1 <= ch <= height
        assert cw == width or ch == height
        assert _aspect_ok(cw, ch, aspect)
