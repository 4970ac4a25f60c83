import numpy as np
import pytest

from kernels.heat import prepare_heatmap


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
