"""The dev evaluation sets (../shared/eval/<set>/manifest.json) and what each kind asks for.

A set's protocol follows from its manifest `kind` (crop, object, saliency), as the eval README
lays out: which aspects to ask for per image and which per-image metrics to compute.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.metrics import (
    Box,
    all_dishes_kept,
    bde,
    drop_first_fixations,
    fixations_kept,
    food_kept,
    iou,
)

DEFAULT_SETS: tuple[str, ...] = ("fcdb_dev", "food_dev", "saliency_dev")
# Aspect ratios asked of the food and saliency sets, label -> width / height.
ASPECTS: dict[str, float] = {"1:1": 1.0, "4:5": 4 / 5, "16:9": 16 / 9, "9:16": 9 / 16}
GT_ASPECT = "gt"


@dataclass(frozen=True)
class EvalItem:
    name: str
    path: Path
    width: int
    height: int
    boxes: tuple[Box, ...]
    # [n, 3] rows of (x, y, subject) with each subject's first fixation already removed.
    fixations: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.zeros((0, 3)), compare=False
    )


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool


@dataclass(frozen=True)
class Protocol:
    """What a set kind asks for: the aspects per image and how to score one crop."""

    kind: str
    metrics: tuple[Metric, ...]
    aspect_labels: tuple[str, ...]
    aspects: Callable[[EvalItem], dict[str, float]]
    score: Callable[[EvalItem, Box], dict[str, float]]
    legend: str = ""


@dataclass(frozen=True)
class EvalSet:
    name: str
    protocol: Protocol
    items: tuple[EvalItem, ...]


def _gt_aspect(item: EvalItem) -> dict[str, float]:
    return {GT_ASPECT: item.boxes[0].aspect}


def _fixed_aspects(item: EvalItem) -> dict[str, float]:
    return dict(ASPECTS)


def _score_crop(item: EvalItem, box: Box) -> dict[str, float]:
    gt = item.boxes[0]
    return {"iou": iou(box, gt), "bde": bde(box, gt, item.width, item.height)}


def _score_food(item: EvalItem, box: Box) -> dict[str, float]:
    return {"kept": food_kept(box, item.boxes), "all90": float(all_dishes_kept(box, item.boxes))}


def _score_saliency(item: EvalItem, box: Box) -> dict[str, float]:
    return {"fix": fixations_kept(box, item.fixations)}


PROTOCOLS: dict[str, Protocol] = {
    "crop": Protocol(
        kind="crop",
        metrics=(Metric("iou", "IoU", True), Metric("bde", "BDE", False)),
        aspect_labels=(GT_ASPECT,),
        aspects=_gt_aspect,
        score=_score_crop,
        legend="Crop asked at the expert crop's aspect; IoU with it, and BDE (mean of the four "
        "edge offsets over W or H).",
    ),
    "object": Protocol(
        kind="object",
        metrics=(Metric("kept", "kept", True), Metric("all90", "all≥90%", True)),
        aspect_labels=tuple(ASPECTS),
        aspects=_fixed_aspects,
        score=_score_food,
        legend="kept: share of the union of dish-box area inside the crop; all≥90%: share of "
        "images where every dish keeps at least 90 % of its own area.",
    ),
    "saliency": Protocol(
        kind="saliency",
        metrics=(Metric("fix", "fixations", True),),
        aspect_labels=tuple(ASPECTS),
        aspects=_fixed_aspects,
        score=_score_saliency,
        legend="fixations: share of eye fixations inside the crop, each subject's first "
        "fixation left out.",
    ),
}


def load_set(eval_dir: str | Path, name: str, limit: int | None = None) -> EvalSet:
    """Read <eval_dir>/<name>/manifest.json; `limit` keeps the first N entries (in file order)."""
    root = Path(eval_dir) / name
    entries: list[dict[str, Any]] = json.loads((root / "manifest.json").read_text())
    if limit is not None:
        entries = entries[:limit]
    kinds = sorted({e["kind"] for e in entries})
    if len(kinds) != 1 or kinds[0] not in PROTOCOLS:
        raise ValueError(f"{name}: expected one known kind per set, got {kinds}")
    items = tuple(_item(root, e) for e in entries)
    return EvalSet(name=name, protocol=PROTOCOLS[kinds[0]], items=items)


def _item(root: Path, entry: dict[str, Any]) -> EvalItem:
    width, height = int(entry["width"]), int(entry["height"])
    boxes = tuple(Box.of(b) for b in entry["boxes"])
    if not boxes or not all(b.inside(width, height) for b in boxes):
        raise ValueError(f"{entry['image']}: boxes missing or outside {width}x{height}")
    raw = entry.get("fixations_xy_subject")
    fixations = np.zeros((0, 3))
    if raw:
        fixations = drop_first_fixations(np.asarray(raw, dtype=np.float64).reshape(-1, 3))
    return EvalItem(
        name=entry["image"],
        path=root / "images" / entry["image"],
        width=width,
        height=height,
        boxes=boxes,
        fixations=fixations,
    )
