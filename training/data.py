"""What the fitters (training/) and the benchmarks (bench/) share: the ground truth and where
the fitted read-out's by-products live. bench imports this module; nothing here imports bench.

- The dev evaluation sets (../shared/eval/<set>/manifest.json) and what each kind asks for: a
  set's protocol follows from its manifest `kind` (crop, object, saliency), as the eval README
  lays out: which aspects to ask for per image and which per-image metrics to compute.
- The crop-quality metrics, as ../shared/eval/README.md defines them. Boxes are integer pixel
  boxes of the original, x1/y1 exclusive, like the manifests and like kernels.window.CropBox.
  All functions are pure; the harness averages their per-image values.
- The largest window at an aspect, its centred position and the oracle (the position the
  ground truth prefers): the units of every headroom share.
- The sets the read-out head is fitted on, and the cache of its features and held-out maps
  (training/fit_readout.py writes them; bench/quality.py and training/tune.py read them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
import numpy.typing as npt

from engines.model import read_manifest

# --- metrics ----------------------------------------------------------------------------------


class BoxLike(TypingProtocol):
    @property
    def x0(self) -> int: ...
    @property
    def y0(self) -> int: ...
    @property
    def x1(self) -> int: ...
    @property
    def y1(self) -> int: ...


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def of(cls, box: BoxLike | Sequence[int]) -> Box:
        """A Box from a CropBox-like object or an [x0, y0, x1, y1] sequence."""
        if isinstance(box, Sequence):
            x0, y0, x1, y1 = (int(v) for v in box)
            return cls(x0, y0, x1, y1)
        return cls(int(box.x0), int(box.y0), int(box.x1), int(box.y1))

    @property
    def width(self) -> int:
        return max(0, self.x1 - self.x0)

    @property
    def height(self) -> int:
        return max(0, self.y1 - self.y0)

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def intersect(self, other: Box) -> Box:
        """The overlap; an empty box (area 0) when they do not overlap."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        return Box(x0, y0, max(x0, min(self.x1, other.x1)), max(y0, min(self.y1, other.y1)))

    def inside(self, width: int, height: int) -> bool:
        return 0 <= self.x0 < self.x1 <= width and 0 <= self.y0 < self.y1 <= height

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


def iou(a: Box, b: Box) -> float:
    inter = a.intersect(b).area
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def bde(pred: Box, gt: Box, width: int, height: int) -> float:
    """Boundary displacement error: mean of the four edge offsets, each over W or H."""
    dx = abs(pred.x0 - gt.x0) + abs(pred.x1 - gt.x1)
    dy = abs(pred.y0 - gt.y0) + abs(pred.y1 - gt.y1)
    return (dx / width + dy / height) / 4.0


def union_area(boxes: Iterable[Box]) -> int:
    """Exact area of the union of boxes (overlaps counted once), by coordinate compression."""
    solid = [b for b in boxes if b.area > 0]
    if not solid:
        return 0
    xs = np.unique([v for b in solid for v in (b.x0, b.x1)])
    ys = np.unique([v for b in solid for v in (b.y0, b.y1)])
    covered = np.zeros((len(ys) - 1, len(xs) - 1), dtype=bool)
    for b in solid:
        i0, i1 = np.searchsorted(ys, [b.y0, b.y1])
        j0, j1 = np.searchsorted(xs, [b.x0, b.x1])
        covered[i0:i1, j0:j1] = True
    cell = np.outer(np.diff(ys), np.diff(xs))
    return int(cell[covered].sum())


def food_kept(crop: Box, dishes: Sequence[Box]) -> float:
    """Share of the union of dish area that stays inside the crop (1.0 when there is none)."""
    total = union_area(dishes)
    if total == 0:
        return 1.0
    return union_area(d.intersect(crop) for d in dishes) / total


def all_dishes_kept(crop: Box, dishes: Sequence[Box], threshold: float = 0.9) -> bool:
    """Every dish keeps at least `threshold` of its own area inside the crop."""
    return all(d.intersect(crop).area >= threshold * d.area for d in dishes if d.area > 0)


def drop_first_fixations(fixations: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Remove each subject's first fixation (rows are [x, y, subject] in viewing order).

    The first fixation lands where the previous stimulus's fixation cross was, the centre,
    whatever the photo shows; keeping it would reward the centre crop for free.
    """
    if len(fixations) == 0:
        return fixations
    _, first = np.unique(fixations[:, 2], return_index=True)
    keep = np.ones(len(fixations), dtype=bool)
    keep[first] = False
    return fixations[keep]


def fixations_kept(crop: Box, fixations_xy: npt.NDArray[np.float64]) -> float:
    """Share of fixation points inside the crop ([x0, x1) × [y0, y1), continuous coordinates)."""
    if len(fixations_xy) == 0:
        return 1.0
    x, y = fixations_xy[:, 0], fixations_xy[:, 1]
    inside = (x >= crop.x0) & (x < crop.x1) & (y >= crop.y0) & (y < crop.y1)
    return float(inside.mean())


# A crop slices a face when it keeps more than this and less than SLICE_HIGH of the face box's
# area (../shared/eval/README.md, faces); the window search's face rule uses the same bounds.
SLICE_LOW = 0.1
SLICE_HIGH = 0.9


# A face people notice: its labelled box at least this share of the photo's height tall (48 px
# on a 576-px crowd photo; ../shared/eval/README.md).
NOTICED = 1 / 12


def noticed_faces(item: EvalItem) -> tuple[Box, ...]:
    """The labelled faces a viewer notices (``NOTICED``), of those that count for slicing."""
    return tuple(f for f in item.faces if f.height >= NOTICED * item.height)


def face_sliced(crop: Box, faces: Sequence[Box]) -> bool:
    """Some face box keeps between 10 % and 90 % of its area inside the crop."""
    for face in faces:
        if face.area > 0:
            kept = face.intersect(crop).area / face.area
            if SLICE_LOW < kept < SLICE_HIGH:
                return True
    return False


# --- evaluation sets ------------------------------------------------------------------------

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
    # Hand-labelled faces that count for slicing (frontal or profile, not `back`); the
    # manifest's `faces` (crowd_train), empty elsewhere.
    faces: tuple[Box, ...] = field(default=(), compare=False)


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


def _score_saliency_faces(item: EvalItem, box: Box) -> dict[str, float]:
    return {
        **_score_saliency(item, box),
        "sliced": float(face_sliced(box, item.faces)),
        "noticed": float(face_sliced(box, noticed_faces(item))),
    }


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
    # A saliency set whose manifest labels faces (crowd_train): the same, plus faces sliced.
    "saliency-faces": Protocol(
        kind="saliency",
        metrics=(
            Metric("fix", "fixations", True),
            Metric("sliced", "faces sliced", False),
            Metric("noticed", "noticed sliced", False),
        ),
        aspect_labels=tuple(ASPECTS),
        aspects=_fixed_aspects,
        score=_score_saliency_faces,
        legend="fixations: share of eye fixations inside the crop, each subject's first "
        "fixation left out; faces sliced: share of crops that keep between 10 % and 90 % of "
        "some labelled frontal or profile face (faces seen from the back do not count); "
        "noticed sliced: the same, counting only faces at least 1/12 of the photo's height.",
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
    protocol = kinds[0]
    if protocol == "saliency" and any("faces" in e for e in entries):
        protocol = "saliency-faces"
    return EvalSet(name=name, protocol=PROTOCOLS[protocol], items=items)


def _item(root: Path, entry: dict[str, Any]) -> EvalItem:
    width, height = int(entry["width"]), int(entry["height"])
    boxes = tuple(Box.of(b) for b in entry["boxes"])
    if not boxes or not all(b.inside(width, height) for b in boxes):
        raise ValueError(f"{entry['image']}: boxes missing or outside {width}x{height}")
    raw = entry.get("fixations_xy_subject")
    fixations = np.zeros((0, 3))
    if raw:
        fixations = drop_first_fixations(np.asarray(raw, dtype=np.float64).reshape(-1, 3))
    faces = tuple(
        Box.of(f["box"])
        for f in entry.get("faces", ())
        if not f.get("back") and (f.get("frontal") or f.get("profile"))
    )
    return EvalItem(
        name=entry["image"],
        path=root / "images" / entry["image"],
        width=width,
        height=height,
        boxes=boxes,
        fixations=fixations,
        faces=faces,
    )


# --- the largest window: centred, and where the ground truth puts it -------------------------

# Offsets the oracle tries along the free axis: every pixel up to this many, evenly spaced beyond.
ORACLE_MAX_OFFSETS = 1024


def largest_window(width: int, height: int, aspect: float) -> tuple[int, int]:
    """(w, h) of the largest window of aspect w/h inside width x height, within a pixel."""
    if width <= 0 or height <= 0 or aspect <= 0:
        raise ValueError(f"bad size or aspect: {width}x{height}, {aspect}")
    # Half-up rounding, as kernels.window does: this centre crop is the service's, to the pixel.
    if width >= height * aspect:
        return max(1, min(width, math.floor(height * aspect + 0.5))), height
    return width, max(1, min(height, math.floor(width / aspect + 0.5)))


def centre_box(width: int, height: int, aspect: float) -> Box:
    cw, ch = largest_window(width, height, aspect)
    x0, y0 = (width - cw) // 2, (height - ch) // 2
    return Box(x0, y0, x0 + cw, y0 + ch)


def oracle_box(
    item: EvalItem,
    aspect: float,
    score: Callable[[Box], float],
    max_offsets: int = ORACLE_MAX_OFFSETS,
) -> Box:
    """The largest window at `aspect` whose position maximises `score` (higher is better).

    A largest window has one free axis; every integer offset along it is tried (evenly spaced
    ones, always including both ends and the centre, when there are more than `max_offsets`).
    Ties go to the offset nearest the centre, so a flat score gives the centre crop.
    """
    cw, ch = largest_window(item.width, item.height, aspect)
    free_x = item.width - cw
    free = free_x if free_x > 0 else item.height - ch
    middle = free // 2
    if free + 1 <= max_offsets:
        offsets = list(range(free + 1))
    else:
        grid = np.round(np.linspace(0, free, max_offsets)).astype(int).tolist()
        offsets = sorted({*grid, middle})
    best, best_value = middle, -math.inf
    for off in offsets:
        x0, y0 = (off, 0) if free_x > 0 else (0, off)
        value = score(Box(x0, y0, x0 + cw, y0 + ch))
        if value > best_value or (value == best_value and abs(off - middle) < abs(best - middle)):
            best, best_value = off, value
    x0, y0 = (best, 0) if free_x > 0 else (0, best)
    return Box(x0, y0, x0 + cw, y0 + ch)


# --- the fitted read-out's sets, features and held-out maps -----------------------------------

# The sets the shipped read-out head is fitted on (training/fit_head.py, DEFAULT_SETS): a
# benchmark must use held-out maps (build/readout/heldout-*.npz) for their images.
FIT_SETS: tuple[str, ...] = ("fcdb_train", "saliency_dev", "food_dev", "osie_train", "crowd_train")
ALL_SETS: tuple[str, ...] = ("fcdb_train", "fcdb_dev", "saliency_dev", "food_dev")
CACHE = Path("build/readout")


def feature_key(model_dir: Path) -> str:
    """The cache key of the tapped features and held-out maps: the backbone's weights, not the
    whole model. The tapped features do not depend on the read-out head, so refitting and
    re-exporting it keeps the cache."""
    return "lite0-" + read_manifest(model_dir)["weights_sha256"][:12]


def heldout_path(stem: str) -> Path:
    return CACHE / f"heldout-{stem}.npz"


def heldout_key(path: Path) -> str:
    """The key of an image's held-out map: its resolved path, so that another spelling of the
    eval folder (relative, absolute, with `..`) finds the same maps."""
    return str(Path(path).resolve())


def publish(text: str, out: Path | None) -> None:
    """Print a command's markdown report and, with `out`, write it there too (the benchmarks'
    and the fitters' reports)."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
