"""What other viewers' eyes win on the fixation metric: the ceiling a saliency predictor faces.

The oracle row chooses each window on the very fixations it is then scored on, so its gain over
the centre crop includes the sampling noise of a dozen viewers, which no predictor can capture.
A fairer ceiling: split each image's viewers in two, choose the window on k viewers of one half
(the oracle on their fixations) and score it on the other half only. That gain is an unbiased
estimate of what a predictor as good as k people wins, on the same scale as heatcrop's gain
(chosen without any viewer, scored on all of them). Its share of the oracle's headroom says how
much of that headroom human agreement itself reaches.

The largest panel that can choose apart from the scored viewers is all of them but one: each
viewer in turn is scored on the window the others choose (ALL_BUT_ONE), pooled over fixations
as the metric itself is. That is as close to "a predictor as good as the whole panel" as the
data can measure without extrapolating.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.data import Box, EvalItem, EvalSet, centre_box, fixations_kept

# Chooses the best largest window at an aspect for a score (training.data.oracle_box).
Chooser = Callable[[EvalItem, float, Callable[[Box], float], int], Box]
HALF = 0  # k meaning "every viewer of the choosing half"
ALL_BUT_ONE = -1  # k meaning "every viewer but the one scored", each in turn
# Offsets the choosers try: the fixation score is a step function of the offset, and 64 steps
# along the free axis already resolve it to within 1/64 of the image.
OFFSETS = 64


@dataclass(frozen=True)
class ObserverGain:
    k: int  # viewers who choose (HALF: the whole choosing half; ALL_BUT_ONE: all others)
    gain: float  # mean fixations kept on the held half, minus the centre crop's
    se: float  # standard error of the per-image gain
    images: int


def observer_gains(
    eval_set: EvalSet,
    choose: Chooser,
    ks: Sequence[int] = (1, 2, 4, HALF, ALL_BUT_ONE),
    splits: int = 3,
    seed: int = 0,
) -> list[ObserverGain]:
    """Gain over the centre crop of windows chosen by k viewers, scored on other viewers.

    Each of `splits` random splits per image holds out half the viewers (rounded down) for
    scoring; choosers come from the other half, the first k of a random order. Per image the
    gain is averaged over splits and the protocol's aspects; images with fewer than two
    viewers, or fewer choosers than k, do not count for that k. ALL_BUT_ONE needs no split:
    every viewer is held out once.
    """
    if eval_set.protocol.kind != "saliency":
        raise ValueError(f"{eval_set.name} has no fixations (kind {eval_set.protocol.kind})")
    rng = np.random.default_rng(seed)
    per_k: dict[int, list[float]] = {k: [] for k in ks}
    for item in eval_set.items:
        gains = _image_gains(item, eval_set, choose, ks, splits, rng)
        for k, g in gains.items():
            per_k[k].append(g)
    out = []
    for k in ks:
        g = np.array(per_k[k])
        se = float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("nan")
        out.append(ObserverGain(k, float(g.mean()) if len(g) else float("nan"), se, len(g)))
    return out


def _image_gains(
    item: EvalItem,
    eval_set: EvalSet,
    choose: Chooser,
    ks: Sequence[int],
    splits: int,
    rng: np.random.Generator,
) -> dict[int, float]:
    fix = item.fixations
    viewers = np.unique(fix[:, 2])
    if len(viewers) < 2:
        return {}
    held_n = len(viewers) // 2
    aspects = list(eval_set.protocol.aspects(item).values())
    sums: dict[int, float] = {}
    split_ks = [k for k in ks if k != ALL_BUT_ONE]
    for _ in range(splits):
        order = rng.permutation(viewers)
        held = fix[np.isin(fix[:, 2], order[:held_n])]
        pool = order[held_n:]
        for k in split_ks:
            n = len(pool) if k == HALF else k
            if n > len(pool):
                continue
            chosen = fix[np.isin(fix[:, 2], pool[:n])]
            sums[k] = sums.get(k, 0.0) + _split_gain(item, aspects, chosen, held, choose)
    out = {k: s / (splits * len(aspects)) for k, s in sums.items()}
    if ALL_BUT_ONE in ks:
        out[ALL_BUT_ONE] = _leave_one_out_gain(item, aspects, choose) / len(aspects)
    return out


def _leave_one_out_gain(item: EvalItem, aspects: Sequence[float], choose: Chooser) -> float:
    """Summed over aspects: each viewer's fixations kept by the others' window minus the centre's.

    Weighted by each viewer's number of fixations, so that the sum over viewers is the share
    of all fixations, as the metric counts them.
    """
    fix = item.fixations
    total = 0.0
    for v in np.unique(fix[:, 2]):
        mine = fix[:, 2] == v
        total += mine.mean() * _split_gain(item, aspects, fix[~mine], fix[mine], choose)
    return total


def _split_gain(
    item: EvalItem,
    aspects: Sequence[float],
    chosen: npt.NDArray[np.float64],
    held: npt.NDArray[np.float64],
    choose: Chooser,
) -> float:
    """Summed over aspects: held fixations kept by the choosers' window minus by the centre's."""
    total = 0.0
    for aspect in aspects:
        box = choose(item, aspect, lambda b: fixations_kept(b, chosen), OFFSETS)
        centre = centre_box(item.width, item.height, aspect)
        total += fixations_kept(box, held) - fixations_kept(centre, held)
    return total


def _who(k: int) -> str:
    if k == HALF:
        return "half the viewers"
    if k == ALL_BUT_ONE:
        return "all the other viewers (each scored in turn)"
    return f"{k} viewer{'s' if k > 1 else ''}"


def observers_table(
    gains: Sequence[ObserverGain], headroom: float, heatcrop: dict[str, float]
) -> str:
    """Markdown: each chooser's gain and share of the oracle's headroom, heatcrop's beside,
    and each gain as a share of the largest panel's (the ceiling a predictor can be shown to
    reach on this data)."""
    panel = max((g for g in gains if g.images), key=lambda g: g.gain, default=None)
    ceiling = panel.gain if panel is not None and panel.gain > 0 else float("nan")
    lines = [
        "Viewers as predictors: windows chosen on the fixations of k viewers, scored on "
        "other viewers of the same photo (half of them, or the one left out; never the "
        "choosers): an unbiased estimate of what a predictor as good as k people wins. The "
        "oracle chooses on the fixations it is scored on, so part of its headroom is noise "
        "no predictor can win. Last column: the gain as a share of the best panel's"
        + (f" ({_who(panel.k)})." if panel is not None else "."),
        "",
        "| chosen by | Δ fixations vs centre | share of the oracle's headroom | images "
        "| share of the best panel's gain |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in gains:
        share = g.gain / headroom if headroom > 0 else float("nan")
        lines.append(
            f"| {_who(g.k)} | {g.gain:+.3f} ± {1.96 * g.se:.3f} | {share:+.0%} | {g.images} "
            f"| {g.gain / ceiling:+.0%} |"
        )
    for name, gain in heatcrop.items():
        share = gain / headroom if headroom > 0 else float("nan")
        lines.append(f"| {name} | {gain:+.3f} | {share:+.0%} | | {gain / ceiling:+.0%} |")
    return "\n".join(lines)
