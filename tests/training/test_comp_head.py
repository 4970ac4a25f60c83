"""Composition maps of the read-out head (issue 24): training/comp_terms.py, the head's
composition read-out, ranking term and expert-crop gate (training/heads.py), their export
(engines.readout.comp_maps, head_logits) and the bootstrap intervals of training/fit_head.py.

Needs torch (the `fit` extra); skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.readout import (  # noqa: E402
    COMP_MAPS,
    aspect_bucket,
    comp_maps,
    coord_features,
    head_logits,
)
from kernels.window import (  # noqa: E402
    COMP_CHANNELS,
    SearchParams,
    best_window,
    composition_terms,
)
from training.backbones import Cells  # noqa: E402
from training.comp_terms import (  # noqa: E402
    pooled,
    rank_episodes,
    rank_windows,
    region_fracs,
    terms,
)
from training.data import PROTOCOLS, Box, EvalItem, EvalSet, iou  # noqa: E402
from training.features import targets  # noqa: E402
from training.fit_head import (  # noqa: E402
    DEFAULT_SETS,
    config_id,
    paired,
    parse_config,
    parse_sets,
    share,
    share_interval,
)
from training.heads import (  # noqa: E402
    FitSet,
    HeadConfig,
    comp_maps_of,
    export_weights,
    fit,
    groups,
    heat_maps,
    window_scores,
)


def _box(rng: np.random.Generator, width: int, height: int) -> Box:
    x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
    return Box(x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1)))


@pytest.mark.parametrize("seed", range(20))
def test_region_weights_are_the_kernels_composition_terms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gh, gw = int(rng.integers(1, 15)), int(rng.integers(1, 15))
    width, height = int(rng.integers(20, 3000)), int(rng.integers(20, 3000))
    comp = rng.normal(0.0, 2.0, (COMP_CHANNELS, gh, gw))
    assert COMP_MAPS == COMP_CHANNELS
    for _ in range(5):
        box = _box(rng, width, height)
        want = composition_terms(comp, width, height, (box.x0, box.y0, box.x1, box.y1))
        np.testing.assert_allclose(terms(comp, width, height, box), want, rtol=1e-9, atol=1e-9)
    # a map of ones gives each part's share of the image
    box = _box(rng, width, height)
    ones = terms(np.ones((COMP_CHANNELS, gh, gw)), width, height, box)
    inner = box.width * box.height / (width * height)
    np.testing.assert_allclose(ones[:9].sum(), inner, rtol=1e-9)
    np.testing.assert_allclose(ones[9], 1.0 - inner, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_pooled_inputs_give_the_terms_of_linear_maps(seed: int) -> None:
    """T_k(W) of maps m_k = w_k . x + b_k is w_k . P_k(W) + b_k area_k(W)."""
    rng = np.random.default_rng(100 + seed)
    gh, gw, d = int(rng.integers(2, 9)), int(rng.integers(2, 9)), 5
    width, height = int(rng.integers(50, 900)), int(rng.integers(50, 900))
    x = rng.normal(0.0, 1.0, (gh, gw, d))
    w, b = rng.normal(0.0, 1.0, (COMP_CHANNELS, d)), rng.normal(0.0, 1.0, COMP_CHANNELS)
    comp = np.einsum("hwd,kd->khw", x, w) + b[:, None, None]
    boxes = [_box(rng, width, height) for _ in range(7)]
    p, area = pooled(x, width, height, np.array([bx.as_list() for bx in boxes]))
    for j, bx in enumerate(boxes):
        got = (p[j] * w).sum(1) + b * area[j]
        np.testing.assert_allclose(got, terms(comp, width, height, bx), rtol=1e-9, atol=1e-9)
        frac = region_fracs(gh, gw, width, height, bx)
        np.testing.assert_allclose(area[j], frac.sum(1) / (gh * gw), atol=1e-12)


def test_rank_windows_are_rivals_of_the_same_aspect_inside_the_image() -> None:
    expert = Box(100, 50, 400, 250)
    boxes = rank_windows(expert, 500, 300)
    assert boxes[0] == expert and len(boxes) == len(set(boxes)) > 6
    for b in boxes:
        assert 0 <= b.x0 < b.x1 <= 500 and 0 <= b.y0 < b.y1 <= 300
        assert abs(b.aspect - expert.aspect) < 0.02
    # a box against the border: its shifts out of the image are moved back in, not kept twice
    edge = rank_windows(Box(0, 0, 300, 300), 300, 300)
    assert edge == [Box(0, 0, 300, 300), Box(30, 30, 270, 270)]


def test_each_aspect_bucket_has_its_read_out() -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(0.0, 1.0, (12, 6))
    weights = {
        "comp_w": rng.normal(0.0, 1.0, (3 * COMP_MAPS, 6)).astype(np.float32),
        "comp_b": rng.normal(0.0, 1.0, 3 * COMP_MAPS).astype(np.float32),
    }
    for aspect, bucket in ((9 / 16, 0), (0.79, 0), (0.8, 1), (1.0, 1), (1.25, 1), (16 / 9, 2)):
        assert aspect_bucket(aspect, 3) == bucket
        assert aspect_bucket(aspect, 1) == 0
        rows = slice(bucket * COMP_MAPS, (bucket + 1) * COMP_MAPS)
        want = feats @ weights["comp_w"][rows].T.astype(np.float64) + weights["comp_b"][rows]
        got = comp_maps(weights, feats, (3, 4), aspect)
        assert got.shape == (COMP_MAPS, 3, 4)
        np.testing.assert_allclose(got, want.T.reshape(COMP_MAPS, 3, 4), rtol=1e-5, atol=1e-5)
    one = {k: v[:COMP_MAPS] for k, v in weights.items()}
    np.testing.assert_allclose(comp_maps(one, feats, (3, 4), 0.5), comp_maps(one, feats, (3, 4), 2))
    with pytest.raises(ValueError, match="buckets"):
        aspect_bucket(1.0, 2)


# --- a synthetic expert-crop set where only the composition can tell the windows apart ------

GH, GW, CELL = 6, 12, 32  # 384 x 192 images; square crops of the full height


def composed_set(n: int, seed: int) -> tuple[EvalSet, Cells]:
    """Each photo has a subject two cells wide (feature 0 high); its expert crop makes it the
    crop's left third. A window shifted left still holds all of it (the same heat inside):
    only where it sits in the window tells them apart."""
    rng = np.random.default_rng(seed)
    width, height, side = GW * CELL, GH * CELL, GH * CELL
    items, chunks = [], []
    for i in range(n):
        x = rng.normal(0.0, 0.3, (GH * GW, 6))
        col = int(rng.integers(2, GW - 5))
        row = int(rng.integers(0, GH))
        x[row * GW + col : row * GW + col + 2, 0] += 6.0
        x0 = col * CELL
        box = Box(x0, 0, x0 + side, side)
        items.append(EvalItem(f"c{i}.jpg", None, width, height, (box,)))  # type: ignore[arg-type]
        chunks.append(x.astype(np.float16))
    feats = np.concatenate(chunks)
    offsets = (np.arange(n + 1) * GH * GW).astype(np.int64)
    cells = Cells([it.name for it in items], np.array([(GH, GW)] * n), offsets, feats,
                  np.ones((len(feats), 2), np.float16), np.full(n, 0.1, np.float32))  # fmt: skip
    return EvalSet("expert", PROTOCOLS["crop"], tuple(items)), cells


def composed_part(eval_set: EvalSet, cells: Cells) -> FitSet:
    from training.fit_window import episodes

    return FitSet(eval_set.name, cells, targets(eval_set, cells), episodes(eval_set, cells),  # type: ignore[arg-type]
                  np.ones(len(cells)), 1.0, np.arange(len(cells)),
                  ranks=rank_episodes(eval_set, cells), kind="crop")  # fmt: skip


def search_iou(eval_set: EvalSet, cells: Cells, head: object, comp: bool) -> float:
    params = SearchParams(min_scale=1.0, cut_weight=0.0, zoom_weight=0.0)
    heats = heat_maps(head, cells)  # type: ignore[arg-type]
    comps = comp_maps_of(head, cells, range(len(cells))) if comp else {}  # type: ignore[arg-type]
    out = []
    for i, item in enumerate(eval_set.items):
        maps = comps[i][aspect_bucket(1.0, len(comps[i]))] if comp else None
        found = best_window(heats[i], item.width, item.height, 1.0, params, comp=maps)
        out.append(iou(Box.of(found), item.boxes[0]))
    return float(np.mean(out))


def test_composition_learns_where_the_subject_sits_in_the_crop() -> None:
    fit_on, held = composed_set(40, 1), composed_set(30, 2)
    part = composed_part(*fit_on)
    plain = HeadConfig(dims=0, window=0.5, l2=0.1, iters=60)
    comp = HeadConfig(dims=0, window=0.5, l2=0.1, iters=60, comp=6, rank=0.5)
    heads = {c.comp: fit([part], c) for c in (plain, comp)}
    # the expert's window outscores its rivals in the fit's own scores with composition only
    head = heads[6]
    (g,) = groups([part], True, rank=True)
    with torch.no_grad():
        g.x = head.inp(g.x)
        assert g.ranks is not None
        g.ranks.pool.fill(g.x, g.hw, 6)
        probs = torch.softmax(head.logits(g.x, g.mass, g.coords, g.hw), 1)
        r = g.ranks
        s = window_scores(probs[r.img], r.a, r.u, r.pool, head.comp_weights())
    wins = ((s[:, :1] > s[:, 1:]) | ~r.valid[:, 1:]).all(1).float().mean()
    assert float(wins) > 0.8
    # and held-out photos are cropped as the experts crop them, by the kernel's search
    with_comp = search_iou(*held, heads[6], comp=True)
    without = search_iou(*held, heads[0], comp=False)
    assert with_comp > 0.9 and with_comp > without + 0.15


def test_export_gives_the_torch_heads_maps_and_logits() -> None:
    """comp_w / comp_b and the expert-crop gate, exported on the raw features, give what the
    torch head gives on the same photos (numpy reference: engines.readout)."""
    eval_set, cells = composed_set(16, 5)
    part = composed_part(eval_set, cells)
    flipped = (cells.features * -1).astype(np.float16)
    food_cells = Cells(cells.names, cells.shapes, cells.offsets, flipped, cells.cams,
                       cells.food_mass)  # fmt: skip
    food = FitSet("other", food_cells, part.targets, [], np.ones(len(cells)), 1.0,
                  np.arange(len(cells)), kind="object")  # fmt: skip
    cfg = HeadConfig(gate=True, dims=4, window=0.3, l2=0.1, iters=30, comp=3, buckets=3,
                     rank=0.5, xgate=True)  # fmt: skip
    head = fit([part, food], cfg)
    assert float(head.xgate_v.abs().sum()) > 0  # the gate was fitted
    weights = export_weights(head)
    assert weights["comp_w"].shape == (3 * COMP_MAPS, cells.features.shape[1])
    maps = comp_maps_of(head, cells, [0, 3])
    for i in (0, 3):
        x = cells.features[cells.rows(i)]
        for aspect in (0.5, 1.0, 2.0):
            want = maps[i][aspect_bucket(aspect, 3)]
            np.testing.assert_allclose(comp_maps(weights, x, (GH, GW), aspect), want,
                                       rtol=1e-4, atol=1e-4)  # fmt: skip
        for c in (cells, food_cells):
            xt = torch.from_numpy(c.features[c.rows(i)].astype(np.float32))[None]
            with torch.no_grad():
                coords = torch.from_numpy(coord_features(GH, GW).astype(np.float32))
                mass = torch.tensor([float(c.food_mass[i])])
                want = head.logits(head.inp(xt), mass, coords, (GH, GW))[0].numpy()
            got = head_logits(weights, c.features[c.rows(i)], (GH, GW), float(c.food_mass[i]))
            np.testing.assert_allclose(got.ravel(), want, rtol=1e-3, atol=1e-3)
    # the gate tells the two kinds of photo apart
    gates = []
    with torch.no_grad():
        for c in (cells, food_cells):
            x = torch.from_numpy(c.features.astype(np.float32)).reshape(len(c), GH * GW, -1)
            gates.append(head.xgate(head.inp(x)))
    assert float(gates[0].min()) > 0.5 > float(gates[1].max())


# --- records and figures ----------------------------------------------------------------------


def test_config_ids_of_the_earlier_records_are_kept() -> None:
    sets = parse_sets(DEFAULT_SETS)
    shipped = parse_config("gate=1,window=0.2,dims=1536")
    assert config_id(shipped, sets, "lite0-s16", 5) == "2ef91e39d9"
    lever = parse_config("gate=1,window=0.2,dims=1536,comp=32,buckets=3,rank=0.2,xgate=1")
    assert lever == HeadConfig(gate=True, dims=1536, comp=32, buckets=3, rank=0.2, xgate=True)
    assert config_id(lever, sets, "lite0-s16", 5) != "2ef91e39d9"


def test_bootstrap_intervals_resample_photos() -> None:
    rng = np.random.default_rng(0)
    n = 300
    refs = {"s": (np.zeros(n), np.ones(n), np.full(n, np.nan))}
    b = rng.uniform(0.0, 1.0, n)
    a = b + 0.02 + rng.normal(0.0, 0.05, n)
    p = paired({"scores": {"s": a.tolist()}}, {"scores": {"s": b.tolist()}}, refs)["s"]
    assert p.n == n and p.lo < p.mean < p.hi and p.clear()
    # about the normal interval on this many photos, and the same on every run
    assert abs((p.hi - p.lo) / 2 - p.half) < 0.2 * p.half
    again = paired({"scores": {"s": a.tolist()}}, {"scores": {"s": b.tolist()}}, refs)["s"]
    assert again == p
    lo, hi = share_interval(a, refs["s"])
    assert lo < share(a, refs["s"]) < hi
    assert share_interval(np.ones(n), refs["s"]) == (1.0, 1.0)
