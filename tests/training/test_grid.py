"""training/backbones.py's read-out grids: each tap onto the stride-16 grid.

The stride-32 taps are upsampled as ONNX Resize (linear, half-pixel) does, so a stride-16
graph that ships the same features computes what the fit saw.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.readout import TAPS
from training.backbones import BACKBONES, on_grid, upsampled2


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
