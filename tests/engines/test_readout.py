"""The learned read-out channel of the exported model against a numpy recomputation.

The tapped feature maps are exposed as extra graph outputs and the read-out is recomputed from
them with the shipped weights (engines/readout_weights.npz): pooling, 1x1 map(s), centre bias
and peak normalisation, written out naively here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES
from engines.export import export
from engines.readout import COORD_TERMS, FEATURES, TAPS, WEIGHTS_PATH, coord_axis, load_weights

GOLDEN = Path(__file__).parents[1] / "support" / "golden" / "lite0_reference.npz"
READOUT = PROFILES.index("readout")


@pytest.fixture(scope="module")
def tapped(tmp_path_factory) -> ort.InferenceSession:
    model = onnx.load(export(tmp_path_factory.mktemp("model")))
    for tap in TAPS:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _naive_up2(m: np.ndarray) -> np.ndarray:
    """[n, c, h, w] -> [n, c, 2h, 2w], bilinear with half-pixel centres, edges clamped."""
    n, c, h, w = m.shape

    def src(i: int, size: int) -> tuple[int, int, float]:
        x = min(max((i + 0.5) / 2 - 0.5, 0.0), size - 1.0)
        lo = int(np.floor(x))
        return lo, min(lo + 1, size - 1), x - lo

    out = np.zeros((n, c, 2 * h, 2 * w))
    for i in range(2 * h):
        y0, y1, ty = src(i, h)
        for j in range(2 * w):
            x0, x1, tx = src(j, w)
            top = m[:, :, y0, x0] * (1 - tx) + m[:, :, y0, x1] * tx
            bottom = m[:, :, y1, x0] * (1 - tx) + m[:, :, y1, x1] * tx
            out[:, :, i, j] = top * (1 - ty) + bottom * ty
    return out


def _naive_readout(
    maps: list[np.ndarray], weights: dict[str, np.ndarray], mass: np.ndarray
) -> np.ndarray:
    grid = int(weights["grid"]) if "grid" in weights else 32
    n, _, h32, w32 = maps[-1].shape
    h, w = h32 * 32 // grid, w32 * 32 // grid
    cols = []
    for tap, m in zip(TAPS, maps, strict=True):
        stride = 32 // tap.pool
        if stride > grid:
            cols.append(_naive_up2(m))
            continue
        p = grid // stride
        pooled = np.zeros((n, m.shape[1], h, w))
        for i in range(h):
            for j in range(w):
                pooled[:, :, i, j] = m[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].mean((2, 3))
        cols.append(pooled)
    f = np.concatenate(cols, axis=1).astype(np.float64)  # [n, FEATURES, h, w]
    assert f.shape[1] == FEATURES
    z = np.einsum("kc,nchw->nkhw", weights["w1"].astype(np.float64), f)
    z += weights["b1"][None, :, None, None]
    if "w2" in weights:
        z = np.einsum("ok,nkhw->nohw", weights["w2"], np.maximum(z, 0.0))
        z += weights["b2"][None, :, None, None]
    z = z[:, 0]
    if "gate_w1" in weights:  # the food head, times the image's food probability
        zf = np.einsum("kc,nchw->nkhw", weights["gate_w1"].astype(np.float64), f)[:, 0]
        z = z + mass[:, None, None] * (zf + weights["gate_b1"][0])
    a = weights["a"].astype(np.float64)
    v, u = coord_axis(h)[:, None], coord_axis(w)[None, :]
    z = z + (a[0] * u + a[1] * v + a[2] * u * u + a[3] * v * v)[None]
    return np.exp(z - z.max(axis=(1, 2), keepdims=True))


@pytest.mark.parametrize("bucket", ["224x224", "224x320"])
def test_readout_channel_matches_numpy(tapped, bucket):
    with np.load(GOLDEN) as golden:
        inputs = golden[f"inputs_{bucket}"]
    outs = tapped.run([OUTPUT_NAMES[0], OUTPUT_NAMES[1], *(t.tensor for t in TAPS)],
                      {INPUT_NAME: inputs})  # fmt: skip
    heat = outs[0][:, READOUT]
    want = _naive_readout(outs[2:], load_weights(), outs[1])
    np.testing.assert_allclose(heat, want, rtol=1e-3, atol=1e-5)
    assert np.allclose(heat.max(axis=(1, 2)), 1.0) and (heat > 0).all()


def test_readout_portrait_bucket_and_weights_file(tapped):
    rng = np.random.default_rng(5)
    batch = rng.integers(0, 256, (2, 320, 224, 3), dtype=np.uint8)
    outs = tapped.run([OUTPUT_NAMES[0], OUTPUT_NAMES[1], *(t.tensor for t in TAPS)],
                      {INPUT_NAME: batch})  # fmt: skip
    grid = int(load_weights()["grid"])
    assert outs[0].shape == (2, len(PROFILES), 320 // grid, 224 // grid)
    np.testing.assert_allclose(
        outs[0][:, READOUT], _naive_readout(outs[2:], load_weights(), outs[1]), rtol=1e-3,
        atol=1e-5,
    )  # fmt: skip
    weights = load_weights(WEIGHTS_PATH)
    assert weights["w1"].shape[1] == FEATURES and weights["a"].shape == (COORD_TERMS,)
    # Small enough to ship in the repository.
    assert WEIGHTS_PATH.stat().st_size < 200_000


def test_learned_profile_mixes_readout_with_the_cam_blend():
    from sidecar.core import CAM_SHARE, SEARCH_PROFILES, Analysis, blend_profiles

    food = np.zeros((7, 7), np.float32)
    food[0, 0] = 4.0
    generic = np.zeros((7, 7), np.float32)
    generic[6, 6] = 2.0
    readout = np.full((7, 7), 0.5, np.float32)
    readout[3, 3] = 1.0
    heat = np.stack([food, generic, readout]).astype(np.float16)
    analysis = Analysis(100, 50, heat, 1.0, "test")  # all food: auto is the food map
    assert "learned" in SEARCH_PROFILES and "readout" in SEARCH_PROFILES
    mixed = blend_profiles(analysis, "learned")
    assert mixed.sum() == pytest.approx(1.0)
    unit = readout / readout.sum()
    assert mixed[3, 3] == pytest.approx((1 - CAM_SHARE) * unit[3, 3])
    assert mixed[0, 0] == pytest.approx((1 - CAM_SHARE) * unit[0, 0] + CAM_SHARE)
    alone = blend_profiles(analysis, "learned", cam_share=0.0)
    np.testing.assert_allclose(alone, unit, rtol=1e-3)
    np.testing.assert_array_equal(blend_profiles(analysis, "readout"), readout)
