"""Summed-area tables and exact window sums at fractional cell coordinates.

The heatmap is treated as piecewise constant over its cells: cell (i, j) covers
[j, j+1] x [i, i+1] in cell coordinates (x along columns, y along rows). Its integral from the
origin, F(x, y), equals the table at integer corners and is bilinear inside each cell (the
density is constant there, so F is linear in x for fixed y and in y for fixed x). Bilinear
interpolation of the table at a fractional corner is therefore the exact integral, not an
approximation, and a window sum is four such corners. That is what lets the window search
work in original-pixel coordinates on a coarse map without rounding windows to cells.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


def summed_area_table(heat: np.ndarray) -> np.ndarray:
    """The (H+1, W+1) float64 table of a float32/float64 [H, W] map: T[i, j] = heat[:i, :j].sum().

    The zero first row and column make every window sum four lookups with no edge cases.
    """
    if not isinstance(heat, np.ndarray):
        raise ValueError(f"heat must be a numpy array, got {type(heat).__name__}")
    if heat.dtype not in (np.float32, np.float64):
        raise ValueError(f"heat must be float32 or float64, got {heat.dtype}")
    if heat.ndim != 2 or heat.shape[0] < 1 or heat.shape[1] < 1:
        raise ValueError(f"heat must be 2-D and at least 1x1, got shape {heat.shape}")
    return _sat_kernel(np.ascontiguousarray(heat, dtype=np.float64))


def window_sum(sat: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Exact heat over [x0, x1] x [y0, y1] in fractional cell coordinates of the table's map.

    Coordinates outside the map are clamped to it: there is no heat outside.
    """
    if not isinstance(sat, np.ndarray) or sat.dtype != np.float64 or sat.ndim != 2:
        raise ValueError("sat must be a 2-D float64 array from summed_area_table")
    if sat.shape[0] < 2 or sat.shape[1] < 2:
        raise ValueError(f"sat must be at least 2x2, got shape {sat.shape}")
    coords = (x0, y0, x1, y1)
    if not all(isinstance(c, int | float) and math.isfinite(c) for c in coords):
        raise ValueError(f"window coordinates must be finite numbers, got {coords}")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"window must have x0 <= x1 and y0 <= y1, got {coords}")
    return float(_window_sum(sat, float(x0), float(y0), float(x1), float(y1)))


@njit(cache=True)
def _sat_kernel(heat: np.ndarray) -> np.ndarray:
    h, w = heat.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    for i in range(h):
        row = 0.0
        for j in range(w):
            row += heat[i, j]
            sat[i + 1, j + 1] = sat[i, j + 1] + row
    return sat


@njit(cache=True)
def _locate(c: float, n: int) -> tuple[int, float]:
    """Cell index and fraction of coordinate c on an axis of n cells, clamped to [0, n]."""
    c = min(max(c, 0.0), float(n))
    i = min(math.floor(c), n - 1)
    return i, c - i


@njit(cache=True)
def _corner(sat: np.ndarray, x: float, y: float) -> float:
    """F(x, y): the exact integral from the origin, by bilinear interpolation of the table."""
    i, fy = _locate(y, sat.shape[0] - 1)
    j, fx = _locate(x, sat.shape[1] - 1)
    top = sat[i, j] + fx * (sat[i, j + 1] - sat[i, j])
    bottom = sat[i + 1, j] + fx * (sat[i + 1, j + 1] - sat[i + 1, j])
    return top + fy * (bottom - top)


@njit(cache=True)
def _window_sum(sat: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    return _corner(sat, x1, y1) - _corner(sat, x0, y1) - _corner(sat, x1, y0) + _corner(sat, x0, y0)
