"""Turn the model's coarse class-activation map into the heatmap the window search reads.

Lite0's CAM is 7x7 to 7x14 cells; one cell spans ~1/7 of the image, so a window search on it
directly would see blocks. The map is made non-negative (a CAM's negative evidence says
"not this class", not "crop this away"), bilinearly upsampled to a finer grid, normalised to
sum 1, and blended with a Gaussian centre prior.

Why the centre prior: photographers put subjects near the centre and the ground truth says so.
On ../shared/eval the human crops of fcdb_dev have their centre on average 3.6 % (x) and 7.3 %
(y) of the image size from the image centre, and saliency_dev's eye fixations spread with a
standard deviation of 0.21 (x) and 0.16 (y) of the image size, against 0.29 if they were
uniform. A CAM on the other hand often fires on a textured border; the prior keeps such a
border blob from dragging the crop off a centred subject unless it is clearly stronger.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# A grid larger than this buys nothing for a 7x14 CAM and only costs search time.
MAX_GRID_SIDE = 4096
MAX_SMOOTH = 16.0  # sigma in output cells; wider would only flatten the map


def prepare_heatmap(
    heat: np.ndarray,
    out_shape: tuple[int, int],
    *,
    center_sigma: float,
    center_weight: float,
    gamma: float = 1.0,
    smooth: float = 0.0,
) -> np.ndarray:
    """Return a float32 (gh, gw) map, non-negative, summing to 1, with the centre prior blended in.

    ``h' = (1 - center_weight) * h + center_weight * g``: h is the upsampled, normalised map and
    g an isotropic-in-relative-units Gaussian of sigma ``center_sigma`` x grid size per axis,
    also normalised. ``gamma`` > 1 sharpens the non-negative map before upsampling (a CAM's
    blob is broader than the object it fires on). An all-zero map or one with any non-finite
    value (a broken model output carries no information) becomes flat, so the result is never
    NaN. ``smooth`` > 0 blurs the result with a Gaussian of that sigma in output cells (edges
    replicated, as scipy.ndimage's mode "nearest"): the bilinear map has creases at the CNN's
    cell centres, and a window edge should not snap to them (training/tune.py measures it).
    """
    src = _check_heat(heat)
    gh, gw = _check_shape(out_shape)
    _check_prior(center_sigma, center_weight)
    if not isinstance(gamma, int | float) or not 0.1 <= gamma <= 8.0:
        raise ValueError(f"gamma must be a number in [0.1, 8], got {gamma!r}")
    if not isinstance(smooth, int | float) or not 0.0 <= smooth <= MAX_SMOOTH:
        raise ValueError(f"smooth must be a number in [0, {MAX_SMOOTH}], got {smooth!r}")
    if np.isfinite(src).all():
        positive = np.maximum(src, 0.0)
        if gamma != 1.0:
            positive = positive / max(float(positive.max()), 1e-30)
            positive = positive**gamma
        upsampled = _bilinear_kernel(positive, gh, gw)
    else:
        upsampled = np.zeros((gh, gw), dtype=np.float64)
    total = float(upsampled.sum())
    if total > 0.0 and math.isfinite(total):
        base = upsampled / total
    else:
        base = np.full((gh, gw), 1.0 / (gh * gw), dtype=np.float64)
    if center_weight > 0.0:
        prior = _gaussian_kernel(gh, gw, float(center_sigma))
        base = (1.0 - center_weight) * base + center_weight * prior
    if smooth > 0.0:
        base = _blur(base, _blur_taps(float(smooth)))
        base = base / base.sum()  # a blur with replicated edges moves a little mass
    return base.astype(np.float32)


def _blur_taps(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps out to 4 sigma (scipy.ndimage's default truncation)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _blur(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable convolution with ``taps`` along both axes, edges replicated."""
    rows = _blur_rows(img, taps)
    return _blur_rows(np.ascontiguousarray(rows.T), taps).T


@njit(cache=True)
def _blur_rows(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Convolution with ``taps`` along each row, the row's end values replicated."""
    gh, gw = img.shape
    r = taps.size // 2
    out = np.zeros((gh, gw), dtype=np.float64)
    for i in range(gh):
        for j in range(gw):
            acc = 0.0
            for t in range(taps.size):
                acc += taps[t] * img[i, min(max(j + t - r, 0), gw - 1)]
            out[i, j] = acc
    return out


def _check_heat(heat: np.ndarray) -> np.ndarray:
    if not isinstance(heat, np.ndarray):
        raise ValueError(f"heat must be a numpy array, got {type(heat).__name__}")
    if heat.dtype.kind not in "fiu":
        raise ValueError(f"heat must be a real number array, got dtype {heat.dtype}")
    if heat.ndim != 2 or heat.shape[0] < 1 or heat.shape[1] < 1:
        raise ValueError(f"heat must be 2-D and at least 1x1, got shape {heat.shape}")
    return np.ascontiguousarray(heat, dtype=np.float64)


def _check_shape(out_shape: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(out_shape, tuple | list) or len(out_shape) != 2:
        raise ValueError(f"out_shape must be (gh, gw), got {out_shape!r}")
    gh, gw = out_shape
    for n in (gh, gw):
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise ValueError(f"out_shape must hold ints, got {out_shape!r}")
        if not 1 <= n <= MAX_GRID_SIDE:
            raise ValueError(f"out_shape sides must be in [1, {MAX_GRID_SIDE}], got {out_shape!r}")
    return int(gh), int(gw)


def _check_prior(center_sigma: float, center_weight: float) -> None:
    if not isinstance(center_sigma, int | float) or not math.isfinite(center_sigma):
        raise ValueError(f"center_sigma must be a finite number, got {center_sigma!r}")
    if center_sigma <= 0.0:
        raise ValueError(f"center_sigma must be > 0, got {center_sigma!r}")
    if not isinstance(center_weight, int | float) or not math.isfinite(center_weight):
        raise ValueError(f"center_weight must be a finite number, got {center_weight!r}")
    if not 0.0 <= center_weight <= 1.0:
        raise ValueError(f"center_weight must be in [0, 1], got {center_weight!r}")


@njit(cache=True)
def source_coord(i: int, scale: float, n: int) -> tuple[int, int, float]:
    """Half-pixel-centre mapping (as OpenCV/torch align_corners=False), clamped at the edges."""
    c = min(max((i + 0.5) * scale - 0.5, 0.0), float(n - 1))
    lo = math.floor(c)
    hi = min(lo + 1, n - 1)
    return lo, hi, c - lo


@njit(cache=True)
def _bilinear_kernel(src: np.ndarray, gh: int, gw: int) -> np.ndarray:
    h, w = src.shape
    out = np.empty((gh, gw), dtype=np.float64)
    sy = h / gh
    sx = w / gw
    for i in range(gh):
        y0, y1, fy = source_coord(i, sy, h)
        for j in range(gw):
            x0, x1, fx = source_coord(j, sx, w)
            top = src[y0, x0] + fx * (src[y0, x1] - src[y0, x0])
            bottom = src[y1, x0] + fx * (src[y1, x1] - src[y1, x0])
            out[i, j] = top + fy * (bottom - top)
    return out


@njit(cache=True)
def _gaussian_axis(n: int, sigma: float) -> np.ndarray:
    """Gaussian over the n cell centres of one axis, sigma = sigma x n, peak scaled to 1.

    Scaling by the nearest-to-centre cell (not the ideal peak) keeps a tiny sigma from
    underflowing every cell to zero, which would make the normalisation divide by zero. The
    distances are compared before dividing by sigma: divided first, they all overflow to inf
    for a tiny sigma, and inf - inf is NaN.
    """
    s = sigma * n
    raw = np.empty(n, dtype=np.float64)
    for i in range(n):
        d = i + 0.5 - 0.5 * n
        raw[i] = d * d
    m = raw.min()
    out = np.ones(n, dtype=np.float64)
    for i in range(n):
        if raw[i] > m:
            out[i] = np.exp(-0.5 * ((raw[i] - m) / s) / s)
    return out


@njit(cache=True)
def _gaussian_kernel(gh: int, gw: int, sigma: float) -> np.ndarray:
    """Isotropic (in relative units) Gaussian over the grid, normalised to sum 1."""
    out = np.outer(_gaussian_axis(gh, sigma), _gaussian_axis(gw, sigma))
    return out / out.sum()
