"""The face channel of the read-out head (`faces=1`): training/heads.py, training/fit_head.py,
training/face_cache.py.

- the face map joins the cells as one last feature, computed on each image's own grid;
- it widens the head's input by one, beside the principal components (never projected), and
  a fixed input gives the expected standardised, projected output;
- the exported weights fold it like every other feature (numpy reference = torch);
- a head given the channel learns to weigh it: ground truth on the faces is found;
- the cached boxes read back as written; configurations without faces keep their ids.

Needs torch (the `fit` extra); skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.readout import coord_features, head_logits  # noqa: E402
from training.backbones import Cells  # noqa: E402
from training.data import PROTOCOLS, Box, EvalItem, EvalSet  # noqa: E402
from training.face_cache import load_boxes, save_boxes  # noqa: E402
from training.features import targets  # noqa: E402
from training.fit_head import (  # noqa: E402
    DEFAULT_SETS,
    config_id,
    parse_config,
    parse_sets,
    with_face_channel,
)
from training.heads import FitSet, HeadConfig, Input, export_weights, fit, heat_maps  # noqa: E402


def face_set(n: int, channels: int, seed: int) -> tuple[EvalSet, Cells, dict[str, np.ndarray]]:
    """n 4x4-cell photos (128 px) whose fixations sit on one detected face; features noise."""
    rng = np.random.default_rng(seed)
    items, boxes, chunks = [], {}, []
    for i in range(n):
        hot = int(rng.integers(16))
        cy, cx = divmod(hot, 4)
        fix = np.array([[cx * 32 + 16.0, cy * 32 + 16.0, s] for s in range(4)] * 2)
        box = Box(cx * 32, cy * 32, cx * 32 + 32, cy * 32 + 32)
        items.append(EvalItem(f"f{i}.jpg", None, 128, 128, (box,), fix))  # type: ignore[arg-type]
        boxes[f"f{i}.jpg"] = np.array([[cx * 32, cy * 32, cx * 32 + 32, cy * 32 + 32, 0.99]],
                                      np.float32)  # fmt: skip
        chunks.append(rng.normal(0, 1, (16, channels)).astype(np.float16))
    feats = np.concatenate(chunks)
    ones = np.ones((len(feats), 2), np.float16)
    cells = Cells([it.name for it in items], np.array([(4, 4)] * n), np.arange(n + 1) * 16,
                  feats, ones, np.full(n, 0.02, np.float32))  # fmt: skip
    return EvalSet("faces", PROTOCOLS["saliency"], tuple(items)), cells, boxes


def test_face_channel_is_the_last_feature_on_each_grid():
    eval_set, cells, boxes = face_set(3, 5, 0)
    boxes["f1.jpg"] = np.zeros((0, 5), np.float32)  # no face found
    boxes["f2.jpg"] = np.array([[0, 0, 64, 16, 0.9]], np.float32)  # half of two cells
    out = with_face_channel(eval_set, cells, boxes)
    assert out.features.shape == (len(cells.features), 6)
    np.testing.assert_array_equal(out.features[:, :5], cells.features)
    col = out.features[:, 5].astype(np.float32)
    assert col[cells.rows(0)].sum() == pytest.approx(1.0)
    assert col[cells.rows(1)].sum() == 0.0
    np.testing.assert_allclose(col[cells.rows(2)][:4], [0.5, 0.5, 0.0, 0.0])


def test_face_channel_widens_the_input_beside_the_projection():
    mean = np.array([1.0, 2.0, 3.0, 0.1], np.float32)
    scale = np.array([2.0, 1.0, 0.5, 0.2], np.float32)
    basis = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], np.float32)  # 3 features -> 2
    plain = Input(mean[:3], scale[:3], basis)
    faces = Input(mean, scale, basis, extra=1)
    assert plain.dims == 2
    assert faces.dims == 3
    x = torch.tensor([[3.0, 4.0, 4.0, 0.5]])
    # standardised: 1, 2, 2, 2; projected: 1 + 2, 2 - 2; the face column passed on
    np.testing.assert_allclose(faces(x).numpy(), [[3.0, 0.0, 2.0]])
    np.testing.assert_allclose(plain(x[:, :3]).numpy(), [[3.0, 0.0]])


def test_faces_config_and_ids():
    cfg = parse_config("gate=1,window=0.2,faces=1")
    assert cfg == HeadConfig(gate=True, window=0.2, faces=True)
    assert cfg.extra == 1 and HeadConfig().extra == 0
    assert "face channel" in cfg.label()
    sets = parse_sets(DEFAULT_SETS)
    # the records made before the option existed keep their ids (the shipped row's)
    shipped = config_id(HeadConfig(gate=True, window=0.2), sets, "lite0", 5)
    assert shipped == "926562c8d3"
    assert config_id(cfg, sets, "lite0", 5) != shipped


def test_head_learns_to_weigh_the_face_channel_and_exports_it():
    eval_set, cells, boxes = face_set(40, 6, 1)
    with_faces = with_face_channel(eval_set, cells, boxes)
    results = {}
    for faces, c in ((False, cells), (True, with_faces)):
        part = FitSet("faces", c, targets(eval_set, c), [], np.ones(len(c)), 1.0,  # type: ignore[arg-type]
                      np.arange(len(c)))  # fmt: skip
        cfg = HeadConfig(gate=True, dims=4, window=0.0, l2=0.1, iters=60, faces=faces)
        head = fit([part], cfg)
        assert head.inp.dims == 4 + int(faces)
        maps = heat_maps(head, c)
        results[faces] = np.mean([
            maps[i].argmax() == np.argmax(part.targets[c.rows(i)]) for i in maps
        ])  # fmt: skip
        if faces:
            w = export_weights(head)
            assert w["w1"].shape == (1, 7)
            x = c.features[c.rows(0)]
            want = head.logits(head.inp(torch.from_numpy(x.astype(np.float32))[None]),
                               torch.tensor([0.02]),
                               torch.from_numpy(coord_features(4, 4).astype(np.float32)),
                               (4, 4))[0].detach().numpy().reshape(4, 4)  # fmt: skip
            np.testing.assert_allclose(head_logits(w, x, (4, 4), 0.02), want, rtol=1e-3,
                                       atol=1e-3)  # fmt: skip
    assert results[True] > 0.9
    assert results[False] < 0.5


def test_cached_boxes_read_back(tmp_path):
    boxes = {"a.jpg": np.array([[1, 2, 3, 4, 0.9]], np.float32),
             "b.jpg": np.zeros((0, 5), np.float32),
             "c.jpg": np.arange(10, dtype=np.float32).reshape(2, 5)}  # fmt: skip
    path = tmp_path / "faces.npz"
    save_boxes(path, boxes)
    back = load_boxes(path)
    assert list(back) == list(boxes)
    for k, v in boxes.items():
        np.testing.assert_array_equal(back[k], v)
