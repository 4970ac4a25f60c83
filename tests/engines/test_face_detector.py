"""The face detector (engines/faces.py, engines/faces_build.py, engines/face_engine.py) with the
graph `make model` builds from the committed YuNet file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from engines.errors import ModelNotBuilt
from engines.face_engine import FaceEngine, in_pixels, shares
from engines.faces import (
    FACES_MANIFEST_NAME,
    FaceDetector,
    FaceParams,
    HeadBox,
    decode,
    face_map,
    find_face_model,
    priors,
    scale_boxes,
)
from engines.faces_build import SOURCE, build, model_bytes, source_bytes
from tests.support.faces import FACE, HEAD, small_group


@pytest.fixture(scope="module")
def detector(model_dir: Path) -> FaceDetector:
    return FaceDetector(model_dir)


def test_build_is_deterministic_and_the_manifest_names_the_graph_by_its_hash(model_dir, tmp_path):
    path = build(tmp_path)
    assert path.read_bytes() == model_bytes(source_bytes())
    found, digest = find_face_model(model_dir)
    assert found.name == path.name and digest[:12] in path.name
    info = json.loads((model_dir / FACES_MANIFEST_NAME).read_text())
    assert info["source"]["licence"].startswith("Apache-2.0")
    assert (SOURCE.parent / "LICENSE").read_text().count("Apache License") >= 1


def test_the_build_refuses_a_vendored_file_that_is_not_the_pinned_one(tmp_path):
    tampered = tmp_path / "yunet.onnx"
    data = bytearray(SOURCE.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="pinned sha256"):
        build(tmp_path / "out", tampered)


def test_the_astronauts_face_is_found_where_it_is(detector):
    faces = detector.detect(skdata.astronaut())
    assert faces.shape == (1, 5) and faces.dtype == np.float32
    assert faces[0, 4] > 0.9
    np.testing.assert_allclose(faces[0, :4], FACE, atol=12)


def test_each_face_of_a_group_is_found_within_a_tolerance(detector):
    import pyvips

    data, heads = small_group()
    pixels = pyvips.Image.new_from_buffer(data, "").numpy()
    faces = detector.detect(np.ascontiguousarray(pixels))
    assert len(faces) == len(heads)
    for head in heads:
        # The face box lies inside the head box, and fills most of its width.
        inside = [
            f for f in faces if f[0] >= head[0] - 8 and f[2] <= head[2] + 8 and f[1] >= head[1] - 8
        ]
        assert len(inside) == 1
        assert (inside[0][2] - inside[0][0]) > 0.5 * (head[2] - head[0])


def test_no_faces_in_a_flat_or_tiny_image(detector):
    assert detector.detect(np.full((200, 300, 3), 128, np.uint8)).shape == (0, 5)
    assert detector.detect(np.zeros((8, 8, 3), np.uint8)).shape == (0, 5)


def test_a_batch_gives_each_image_its_own_faces(detector):
    face = skdata.astronaut()[::2, ::2]  # 256x256
    flat = np.full_like(face, 90)
    batch = np.stack([flat, face, face[:, ::-1]])
    found = detector.detect_batch(batch)
    assert [len(f) for f in found] == [0, 1, 1]
    np.testing.assert_allclose(found[1], detector.detect_batch(batch[1:2])[0], atol=1e-4)
    # The mirrored photo's face is the mirror of the first.
    np.testing.assert_allclose(256 - found[2][0, [2, 0]], found[1][0, [0, 2]], atol=6)


def test_bad_batches_are_refused(detector):
    for bad in (
        np.zeros((1, 100, 96, 3), np.uint8),  # not a multiple of 32
        np.zeros((1, 96, 96, 3), np.float32),
        np.zeros((96, 96, 3), np.uint8),
        np.zeros((0, 96, 96, 3), np.uint8),
    ):
        with pytest.raises(ValueError):
            detector.detect_batch(bad)


def test_faces_per_photo_are_capped_best_scores_first(model_dir):
    # 4 x 4 copies of the astronaut's face: sixteen faces.
    tile = skdata.astronaut()[20:240, 130:320][::2, ::2]  # 110x95
    grid = np.tile(tile, (4, 4, 1))[:416, :352]
    every = FaceDetector(model_dir).detect_batch(grid[None].copy())[0]
    assert len(every) >= 12
    capped = FaceDetector(model_dir, FaceParams(max_faces=5)).detect_batch(grid[None].copy())[0]
    assert len(capped) == 5
    np.testing.assert_allclose(np.sort(capped[:, 4])[::-1], np.sort(every[:, 4])[::-1][:5])


def test_decode_matches_opencvs_prior_arithmetic():
    # One candidate per stride, decoded by hand: cell (r, c) of stride s, regression (dx, dy,
    # dw, dh) -> centre ((c + dx) s, (r + dy) s), size (e^dw s, e^dh s).
    height, width = 64, 96
    col, row, stride = priors(height, width)
    assert len(col) == (8 * 12) + (4 * 6) + (2 * 3)
    scores = np.zeros((len(col), 1), np.float32)
    reg = np.zeros((len(col), 4), np.float32)
    picks = {8: (3, 5), 16: (2, 1), 32: (1, 2)}
    want = []
    for s, (r, c) in picks.items():
        i = int(np.flatnonzero((stride == s) & (row == r) & (col == c))[0])
        scores[i] = 0.9 - s / 100
        reg[i] = (0.25, -0.5, np.log(1.5), np.log(0.5))
        cx, cy, w, h = (c + 0.25) * s, (r - 0.5) * s, 1.5 * s, 0.5 * s
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        want.append([min(max(v, 0), lim) for v, lim in zip(box, (width, height) * 2, strict=True)])
    out = decode(scores, reg, height, width, FaceParams(score=0.5))
    np.testing.assert_allclose(out[:, :4], want, atol=1e-4)  # best score (stride 8) first
    np.testing.assert_allclose(out[:, 4], [0.82, 0.74, 0.58], atol=1e-6)


def test_nms_keeps_the_better_of_two_overlapping_candidates():
    height, width = 32, 32
    col, row, stride = priors(height, width)
    scores = np.zeros((len(col), 1), np.float32)
    reg = np.zeros((len(col), 4), np.float32)
    a, b = (int(np.flatnonzero((stride == 8) & (row == r) & (col == 1))[0]) for r in (1, 2))
    scores[a], scores[b] = 0.7, 0.8
    reg[[a, b], 2:] = np.log(2.0)  # 16x16 boxes 8 px apart: IoU 1/3
    assert len(decode(scores, reg, height, width, FaceParams(nms=0.5))) == 2
    out = decode(scores, reg, height, width, FaceParams(nms=0.3))
    assert len(out) == 1 and out[0, 4] == pytest.approx(0.8)


def test_the_version_names_the_graph_and_the_knobs(model_dir):
    a = FaceDetector(model_dir, FaceParams(score=0.6))
    b = FaceDetector(model_dir, FaceParams(score=0.5))
    assert a.version != b.version
    assert a.version.startswith("yunet-" + find_face_model(model_dir)[1][:12])


def test_missing_or_tampered_graphs_are_not_built_and_say_why(model_dir, tmp_path):
    with pytest.raises(ModelNotBuilt, match=r"no faces\.json"):
        find_face_model(tmp_path)
    path, _ = find_face_model(model_dir)
    shutil.copy2(model_dir / FACES_MANIFEST_NAME, tmp_path / FACES_MANIFEST_NAME)
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelNotBuilt, match="does not match its sha256"):
        FaceDetector(tmp_path)
    copy.unlink()
    with pytest.raises(ModelNotBuilt, match="missing"):
        FaceDetector(tmp_path)
    info = json.loads((model_dir / FACES_MANIFEST_NAME).read_text())
    info["source"]["sha256"] = "0" * 64
    (tmp_path / FACES_MANIFEST_NAME).write_text(json.dumps(info))
    with pytest.raises(ModelNotBuilt, match="another detector"):
        FaceDetector(tmp_path)


def test_the_face_engine_adds_faces_as_shares_and_names_the_detector(session_engine, model_dir):
    detector = FaceDetector(model_dir)
    joined = FaceEngine(session_engine, detector)
    assert joined.version == f"{session_engine.version}+{detector.version}"
    assert joined.input_shapes == session_engine.input_shapes
    import pyvips

    face = pyvips.Image.new_from_array(skdata.astronaut()).resize(224 / 512).numpy()
    batch = np.stack(
        [np.ascontiguousarray(face[:224, :224, :3]), np.zeros((224, 224, 3), np.uint8)]
    )
    plain = session_engine.infer(batch)
    out = joined.infer(batch)
    np.testing.assert_array_equal(out.heatmaps, plain.heatmaps)
    assert plain.faces == () and len(out.faces) == 2 and len(out.faces[1]) == 0
    (box,) = out.faces[0]
    np.testing.assert_allclose(box[:4] * 512, FACE, atol=16)  # shares of the image's sides


def test_shares_and_pixels_are_inverse():
    faces = np.array([[10.0, 20.0, 110.0, 220.0, 0.9]], np.float32)
    back = in_pixels(shares(faces, 400, 300), 400, 300)
    np.testing.assert_allclose(back[:, :4], [[10.0, 20.0, 110.0, 220.0]], rtol=1e-6)
    np.testing.assert_allclose(shares(faces, 50, 50)[0, :4], [0.2, 0.4, 1.0, 1.0])


def test_face_map_is_the_covered_share_of_each_cell():
    faces = np.array([[0.0, 0.0, 50.0, 50.0, 0.9], [150.0, 25.0, 200.0, 75.0, 0.8]])
    grid = face_map(faces, 200, 100, 2, 4)  # cells of 50x50 px
    np.testing.assert_allclose(grid, [[1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.5]])
    assert face_map(np.zeros((0, 5)), 200, 100, 7, 7).sum() == 0
    overlapping = np.array([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 50.0, 50.0]])
    assert face_map(overlapping, 100, 100, 2, 2).max() == 1.0


def test_head_box_puts_the_detector_box_where_it_sits_in_a_head():
    head = HeadBox(width=0.5, height=0.5, cx=0.5, cy=0.75)
    out = head.apply(np.array([[40.0, 40.0, 60.0, 60.0, 0.9]]))
    np.testing.assert_allclose(out, [[30.0, 20.0, 70.0, 60.0, 0.9]], rtol=1e-6)


def test_scale_boxes_maps_between_image_sizes():
    out = scale_boxes(np.array([[10.0, 10.0, 20.0, 30.0, 1.0]]), (100, 100), (200, 50))
    np.testing.assert_allclose(out[0, :4], [20.0, 5.0, 40.0, 15.0])


def test_the_default_head_box_holds_the_astronauts_face_in_her_head():
    (mapped,) = HeadBox().apply(np.array([[*FACE, 1.0]]))
    ix = min(mapped[2], HEAD[2]) - max(mapped[0], HEAD[0])
    iy = min(mapped[3], HEAD[3]) - max(mapped[1], HEAD[1])
    union = (mapped[2] - mapped[0]) * (mapped[3] - mapped[1]) + (HEAD[2] - HEAD[0]) * (
        HEAD[3] - HEAD[1]
    )
    assert ix * iy / (union - ix * iy) > 0.6


def test_the_built_graph_gives_the_vendored_graphs_scores_and_boxes(model_dir):
    # The build folds YuNet's BGR order into its first convolution and joins the strides:
    # on the same photo both graphs must agree, the vendored one fed BGR floats NCHW.
    import onnxruntime as ort

    path, _ = find_face_model(model_dir)
    built = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(SOURCE), providers=["CPUExecutionProvider"])
    image = np.ascontiguousarray(skdata.astronaut()[:224, :288])[None]
    scores, boxes = built.run(["scores", "boxes"], {"image": image})
    names = [f"{k}_{s}" for k in ("cls", "obj", "bbox") for s in (8, 16, 32)]
    ref = dict(
        zip(
            names,
            raw.run(names, {"input": image[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)}),
            strict=True,
        )
    )
    # Squared: sqrt near 0 would magnify float noise.
    want = np.concatenate([ref[f"cls_{s}"] * ref[f"obj_{s}"] for s in (8, 16, 32)], 1)
    np.testing.assert_allclose(scores**2, want, atol=1e-5)
    assert (scores > 0.9).sum() >= 1  # her face
    want_boxes = np.concatenate([ref[f"bbox_{s}"] for s in (8, 16, 32)], 1)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-3)
