import numpy as np
import pytest

from kernels.heat import prepare_heatmap
from tests.support.naive import naive_blur


def test_gamma_sharpens_and_keeps_sum():
    rng = np.random.default_rng(3)
    heat = rng.random((7, 9)).astype(np.float32)
    soft = prepare_heatmap(heat, (28, 36), center_sigma=0.3, center_weight=0.0)
    sharp = prepare_heatmap(heat, (28, 36), center_sigma=0.3, center_weight=0.0, gamma=2.0)
    assert soft.sum() == pytest.approx(1.0, abs=1e-5)
    assert sharp.sum() == pytest.approx(1.0, abs=1e-5)
    assert sharp.max() > soft.max()
    assert np.unravel_index(sharp.argmax(), sharp.shape) == np.unravel_index(
        soft.argmax(), soft.shape
    )


def test_gamma_matches_power_of_the_map():
    heat = np.array([[1.0, 3.0], [0.0, 2.0]], np.float32)
    out = prepare_heatmap(heat, (2, 2), center_sigma=0.3, center_weight=0.0, gamma=2.0)
    want = heat**2 / (heat**2).sum()
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, -1.0, 9.0, float("nan")])
def test_gamma_validation(gamma):
    with pytest.raises(ValueError, match="gamma"):
        prepare_heatmap(np.ones((2, 2)), (4, 4), center_sigma=0.3, center_weight=0.0, gamma=gamma)


@pytest.mark.parametrize("shape", [(64, 64), (2, 3), (5, 8)])
@pytest.mark.parametrize("sigma", [1e-160, 1e-300, 5e-324])
def test_a_vanishing_centre_prior_is_the_centre_cells_not_nan(
    sigma: float, shape: tuple[int, int]
) -> None:
    out = prepare_heatmap(np.zeros((7, 7)), shape, center_sigma=sigma, center_weight=1.0)
    assert np.isfinite(out).all() and abs(float(out.sum()) - 1.0) < 1e-5
    gh, gw = shape
    rows = [gh // 2 - 1, gh // 2] if gh % 2 == 0 else [gh // 2]
    cols = [gw // 2 - 1, gw // 2] if gw % 2 == 0 else [gw // 2]
    expected = np.zeros(shape)
    expected[np.ix_(rows, cols)] = 1.0 / (len(rows) * len(cols))
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(28, 40), (5, 3), (1, 9)])
def test_smoothing_is_a_gaussian_blur_with_replicated_edges(
    sigma: float, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(int(sigma * 10) + shape[0])
    src = rng.uniform(0, 1, (7, 9))
    plain = prepare_heatmap(src, shape, center_sigma=0.3, center_weight=0.2).astype(np.float64)
    smooth = prepare_heatmap(src, shape, center_sigma=0.3, center_weight=0.2, smooth=sigma)
    expected = naive_blur(plain, sigma)
    np.testing.assert_allclose(smooth, expected / expected.sum(), rtol=1e-5, atol=1e-9)
    assert abs(float(smooth.sum()) - 1.0) < 1e-5
    # and scipy agrees (a second, independent reference)
    from scipy.ndimage import gaussian_filter

    ref = gaussian_filter(plain, sigma, mode="nearest")
    np.testing.assert_allclose(smooth, ref / ref.sum(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("smooth", [-1.0, 17.0, float("nan"), "1"])
def test_smoothing_out_of_range_is_refused(smooth) -> None:
    with pytest.raises(ValueError, match="smooth"):
        prepare_heatmap(
            np.ones((7, 7)), (28, 28), center_sigma=0.3, center_weight=0.0, smooth=smooth
        )
