"""The face detector (engines/faces.py, engines/faces_export.py) with the real built graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from engines.errors import ModelNotBuilt
from engines.faces import (
    FaceDetector,
    FaceParams,
    HeadBox,
    area_resize,
    face_map,
    face_pixels,
    find_face_model,
    integral_image,
    nms,
    scale_boxes,
)
from engines.faces_export import FACES_MANIFEST_NAME, model_bytes
from tests.support.faces import with_faces
from tests.support.images import jpeg


@pytest.fixture(scope="module")
def faces_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_faces(model_dir, tmp_path_factory.mktemp("faces-model"))


@pytest.fixture(scope="module")
def detector(faces_dir: Path) -> FaceDetector:
    return FaceDetector(faces_dir)


def test_export_is_deterministic_and_the_manifest_names_each_graph_by_its_hash(faces_dir):
    from engines.faces_export import DEFAULT_WHEEL_DIR, fetch_wheel

    wheel = fetch_wheel(Path(__file__).resolve().parents[2] / DEFAULT_WHEEL_DIR)
    assert model_bytes(wheel) == model_bytes(wheel)
    paths, version = find_face_model(faces_dir)
    info = json.loads((faces_dir / FACES_MANIFEST_NAME).read_text())
    assert info["version"] == version
    assert info["source"]["requirement"] == "facenet-pytorch==2.6.0"
    assert "MIT" in info["source"]["licence"]
    for net, path in paths.items():
        assert path.name == info["nets"][net]["file"]
        assert info["nets"][net]["sha256"][:12] in path.name


def test_astronaut_face_is_found_where_it_is(detector):
    image = skdata.astronaut()  # 512x512, her face at about x 170-280, y 70-190
    faces = detector.detect(image)
    assert faces.shape[1] == 5 and faces.dtype == np.float32
    best = faces[np.argmax(faces[:, 4])]
    assert best[4] > 0.95
    cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
    assert 170 < cx < 280 and 70 < cy < 190
    assert 40 < best[2] - best[0] < 160


def test_no_faces_in_a_flat_or_tiny_image(detector):
    assert detector.detect(np.full((200, 300, 3), 128, np.uint8)).shape == (0, 5)
    assert detector.detect(np.zeros((8, 8, 3), np.uint8)).shape == (0, 5)


def test_detect_bytes_finds_the_face_in_the_decode_it_reports(detector, faces_dir):
    data = jpeg(skdata.astronaut())
    faces, size = detector.detect_bytes(data)
    assert size == (512, 512)  # under max_side: never enlarged
    found, small = FaceDetector(faces_dir, FaceParams(max_side=256)).detect_bytes(data)
    assert small == (256, 256)
    scaled = scale_boxes(found, small, size)
    centre = (faces[0, 0] + faces[0, 2]) / 2
    assert len(scaled) and abs((scaled[0, 0] + scaled[0, 2]) / 2 - centre) < 25


def test_face_pixels_never_enlarge_and_keep_the_aspect():
    data = jpeg(skdata.coffee())  # 600x400
    assert face_pixels(data, 768).shape == (400, 600, 3)
    assert face_pixels(data, 300).shape == (200, 300, 3)


def test_the_version_names_the_graphs_and_the_knobs(faces_dir):
    a = FaceDetector(faces_dir, FaceParams(min_face=20))
    b = FaceDetector(faces_dir, FaceParams(min_face=24))
    assert a.version != b.version
    assert a.version.startswith("mtcnn-" + find_face_model(faces_dir)[1])


def test_missing_or_tampered_graphs_are_not_built(faces_dir, tmp_path):
    with pytest.raises(ModelNotBuilt, match=r"faces\.json"):
        find_face_model(tmp_path)
    for path in faces_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    info = json.loads((tmp_path / FACES_MANIFEST_NAME).read_text())
    onet = tmp_path / info["nets"]["onet"]["file"]
    onet.write_bytes(onet.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelNotBuilt, match="sha256"):
        FaceDetector(tmp_path)
    onet.unlink()
    with pytest.raises(ModelNotBuilt, match="missing"):
        FaceDetector(tmp_path)


@pytest.mark.parametrize("seed", range(6))
def test_area_resize_is_adaptive_average_pooling(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(3, 30, size=2))
    oh, ow = (int(v) for v in rng.integers(1, 40, size=2))
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = area_resize(integral_image(img), oh, ow)
    for i in range(oh):
        for j in range(ow):
            r0, r1 = (i * h) // oh, -(-(i + 1) * h // oh)
            c0, c1 = (j * w) // ow, -(-(j + 1) * w // ow)
            want = img[r0:r1, c0:c1].reshape(-1, 3).mean(axis=0)
            np.testing.assert_allclose(out[i, j], want, rtol=1e-5)


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 4, 4]], float)
    scores = np.array([0.5, 0.9, 0.7, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]
    # By the smaller box's area, the small box inside the first is suppressed too.
    assert nms(boxes, scores, 0.5, by_min=True).tolist() == [1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0


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
