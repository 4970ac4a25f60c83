"""bench/observers.py: windows chosen by some viewers, scored on the others."""

from __future__ import annotations

import numpy as np
import pytest

from bench.observers import ALL_BUT_ONE, HALF, observer_gains, observers_table
from training.data import PROTOCOLS, EvalItem, EvalSet, centre_box, fixations_kept, oracle_box

W, H = 300, 100


def _item(fixations: np.ndarray) -> EvalItem:
    return EvalItem("x.jpg", path=None, width=W, height=H, boxes=(), fixations=fixations)  # type: ignore[arg-type]


def _set(items: list[EvalItem], kind: str = "saliency") -> EvalSet:
    return EvalSet(name="s", protocol=PROTOCOLS[kind], items=items)


def _viewers(points_per_viewer: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(
        [np.column_stack([p, np.full(len(p), v)]) for v, p in enumerate(points_per_viewer)]
    )


def _oracle_gain(es: EvalSet) -> float:
    """In-sample: the window chosen on all fixations, scored on the same fixations."""
    gains = []
    for item in es.items:
        for a in es.protocol.aspects(item).values():
            box = oracle_box(item, a, lambda b, f=item.fixations: fixations_kept(b, f), 64)
            centre = centre_box(item.width, item.height, a)
            gains.append(
                fixations_kept(box, item.fixations) - fixations_kept(centre, item.fixations)
            )
    return float(np.mean(gains))


def test_viewers_who_agree_win_what_the_oracle_wins():
    # Every viewer looks at the same places near the left edge: one viewer already finds the
    # oracle's window.
    rng = np.random.default_rng(3)
    items = []
    for _ in range(5):
        spots = np.column_stack([rng.uniform(5, 40, 4), rng.uniform(20, 80, 4)])
        items.append(_item(_viewers([spots] * 8)))
    es = _set(items)
    gains = observer_gains(es, oracle_box, ks=(1, 2, HALF, ALL_BUT_ONE))
    oracle = _oracle_gain(es)
    assert oracle > 0.2
    for g in gains:
        assert g.images == 5
        assert g.gain == pytest.approx(oracle, abs=1e-9)


def test_viewers_who_disagree_win_far_less_than_the_in_sample_oracle():
    # Each viewer looks at one random place of their own: the oracle's in-sample gain is
    # selection on noise, which viewers chosen apart from the scored ones cannot repeat.
    rng = np.random.default_rng(5)
    items = []
    for _ in range(40):
        spots = [np.tile([rng.uniform(0, W), rng.uniform(0, H)], (3, 1)) for _ in range(10)]
        items.append(_item(_viewers(spots)))
    es = _set(items)
    half, rest = observer_gains(es, oracle_box, ks=(HALF, ALL_BUT_ONE), splits=2)
    oracle = _oracle_gain(es)
    assert oracle > 0.05
    assert half.gain < 0.5 * oracle and rest.gain < 0.5 * oracle
    assert half.images == rest.images == 40 and half.se > 0


def test_all_but_one_scores_each_viewer_on_the_others_window_pooled_over_fixations():
    # Viewer 0 (3 fixations) looks just left of the centre, which every centre crop of a
    # 300 x 100 image keeps; viewers 1 and 2 (1 fixation each) look at the far right. Viewer 0
    # held out: the others choose the right edge and lose all of viewer 0's fixations. Viewer 1
    # or 2 held out: the remaining two (4 fixations, 3 near the centre) choose a window without
    # the far right, as the centre crop does.
    left = np.array([[140.0, 50.0]] * 3)
    right = np.array([[290.0, 50.0]])
    item = _item(_viewers([left, right, right]))
    es = EvalSet(name="s", protocol=PROTOCOLS["saliency"], items=[item])
    aspects = list(es.protocol.aspects(item).values())
    (rest,) = observer_gains(es, oracle_box, ks=(ALL_BUT_ONE,))
    others_of_1 = np.vstack([left, right])
    expected = 0.0
    for aspect in aspects:
        centre = centre_box(W, H, aspect)
        by_0_2 = oracle_box(item, aspect, lambda b: fixations_kept(b, others_of_1), 64)
        by_1_2 = oracle_box(item, aspect, lambda b: fixations_kept(b, right), 64)
        held_0 = fixations_kept(by_1_2, left) - fixations_kept(centre, left)
        held_1 = fixations_kept(by_0_2, right) - fixations_kept(centre, right)
        expected += (3 * held_0 + 2 * held_1) / 5
    assert rest.gain == pytest.approx(expected / len(aspects), abs=1e-12)
    assert rest.gain < 0  # every viewer disagrees with the rest: worse than the centre crop


def test_images_without_enough_viewers_do_not_count():
    one = _item(_viewers([np.array([[10.0, 10.0], [20.0, 20.0]])]))
    four = _item(_viewers([np.array([[10.0 * v + 5, 50.0]]) for v in range(4)]))
    gains = observer_gains(_set([one, four]), oracle_box, ks=(1, 2, 3, HALF))
    # Four viewers: two held out, two choose; three choosers are more than there are.
    assert [g.images for g in gains] == [1, 1, 0, 1]
    assert np.isnan(gains[2].gain)


def test_only_saliency_sets():
    with pytest.raises(ValueError, match="no fixations"):
        observer_gains(_set([], kind="crop"), oracle_box)


def test_table_gives_shares_of_the_headroom():
    gains = observer_gains(
        _set([_item(_viewers([np.array([[10.0, 50.0]])] * 4))]),
        oracle_box,
        ks=(1, HALF, ALL_BUT_ONE),
    )
    text = observers_table(gains, headroom=gains[0].gain * 2, heatcrop={"heatcrop x": 0.0})
    assert "| 1 viewer |" in text and "| half the viewers |" in text
    assert "| all the other viewers (each scored in turn) |" in text
    assert "+50%" in text and "| heatcrop x | +0.000 | +0% | | +0% |" in text
    # One fixation per viewer at the same place: every panel wins the same, 100 % of the best.
    assert text.count("| +100% |") == 3


def test_table_gives_each_gain_as_a_share_of_the_best_panels():
    from bench.observers import ObserverGain

    gains = [ObserverGain(1, 0.01, 0.001, 10), ObserverGain(ALL_BUT_ONE, 0.04, 0.002, 10)]
    text = observers_table(gains, headroom=0.08, heatcrop={"heatcrop x": 0.02})
    assert "(all the other viewers (each scored in turn))" in text
    assert "| 1 viewer | +0.010 ± 0.002 | +12% | 10 | +25% |" in text
    assert "| heatcrop x | +0.020 | +25% | | +50% |" in text


def test_quality_report_and_json_carry_the_viewers():
    import json

    from bench.quality import CentreMethod, OracleMethod, evaluate, set_section, to_json

    spots = np.array([[20.0, 50.0], [30.0, 40.0]])
    es = _set([_item(_viewers([spots] * 4)) for _ in range(3)])
    result = evaluate(es, [CentreMethod(), OracleMethod()], progress=False)
    result.observers = observer_gains(es, oracle_box, ks=(1, HALF))
    text = set_section(result)
    assert "Viewers as predictors" in text and "| half the viewers |" in text
    data = json.loads(json.dumps(to_json([result], {})))
    rows = data["sets"]["s"]["observers"]
    assert [r["k"] for r in rows] == [1, HALF] and rows[0]["images"] == 3
    assert rows[0]["gain"] == pytest.approx(
        result.mean("oracle (ground truth)", "fix") - result.mean("centre", "fix")
    )
