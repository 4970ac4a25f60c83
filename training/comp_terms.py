"""Composition terms of a window for fitting (issue 24): where in a window the features sit.

The kernel (kernels.window.composition_terms) scores a window W with composition maps m_k, one
per part k of W (its 3x3 thirds row-major, then 9: the image outside W), read piecewise-constant
on their own cell grid:

    T_k(W) = (1 / (gh * gw)) * sum_c m_k(c) * frac_k(W, c)

with frac_k(W, c) the share of cell c's area inside part k. The head's maps are linear in the
cell features (m_k(c) = w_k . x_c + b_k), so T_k(W) = w_k . P_k(W) + b_k * area_k(W) with
P_k(W) = (1 / (gh * gw)) sum_c frac_k(W, c) x_c: pooled once per fold, the fit then never sees
the cells of a candidate window again.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.data import Box, EvalSet
from training.features import SetFeatures
from training.fit_window import UPSAMPLE, Episode, axis_matrix, coverage, window_weights

F64 = npt.NDArray[np.float64]
COMP_GRID = 3
COMP_CHANNELS = COMP_GRID * COMP_GRID + 1
# Shifts (share of the expert box's side, each axis alone) and rescalings about its centre: the
# windows an expert crop must beat in the ranking term.
RANK_SHIFTS = (-0.2, -0.1, 0.1, 0.2)
RANK_SCALES = (0.8, 1.25)


def thirds(g: int, length: int, a0: float, a1: float) -> F64:
    """[3, g]: share of each of g cells over [0, length) inside each third of [a0, a1)."""
    step = (a1 - a0) / COMP_GRID
    return np.stack([coverage(g, length, a0 + i * step, a0 + (i + 1) * step) for i in range(3)])


def region_fracs(gh: int, gw: int, width: int, height: int, box: Box) -> F64:
    """[COMP_CHANNELS, gh * gw]: frac_k(box, c) for every part k and cell c."""
    fy = thirds(gh, height, box.y0, box.y1)
    fx = thirds(gw, width, box.x0, box.x1)
    inner = np.einsum("rh,cw->rchw", fy, fx).reshape(COMP_GRID * COMP_GRID, gh * gw)
    return np.concatenate([inner, 1.0 - inner.sum(0, keepdims=True)])


def terms(comp: F64, width: int, height: int, box: Box) -> F64:
    """[COMP_CHANNELS] T_k of one window on maps comp [COMP_CHANNELS, gh, gw] (the numpy
    reference of kernels.window.composition_terms, used by the fit)."""
    _, gh, gw = comp.shape
    frac = region_fracs(gh, gw, width, height, box)
    return (frac * comp.reshape(COMP_CHANNELS, -1)).sum(1) / (gh * gw)


def pooled(
    x: npt.NDArray[np.floating], width: int, height: int, boxes: npt.NDArray[np.int64]
) -> tuple[F64, F64]:
    """P [K, COMP_CHANNELS, d] and area [K, COMP_CHANNELS] of K windows (boxes [K, 4] x0, y0,
    x1, y1) on one image's cell features x [gh, gw, d]."""
    gh, gw, d = x.shape
    xs = np.asarray(x, dtype=np.float64)
    mean = xs.sum((0, 1)) / (gh * gw)
    fy = np.stack([thirds(gh, height, float(b[1]), float(b[3])) for b in boxes])  # [K, 3, gh]
    fx = np.stack([thirds(gw, width, float(b[0]), float(b[2])) for b in boxes])  # [K, 3, gw]
    inner = np.einsum("krh,hwd,kcw->krcd", fy, xs, fx, optimize=True) / (gh * gw)
    inner = inner.reshape(len(boxes), COMP_GRID * COMP_GRID, d)
    p = np.concatenate([inner, mean[None, None] - inner.sum(1, keepdims=True)], axis=1)
    share = np.einsum("krh,kcw->krc", fy, fx).reshape(len(boxes), -1) / (gh * gw)
    area = np.concatenate([share, 1.0 - share.sum(1, keepdims=True)], axis=1)
    return p, area


def clamped(x0: float, y0: float, w: float, h: float, width: int, height: int) -> Box:
    """A w x h window at (x0, y0) moved (not shrunk) inside the image; larger than the image:
    shrunk about its centre, keeping its aspect."""
    s = min(1.0, width / w, height / h)
    cx, cy = x0 + w / 2, y0 + h / 2
    w, h = max(1, round(w * s)), max(1, round(h * s))
    x = min(max(round(cx - w / 2), 0), width - w)
    y = min(max(round(cy - h / 2), 0), height - h)
    return Box(x, y, x + w, y + h)


def rank_windows(expert: Box, width: int, height: int) -> list[Box]:
    """The expert box first, then its shifted and rescaled rivals of the same aspect, inside
    the image, each once and none equal to the expert's."""
    w, h = expert.width, expert.height
    rivals: list[Box] = []
    for f in RANK_SHIFTS:
        rivals.append(clamped(expert.x0 + f * w, expert.y0, w, h, width, height))
        rivals.append(clamped(expert.x0, expert.y0 + f * h, w, h, width, height))
    cx, cy = (expert.x0 + expert.x1) / 2, (expert.y0 + expert.y1) / 2
    for s in RANK_SCALES:
        rivals.append(clamped(cx - s * w / 2, cy - s * h / 2, s * w, s * h, width, height))
    out = [expert]
    for b in rivals:
        if b not in out:
            out.append(b)
    return out


def rank_episodes(eval_set: EvalSet, feats: SetFeatures) -> list[Episode]:
    """Per expert-crop photo, its expert box (row 0) and rivals (rank_windows) as an Episode:
    heat inside each on the kernel's upsampled grid (`a`), the boxes, the aspect (the
    expert's), the image's size; `m` unused (zeros)."""
    out = []
    for i, item in enumerate(eval_set.items):
        h, w = (int(v) for v in feats.shapes[i])
        ry, rx = axis_matrix(h, h * UPSAMPLE), axis_matrix(w, w * UPSAMPLE)
        boxes = rank_windows(item.boxes[0], item.width, item.height)
        if len(boxes) < 2:
            continue
        a = np.array([window_weights(ry, rx, item.width, item.height, b) for b in boxes])
        u = np.outer(ry.sum(0), rx.sum(0)).ravel()
        out.append(Episode(i, a, u, np.zeros(len(boxes)), np.array([b.as_list() for b in boxes]),
                           item.boxes[0].aspect, (item.width, item.height)))  # fmt: skip
    return out
