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
from numba import njit

from kernels.sat import _sat_kernel
from kernels.window import (
    TIE_EPS,
    CropBox,
    SearchParams,
    _box_score,
    _check_aspect,
    _check_keep,
    _check_size,
    _is_number,
    _keep_fallback,
    _normalised,
    _offsets,
    _scale_list,
    _scores,
    _window_size,
)

SLICE_LOW = 0.1
SLICE_HIGH = 0.9
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
) -> tuple[CropBox, int]:
    """kernels.window.best_window with the face rule; also the number of faces it slices.

    ``faces`` is [N, >= 4] (x0, y0, x1, y1 in original pixels, x1/y1 exclusive; further
    columns, such as a detector's score, are ignored); boxes are clipped to the image and
    empty ones dropped. With no faces the box is best_window's.
    """
    _check_size(width, height)
    _check_aspect(aspect)
    if not isinstance(params, SearchParams):
        raise ValueError(f"params must be a SearchParams, got {type(params).__name__}")
    if not _is_number(face_weight) or not math.isfinite(face_weight) or face_weight < 0:
        raise ValueError(f"face_weight must be a finite number >= 0, got {face_weight!r}")
    keep_arr = _check_keep(keep, width, height)
    boxes = clean_faces(faces, width, height)
    width, height, aspect = int(width), int(height), float(aspect)
    weights = (float(params.cut_weight), float(params.cut_band), float(params.zoom_weight))
    sat = _sat_kernel(_normalised(heat))
    scales = _scale_list(params)
    sizes = np.array([_window_size(width, height, aspect, s) for s in scales], dtype=np.int64)
    cws = np.ascontiguousarray(sizes[:, 0])
    chs = np.ascontiguousarray(sizes[:, 1])
    found, bx, by, bk, score, center, sliced = _face_search_kernel(
        sat, width, height, cws, chs, np.array(scales, dtype=np.float64), int(params.steps),
        keep_arr, boxes, float(face_weight), *weights,
    )  # fmt: skip
    cw, ch = int(cws[bk]), int(chs[bk])
    if not found:
        bx, by, cw, ch = _keep_fallback(keep_arr, width, height, int(cws[0]), int(chs[0]))
        score = _box_score(sat, width, height, bx, by, cw, ch, 1.0, *weights)
        sliced = count_sliced(boxes, (bx, by, bx + cw, by + ch))
    x0, y0 = int(bx), int(by)
    box = CropBox(
        x0, y0, x0 + cw, y0 + ch,
        score=float(score),
        center_score=float(center),
        confidence=max(0.0, float(score) - float(center)),
    )  # fmt: skip
    return box, int(sliced)


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


@njit(cache=True)
def _face_offsets(
    base: np.ndarray, lo: np.ndarray, hi: np.ndarray, side: int, a: int, b: int
) -> np.ndarray:
    """``base`` plus, per face [lo, hi) on this axis, the offsets in [a, b] where a window of
    ``side`` starts or ends on the face's edges (keeping it whole or dropping it), sorted."""
    out = np.empty(base.size + 4 * lo.size, dtype=np.int64)
    n = 0
    for v in base:
        out[n] = v
        n += 1
    for f in range(lo.size):
        f0 = math.floor(lo[f])
        f1 = math.ceil(hi[f])
        for v in (f0, f1 - side, f1, f0 - side):
            if a <= v <= b:
                out[n] = v
                n += 1
    return np.unique(out[:n])


@njit(cache=True)
def _fractions(offs: np.ndarray, side: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[offset, face]: share of each face's extent on this axis inside [offset, offset + side)."""
    out = np.empty((offs.size, lo.size), dtype=np.float64)
    for a in range(offs.size):
        w0 = float(offs[a])
        w1 = w0 + side
        for f in range(lo.size):
            inter = min(w1, hi[f]) - max(w0, lo[f])
            out[a, f] = max(0.0, inter) / (hi[f] - lo[f])
    return out


@njit(cache=True)
def _face_search_kernel(
    sat: np.ndarray,
    width: int,
    height: int,
    cws: np.ndarray,
    chs: np.ndarray,
    scales: np.ndarray,
    steps: int,
    keep: np.ndarray,
    faces: np.ndarray,
    face_weight: float,
    cut_weight: float,
    cut_band: float,
    zoom_weight: float,
) -> tuple[bool, int, int, int, float, float, int]:
    """(found, x, y, scale index, score, centre score, faces sliced); see the module doc."""
    has_keep = keep[0] >= 0
    nf = faces.shape[0]
    fx0 = np.ascontiguousarray(faces[:, 0])
    fx1 = np.ascontiguousarray(faces[:, 2])
    fy0 = np.ascontiguousarray(faces[:, 1])
    fy1 = np.ascontiguousarray(faces[:, 3])
    per_face = face_weight / nf if nf > 0 else 0.0
    found = False
    bx = 0
    by = 0
    bk = 0
    best = -np.inf
    best_score = 0.0
    best_d2 = 0
    best_sliced = 0
    for k in range(scales.size):
        cw = cws[k]
        ch = chs[k]
        lox, hix = 0, width - cw
        loy, hiy = 0, height - ch
        if has_keep:
            lox, hix = max(lox, keep[2] - cw), min(hix, keep[0])
            loy, hiy = max(loy, keep[3] - ch), min(hiy, keep[1])
            if lox > hix or loy > hiy:
                continue
        xs = _face_offsets(_offsets(width - cw, steps, lox, hix), fx0, fx1, cw, lox, hix)
        ys = _face_offsets(_offsets(height - ch, steps, loy, hiy), fy0, fy1, ch, loy, hiy)
        sc = _scores(
            sat, width, height, cw, ch, scales[k], xs, ys, cut_weight, cut_band, zoom_weight
        )
        gx = _fractions(xs, cw, fx0, fx1)
        gy = _fractions(ys, ch, fy0, fy1)
        for b in range(ys.size):
            dy = 2 * ys[b] + ch - height
            for a in range(xs.size):
                sliced = 0
                kept = 0
                for f in range(nf):
                    share = gx[a, f] * gy[b, f]
                    if share >= SLICE_HIGH:
                        kept += 1
                    elif share > SLICE_LOW:
                        sliced += 1
                if found and sliced > best_sliced:
                    continue
                v = sc[b, a] + per_face * kept
                dx = 2 * xs[a] + cw - width
                d2 = dx * dx + dy * dy
                if (
                    not found
                    or sliced < best_sliced
                    or v > best + TIE_EPS
                    or (v >= best - TIE_EPS and d2 < best_d2)
                ):
                    found = True
                    best = v
                    best_score = sc[b, a]
                    best_d2 = d2
                    best_sliced = sliced
                    bx = xs[a]
                    by = ys[b]
                    bk = k
    cx = (width - cws[0]) // 2
    cy = (height - chs[0]) // 2
    center = _box_score(
        sat, width, height, cx, cy, cws[0], chs[0], scales[0], cut_weight, cut_band, zoom_weight
    )
    return found, bx, by, bk, best_score, center, best_sliced
