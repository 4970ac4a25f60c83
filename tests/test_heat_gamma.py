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
