"""training/fit_window.py: candidate windows as linear maps of cell heats; the loss gradient."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kernels.heat import prepare_heatmap
from training.data import PROTOCOLS, Box, EvalItem, EvalSet
from training.features import SetFeatures, targets
from training.fit_window import (
    UPSAMPLE,
    Config,
    Inputs,
    Part,
    axis_matrix,
    episodes,
    fit,
    heat_maps,
    initial,
    loss_grad,
    n_params,
    problem,
    window_weights,
)

SHAPES = [(3, 5), (4, 4), (5, 3)]  # cells of three images (h, w)
SIZES = [(500, 300), (400, 400), (300, 500)]  # their pixels (w, h)


def _data(seed: int = 0, features: int = 12) -> tuple[EvalSet, SetFeatures]:
    """Three images whose viewers look at the left third; feature 0 says 'left third'."""
    rng = np.random.default_rng(seed)
    items, chunks = [], []
    for (h, w), (pw, ph) in zip(SHAPES, SIZES, strict=True):
        fx = np.column_stack(
            [rng.uniform(0, pw / 3, 40), rng.uniform(0, ph, 40), np.arange(40) % 8]
        )
        items.append(EvalItem("x.jpg", path=None, width=pw, height=ph, boxes=(), fixations=fx))  # type: ignore[arg-type]
        f = rng.normal(0, 1, (h * w, features))
        f[:, 0] = np.tile(np.arange(w) < w / 3, h) * 3.0
        chunks.append(f.astype(np.float16))
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    feats = SetFeatures(["a", "b", "c"], np.array(SHAPES), offsets, np.concatenate(chunks))
    return EvalSet(name="s", protocol=PROTOCOLS["saliency"], items=items), feats


def _problem(scene: int = 0):
    es, feats = _data()
    inputs = Inputs.fit(feats, dims=6, scene=scene)
    part = Part(feats, episodes(es, feats), [0, 1, 2], 1.0, 0.05, targets(es, feats))
    return problem([part], inputs), es, feats, inputs


def test_window_weights_give_the_kernels_upsampled_heat_inside_the_box():
    rng = np.random.default_rng(2)
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(2, 9, 2))
        width, height = (int(v) for v in rng.integers(40, 400, 2))
        heat = rng.uniform(0.1, 1.0, (h, w))
        gh, gw = h * UPSAMPLE, w * UPSAMPLE
        fine = prepare_heatmap(heat, (gh, gw), center_sigma=0.3, center_weight=0.0)
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        box = Box(
            x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
        )
        weights = window_weights(axis_matrix(h, gh), axis_matrix(w, gw), width, height, box)
        whole = window_weights(axis_matrix(h, gh), axis_matrix(w, gw), width, height,
                               Box(0, 0, width, height))  # fmt: skip
        # Brute force: each fine cell's area inside the box, in fine-cell units.
        ys = (np.arange(gh) + 0.5) * height / gh
        xs = (np.arange(gw) + 0.5) * width / gw
        cy = np.array(
            [_overlap(y - height / gh / 2, y + height / gh / 2, box.y0, box.y1) for y in ys]
        )
        cx = np.array(
            [_overlap(x - width / gw / 2, x + width / gw / 2, box.x0, box.x1) for x in xs]
        )
        cover = np.outer(cy / (height / gh), cx / (width / gw))
        share = weights @ heat.ravel() / (whole @ heat.ravel())
        assert share == pytest.approx(float((fine * cover).sum()), rel=1e-5, abs=1e-9)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


@pytest.mark.parametrize("hidden,scene,aux", [(0, 0, 0.0), (0, 2, 1.5), (3, 0, 0.5)])
def test_gradient_matches_finite_differences(hidden, scene, aux):
    pr, *_ = _problem(scene)
    pr = replace(pr, x=pr.x.astype(np.float64))  # float32 products would drown the differences
    cfg = Config(dims=6, hidden=hidden, tau=0.05, l2=0.1, aux=aux, scene=scene)
    d = pr.x.shape[1]
    rng = np.random.default_rng(7)
    theta = initial(d, hidden, seed=1) + rng.normal(0, 0.2, n_params(d, hidden))
    _, grad = loss_grad(theta, pr, cfg)
    for j in rng.choice(len(theta), min(12, len(theta)), replace=False):
        step = np.zeros_like(theta)
        step[j] = 1e-5
        num = (loss_grad(theta + step, pr, cfg)[0] - loss_grad(theta - step, pr, cfg)[0]) / 2e-5
        assert grad[j] == pytest.approx(num, rel=2e-3, abs=2e-4)


def test_fitting_moves_the_heat_to_where_people_look():
    pr, _, feats, inputs = _problem()
    cfg = Config(dims=6, l2=0.01, aux=0.0, scene=0, iters=100)
    start = loss_grad(initial(pr.x.shape[1], 0), pr, cfg)[0]
    params = fit(pr, cfg)
    end = loss_grad(np.concatenate([params.w1[:, 0], params.a]), pr, cfg)[0]
    assert end < start
    for heat, (h, w) in zip(heat_maps(params, feats, inputs, 0), SHAPES, strict=True):
        assert heat.shape == (h, w)
        left = heat[:, : max(1, w // 3)].mean()
        assert left > heat[:, w // 3 :].mean()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().dims = 3  # type: ignore[misc]
    assert replace(Config(), dims=3).dims == 3


def test_dims_zero_keeps_the_standardised_features():
    _, feats = _data()
    inputs = Inputs.fit(feats, dims=0, scene=0)
    x = feats.features.astype(np.float32)
    expected = (x[feats.rows(1)] - x.mean(0)) / (x.std(0) + 1e-3)
    assert np.allclose(inputs.cells(feats, 1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="principal components"):
        Inputs.fit(feats, dims=0, scene=2)


@pytest.mark.parametrize("dims", [0, 5])
def test_readout_weights_give_the_same_logits_on_the_raw_features(dims):
    from engines.readout import coord_features
    from training.fit_window import Params, forward, readout_weights

    _, feats = _data()
    inputs = Inputs.fit(feats, dims=dims, scene=0)
    d = inputs.basis.shape[1]
    rng = np.random.default_rng(9)
    params = Params(rng.normal(0, 0.3, (d, 1)), np.zeros(1), np.ones(1), rng.normal(0, 1, 4))
    shipped = readout_weights(params, inputs)
    assert shipped["w1"].shape == (1, feats.features.shape[1]) and shipped["a"].shape == (4,)
    for i, (h, w) in enumerate(SHAPES):
        coords = coord_features(h, w)
        expected, _ = forward(params, inputs.cells(feats, i).astype(np.float64), coords, 0)
        raw = feats.features[feats.rows(i)].astype(np.float64)
        got = raw @ shipped["w1"][0] + shipped["b1"][0] + coords @ shipped["a"]
        assert np.allclose(got, expected, atol=1e-3)
    with pytest.raises(ValueError, match="scene"):
        readout_weights(params, Inputs.fit(feats, dims=5, scene=2))
