"""The face rule of the window search: never slice a face when a window exists that keeps or
drops every face whole.

A window *slices* a face when it keeps more than ``SLICE_LOW`` and less than ``SLICE_HIGH`` of
the face box's area (the quality protocol's definition, ../shared/eval/README.md); it *keeps*
it at ``SLICE_HIGH`` or more. Among the candidates of kernels.window (same scales, same evenly
spaced offsets and centre), plus the offsets that put a window edge on a face edge (so that a
position keeping or dropping a face whole exists among the candidates whenever one exists on
that axis), the order is

1. fewest faces sliced (0 when any candidate slices none: the rule; else the least slicing);
2. highest ``score + face_weight * (faces kept / faces)``, the score of kernels.window
   (heat inside minus the edge cut and zoom terms): among windows that slice nothing, the
   one that keeps more heat, and with ``face_weight`` > 0 more faces;
3. centre closest to the image centre, then the fixed order of kernels.window.

Choosing by what the window keeps matters: moving the heat-best box to the *nearest*
non-slicing position lost fixations on unseen crowd photos (issue 14: 0.798 -> 0.783).
"""

from __future__ import annotations

import math

import numpy as np

from kernels.window import (
    SLICE_HIGH,
    SLICE_LOW,
    Composition,
    CropBox,
    SearchParams,
    _check_aspect,
    _check_keep,
    _check_size,
    _is_number,
    _search,
    comp_tables,
)

# More faces than this: the largest ones are kept. The search costs ~ candidates x faces, and
# in a crowd of hundreds the smallest faces are sliced by any window anyway.
MAX_FACES = 128


def best_window_faces(
    heat: np.ndarray,
    width: int,
    height: int,
    aspect: float,
    params: SearchParams,
    faces: np.ndarray,
    keep: tuple[int, int, int, int] | None = None,
    face_weight: float = 0.0,
    comp: np.ndarray | Composition | None = None,
) -> tuple[CropBox, int]:
    """kernels.window.best_window with the face rule; also the number of faces it slices.

    ``faces`` is [N, >= 4] (x0, y0, x1, y1 in original pixels, x1/y1 exclusive; further
    columns, such as a detector's score, are ignored); boxes are clipped to the image and
    empty ones dropped. With no faces the box is best_window's; ``comp`` as there.
    """
    _check_size(width, height)
    _check_aspect(aspect)
    if not isinstance(params, SearchParams):
        raise ValueError(f"params must be a SearchParams, got {type(params).__name__}")
    if not _is_number(face_weight) or not math.isfinite(face_weight) or face_weight < 0:
        raise ValueError(f"face_weight must be a finite number >= 0, got {face_weight!r}")
    keep_arr = _check_keep(keep, width, height)
    boxes = clean_faces(faces, width, height)
    box, sliced, found = _search(heat, width, height, aspect, params, keep_arr, boxes,
                                 float(face_weight), comp_tables(comp))  # fmt: skip
    if not found:
        sliced = count_sliced(boxes, box.as_tuple())
    return box, sliced


def clean_faces(faces: np.ndarray, width: int, height: int) -> np.ndarray:
    """float64 [N, 4] boxes inside the image, non-empty, at most ``MAX_FACES`` (the largest)."""
    arr = np.asarray(faces, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 4:
        raise ValueError(f"faces must be [N, >= 4], got shape {arr.shape}")
    if not np.isfinite(arr[:, :4]).all():
        raise ValueError("faces must be finite")
    out = arr[:, :4].copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, float(width))
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, float(height))
    out = out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]
    if out.shape[0] > MAX_FACES:
        area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
        out = out[np.sort(np.argsort(-area, kind="stable")[:MAX_FACES])]
    return np.ascontiguousarray(out)


def kept_fractions(faces: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Share of each face box's area inside ``box`` (x0, y0, x1, y1)."""
    f = np.asarray(faces, dtype=np.float64).reshape(-1, np.shape(faces)[-1] if len(faces) else 4)
    if f.shape[0] == 0:
        return np.zeros(0)
    ox = np.clip(np.minimum(f[:, 2], box[2]) - np.maximum(f[:, 0], box[0]), 0.0, None)
    oy = np.clip(np.minimum(f[:, 3], box[3]) - np.maximum(f[:, 1], box[1]), 0.0, None)
    area = (f[:, 2] - f[:, 0]) * (f[:, 3] - f[:, 1])
    return np.where(area > 0, ox * oy / np.where(area > 0, area, 1.0), 0.0)


def count_sliced(faces: np.ndarray, box: tuple[int, int, int, int]) -> int:
    kept = kept_fractions(faces, box)
    return int(np.count_nonzero((kept > SLICE_LOW) & (kept < SLICE_HIGH)))
