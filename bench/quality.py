"""Crop quality on the dev sets with human ground truth, beside the baselines, in one run.

    python -m bench.quality [--sets fcdb_dev,food_dev,saliency_dev,osie_train,crowd_train]
        [--limit N] [--out bench/results/quality.md] [--json PATH] [--eval-dir ../shared/eval]
        [--profile food --profile generic] [--only-baselines] [--no-faces]

The protocol is ../shared/eval/README.md's: fcdb asks for the ground-truth box's aspect (IoU,
BDE); food and saliency ask for 1:1, 4:5, 16:9 and 9:16 (dish area kept, all dishes kept
>= 90 %; fixations kept, each subject's first one left out). Rows are methods: the centred
largest window, libvips smartcrop attention and entropy, and heatcrop per profile, raw and
with the service's low-confidence rule (centre crop when the box is not confident), and the
face rule (``kernel.faces``: the detector's faces, then the labelled faces as a perfect
detector would find them). crowd_train adds the faces-sliced metric (share of crops that keep
10-90 % of some labelled frontal or profile face); its oracle row is the best largest-window
position for each metric separately.
Heatcrop's settings come from sidecar.settings.load(), so HEATCROP_KERNEL_* variables or
--config change what is measured; the header of the report records them.

A method is anything with a name and `boxes(ctx, aspects)`; ImageContext caches per-image work
(bytes, the libvips working copy, heatcrop's analysis) so each is done once per image and
shared by every method and aspect. Columns are functions of a SetResult, which keeps every
per-image value, so derived columns (deltas, oracle headroom) need no re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pyvips
from tqdm import tqdm

from bench.baselines import SMARTCROP_KINDS, WORKING_LONG_SIDE, smartcrop_box, working_image
from bench.observers import ObserverGain, observer_gains, observers_table
from training.data import (
    DEFAULT_SETS,
    FIT_SETS,
    Box,
    EvalItem,
    EvalSet,
    Metric,
    Protocol,
    centre_box,
    feature_key,
    heldout_key,
    heldout_path,
    load_set,
    oracle_box,
)

T = TypeVar("T")
# Fixation sets fitted on by the new heads (issue 14), reported too: the read-out rows are
# held-out there, and crowd_train's labelled faces give the faces-sliced column.
TRAIN_SETS: tuple[str, ...] = ("osie_train", "crowd_train")
CENTRE = "centre"
ORACLE = "oracle (ground truth)"
ANALYSE = "heatcrop analyse (decode + CNN + faces)"


@dataclass
class ImageContext:
    """One image under evaluation, with per-image work computed once and shared."""

    item: EvalItem
    memo_s: dict[str, float] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, make: Callable[[], T]) -> T:
        if key not in self._memo:
            t0 = time.perf_counter()
            self._memo[key] = make()
            self.memo_s[key] = time.perf_counter() - t0
        return cast(T, self._memo[key])

    @property
    def data(self) -> bytes:
        return self.memo("read", self.item.path.read_bytes)

    @property
    def working(self) -> pyvips.Image:
        return self.memo("libvips working copy", lambda: working_image(self.data))


class Method:
    """A crop method under test: one box per requested aspect for an image."""

    name: str = ""

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        raise NotImplementedError

    def notes(self) -> str:
        """Anything the reader needs besides the numbers (e.g. how often a fallback fired)."""
        return ""

    def reset(self) -> None:
        """Forget what notes() would report (after the warm-up, between sets)."""

    def scores(
        self, ctx: ImageContext, aspect: float, box: Box, protocol: Protocol
    ) -> dict[str, float]:
        """Every metric of the protocol for this method's box at `aspect`."""
        return protocol.score(ctx.item, box)

    def begin_set(self, eval_set: EvalSet) -> None:
        """Called before the images of a set (methods that read the set's protocol)."""


class CentreMethod(Method):
    name = CENTRE

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        return [centre_box(ctx.item.width, ctx.item.height, a) for a in aspects]


class OracleMethod(Method):
    """The best position of the largest window, chosen with the ground truth, per metric.

    What a largest-window crop can win at most: best IoU on fcdb, most dish area kept on
    food, most fixations kept on saliency (each protocol's first metric, whose box `boxes`
    returns); every other metric gets its own best position too (best BDE, most images with
    every dish ≥ 90 %), so that oracle minus centre is that metric's headroom.
    """

    name = ORACLE

    def __init__(self) -> None:
        self.protocol: Protocol | None = None

    def begin_set(self, eval_set: EvalSet) -> None:
        self.protocol = eval_set.protocol

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        protocol = self.protocol
        if protocol is None:  # the warm-up pass: no set yet
            return [centre_box(ctx.item.width, ctx.item.height, a) for a in aspects]
        key = protocol.metrics[0].key
        sign = 1.0 if protocol.metrics[0].higher_is_better else -1.0

        def score(box: Box) -> float:
            return sign * protocol.score(ctx.item, box)[key]

        return [oracle_box(ctx.item, a, score) for a in aspects]

    def scores(
        self, ctx: ImageContext, aspect: float, box: Box, protocol: Protocol
    ) -> dict[str, float]:
        out = protocol.score(ctx.item, box)
        for metric in protocol.metrics[1:]:
            sign = 1.0 if metric.higher_is_better else -1.0

            def score(b: Box, key: str = metric.key, sign: float = sign) -> float:
                return sign * protocol.score(ctx.item, b)[key]

            best = oracle_box(ctx.item, aspect, score)
            out[metric.key] = protocol.score(ctx.item, best)[metric.key]
        return out


class SmartcropMethod(Method):
    def __init__(self, interesting: str) -> None:
        self.interesting = interesting
        self.name = f"libvips {interesting}"

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        item = ctx.item
        return [
            smartcrop_box(ctx.working, item.width, item.height, a, self.interesting)
            for a in aspects
        ]


class HeatcropMethod(Method):
    """heatcrop's box per profile; with `fallback`, the service's low-confidence rule."""

    def __init__(
        self,
        core: Any,
        profile: str,
        fallback: bool,
        heldout: dict[str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        self.core = core
        self.profile = profile
        self.fallback = fallback
        self.heldout = heldout
        # The shipped read-out was fitted on saliency_dev and food_dev: its own rows are
        # in-sample there; `held-out` rows use maps from heads that never saw the image.
        tag = " held-out" if heldout is not None else ""
        self.name = f"heatcrop {profile}{tag}" + (" (low conf → centre)" if fallback else "")
        if not core.kernel.faces:
            self.name += ", faces off"
        self.counts: Counter[str] = Counter()
        self.fitted_on = False
        # Per photo of a set with labelled faces: the head-box transform fitted on the other
        # folds (training/faces.py), since the shipped one was fitted on those very faces.
        self.heads: dict[str, Any] = {}
        self.set_name = ""

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        # Every row comes out of one CNN (and face detector) run: the analysis is shared.
        analysis = ctx.memo(ANALYSE, lambda: self.core.analyse(ctx.data))
        if self.heldout is not None:
            analysis = heldout_analysis(analysis, self._heldout_map(ctx.item))
        head = self.heads.get(ctx.item.name)
        out = []
        for aspect in aspects:
            box = self.core.box(analysis, aspect, self.profile, head_box=head)
            self.counts["boxes"] += 1
            if self.fallback and not self.core.is_confident(box):
                self.counts["fallback"] += 1
                box = self.core.center(analysis, aspect)
            out.append(Box.of(box))
        return out

    def begin_set(self, eval_set: EvalSet) -> None:
        self.fitted_on = eval_set.name in FIT_SETS
        self.set_name = eval_set.name
        self.heads = {}
        detector = getattr(self.core.engine, "detector", None)
        if self.core.kernel.faces and detector is not None:
            self.heads = fold_heads(detector, eval_set)

    def _heldout_map(self, item: EvalItem) -> npt.NDArray[np.float32] | None:
        """The image's held-out map; None for a set the read-out never saw (its own map is
        held-out already). A fitted-on image without one would pass in-sample as held-out."""
        assert self.heldout is not None
        heat = self.heldout.get(heldout_key(item.path))
        if heat is None and self.fitted_on:
            raise RuntimeError(
                f"no held-out read-out map for {item.path}: run "
                "`python -m training.fit_head cv --save-heldout` (the shipped configuration)"
            )
        return heat

    def reset(self) -> None:
        self.counts.clear()

    def notes(self) -> str:
        out = []
        if self.fallback and self.counts["boxes"]:
            share = self.counts["fallback"] / self.counts["boxes"]
            out.append(f"centre crop used for {share:.0%} of {self.counts['boxes']} boxes")
        stats = DETECT_STATS.get(self.set_name) if self.core.kernel.faces else None
        if stats is not None and not isinstance(self, LabelledFaceRuleMethod):
            ms, found, photos = stats
            out.append(
                f"face detector (YuNet-n on the CNN's own input, one thread, inside the engine "
                f"call) ms per photo: median {np.median(ms):.2f}, mean {np.mean(ms):.2f}; "
                f"{found} faces kept in {photos} of {len(ms)} photos"
            )
        return "; ".join(out)


_FOLD_HEADS: dict[tuple[int, str], dict[str, Any]] = {}
# Per set: the detector's ms per photo, faces kept, photos with faces.
DETECT_STATS: dict[str, tuple[list[float], int, int]] = {}


def fold_heads(detector: Any, eval_set: EvalSet) -> dict[str, Any]:
    """Each photo's head-box transform fitted on the other folds' labelled faces (none for a
    set without labelled faces); the detector's ms per photo of the set are kept for its notes.
    Computed once per set and detector."""
    key = (id(detector), eval_set.name)
    if key not in _FOLD_HEADS:
        from training.faces import detect_set, fold_head_boxes

        found = detect_set(detector, eval_set)
        DETECT_STATS[eval_set.name] = (
            [1e3 * v for v in found.seconds.values()],
            sum(len(b) for b in found.boxes.values()),
            sum(len(b) > 0 for b in found.boxes.values()),
        )
        labelled = any(item.faces for item in eval_set.items)
        _FOLD_HEADS[key] = fold_head_boxes(eval_set, found) if labelled else {}
    return _FOLD_HEADS[key]


class LabelledFaceRuleMethod(HeatcropMethod):
    """The face rule on the labelled faces themselves (sets that have them): what the rule
    would do with a perfect detector, the ceiling of the rule alone."""

    def __init__(
        self, core: Any, profile: str, heldout: dict[str, npt.NDArray[np.float32]] | None = None
    ) -> None:
        super().__init__(core, profile, False, heldout)
        self.name += " + face rule on the labelled faces (the rule's ceiling)"

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        from engines.faces import HeadBox

        analysis = ctx.memo(ANALYSE, lambda: self.core.analyse(ctx.data))
        if self.heldout is not None:
            analysis = heldout_analysis(analysis, self._heldout_map(ctx.item))
        labelled = np.array([[*f.as_list(), 1.0] for f in ctx.item.faces], np.float32)
        analysis = dataclasses.replace(analysis, faces=labelled.reshape(-1, 5))
        # The labelled boxes are head boxes already: the identity transform.
        same = HeadBox(1.0, 1.0, 0.5, 0.5)
        return [Box.of(self.core.box(analysis, a, self.profile, head_box=same)) for a in aspects]


@dataclass
class SetResult:
    """Every per-image value of one set: values[method][aspect][metric] -> [n_images]."""

    eval_set: EvalSet
    methods: list[str]
    values: dict[str, dict[str, dict[str, npt.NDArray[np.float64]]]]
    method_s: dict[str, float]
    shared_s: dict[str, float]
    seconds: float
    notes: dict[str, str] = field(default_factory=dict)
    # Saliency sets: what windows chosen by other viewers win (bench/observers.py).
    observers: list[ObserverGain] = field(default_factory=list)
    # Sets with labelled faces: per photo, the other viewers' gain over the centre crop among
    # the windows that slice no noticed face (training/face_rule.py's constrained ceiling).
    face_ceiling: npt.NDArray[np.float64] | None = None

    @property
    def n_images(self) -> int:
        return len(self.eval_set.items)

    @property
    def aspect_labels(self) -> tuple[str, ...]:
        return self.eval_set.protocol.aspect_labels

    def per_image(self, method: str, metric: str, aspect: str | None = None) -> npt.NDArray[Any]:
        """Per-image values at one aspect, or averaged over the aspects when aspect is None."""
        by_aspect = self.values[method]
        if aspect is not None:
            return by_aspect[aspect][metric]
        return np.mean([by_aspect[a][metric] for a in self.aspect_labels], axis=0)

    def mean(self, method: str, metric: str, aspect: str | None = None) -> float:
        return float(self.per_image(method, metric, aspect).mean())


def evaluate(eval_set: EvalSet, methods: Sequence[Method], progress: bool = True) -> SetResult:
    protocol = eval_set.protocol
    values = {
        m.name: {
            a: {k.key: np.zeros(len(eval_set.items)) for k in protocol.metrics}
            for a in protocol.aspect_labels
        }
        for m in methods
    }
    method_s: Counter[str] = Counter()
    shared_s: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    for method in methods:
        method.reset()  # notes are per set
        method.begin_set(eval_set)
    t0 = time.perf_counter()
    items = tqdm(
        eval_set.items,
        desc=eval_set.name,
        unit="img",
        disable=not progress,
        mininterval=2.0,
        file=sys.stderr,
    )
    for i, item in enumerate(items):
        ctx = ImageContext(item)
        aspects = protocol.aspects(item)
        for method in methods:
            shared_before = sum(ctx.memo_s.values())
            t = time.perf_counter()
            try:
                boxes = method.boxes(ctx, list(aspects.values()))
            except Exception as exc:
                raise RuntimeError(f"{method.name} failed on {item.path}: {exc}") from exc
            # Time spent computing shared per-image work is reported apart, not charged here.
            method_s[method.name] += (
                time.perf_counter() - t - (sum(ctx.memo_s.values()) - shared_before)
            )
            for (label, aspect), box in zip(aspects.items(), boxes, strict=True):
                if not box_ok(box, item.width, item.height, aspect):
                    bad[method.name] += 1
                for key, value in method.scores(ctx, aspect, box, protocol).items():
                    values[method.name][label][key][i] = value
        shared_s.update(ctx.memo_s)
    notes = {m.name: m.notes() for m in methods if m.notes()}
    for name, count in bad.items():
        extra = f"{count} boxes out of bounds or off-aspect by more than a pixel"
        notes[name] = f"{notes[name]}; {extra}" if name in notes else extra
    return SetResult(
        eval_set,
        [m.name for m in methods],
        values,
        dict(method_s),
        dict(shared_s),
        time.perf_counter() - t0,
        notes,
    )


def box_ok(box: Box, width: int, height: int, aspect: float) -> bool:
    """Inside the image and at the requested aspect within a pixel on one side."""
    if not box.inside(width, height):
        return False
    return abs(box.width - box.height * aspect) <= 1 or abs(box.height - box.width / aspect) <= 1


# --- columns ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A table column; when `value` is given, the best method's cell is set in bold."""

    header: str
    text: Callable[[SetResult, str], str]
    value: Callable[[SetResult, str], float] | None = None
    higher_is_better: bool = True


def metric_columns(result: SetResult, metric: Metric) -> list[Column]:
    """One column per aspect (when there are several), then the mean over aspects."""
    labels = result.aspect_labels
    aspects: list[str | None] = [*labels, None] if len(labels) > 1 else [None]
    cols = []
    for label in aspects:

        def value(r: SetResult, m: str, lb: str | None = label) -> float:
            return r.mean(m, metric.key, lb)

        arrow = "↑" if metric.higher_is_better else "↓"
        suffix = label if label is not None else ("mean " + arrow if len(labels) > 1 else arrow)
        cols.append(
            Column(
                f"{metric.title} {suffix}",
                lambda r, m, v=value: f"{v(r, m):.3f}",
                value,
                metric.higher_is_better,
            )
        )
    return cols


def delta_column(metric: Metric, reference: str = CENTRE) -> Column:
    """Paired per-image difference of the mean against `reference`, ± 1.96 standard errors."""

    def text(result: SetResult, method: str) -> str:
        if method == reference or reference not in result.values:
            return "—"
        diff = result.per_image(method, metric.key) - result.per_image(reference, metric.key)
        half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        return f"{diff.mean():+.3f} ± {half:.3f}"

    return Column(f"Δ {metric.title} vs {reference}", text)


def columns_for(result: SetResult) -> list[Column]:
    cols: list[Column] = []
    for metric in result.eval_set.protocol.metrics:
        cols += metric_columns(result, metric)
    cols += [delta_column(metric) for metric in result.eval_set.protocol.metrics]
    return cols


def markdown_table(result: SetResult) -> str:
    cols = columns_for(result)
    cells = {m: [c.text(result, m) for c in cols] for m in result.methods}
    for j, col in enumerate(cols):
        if col.value is None or len(result.methods) < 2:
            continue
        # The oracle sees the answer; bold marks the best of the methods that do not.
        scores = {m: col.value(result, m) for m in result.methods if m != ORACLE}
        best = max(scores.values()) if col.higher_is_better else min(scores.values())
        for m, score in scores.items():
            if f"{score:.3f}" == f"{best:.3f}":
                cells[m][j] = f"**{cells[m][j]}**"
    lines = [
        "| method | " + " | ".join(c.header for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    lines += [f"| {m} | " + " | ".join(cells[m]) + " |" for m in result.methods]
    return "\n".join(lines)


def headroom_share(result: SetResult, method: str, metric: str, aspect: str | None) -> float:
    """(method − centre) / (oracle − centre): 1 is the oracle, 0 the centre crop, < 0 worse.

    NaN when the oracle does not differ from the centre crop (no headroom to share).
    """
    centre = result.mean(CENTRE, metric, aspect)
    room = result.mean(ORACLE, metric, aspect) - centre
    if abs(room) < 1e-12:
        return float("nan")
    return (result.mean(method, metric, aspect) - centre) / room


# Resamples of the images for the interval of a headroom share.
BOOTSTRAP_DRAWS = 2000


def headroom_interval(
    result: SetResult, method: str, metric: str, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of the mean headroom share, by a paired bootstrap over the images.

    Each draw resamples images with replacement and recomputes (method − centre) / (oracle −
    centre) on the means of the same images, so the share's noise from which photos happen
    to be in the set shows (60 food photos give a wide interval). NaN when a draw has no
    headroom.
    """
    m, c, o = (result.per_image(name, metric) for name in (method, CENTRE, ORACLE))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), (draws, len(m)))
    room = o[idx].mean(axis=1) - c[idx].mean(axis=1)
    if (np.abs(room) < 1e-12).any():
        return float("nan"), float("nan")
    shares = (m[idx].mean(axis=1) - c[idx].mean(axis=1)) / room
    lo, hi = np.percentile(shares, [2.5, 97.5])
    return float(lo), float(hi)


def aspects_below_centre(result: SetResult, method: str, metric: Metric) -> list[str]:
    """The aspects where the method's mean is worse than the centre crop's."""
    sign = 1.0 if metric.higher_is_better else -1.0
    return [
        a
        for a in result.aspect_labels
        if sign * (result.mean(method, metric.key, a) - result.mean(CENTRE, metric.key, a)) < 0
    ]


def headroom_table(result: SetResult) -> str:
    """Share of the centre → oracle headroom each method captures, per metric and aspect."""
    if CENTRE not in result.values or ORACLE not in result.values:
        return ""
    labels = result.aspect_labels
    aspects: list[str | None] = [*labels, None] if len(labels) > 1 else [None]
    metrics = result.eval_set.protocol.metrics
    headers = []
    for metric in metrics:
        headers += [f"{metric.title} {a if a is not None else 'mean'}" for a in aspects]
    headers += [f"{metric.title} mean, 95 % interval" for metric in metrics]
    headers += [f"{metric.title}: aspects below centre" for metric in metrics]
    lines = [
        "| method | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for method in result.methods:
        if method in (CENTRE, ORACLE):
            continue
        cells = []
        for metric in metrics:
            for a in aspects:
                share = headroom_share(result, method, metric.key, a)
                cells.append("—" if math.isnan(share) else f"{share:+.0%}")
        for metric in metrics:
            lo, hi = headroom_interval(result, method, metric.key)
            cells.append("—" if math.isnan(lo) else f"{lo:+.0%} to {hi:+.0%}")
        for metric in metrics:
            below = aspects_below_centre(result, method, metric)
            cells.append(", ".join(below) if below else "none")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    room = ", ".join(
        f"{m.title} {result.mean(CENTRE, m.key):.3f} → {result.mean(ORACLE, m.key):.3f}"
        for m in metrics
    )
    intro = f"Headroom captured: (method − centre) / (oracle − centre); centre → oracle: {room}."
    return intro + "\n\n" + "\n".join(lines)


def set_section(result: SetResult) -> str:
    es = result.eval_set
    aspects = ", ".join(result.aspect_labels)
    head = f"## {es.name} ({result.n_images} images, kind `{es.protocol.kind}`, aspects: {aspects})"
    if es.name.endswith("_train"):
        head += (
            " — a *_train set: for fitting; the read-out rows are held-out (never fitted on "
            "these photos) and the face rule's head-box transform is fitted on the other folds"
        )
    parts = [head, "", es.protocol.legend, "", markdown_table(result), ""]
    headroom = headroom_table(result)
    if headroom:
        parts += [headroom, ""]
    if result.observers:
        parts += [viewer_section(result), ""]
    if result.face_ceiling is not None:
        parts += [faces_section(result), ""]
    for method, note in result.notes.items():
        parts.append(f"- {method}: {note}")
    n = max(result.n_images, 1)
    timing = ", ".join(
        f"{name} {1e3 * s / n:.1f}" for name, s in {**result.shared_s, **result.method_s}.items()
    )
    parts += [f"- ms per image: {timing}; set total {result.seconds:.1f} s", ""]
    return "\n".join(parts)


def face_ceiling(eval_set: EvalSet) -> npt.NDArray[np.float64]:
    from training.data import noticed_faces
    from training.face_rule import viewers_gain

    return np.array(
        [
            viewers_gain(item, list(eval_set.protocol.aspects(item).values()), noticed_faces(item))
            for item in eval_set.items
        ]
    )


def faces_section(result: SetResult) -> str:
    """Faces people notice sliced, and fixations as a share of the viewers' ceiling under the
    face constraint, with 95 % bootstrap intervals over photos (issue 23's crowd figures)."""
    from training.face_rule import interval, mean_interval, share

    ceiling = result.face_ceiling
    assert ceiling is not None
    centre = result.per_image(CENTRE, "fix")
    lines = [
        "Under the face constraint: the viewers' ceiling among the windows that slice no "
        "noticed face (each viewer scored on the non-slicing largest window all the others' "
        f"fixations choose): fixations {centre.mean():.3f} (centre) → "
        f"{centre.mean() + ceiling.mean():.3f}; {result.n_images} photos, intervals 95 % "
        "bootstrap over photos.",
        "",
        "| method | noticed sliced | faces sliced | fixations | share of the constrained "
        "ceiling's gain |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in result.methods:
        if method == ORACLE:
            continue
        noticed = result.per_image(method, "noticed")
        lo, hi = mean_interval(noticed)
        gain = result.per_image(method, "fix") - centre
        slo, shi = interval(gain, ceiling)
        lines.append(
            f"| {method} | {noticed.mean():.1%} ({lo:.1%} to {hi:.1%}) | "
            f"{result.mean(method, 'sliced'):.1%} | {result.mean(method, 'fix'):.4f} | "
            f"{share(gain, ceiling):+.0%} ({slo:+.0%} to {shi:+.0%}) |"
        )
    return "\n".join(lines)


def viewer_section(result: SetResult) -> str:
    key = result.eval_set.protocol.metrics[0].key
    centre = result.mean(CENTRE, key)
    heatcrop = {m: result.mean(m, key) - centre for m in result.methods if m.startswith("heatcrop")}
    return observers_table(result.observers, result.mean(ORACLE, key) - centre, heatcrop)


# --- run ----------------------------------------------------------------------------------------


def baseline_methods() -> list[Method]:
    return [CentreMethod(), OracleMethod(), *(SmartcropMethod(kind) for kind in SMARTCROP_KINDS)]


def heldout_analysis(analysis: Any, heat: npt.NDArray[np.float32] | None) -> Any:
    """The analysis with its read-out channel replaced by the held-out map (when there is one)."""
    from engines.base import PROFILES

    if heat is None:
        return analysis
    if heat.shape != analysis.heatmaps.shape[1:]:
        raise ValueError(f"held-out map {heat.shape} vs heatmaps {analysis.heatmaps.shape}")
    maps = analysis.heatmaps.copy()
    maps[PROFILES.index("readout")] = heat.astype(np.float16)
    return dataclasses.replace(analysis, heatmaps=maps)


def load_heldout(model_dir: Path) -> dict[str, npt.NDArray[np.float32]] | None:
    """training/fit_readout.py's held-out read-out maps by image path, if they were computed."""
    path = heldout_path(feature_key(model_dir))
    if not path.exists():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def heatcrop_methods(
    settings: Any, profiles: Sequence[str], faces: bool = True
) -> tuple[list[Method], str]:
    """heatcrop rows, plus a line describing the engine; imports the model stack lazily.

    The rows use the service's settings: with ``kernel.faces`` (the default) the engine is the
    service's, the face detector joined to it (sidecar/faces.py), and the boxes follow the face
    rule. The shipped read-out was fitted on training.data.FIT_SETS, so its rows there are
    in-sample; the `held-out` rows use each image's map from a cross-validation head that
    never saw it (training/fit_head.py), the figures to trust for other photos.
    """
    from engines.loader import load_engine
    from sidecar.core import CropCore
    from sidecar.decode import configure_vips
    from sidecar.faces import with_faces

    configure_vips()
    engine = load_engine(settings.engine)
    if faces:
        engine = with_faces(engine, settings)
    core = CropCore(engine, settings.kernel, settings.source, profiles[0])
    methods: list[Method] = []
    uses_readout = ("readout", "learned")
    heldout = None
    if any(p in uses_readout for p in profiles):
        heldout = load_heldout(Path(settings.engine.model_dir))
    # With no confidence cut-off the service never falls back: the second row would repeat.
    fallbacks = (False, True) if settings.kernel.min_confidence > 0 else (False,)
    for profile in profiles:
        if heldout is not None and profile in uses_readout:
            methods += [HeatcropMethod(core, profile, f, heldout) for f in fallbacks]
        methods += [HeatcropMethod(core, profile, f) for f in fallbacks]
    line = f"{engine.name}, model {engine.version}, threads {settings.engine.threads}"
    if faces and settings.kernel.faces:
        methods += face_methods(settings, engine, profiles[0], heldout, uses_readout)
    return methods, line


def face_methods(
    settings: Any, engine: Any, profile: str, heldout: Any, uses_readout: Sequence[str]
) -> list[Method]:
    """Beside the service's rows, on the first profile: the same without faces, and the face
    rule on the labelled faces (a perfect detector)."""
    from sidecar.core import CropCore

    maps = heldout if profile in uses_readout else None
    off = CropCore(engine, dataclasses.replace(settings.kernel, faces=False), settings.source)
    on = CropCore(engine, settings.kernel, settings.source, profile)
    return [HeatcropMethod(off, profile, False, maps), LabelledFaceRuleMethod(on, profile, maps)]


def run(args: argparse.Namespace) -> tuple[list[SetResult], dict[str, Any]]:
    t0 = time.perf_counter()
    sets = [load_set(args.eval_dir, name, args.limit) for name in args.sets]
    methods = baseline_methods()
    info: dict[str, Any] = {
        "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        "working_long_side": WORKING_LONG_SIDE,
    }
    if not args.only_baselines:
        from sidecar import settings as settings_mod

        settings = settings_mod.load(args.config)
        extra, engine_line = heatcrop_methods(settings, args.profile, not args.no_faces)
        methods += extra
        info["engine"] = engine_line
        info["kernel"] = dataclasses.asdict(settings.kernel)
    warm_up(sets, methods)
    results = [evaluate(s, methods, progress=not args.quiet) for s in sets]
    for result in results:
        if result.eval_set.protocol.kind == "saliency" and result.n_images:
            result.observers = observer_gains(result.eval_set, oracle_box)
        if any(item.faces for item in result.eval_set.items):
            result.face_ceiling = face_ceiling(result.eval_set)
    info["runtime_s"] = time.perf_counter() - t0
    return results, info


def warm_up(sets: Sequence[EvalSet], methods: Sequence[Method]) -> None:
    """One untimed pass on one image, so JIT compilation is not charged to the first set."""
    item = next((s.items[0] for s in sets if s.items), None)
    if item is not None:
        for method in methods:
            method.boxes(ImageContext(item), [1.0])
            method.reset()


def report_header(results: Sequence[SetResult], info: dict[str, Any]) -> str:
    counts = ", ".join(f"{r.eval_set.name} {r.n_images}" for r in results)
    lines = [
        f"# heatcrop crop quality ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- commit: {git_describe()}; {os.cpu_count()} cores",
        f"- images: {counts} (protocol: ../shared/eval/README.md)",
        f"- baselines: centred largest window; libvips {info['libvips']} smartcrop on a "
        f"working copy (long side {info['working_long_side']}), box mapped back to "
        "original pixels",
        "- Δ vs centre: mean paired per-image difference (over the mean of the aspects) "
        "± 1.96 standard errors; bold: best in column",
    ]
    if "engine" in info:
        lines.append(f"- heatcrop: {info['engine']}")
        lines.append(
            "- kernel settings: " + ", ".join(f"{k}={v}" for k, v in info["kernel"].items())
        )
        lines.append(
            "- `held-out` rows: the read-out channel replaced by the map of a cross-validation "
            "head that never saw the image (`python -m training.fit_head cv --save-heldout`); "
            f"rows without it use the shipped read-out, fitted on {', '.join(FIT_SETS)}: "
            "in-sample on those sets, held-out on fcdb_dev"
        )
    else:
        lines.append("- heatcrop: not run (--only-baselines)")
    lines += [f"- total runtime: {info['runtime_s']:.1f} s", ""]
    return "\n".join(lines)


def git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (uncommitted changes)" if dirty else "")


def to_json(results: Sequence[SetResult], info: dict[str, Any]) -> dict[str, Any]:
    sets = {}
    for r in results:
        metrics = [m.key for m in r.eval_set.protocol.metrics]
        sets[r.eval_set.name] = {
            "kind": r.eval_set.protocol.kind,
            "n_images": r.n_images,
            "aspects": list(r.aspect_labels),
            "images": [item.name for item in r.eval_set.items],
            "notes": r.notes,
            "observers": [dataclasses.asdict(g) for g in r.observers],
            "methods": {
                m: {
                    "mean": {
                        k: {"mean": r.mean(m, k), **{a: r.mean(m, k, a) for a in r.aspect_labels}}
                        for k in metrics
                    },
                    "per_image": {
                        a: {k: r.values[m][a][k].tolist() for k in metrics} for a in r.aspect_labels
                    },
                    "seconds": r.method_s.get(m, 0.0),
                }
                for m in r.methods
            },
        }
    return {"date": datetime.now(UTC).isoformat(), "commit": git_describe(), **info, "sets": sets}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sets",
        type=lambda s: [x for x in s.split(",") if x],
        default=[*DEFAULT_SETS, *TRAIN_SETS],
        help="comma-separated set names",
    )
    parser.add_argument("--limit", type=int, help="first N images of each set")
    parser.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write machine-readable results ('-': stdout)")
    parser.add_argument(
        "--profile",
        action="append",
        choices=("food", "generic", "readout", "auto", "learned"),
        help="heatcrop profile(s) to run (default: learned, readout)",
    )
    parser.add_argument("--only-baselines", action="store_true", help="skip heatcrop")
    parser.add_argument("--no-faces", action="store_true", help="skip the face-rule rows")
    parser.add_argument("--config", help="heatcrop settings TOML (default: $HEATCROP_CONFIG)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.profile = args.profile or ["learned", "readout"]
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results, info = run(args)
    text = report_header(results, info) + "\n" + "\n".join(set_section(r) for r in results)
    if args.json == Path("-"):
        json.dump(to_json(results, info), sys.stdout, indent=1)
    else:
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(to_json(results, info), indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
