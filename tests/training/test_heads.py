"""training/heads.py and training/fit_head.py: the torch read-out head on synthetic sets.

- the fitting code takes any sets it is given, with any names, kinds and weights, and folds
  every set so that each fold holds some of each;
- a fitted head exported to arrays (engines/readout.py's layout) gives the same logits in
  numpy (engines.readout.head_logits) and in the ONNX graph as in torch;
- the window-choice term and the food gate move the fit the way they should.

Needs torch (the `fit` extra); skipped without it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from engines import classes  # noqa: E402
from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES  # noqa: E402
from engines.graph import build_model  # noqa: E402
from engines.readout import FEATURES, TAPS, coord_features, head_logits  # noqa: E402
from engines.weights import load_state_dict, shipped_weights_path  # noqa: E402
from training.backbones import Cells  # noqa: E402
from training.data import PROTOCOLS, Box, EvalItem, EvalSet  # noqa: E402
from training.features import fold_of, pooled, targets  # noqa: E402
from training.fit_head import join_cells, objective, parse_config, parse_sets, share  # noqa: E402
from training.fit_window import episodes  # noqa: E402
from training.heads import FitSet, HeadConfig, export_weights, fit, heat_maps  # noqa: E402

SHAPES = [(3, 5), (4, 4), (5, 3), (4, 4)]


def synthetic_set(name: str, kind: str, n: int, channels: int, seed: int) -> tuple[EvalSet, Cells]:
    """n images whose ground truth sits where feature 0 is high (and, for food, feature 1)."""
    rng = np.random.default_rng(seed)
    items, shapes, chunks, masses = [], [], [], []
    for i in range(n):
        h, w = SHAPES[i % len(SHAPES)]
        x = rng.normal(0, 1, (h * w, channels))
        hot = int(rng.integers(h * w))
        x[hot, 0] += 8.0
        if kind == "object":
            x[hot, 1] += 8.0
        cy, cx = divmod(hot, w)
        width, height = w * 32, h * 32
        box = Box(cx * 32, cy * 32, cx * 32 + 32, cy * 32 + 32)
        fix = np.array([[cx * 32 + 16.0, cy * 32 + 16.0, s] for s in range(4)] * 2)
        items.append(EvalItem(f"{name}{i}.jpg", None, width, height, (box,), fix))  # type: ignore[arg-type]
        shapes.append((h, w))
        chunks.append(x.astype(np.float16))
        masses.append(0.9 if kind == "object" else 0.02)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    feats = np.concatenate(chunks)
    cells = Cells([it.name for it in items], np.array(shapes), offsets, feats,
                  np.ones((len(feats), 2), np.float16), np.array(masses, np.float32))  # fmt: skip
    return EvalSet(name, PROTOCOLS[kind], tuple(items)), cells


def fit_set(eval_set: EvalSet, cells: Cells, weight: float) -> FitSet:
    eps = episodes(eval_set, cells)  # type: ignore[arg-type]
    return FitSet(eval_set.name, cells, targets(eval_set, cells), eps,  # type: ignore[arg-type]
                  np.ones(len(cells)), weight, np.arange(len(cells)))  # fmt: skip


def test_parse_sets_and_config():
    assert parse_sets("a=2,b,c=0.5") == {"a": 2.0, "b": 1.0, "c": 0.5}
    cfg = parse_config("hidden=32-16,gate=1,blur=0.5,l2=3,window=0,dims=64")
    assert cfg == HeadConfig(hidden=(32, 16), gate=True, blur=0.5, l2=3.0, window=0.0, dims=64)
    with pytest.raises(ValueError, match="unknown head setting"):
        parse_config("depth=3")


def test_folds_put_every_set_in_every_fold():
    for n in (60, 200, 350, 1035):
        fold = fold_of(n, 5)
        assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
        assert np.bincount(fold).max() - np.bincount(fold).min() <= 1


def test_objective_penalises_negative_shares():
    assert objective([0.3, 0.3]) == pytest.approx(0.3)
    assert objective([0.6, -0.1]) == pytest.approx(0.25 - 0.2)
    refs = (np.zeros(4), np.ones(4), np.full(4, 0.5))
    assert share(np.full(4, 0.25), refs) == pytest.approx(0.25)
    assert share(np.full(4, 0.25), refs, viewers=True) == pytest.approx(0.5)


CONFIGS = [
    HeadConfig(dims=0, window=0.0, l2=0.1, iters=60),
    HeadConfig(hidden=(8,), dims=4, window=0.5, l2=0.1, iters=80),
    HeadConfig(hidden=(8,), skip=True, dims=4, window=0.5, l2=0.1, iters=80),
    HeadConfig(hidden=(6, 4), gate=True, blur=0.7, dims=0, l2=0.1, iters=60),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fit_takes_any_sets_and_finds_the_ground_truth(cfg):
    made = [
        synthetic_set("alpha", "saliency", 24, 8, 1),
        synthetic_set("beta", "crop", 20, 8, 2),
        synthetic_set("gamma", "object", 12, 8, 3),
        synthetic_set("delta", "saliency", 16, 8, 4),
    ]
    parts = [fit_set(s, c, w) for (s, c), w in zip(made, (1.0, 2.0, 1.0, 0.5), strict=True)]
    head = fit(parts, cfg)
    hits = []
    for (_, cells), part in zip(made, parts, strict=True):
        maps = heat_maps(head, cells)
        for i, heat in maps.items():
            hits.append(heat.argmax() == np.argmax(part.targets[cells.rows(i)]))
    assert np.mean(hits) > 0.9


def test_export_matches_torch_numpy_and_onnx():
    """A fitted head's export gives torch's logits in numpy and in the ONNX graph."""
    rng = np.random.default_rng(0)
    weights = load_state_dict(shipped_weights_path())
    batch = rng.integers(0, 256, (1, 224, 256, 3), dtype=np.uint8)
    # Fit a small head on the graph's own tapped features of a few random images.
    model = build_model(weights, classes.FOOD_CLASSES, {
        "w1": np.zeros((1, FEATURES), np.float32), "b1": np.zeros(1, np.float32),
        "a": np.zeros(4, np.float32)})  # fmt: skip
    for tap in TAPS:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run([OUTPUT_NAMES[1], *(t.tensor for t in TAPS)], {INPUT_NAME: batch})
    maps = [
        pooled(m[0], t.pool) if t.pool > 1 else m[0] for m, t in zip(outs[1:], TAPS, strict=True)
    ]
    feats = np.concatenate(maps).reshape(FEATURES, -1).T
    h, w = 7, 8
    stacked = np.concatenate([feats, feats[::-1], np.roll(feats, 5, 0)]).astype(np.float16)
    masses = np.array([float(outs[0][0]), 0.5, 0.1])
    cams = np.ones((3 * h * w, 2), np.float16)
    cells = Cells(["x"] * 3, np.array([(h, w)] * 3), np.arange(4) * h * w, stacked, cams, masses)
    t = np.zeros(3 * h * w)
    for i, hot in enumerate((10, 30, 50)):
        t[i * h * w + hot] = 1.0
    part = FitSet("fixed", cells, t, [], np.ones(3), 1.0, np.arange(3))
    cfg = HeadConfig(hidden=(8, 4), skip=True, gate=True, blur=0.6, dims=16, window=0.0, iters=30)
    head = fit([part], cfg)
    exported = export_weights(head)
    x = torch.from_numpy(cells.features[cells.rows(0)].astype(np.float32))[None]
    with torch.no_grad():
        coords = torch.from_numpy(coord_features(h, w).astype(np.float32))
        mass = torch.tensor([float(cells.food_mass[0])])
        want = head.logits(head.inp(x), mass, coords, (h, w))[0].numpy().reshape(h, w)
    ref = head_logits(exported, cells.features[cells.rows(0)], (h, w), float(cells.food_mass[0]))
    np.testing.assert_allclose(ref, want, rtol=1e-3, atol=2e-3)
    full = build_model(weights, classes.FOOD_CLASSES, exported)
    graph = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    heat = graph.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})[0][0, PROFILES.index("readout")]
    torch_heat = np.exp(want - want.max())
    np.testing.assert_allclose(heat, torch_heat, rtol=1e-2, atol=1e-3)
    # and the fp16 rounding of the cached features is all that separates them
    assert np.argmax(heat) == np.argmax(torch_heat)


def test_join_cells_puts_backbones_side_by_side():
    _, a = synthetic_set("a", "saliency", 4, 3, 0)
    _, b = synthetic_set("a", "saliency", 4, 5, 1)
    both = join_cells([a, b])
    assert both.features.shape == (len(a.features), 8)
    assert np.array_equal(both.food_mass, a.food_mass)
    with pytest.raises(ValueError):
        join_cells([a, replace(b, names=["z"] * 4)])


def test_paired_difference_is_in_headroom_points():
    from training.fit_head import paired

    refs = {"s": (np.zeros(4), np.full(4, 0.5), np.full(4, np.nan))}
    a = {"scores": {"s": [0.1, 0.2, 0.3, 0.4], "only_a": [1.0]}}
    b = {"scores": {"s": [0.1, 0.1, 0.2, 0.2]}}
    (name, p), *_ = paired(a, b, refs).items()
    assert name == "s" and len(paired(a, b, refs)) == 1
    d = np.array([0.0, 0.1, 0.1, 0.2]) / 0.5
    assert p.mean == pytest.approx(100 * d.mean())
    assert p.half == pytest.approx(196 * d.std(ddof=1) / 2)
    assert p.n == 4 and 0.0 <= p.lo < p.mean < p.hi <= 40.0


def test_cross_validate_scores_each_photo_with_a_head_that_never_saw_it():
    from training.fit_head import SetRun, cross_validate, head_fold

    made = {n: synthetic_set(n, kind, 12, 6, seed)
            for n, kind, seed in (("fix", "saliency", 1), ("food", "object", 2),
                                  ("check", "saliency", 3))}  # fmt: skip
    runs = {}
    for n, (s, cells) in made.items():
        fit = fit_set(s, cells, 1.0) if n != "check" else None
        refs = (np.zeros(12), np.ones(12), np.full(12, np.nan))
        runs[n] = SetRun(s, cells, 1.0, fold_of(12, 3), refs, fit)
    inner = head_fold(runs, HeadConfig(gate=True, dims=4, window=0.2, iters=20))
    asked: dict[str, list[int]] = {n: [] for n in runs}

    def spying_fold(parts, fold):
        fitted = {p.name: set(p.images.tolist()) for p in parts}
        assert set(fitted) == {"fix", "food"}
        maps_of = inner(parts, fold).maps  # type: ignore[union-attr]

        def maps(name, images):
            assert not fitted.get(name, set()) & set(images)
            asked[name] += images
            return maps_of(name, images)

        return maps

    scores = cross_validate(runs, 3, spying_fold)
    assert sorted(asked["fix"]) == sorted(asked["food"]) == list(range(12))
    assert sorted(asked["check"]) == sorted(list(range(12)) * 3)  # every fold's head
    assert all(len(v) == 12 and np.isfinite(v).all() for v in scores.values())
