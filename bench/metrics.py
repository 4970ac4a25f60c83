"""Crop-quality metrics, as ../shared/eval/README.md defines them.

Boxes are integer pixel boxes of the original, x1/y1 exclusive, like the manifests and like
kernels.window.CropBox. All functions are pure; the harness averages their per-image values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


class BoxLike(Protocol):
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
