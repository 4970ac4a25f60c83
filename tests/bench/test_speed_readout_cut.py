"""bench/speed.py's comparison model: the shipped graph with its read-out head cut out."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from bench.speed import _without_readout
from engines.base import INPUT_NAME, OUTPUT_NAMES
from engines.export import export
from engines.readout import upsampled2


def test_cut_model_serves_the_cam_heads_on_the_backbones_grid(tmp_path):
    model = onnx.load(export(tmp_path / "model"))
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cut = ort.InferenceSession(
        _without_readout(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).integers(0, 256, (1, 224, 320, 3), dtype=np.uint8)
    heat = full.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]
    coarse = cut.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]
    assert heat.shape == (1, 3, 14, 20) and coarse.shape == (1, 2, 7, 10)
    assert not any(n.name.startswith("readout.") for n in _without_readout(model).graph.node)
    # the served CAM channels are the cut model's, upsampled x2
    np.testing.assert_allclose(heat[0, :2], upsampled2(coarse[0]), rtol=1e-5, atol=1e-5)
