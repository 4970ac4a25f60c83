"""The oracle row (training/data.py) and the headroom table of bench/quality against naive
references."""

from __future__ import annotations

import json
import math

import numpy as np

from bench.quality import (
    CENTRE,
    ORACLE,
    CentreMethod,
    Method,
    OracleMethod,
    SetResult,
    aspects_below_centre,
    evaluate,
    headroom_interval,
    headroom_share,
    headroom_table,
)
from training.data import (
    PROTOCOLS,
    Box,
    EvalItem,
    EvalSet,
    centre_box,
    fixations_kept,
    food_kept,
    iou,
    largest_window,
    load_set,
    oracle_box,
)


def _item(width: int, height: int, boxes: list[Box], fixations: np.ndarray | None = None):
    return EvalItem(
        "x.jpg",
        path=None,  # type: ignore[arg-type]
        width=width,
        height=height,
        boxes=tuple(boxes),
        fixations=np.zeros((0, 3)) if fixations is None else fixations,
    )


def _naive_best(item: EvalItem, aspect: float, score) -> float:
    """Best score over every integer position of the largest window, by brute force."""
    cw, ch = largest_window(item.width, item.height, aspect)
    return max(
        score(Box(x, y, x + cw, y + ch))
        for x in range(item.width - cw + 1)
        for y in range(item.height - ch + 1)
    )


def test_oracle_is_the_max_over_positions_random_cases():
    rng = np.random.default_rng(11)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(20, 160, 2))
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        gt = Box(x0, y0, int(rng.integers(x0 + 2, w + 1)), int(rng.integers(y0 + 2, h + 1)))
        fix = np.column_stack([rng.uniform(0, w, 30), rng.uniform(0, h, 30), np.zeros(30)])
        item = _item(w, h, [gt], fix)
        for aspect in (1.0, 4 / 5, 16 / 9, 9 / 16, gt.aspect):
            for score in (
                lambda b, gt=gt: iou(b, gt),
                lambda b, gt=gt: food_kept(b, [gt]),
                lambda b, fix=fix: fixations_kept(b, fix),
            ):
                box = oracle_box(item, aspect, score)
                cw, ch = largest_window(w, h, aspect)
                assert (box.width, box.height) == (cw, ch) and box.inside(w, h)
                assert math.isclose(score(box), _naive_best(item, aspect, score))
                assert score(box) >= score(centre_box(w, h, aspect))


def test_oracle_ties_go_to_the_centre_and_subsampling_keeps_ends_and_centre():
    item = _item(1000, 100, [Box(0, 0, 1000, 100)])
    assert oracle_box(item, 1.0, lambda b: 0.0) == centre_box(1000, 100, 1.0)
    # With only 5 offsets tried out of 901 the best end (x = 900) is still among them.
    box = oracle_box(item, 1.0, lambda b: float(b.x0), max_offsets=5)
    assert box == Box(900, 0, 1000, 100)
    box = oracle_box(item, 1.0, lambda b: -abs(b.x0 - 450), max_offsets=5)
    assert box == Box(450, 0, 550, 100)


class _LeftMethod(Method):
    """Always the left/top-most largest window: worse than centre on a centred subject."""

    name = "left"

    def boxes(self, ctx, aspects):
        out = []
        for a in aspects:
            cw, ch = largest_window(ctx.item.width, ctx.item.height, a)
            out.append(Box(0, 0, cw, ch))
        return out


def test_headroom_on_a_synthetic_set(tmp_path):
    root = tmp_path / "crops"
    root.mkdir()
    # Expert crops on the right half: centre IoU < 1, oracle IoU = 1, left-most crop worse.
    entries = [
        {"image": f"{i}.jpg", "width": 400, "height": 200, "boxes": [[200, 0, 400, 200]],
         "kind": "crop"}
        for i in range(3)
    ]  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(entries))
    eval_set = load_set(tmp_path, "crops")
    result = evaluate(eval_set, [CentreMethod(), OracleMethod(), _LeftMethod()], progress=False)
    assert result.mean(ORACLE, "iou") == 1.0
    centre = result.mean(CENTRE, "iou")
    assert math.isclose(centre, iou(Box(100, 0, 300, 200), Box(200, 0, 400, 200)))
    assert math.isclose(headroom_share(result, "left", "iou", None), (0.0 - centre) / (1 - centre))
    assert headroom_share(result, ORACLE, "iou", None) == 1.0
    assert headroom_share(result, CENTRE, "iou", None) == 0.0
    # BDE is lower-is-better: the oracle still counts as +100 %, the left crop as negative.
    assert headroom_share(result, ORACLE, "bde", None) == 1.0
    assert headroom_share(result, "left", "bde", None) < 0
    metric = eval_set.protocol.metrics[0]
    assert aspects_below_centre(result, "left", metric) == ["gt"]
    assert aspects_below_centre(result, ORACLE, metric) == []
    table = headroom_table(result)
    assert "| left | -50% |" in table and "oracle (ground truth) |" not in table
    # Every photo alike: resampling them cannot move the share.
    lo, hi = headroom_interval(result, "left", "iou")
    assert math.isclose(lo, -0.5) and math.isclose(hi, -0.5)
    assert "-50% to -50%" in table


def test_headroom_interval_is_paired_and_shrinks_with_more_photos():
    rng = np.random.default_rng(4)

    def synthetic(n: int) -> SetResult:
        centre = rng.uniform(0.5, 0.8, n)
        oracle = centre + rng.uniform(0.0, 0.3, n)
        # A method that wins a noisy ~40 % of each photo's headroom.
        method = centre + (oracle - centre) * rng.uniform(-0.2, 1.0, n)
        values = {name: {"gt": {"iou": v}} for name, v in
                  ((CENTRE, centre), (ORACLE, oracle), ("m", method))}  # fmt: skip
        es = EvalSet(name="s", protocol=PROTOCOLS["crop"], items=[])
        return SetResult(es, [CENTRE, ORACLE, "m"], values, {}, {}, 0.0)

    small, large = synthetic(30), synthetic(3000)
    for result in (small, large):
        lo, hi = headroom_interval(result, "m", "iou")
        assert lo < headroom_share(result, "m", "iou", None) < hi
    (slo, shi), (llo, lhi) = (headroom_interval(r, "m", "iou") for r in (small, large))
    assert lhi - llo < (shi - slo) / 4
    assert llo < 0.4 < lhi


def test_each_metric_gets_its_own_oracle_position():
    # The box that keeps the most dish area can cut a small dish that another position keeps
    # whole: the "all dishes >= 90 %" oracle must be that metric's own best position.
    protocol = PROTOCOLS["object"]
    rng = np.random.default_rng(7)
    differs = 0
    for _ in range(40):
        w, h = 300, int(rng.integers(80, 140))
        dishes = []
        for _ in range(int(rng.integers(2, 4))):
            x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 20))
            dishes.append(
                Box(x0, y0, x0 + int(rng.integers(10, 90)), y0 + int(rng.integers(10, 40)))
            )
        dishes = [Box(b.x0, b.y0, min(b.x1, w), min(b.y1, h)) for b in dishes]
        item = _item(w, h, dishes)
        ctx = type("Ctx", (), {"item": item})()
        oracle = OracleMethod()
        oracle.protocol = protocol
        for aspect in (1.0, 4 / 5):
            (box,) = oracle.boxes(ctx, [aspect])
            got = oracle.scores(ctx, aspect, box, protocol)
            best_all90 = _naive_best(
                item, aspect, lambda b, it=item: protocol.score(it, b)["all90"]
            )
            best_kept = _naive_best(item, aspect, lambda b, it=item: protocol.score(it, b)["kept"])
            assert math.isclose(got["all90"], best_all90)
            assert math.isclose(got["kept"], best_kept)
            differs += protocol.score(item, box)["all90"] < best_all90
    assert differs > 0  # the case the per-metric oracle is for does occur here
