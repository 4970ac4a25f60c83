"""engines.export / engines.graph / engines.model: the torch-free ONNX model against the reference.

The golden file (tests/support/golden/lite0_reference.npz, written with torch by
tests/support/golden/make_golden.py) holds uint8 inputs and the reference model's logits
and heat maps; these tests
need only ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines import buckets, classes
from engines.artifacts import MANIFEST_NAME, model_file_name, sha256_hex
from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES
from engines.errors import ModelNotBuilt
from engines.export import export
from engines.graph import GENERIC_HEAD, same_pads
from engines.model import find_model
from engines.readout import GATE_PREFIX, WEIGHTS_PATH, layer_count, load_weights, upsampled2

GOLDEN = Path(__file__).parents[1] / "support" / "golden" / "lite0_reference.npz"
GOLDEN_BUCKETS = ("224x224", "224x320")
# Relative to the largest reference value; measured differences are ~2e-6 (BN folding and
# operator order), so this leaves room for other CPUs without hiding a wrong layer.
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def session(model_path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


def _run(session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
    return dict(
        zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}), strict=True)
    )


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    tol = REL_TOL * max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max |Δ| {err:.3g} > {tol:.3g}"


# The channels the torch reference computes; the learned read-out is checked in
# tests/test_readout.py against a numpy recomputation from the graph's own features.
REFERENCE_PROFILES = ("food", "generic")


def _assert_heatmaps_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    # Per channel: the food map is in logits (tens), the generic one in ReLU6 activations
    # (about 1), so one tolerance from the larger channel would hide an error in the smaller.
    assert PROFILES[: len(REFERENCE_PROFILES)] == REFERENCE_PROFILES
    # The reference's maps are on the backbone's stride-32 grid; the graph upsamples both CAM
    # heads to the read-out's grid (engines/readout.upsampled2 is that step in numpy).
    while want.shape[-1] < got.shape[-1]:
        want = np.stack([upsampled2(m) for m in want])
    for channel, profile in enumerate(REFERENCE_PROFILES):
        _assert_close(got[:, channel], want[:, channel], f"{what} {profile}")


def test_golden_matches_current_head_definition(golden):
    # The heat maps in the golden file depend on the class set and on what the generic head is;
    # a change to either needs a new golden.
    hint = "heads changed: regenerate with `python -m tests.support.golden.make_golden`"
    assert tuple(golden["food_classes"].tolist()) == classes.FOOD_CLASSES, hint
    assert str(golden["generic_head"]) == GENERIC_HEAD, hint


@pytest.mark.parametrize("bucket", GOLDEN_BUCKETS)
def test_matches_reference_model(session, golden, bucket):
    out = _run(session, golden[f"inputs_{bucket}"])
    _assert_close(out["logits"], golden[f"logits_{bucket}"], f"logits {bucket}")
    _assert_heatmaps_close(out["heatmaps"], golden[f"heatmaps_{bucket}"], f"heatmaps {bucket}")
    np.testing.assert_allclose(out["food_mass"], golden[f"food_mass_{bucket}"], atol=1e-5)
    np.testing.assert_array_equal(
        out["logits"].argmax(axis=1), golden[f"logits_{bucket}"].argmax(axis=1)
    )


@pytest.mark.parametrize("bucket", GOLDEN_BUCKETS)
def test_photos_make_sense(session, golden, bucket):
    names = list(golden[f"names_{bucket}"])
    out = _run(session, golden[f"inputs_{bucket}"])
    coffee, cat = names.index("coffee"), names.index("chelsea")
    espresso, cup, mug = 967, 968, 504
    top3 = set(np.argsort(-out["logits"][coffee])[:3].tolist())
    assert espresso in top3 and top3 & {cup, mug}, [classes.label(c) for c in top3]
    assert out["food_mass"][coffee] > 0.5 > out["food_mass"][cat]
    assert 281 <= out["logits"][cat].argmax() <= 285  # the domestic-cat classes
    # The cup sits in the upper middle of skimage's coffee photo; its heat must peak there.
    food = out["heatmaps"][coffee, 0]
    row, col = np.unravel_index(food.argmax(), food.shape)
    h, w = food.shape
    assert row < h / 2 and w / 4 <= col < 3 * w / 4, (row, col)


def test_heatmaps_non_negative_and_finite(session, golden):
    for bucket in GOLDEN_BUCKETS:
        out = _run(session, golden[f"inputs_{bucket}"])
        for name, value in out.items():
            assert value.dtype == np.float32 and np.isfinite(value).all(), name
        assert (out["heatmaps"] >= 0).all()
        assert ((out["food_mass"] >= 0) & (out["food_mass"] <= 1)).all()


def test_input_must_be_uint8(session, model_path):
    graph_input = onnx.load(model_path, load_external_data=False).graph.input[0]
    assert graph_input.name == INPUT_NAME
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    with pytest.raises(Exception, match=r"(?i)type"):
        session.run(None, {INPUT_NAME: np.zeros((1, 224, 224, 3), np.float32)})


def test_dynamic_batch_equals_singles(session, golden):
    batch = golden["inputs_224x320"][2:5]
    together = _run(session, batch)
    for i in range(len(batch)):
        alone = _run(session, batch[i : i + 1])
        for name in OUTPUT_NAMES:
            np.testing.assert_allclose(together[name][i], alone[name][0], rtol=1e-5, atol=1e-5)


def test_every_bucket_runs(session):
    rng = np.random.default_rng(7)
    for height, width in buckets.all_buckets():
        batch = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        out = _run(session, batch)
        h, w = buckets.heatmap_shape((height, width))
        assert (h, w) == (height // buckets.HEATMAP_STRIDE, width // buckets.HEATMAP_STRIDE)
        assert out["heatmaps"].shape == (2, len(PROFILES), h, w)
        assert out["food_mass"].shape == (2,)
        assert out["logits"].shape == (2, classes.NUM_CLASSES)


def test_export_is_deterministic_and_idempotent(tmp_path, model_path):
    again = export(tmp_path / "a")
    assert again.name == model_path.name
    assert again.read_bytes() == model_path.read_bytes()
    assert again.name == model_file_name(sha256_hex(again.read_bytes()))
    before = {p.name: p.stat().st_mtime_ns for p in again.parent.iterdir()}
    assert export(tmp_path / "a") == again
    after = {p.name: p.stat().st_mtime_ns for p in again.parent.iterdir()}
    assert before == after  # nothing rewritten


def test_manifest(model_path):
    info = json.loads((model_path.parent / MANIFEST_NAME).read_text())
    assert info["file"] == model_path.name
    assert info["sha256"] == sha256_hex(model_path.read_bytes())
    assert info["input"]["name"] == INPUT_NAME
    assert list(info["outputs"]) == list(OUTPUT_NAMES)
    assert [tuple(b) for b in info["buckets"]] == list(buckets.all_buckets())
    assert tuple(info["food_classes"]) == classes.FOOD_CLASSES
    assert info["generic"] == GENERIC_HEAD
    assert info["profiles"] == list(PROFILES)
    assert info["readout"]["weights_sha256"] == sha256_hex(WEIGHTS_PATH.read_bytes())


def test_graph_structure(model_path):
    model = onnx.load(model_path)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # stem + block 0 (depthwise, project) + 15 blocks x 3 + head + the food CAM + read-out
    # (one 1x1 convolution per layer of the head and of its food head, two for a blur).
    weights = load_weights()
    readout = layer_count(weights) + layer_count(weights, GATE_PREFIX) + 2 * ("blur" in weights)
    assert len(convs) == 1 + 2 + 15 * 3 + 1 + 1 + readout
    attrs = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs
    }
    assert attrs["_conv_stem"]["pads"] == [0, 0, 1, 1]
    assert attrs["_blocks.3._depthwise_conv"]["pads"] == [1, 1, 2, 2]  # 5x5, stride 2
    assert attrs["_blocks.4._depthwise_conv"]["pads"] == [2, 2, 2, 2]  # 5x5, stride 1
    assert attrs["_blocks.6._depthwise_conv"]["pads"] == [1, 1, 1, 1]  # 3x3, stride 1
    ops = {n.op_type for n in model.graph.node}
    assert "Sigmoid" not in ops and "BatchNormalization" not in ops  # no SE, BN folded
    assert "TopK" not in ops  # the generic head no longer depends on the image's classes


def test_generic_is_feature_rms(model_path, golden):
    # Expose the head's feature map as an extra output and recompute the generic channel from
    # it in numpy: the graph's own arithmetic, checked without torch.
    model = onnx.load(model_path)
    features = "_conv_head.relu6"
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    heat, feat = sess.run([OUTPUT_NAMES[0], features], {INPUT_NAME: golden["inputs_224x320"]})
    assert feat.shape[1:] == (1280, 7, 10)
    want = np.sqrt(np.mean(feat.astype(np.float64) ** 2, axis=1))
    if heat.shape[-1] > want.shape[-1]:  # on the read-out's finer grid
        want = np.stack([upsampled2(m[None])[0] for m in want])
    np.testing.assert_allclose(heat[:, 1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kernel", "stride", "pads"),
    [(3, 1, [1, 1, 1, 1]), (3, 2, [0, 0, 1, 1]), (5, 1, [2, 2, 2, 2]), (5, 2, [1, 1, 2, 2]),
     (1, 1, [0, 0, 0, 0])],
)  # fmt: skip
def test_same_pads_match_tensorflow(kernel, stride, pads):
    # TF SAME for an input side divisible by the stride: out = in / s,
    # total = (out - 1) * s + k - in, split with the extra pixel after.
    side = 224
    total = max((side // stride - 1) * stride + kernel - side, 0)
    assert pads == [total // 2, total // 2, total - total // 2, total - total // 2]
    assert same_pads(kernel, stride) == pads


def test_find_model(model_path, tmp_path):
    assert find_model(model_path.parent) == model_path
    with pytest.raises(ModelNotBuilt, match="make setup"):
        find_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(model_path.parent, broken)
    copy = broken / model_path.name
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelNotBuilt, match="does not match"):
        find_model(broken)
    copy.unlink()
    with pytest.raises(ModelNotBuilt, match="missing"):
        find_model(broken)
    (broken / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelNotBuilt, match="unreadable"):
        find_model(broken)


def test_find_model_refuses_manifest_naming_another_file(model_path, tmp_path):
    shutil.copytree(model_path.parent, tmp_path / "m")
    manifest = tmp_path / "m" / MANIFEST_NAME
    info = json.loads(manifest.read_text())
    (tmp_path / "m" / model_path.name).rename(tmp_path / "m" / "other.onnx")
    info["file"] = "other.onnx"
    manifest.write_text(json.dumps(info))
    with pytest.raises(ModelNotBuilt, match="not its hash"):
        find_model(tmp_path / "m")


@pytest.mark.reference
def test_live_reference_on_another_bucket(session):
    """Torch on a bucket the golden file does not cover (portrait 288x224)."""
    pytest.importorskip("torch", reason="torch is only in the `reference` extra")
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the `reference` extra")
    spec = importlib.util.spec_from_file_location(
        "make_golden", Path(__file__).parents[1] / "support" / "golden" / "make_golden.py"
    )
    assert spec is not None and spec.loader is not None
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    from efficientnet_lite_pytorch import EfficientNet

    from engines.weights import shipped_weights_path

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(shipped_weights_path())
    )
    model.eval()
    batch = np.random.default_rng(11).integers(0, 256, (2, 288, 224, 3), dtype=np.uint8)
    want = make_golden.reference_heads(model, batch)
    got = _run(session, batch)
    _assert_heatmaps_close(got["heatmaps"], want["heatmaps"], "heatmaps 288x224")
    for name in OUTPUT_NAMES[1:]:
        _assert_close(got[name], want[name], name)


def test_class_sets_and_labels():
    food = classes.FOOD_CLASSES
    assert list(food) == sorted(set(food)) and all(0 <= c < classes.NUM_CLASSES for c in food)
    assert 958 not in food  # hay
    assert len(classes.labels()) == classes.NUM_CLASSES
    assert classes.label(967) == "espresso" and classes.label(923) == "plate"
    assert {classes.label(c) for c in (809, 659, 504)} == {"soup bowl", "mixing bowl", "coffee mug"}
    with pytest.raises(ValueError):
        classes.label(1000)


def test_buckets_follow_the_short_side(monkeypatch):
    monkeypatch.setattr(buckets, "SHORT_SIDE", 192)
    got = buckets.all_buckets()
    assert (192, 192) in got and max(max(b) for b in got) == 384
    assert all(min(b) == 192 and max(b) % buckets.STRIDE == 0 for b in got)
    assert buckets.bucket_for(2000, 1000) == (192, 384)


def test_another_short_side_is_another_model(tmp_path, monkeypatch, model_path):
    monkeypatch.setattr(buckets, "SHORT_SIDE", 192)
    other = export(tmp_path / "192")
    # Another hash, so no cache key, INT8 graph or TensorRT plan of the native model serves it.
    assert other.name != model_path.name
    info = json.loads((other.parent / MANIFEST_NAME).read_text())
    assert [tuple(b) for b in info["buckets"]] == list(buckets.all_buckets())
    assert find_model(other.parent) == other
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(other), options, providers=["CPUExecutionProvider"])
    out = _run(session, np.zeros((1, 192, 384, 3), np.uint8))
    assert out["heatmaps"].shape == (1, len(PROFILES), 12, 24)


def test_a_model_built_for_other_buckets_is_refused(tmp_path, monkeypatch, model_path):
    shutil.copytree(model_path.parent, tmp_path / "native")
    monkeypatch.setattr(buckets, "SHORT_SIDE", 192)
    with pytest.raises(ModelNotBuilt, match="short side 224"):
        find_model(tmp_path / "native")
