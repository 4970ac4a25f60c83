"""crowd_train's faces in training.data (faces-sliced metric) and training/faces.py's matching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engines.faces import HeadBox
from training.data import PROTOCOLS, Box, EvalItem, face_sliced, load_set, noticed_faces
from training.faces import Detections, fit_head_box, match


def test_face_sliced_is_between_ten_and_ninety_percent_kept():
    face = Box(100, 100, 200, 200)
    assert not face_sliced(Box(0, 0, 300, 300), [face])  # all of it
    assert not face_sliced(Box(0, 0, 105, 300), [face])  # 5 %: dropped
    assert face_sliced(Box(0, 0, 150, 300), [face])  # 50 %
    assert not face_sliced(Box(0, 0, 195, 300), [face])  # 95 %: kept
    assert not face_sliced(Box(0, 0, 50, 50), [])


def test_a_saliency_set_with_labelled_faces_scores_faces_sliced(tmp_path: Path):
    root = tmp_path / "crowd"
    (root / "images").mkdir(parents=True)
    entry = {
        "image": "a.jpg", "width": 400, "height": 300, "boxes": [[0, 0, 400, 300]],
        "kind": "saliency", "fixations_xy_subject": [[10, 10, 0], [200, 150, 0]],
        "faces": [
            {"box": [150, 100, 250, 200], "frontal": True, "profile": False, "back": False},
            {"box": [0, 0, 20, 20], "frontal": False, "profile": False, "back": True},
        ],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps([entry]))
    es = load_set(tmp_path, "crowd")
    assert [m.key for m in es.protocol.metrics] == ["fix", "sliced", "noticed"]
    item = es.items[0]
    assert item.faces == (Box(150, 100, 250, 200),)  # the `back` face does not count
    assert es.protocol.score(item, Box(0, 0, 200, 300))["sliced"] == 1.0
    assert es.protocol.score(item, Box(100, 0, 400, 300))["sliced"] == 0.0


def test_a_face_people_notice_is_at_least_a_twelfth_of_the_photos_height():
    faces = (Box(0, 0, 50, 50), Box(100, 0, 140, 49))  # 50 px: noticed on a 600-px photo
    item = EvalItem("a.jpg", Path("a.jpg"), 800, 600, (Box(0, 0, 800, 600),), faces=faces)
    assert noticed_faces(item) == (Box(0, 0, 50, 50),)
    scores = PROTOCOLS["saliency-faces"].score(item, Box(120, 0, 800, 600))
    assert (scores["sliced"], scores["noticed"]) == (1.0, 0.0)
    scores = PROTOCOLS["saliency-faces"].score(item, Box(25, 0, 800, 600))
    assert (scores["sliced"], scores["noticed"]) == (1.0, 1.0)


def test_match_is_one_to_one_by_centre_and_iou():
    gt = np.array([[0.0, 0.0, 100.0, 100.0], [200.0, 0.0, 300.0, 100.0]])
    det = np.array(
        [[20.0, 30.0, 80.0, 90.0, 0.9], [25.0, 30.0, 85.0, 90.0, 0.9], [500, 0, 560, 60, 0.9]]
    )
    pairs = match(det, gt)
    assert len(pairs) == 1 and pairs[0][1] == 0


def test_head_box_fit_recovers_a_known_transform(tmp_path: Path):
    truth = HeadBox(0.5, 0.6, 0.5, 0.6)
    rng = np.random.default_rng(0)
    heads = []
    for _ in range(30):
        x, y, w = rng.uniform(0, 500), rng.uniform(0, 300), rng.uniform(30, 90)
        heads.append([x, y, x + w, y + 1.3 * w])
    heads_arr = np.array(heads)
    w, h = heads_arr[:, 2] - heads_arr[:, 0], heads_arr[:, 3] - heads_arr[:, 1]
    cx, cy = heads_arr[:, 0] + truth.cx * w, heads_arr[:, 1] + truth.cy * h
    dw, dh = truth.width * w, truth.height * h
    det = np.stack([cx - dw / 2, cy - dh / 2, cx + dw / 2, cy + dh / 2, np.ones(30)], 1)

    faces = tuple(Box(*(round(v) for v in b)) for b in heads)
    item = EvalItem("a.jpg", tmp_path / "a.jpg", 700, 500, (Box(0, 0, 700, 500),), faces=faces)
    fitted = fit_head_box([item], Detections({"a.jpg": det.astype(np.float32)}, {}))
    for got, want in zip(
        (fitted.width, fitted.height, fitted.cx, fitted.cy),
        (truth.width, truth.height, truth.cx, truth.cy),
        strict=True,
    ):
        assert abs(got - want) < 0.02
    np.testing.assert_allclose(fitted.apply(det)[:, :4], heads_arr, atol=4.0)
