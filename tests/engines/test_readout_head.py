"""The read-out's general head in the ONNX graph against engines.readout.head_logits (numpy).

Hidden layers, the food head gated by the image's food probability and the blur are each
compiled into the graph (engines/graph.py) from plain arrays; the graph's readout channel
must be exp(z - max) of the numpy reference's logits on the graph's own tapped features.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines import classes
from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES
from engines.graph import build_model
from engines.readout import (
    COORD_TERMS,
    FEATURES,
    TAPS,
    blur_kernel,
    blur_map,
    head_logits,
    layer_count,
)
from engines.weights import load_state_dict, shipped_weights_path
from training.features import pooled

READOUT = PROFILES.index("readout")


def random_head(
    hidden: tuple[int, ...], gate: bool, blur: float, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    widths = [FEATURES, *hidden, 1]
    for prefix, ws in (("", widths), ("gate_", [FEATURES, 1]) if gate else ("", [])):
        for k, (a, b) in enumerate(itertools.pairwise(ws), start=1):
            out[f"{prefix}w{k}"] = rng.normal(0, 1 / np.sqrt(a), (b, a)).astype(np.float32)
            out[f"{prefix}b{k}"] = rng.normal(0, 0.1, b).astype(np.float32)
    if blur:
        out["blur"] = np.array(blur, np.float32)
    out["a"] = np.array([0.3, -0.2, -1.0, -0.5], np.float32)
    return out


@pytest.fixture(scope="module")
def backbone_weights():
    return load_state_dict(shipped_weights_path())


def tapped_session(weights, readout) -> ort.InferenceSession:
    model = build_model(weights, classes.FOOD_CLASSES, readout)
    for tap in TAPS:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def cells_of(maps: list[np.ndarray], n: int) -> np.ndarray:
    cols = [pooled(m[n], t.pool) if t.pool > 1 else m[n] for m, t in zip(maps, TAPS, strict=True)]
    stacked = np.concatenate(cols)
    return stacked.reshape(stacked.shape[0], -1).T


@pytest.mark.parametrize(
    ("hidden", "gate", "blur"),
    [((), False, 0.0), ((16,), False, 0.0), ((16, 8), True, 0.0), ((8,), True, 0.75)],
)
def test_graph_head_matches_numpy_reference(backbone_weights, hidden, gate, blur):
    readout = random_head(hidden, gate, blur)
    assert layer_count(readout) == len(hidden) + 1
    sess = tapped_session(backbone_weights, readout)
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (2, 224, 288, 3), dtype=np.uint8)
    outs = sess.run([OUTPUT_NAMES[0], OUTPUT_NAMES[1], *(t.tensor for t in TAPS)],
                    {INPUT_NAME: batch})  # fmt: skip
    heat, mass, maps = outs[0], outs[1], outs[2:]
    assert heat.shape == (2, len(PROFILES), 7, 9)
    for n in range(2):
        z = head_logits(readout, cells_of(maps, n), (7, 9), float(mass[n]))
        want = np.exp(z - z.max())
        np.testing.assert_allclose(heat[n, READOUT], want, rtol=2e-3, atol=1e-5)
    # Every node the head adds is under the `readout.` prefix (the INT8 quantizer keeps it float).
    plain = random_head((), False, 0.0)
    names = {
        n.name for n in build_model(backbone_weights, classes.FOOD_CLASSES, readout).graph.node
    }
    linear = {n.name for n in build_model(backbone_weights, classes.FOOD_CLASSES, plain).graph.node}
    assert all(m.startswith("readout.") for m in names ^ linear)
    assert bool(names ^ linear) == bool(hidden or gate or blur)


def test_blur_is_normalised_at_the_borders():
    z = np.full((7, 9), 2.5)
    np.testing.assert_allclose(blur_map(z, 1.0), z)
    k = blur_kernel(0.5)
    assert len(k) == 3 and np.isclose(k.sum(), 1.0)
    spike = np.zeros((7, 9))
    spike[3, 4] = 1.0
    blurred = blur_map(spike, 1.0)
    assert blurred.argmax() == 3 * 9 + 4 and blurred[3, 4] < 1.0


def test_centre_bias_terms_count():
    assert random_head((), False, 0.0)["a"].shape == (COORD_TERMS,)
