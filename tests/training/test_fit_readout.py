"""training/fit_readout.py: targets of mirror images and how they enter a fit."""

from __future__ import annotations

import numpy as np

from training.data import PROTOCOLS, Box, EvalItem, EvalSet
from training.features import (
    Data,
    SetFeatures,
    box_mass,
    fixation_mass,
    mirrored_item,
    mirrored_set,
)
from training.fit_readout import FIT_SETS, fit_parts


def _item(**kw) -> EvalItem:
    base = dict(name="a.jpg", path=None, width=320, height=160, boxes=(Box(10, 20, 110, 150),))
    return EvalItem(**{**base, **kw})  # type: ignore[arg-type]


def test_mirrored_item_flips_boxes_and_fixations_and_twice_is_the_same():
    fix = np.array([[0.0, 5.0, 0], [319.5, 80.0, 1], [100.0, 10.0, 1]])
    item = _item(fixations=fix)
    m = mirrored_item(item)
    assert m.boxes == (Box(210, 20, 310, 150),)
    assert m.fixations[:, 0].tolist() == [320.0, 0.5, 220.0]
    assert np.array_equal(m.fixations[:, 1:], fix[:, 1:])
    twice = mirrored_item(m)
    assert twice.boxes == item.boxes and np.array_equal(twice.fixations, fix)
    assert item.fixations[0, 0] == 0.0  # the original is untouched


def test_mirrored_targets_are_the_original_targets_flipped():
    # Cell edges at multiples of 32 px: both masses are exact mirror images of each other.
    rng = np.random.default_rng(1)
    fix = np.column_stack([rng.uniform(0, 320, 50), rng.uniform(0, 160, 50), np.arange(50) % 5])
    item = _item(boxes=(Box(32, 0, 128, 96), Box(224, 64, 320, 160)), fixations=fix)
    m = mirrored_item(item)
    for mass in (box_mass, fixation_mass):
        a = mass(item, 5, 10).reshape(5, 10)
        b = mass(m, 5, 10).reshape(5, 10)
        assert np.allclose(a[:, ::-1], b)


def _feats(n: int) -> SetFeatures:
    offsets = np.arange(n + 1, dtype=np.int64) * 2
    return SetFeatures([f"{i}" for i in range(n)], np.ones((n, 2), np.int64) * [1, 2], offsets,
                       np.zeros((2 * n, 3), np.float16))  # fmt: skip


def test_fit_parts_hold_out_the_mirror_of_a_held_out_photo_and_split_the_weight():
    sets = {n: EvalSet(n, PROTOCOLS["saliency"], ()) for n in FIT_SETS}
    feats = {n: _feats(4) for n in FIT_SETS}
    t = {n: np.full(8, 0.5) for n in FIT_SETS}
    held = {n: np.array([False, True, False, False]) for n in FIT_SETS}
    weights = {n: 1.0 for n in FIT_SETS}
    plain = fit_parts(Data(sets, feats, t), held, weights)
    assert [(p[0] is feats[n], list(p[2]), p[3]) for p, n in zip(plain, FIT_SETS, strict=True)] == [
        (True, [0, 2, 3], 1 / 3)
    ] * 3
    flipped = {n: (_feats(4), np.full(8, 0.5)) for n in ("saliency_dev",)}
    parts = fit_parts(Data(sets, feats, t, flipped), held, weights)
    mine = (feats["saliency_dev"], flipped["saliency_dev"][0])
    sal = [p for p in parts if any(p[0] is f for f in mine)]
    assert len(parts) == 4 and len(sal) == 2
    assert all(list(p[2]) == [0, 2, 3] and p[3] == 1 / 6 for p in sal)


def test_mirrored_set_keeps_protocol_and_order():
    es = EvalSet("s", PROTOCOLS["crop"], (_item(), _item(name="b.jpg")))
    m = mirrored_set(es)
    assert m.name == "s-mirrored" and m.protocol is es.protocol
    assert [i.name for i in m.items] == ["a.jpg", "b.jpg"]
