"""training/backbones.py's read-out grids: each tap onto the stride-16 grid.

The stride-32 taps are upsampled as ONNX Resize (linear, half-pixel) does, so a stride-16
graph that ships the same features computes what the fit saw.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.readout import TAPS, upsampled2
from training.backbones import BACKBONES, on_grid


def _onnx_resize(x: np.ndarray) -> np.ndarray:
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear",
                            coordinate_transformation_mode="half_pixel")  # fmt: skip
    graph = helper.make_graph(
        [node], "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_upsampling_is_onnx_resize_linear_half_pixel():
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(upsampled2(x), _onnx_resize(x[None])[0], atol=1e-6)


def test_every_tap_lands_on_the_stride16_grid():
    rng = np.random.default_rng(1)
    h16, w16 = 6, 8  # a 96 x 128 input
    for tap in TAPS:
        stride = 32 // tap.pool
        x = rng.normal(size=(2, 96 // stride, 128 // stride)).astype(np.float32)
        got = on_grid(x, tap, 16)
        assert got.shape == (2, h16, w16)
        if stride == 8:
            np.testing.assert_allclose(got[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
        if stride == 16:
            assert got is x
    with pytest.raises(ValueError, match="onto grid 8"):
        on_grid(np.zeros((1, 2, 2), np.float32), TAPS[-1], 8)


def test_grid_is_part_of_the_cache_key():
    assert BACKBONES["lite0-s16"].key != BACKBONES["lite0"].key
    assert BACKBONES["lite0-s16"].key.startswith("lite0-s16-")


def test_a_stride16_readout_graph_computes_what_the_fit_saw():
    """Weights with grid 16: the graph's read-out channel is head_logits on the taps put on the
    stride-16 grid by on_grid (what training/backbones caches for lite0-s16), and its CAM
    channels are the stride-32 graph's, upsampled."""
    from engines import classes
    from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES
    from engines.graph import build_model
    from engines.readout import FEATURES, head_logits
    from engines.weights import load_state_dict, shipped_weights_path

    rng = np.random.default_rng(2)
    weights = load_state_dict(shipped_weights_path())
    readout = {
        "w1": (rng.normal(size=(1, FEATURES)) * 0.01).astype(np.float32),
        "b1": np.zeros(1, np.float32),
        "gate_w1": (rng.normal(size=(1, FEATURES)) * 0.01).astype(np.float32),
        "gate_b1": np.zeros(1, np.float32),
        "a": np.array([0.1, -0.2, -0.5, -0.3], np.float32),
    }
    batch = rng.integers(0, 256, (1, 224, 288, 3), dtype=np.uint8)
    coarse = build_model(weights, classes.FOOD_CLASSES, readout)
    for tap in TAPS:
        coarse.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
    sess = ort.InferenceSession(coarse.SerializeToString(), providers=["CPUExecutionProvider"])
    heat32, mass, *taps = sess.run([OUTPUT_NAMES[0], OUTPUT_NAMES[1], *(t.tensor for t in TAPS)],
                                   {INPUT_NAME: batch})  # fmt: skip
    fine = build_model(weights, classes.FOOD_CLASSES, {**readout, "grid": np.array(16)})
    sess16 = ort.InferenceSession(fine.SerializeToString(), providers=["CPUExecutionProvider"])
    heat16 = sess16.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})[0][0]
    assert heat16.shape == (len(PROFILES), 14, 18)
    feats = np.concatenate([on_grid(m[0], t, 16) for m, t in zip(taps, TAPS, strict=True)])
    z = head_logits(readout, feats.reshape(FEATURES, -1).T, (14, 18), float(mass[0]))
    want = np.exp(z - z.max())
    np.testing.assert_allclose(heat16[PROFILES.index("readout")], want, rtol=1e-3, atol=1e-4)
    for k in range(2):  # the CAM heads, upsampled
        np.testing.assert_allclose(heat16[k], upsampled2(heat32[0, k : k + 1])[0], atol=1e-5)
