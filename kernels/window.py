"""Best crop window for an aspect ratio on a prepared heatmap: exhaustive, O(1) per window.

Windows live in original-pixel coordinates; the heatmap covers the whole original and is read
through a summed-area table at fractional cell coordinates (exact for a piecewise-constant
map, see kernels.sat), so no window is rounded to heatmap cells.

Candidates: scales from 1 (the largest window of the aspect) down to ``min_scale``; at each,
integer offsets along each free axis: ``steps`` evenly spaced ones (so 0 and the maximum), plus
the centre offset when it is not among them (up to steps + 1), so the centre crop competes.
Score:

    inside - cut_weight * cut - zoom_weight * (1 - s)

``inside`` is the heat in the window (the map is normalised to sum 1); a smaller window never
holds more heat than some largest one, so zooming in only wins by avoiding a cut, or when
``zoom_weight`` is negative, a reward for tighter windows (training/tune.py measures that lever;
the service's settings keep the weight >= 0). ``cut`` sums, over the
window edges not lying on the image border, the heat in a band of ``cut_band`` x the window's
short side straddling the edge, in excess of what the band would hold on a flat map:
an edge through background slices nothing, an edge through a hot object slices the excess.
(Counting the band's whole mass would make a flat map prefer windows pushed against a border,
one cut edge instead of two: a bias toward corners with no evidence behind it.)

With composition maps (``comp``, issue 24), the score adds, for each of ``COMP_CHANNELS``
signed maps, its integral over one part of the window: channels 0-8 the 3 x 3 grid of the
window's thirds (row-major, top-left first), channel 9 the part of the image the window
throws away; each in units of the image's area (a map of constant 1 adds the part's share of
the image). The maps are read piecewise constant on their own grid, like the heat, so the
terms are exact too. A heat map says where things are; these say where in the frame they
should sit, and what may be cut (ASM-Net's position-specific maps, GAIC's discarded region).

Ties (within 1e-9) go to the window whose centre is closer to the image centre, then to the
first in a fixed order (largest scale first, then top-to-bottom, left-to-right), so the same
map, size and aspect always give the same box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from numba import njit

from kernels.sat import _locate, _sat_kernel, _window_sum

MAX_SIDE = 1_000_000
MIN_ASPECT = 1e-3
MAX_ASPECT = 1e3
MAX_SCALES = 64
MAX_STEPS = 1024
# Scores closer than this are a tie: float noise must not pick between mirror-image windows.
TIE_EPS = 1e-9
# The face rule's thresholds (kernels.faces; the quality protocol's "sliced").
SLICE_LOW = 0.1
SLICE_HIGH = 0.9
NO_FACES = np.zeros((0, 4), dtype=np.float64)
# Composition channels: the 3 x 3 thirds of the window, then the discarded rest of the image.
COMP_GRID = 3
COMP_CHANNELS = COMP_GRID * COMP_GRID + 1
NO_COMP = np.zeros((0, 2, 2), dtype=np.float64)


@dataclass(frozen=True)
class Bounds:
    """The values a search knob may take: ``low`` to ``high``, both included unless
    ``low_open``; finite; an int when ``integer``."""

    low: float
    high: float
    low_open: bool = False
    integer: bool = False

    def admits(self, value: object) -> bool:
        if self.integer and not _is_int(value):
            return False
        if not _is_number(value):
            return False
        v = float(value)
        if not math.isfinite(v):
            return False
        return (v > self.low if self.low_open else v >= self.low) and v <= self.high

    def __str__(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        if math.isinf(self.low) and math.isinf(self.high):
            return kind
        if math.isinf(self.high):
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# What each knob of SearchParams may be: the one definition, checked by SearchParams and by
# the service's settings (sidecar.settings, which adds its own policy: no zoom reward).
KNOB_BOUNDS: dict[str, Bounds] = {
    "min_scale": Bounds(0.0, 1.0, low_open=True),
    "scales": Bounds(1, MAX_SCALES, integer=True),
    "steps": Bounds(2, MAX_STEPS, integer=True),
    "cut_weight": Bounds(0.0, math.inf),
    "cut_band": Bounds(0.0, 0.5),
    "zoom_weight": Bounds(-math.inf, math.inf),
}


@dataclass(frozen=True)
class SearchParams:
    """Search knobs, within ``KNOB_BOUNDS``. The defaults are the service's too:
    sidecar.settings.KernelSettings takes them from here."""

    min_scale: float = 1.0
    scales: int = 6
    steps: int = 64
    cut_weight: float = 1.0
    cut_band: float = 0.06
    zoom_weight: float = 0.05

    def __post_init__(self) -> None:
        _check_params(self)


@dataclass(frozen=True)
class CropBox:
    """A crop in original pixels, x1/y1 exclusive, with its score and its gain over the centre."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 0.0
    center_score: float = 0.0
    confidence: float = 0.0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1


def largest_window(width: int, height: int, aspect: float) -> tuple[int, int]:
    """The (cw, ch) of the largest window of ``aspect`` (= w/h) inside a width x height image.

    The bound side is the image's; the other is rounded to within half a pixel of exact, and
    both are at least 1 (so on a 1-pixel-wide image a 1:10 request cannot be exact).
    """
    _check_size(width, height)
    _check_aspect(aspect)
    return _window_size(width, height, aspect, 1.0)


def center_box(width: int, height: int, aspect: float) -> CropBox:
    """The centre crop of the largest window: what the legacy server does, with no scores."""
    cw, ch = largest_window(width, height, aspect)
    x0 = (width - cw) // 2
    y0 = (height - ch) // 2
    return CropBox(x0, y0, x0 + cw, y0 + ch)


def best_window(
    heat: np.ndarray,
    width: int,
    height: int,
    aspect: float,
    params: SearchParams,
    keep: tuple[int, int, int, int] | None = None,
    comp: np.ndarray | Composition | None = None,
) -> CropBox:
    """Best window of ``aspect`` on ``heat`` (covering the whole width x height original).

    ``keep`` (original pixels, x1/y1 exclusive) restricts candidates to windows containing it;
    when no window of the aspect can, the largest window is centred on it instead, clamped.
    ``comp``: [COMP_CHANNELS, gh, gw] composition maps covering the whole original (or their
    ``composition``, to make the tables once for several searches), or None.
    ``confidence`` is the score gained over the centre crop of the largest window.
    """
    _check_size(width, height)
    _check_aspect(aspect)
    if not isinstance(params, SearchParams):
        raise ValueError(f"params must be a SearchParams, got {type(params).__name__}")
    keep_arr = _check_keep(keep, width, height)
    csat = comp_tables(comp)
    return _search(heat, width, height, aspect, params, keep_arr, NO_FACES, 0.0, csat)[0]


def composition_terms(
    comp: np.ndarray | Composition, width: int, height: int, box: tuple[int, int, int, int]
) -> np.ndarray:
    """float64 [COMP_CHANNELS]: each composition map's integral over its part of ``box``
    (original pixels, x1/y1 exclusive), in units of the image's area: what the search adds."""
    _check_size(width, height)
    if not isinstance(box, tuple | list) or len(box) != 4 or not all(map(_is_int, box)):
        raise ValueError(f"box must be (x0, y0, x1, y1) ints, got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box must lie inside the {width}x{height} image, got {box!r}")
    out = np.zeros(COMP_CHANNELS, dtype=np.float64)
    _comp_terms(comp_tables(comp, required=True), width, height, x0, y0, x1 - x0, y1 - y0, out)
    return out


@dataclass(frozen=True)
class Composition:
    """Checked composition maps as their summed-area tables, made once per heatmap and read by
    every aspect's search (``composition``)."""

    tables: np.ndarray  # [COMP_CHANNELS, gh + 1, gw + 1] float64, over the cell count


def composition(comp: np.ndarray) -> Composition:
    """The tables of [COMP_CHANNELS, gh, gw] composition maps (float, finite, signed)."""
    if not isinstance(comp, np.ndarray) or comp.dtype.kind != "f":
        raise ValueError(f"comp must be a float numpy array, got {type(comp).__name__}")
    if comp.ndim != 3 or comp.shape[0] != COMP_CHANNELS or min(comp.shape[1:]) < 1:
        raise ValueError(f"comp must be [{COMP_CHANNELS}, gh >= 1, gw >= 1], got {comp.shape}")
    maps = np.ascontiguousarray(comp, dtype=np.float64)
    if not np.isfinite(maps).all():
        raise ValueError("comp must be finite")
    return Composition(_comp_sat_kernel(maps))


def comp_tables(comp: np.ndarray | Composition | None, required: bool = False) -> np.ndarray:
    """The tables the kernel reads: of the maps, of a Composition as it is, NO_COMP for None."""
    if isinstance(comp, Composition):
        return comp.tables
    if comp is None:
        if required:
            raise ValueError("comp must be a composition map array, got None")
        return NO_COMP
    return composition(comp).tables


def _search(
    heat: np.ndarray,
    width: int,
    height: int,
    aspect: float,
    params: SearchParams,
    keep_arr: np.ndarray,
    faces: np.ndarray,
    face_weight: float,
    csat: np.ndarray = NO_COMP,
) -> tuple[CropBox, int, bool]:
    """The checked search (best_window, kernels.faces.best_window_faces): the box, the faces
    it slices, and False when no window held ``keep`` (the box is then the fallback's and the
    count is not made). ``csat``: comp_tables of the composition maps."""
    width, height, aspect = int(width), int(height), float(aspect)
    # Plain int/float arguments only: an int cut_weight or np.int32 width would otherwise make
    # numba compile (seconds) and cache another specialisation at request time.
    weights = (float(params.cut_weight), float(params.cut_band), float(params.zoom_weight))
    sat = _sat_kernel(_normalised(heat))
    scales = _scale_list(params)
    sizes = np.array(window_sizes(width, height, aspect, params), dtype=np.int64)
    cws = np.ascontiguousarray(sizes[:, 0])
    chs = np.ascontiguousarray(sizes[:, 1])
    found, bx, by, bk, score, center, sliced = _search_kernel(
        sat, width, height, cws, chs, np.array(scales, dtype=np.float64), int(params.steps),
        keep_arr, faces, float(face_weight), csat, *weights,
    )  # fmt: skip
    cw, ch = int(cws[bk]), int(chs[bk])
    if not found:
        # No window of this aspect holds the keep box: cover what we can of it, centred on it.
        bx, by, cw, ch = _keep_fallback(keep_arr, width, height, int(cws[0]), int(chs[0]))
        score = _box_score(sat, width, height, bx, by, cw, ch, 1.0, *weights)
        score += _comp_box(csat, width, height, bx, by, cw, ch)
    x0, y0 = int(bx), int(by)
    box = CropBox(
        x0, y0, x0 + cw, y0 + ch,
        score=float(score),
        center_score=float(center),
        confidence=max(0.0, float(score) - float(center)),
    )  # fmt: skip
    return box, int(sliced), bool(found)


def window_sizes(
    width: int, height: int, aspect: float, params: SearchParams
) -> list[tuple[int, int]]:
    """The (cw, ch) of the candidate windows, one per scale, largest first: every box the search
    returns has one of these sizes (a cached box of another size was not made by it)."""
    return [_window_size(width, height, aspect, s) for s in _scale_list(params)]


def _window_size(width: int, height: int, aspect: float, s: float) -> tuple[int, int]:
    """Window at scale s: scale the side bound by the image, derive the other from the aspect."""
    if width >= height * aspect:
        ch = max(1, math.floor(height * s + 0.5))
        cw = max(1, min(width, math.floor(ch * aspect + 0.5)))
    else:
        cw = max(1, math.floor(width * s + 0.5))
        ch = max(1, min(height, math.floor(cw / aspect + 0.5)))
    return cw, ch


def _scale_list(params: SearchParams) -> list[float]:
    n = params.scales
    if n == 1 or params.min_scale >= 1.0:
        return [1.0]
    return [1.0 - (1.0 - params.min_scale) * k / (n - 1) for k in range(n)]


def _keep_fallback(
    keep: np.ndarray, width: int, height: int, cw: int, ch: int
) -> tuple[int, int, int, int]:
    """Largest window centred on the keep box, clamped: covers as much of it as the size allows."""
    x = min(max((int(keep[0]) + int(keep[2]) - cw) // 2, 0), width - cw)
    y = min(max((int(keep[1]) + int(keep[3]) - ch) // 2, 0), height - ch)
    return x, y, cw, ch


def _normalised(heat: np.ndarray) -> np.ndarray:
    """float64 copy summing to 1; flat when the map holds no heat at all."""
    if not isinstance(heat, np.ndarray):
        raise ValueError(f"heat must be a numpy array, got {type(heat).__name__}")
    if heat.dtype.kind != "f":
        raise ValueError(f"heat must be a float array, got dtype {heat.dtype}")
    if heat.ndim != 2 or heat.shape[0] < 1 or heat.shape[1] < 1:
        raise ValueError(f"heat must be 2-D and at least 1x1, got shape {heat.shape}")
    h = np.ascontiguousarray(heat, dtype=np.float64)
    if not np.isfinite(h).all():
        raise ValueError("heat must be finite (prepare_heatmap never returns NaN or inf)")
    if (h < 0.0).any():
        raise ValueError("heat must be non-negative (prepare_heatmap clips it)")
    total = float(h.sum())
    if total <= 0.0 or not math.isfinite(total):
        return np.full(h.shape, 1.0 / h.size, dtype=np.float64)
    return h / total


def _is_int(v: object) -> TypeGuard[int | np.integer]:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[float | np.integer | np.floating]:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not _is_int(v):
            raise ValueError(f"{name} must be an int, got {v!r}")
        if not 1 <= v <= MAX_SIDE:
            raise ValueError(f"{name} must be in [1, {MAX_SIDE}], got {v}")


def _check_aspect(aspect: float) -> None:
    if not _is_number(aspect) or not math.isfinite(aspect):
        raise ValueError(f"aspect must be a finite number, got {aspect!r}")
    if not MIN_ASPECT <= aspect <= MAX_ASPECT:
        raise ValueError(f"aspect must be in [{MIN_ASPECT}, {MAX_ASPECT}], got {aspect!r}")


def _check_keep(keep: tuple[int, int, int, int] | None, width: int, height: int) -> np.ndarray:
    """The keep box as int64[4]; -1s when there is none (numba wants one argument type)."""
    if keep is None:
        return np.full(4, -1, dtype=np.int64)
    if not isinstance(keep, tuple | list) or len(keep) != 4 or not all(map(_is_int, keep)):
        raise ValueError(f"keep must be (x0, y0, x1, y1) ints, got {keep!r}")
    x0, y0, x1, y1 = (int(v) for v in keep)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"keep must lie inside the {width}x{height} image with x0 < x1, y0 < y1, got {keep!r}"
        )
    return np.array([x0, y0, x1, y1], dtype=np.int64)


def _check_params(p: SearchParams) -> None:
    for name, bounds in KNOB_BOUNDS.items():
        v = getattr(p, name)
        if not bounds.admits(v):
            raise ValueError(f"SearchParams.{name} must be {bounds}, got {v!r}")


@njit(cache=True)
def _offsets(m: int, steps: int, lo: int, hi: int) -> np.ndarray:
    """Sorted candidate offsets in [lo, hi] of an axis with offsets 0..m.

    ``steps`` evenly spaced offsets (all of them when there are no more), the centre offset
    m // 2, and lo and hi themselves, so a keep-restricted range is never left empty.
    """
    if m + 1 <= steps:
        base = np.arange(m + 1)
    else:
        base = np.empty(steps + 1, dtype=np.int64)
        for i in range(steps):
            # round(i * m / (steps - 1)) in exact integer arithmetic
            base[i] = (2 * i * m + steps - 1) // (2 * (steps - 1))
        base[steps] = m // 2
    out = np.empty(base.size + 2, dtype=np.int64)
    n = 0
    for v in base:
        if lo <= v <= hi:
            out[n] = v
            n += 1
    out[n] = lo
    out[n + 1] = hi
    return np.unique(out[: n + 2])


@njit(cache=True)
def _lerp(vec: np.ndarray, j: int, f: float) -> float:
    return vec[j] + f * (vec[j + 1] - vec[j])


@njit(cache=True)
def _rows_between(sat: np.ndarray, y0: float, y1: float, out: np.ndarray) -> None:
    """Column-cumulative heat between rows y0 and y1 (cell coords) into out: F(., y1) - F(., y0)."""
    gh = sat.shape[0] - 1
    i0, f0 = _locate(y0, gh)
    i1, f1 = _locate(y1, gh)
    for j in range(sat.shape[1]):
        a = sat[i0, j] + f0 * (sat[i0 + 1, j] - sat[i0, j])
        b = sat[i1, j] + f1 * (sat[i1 + 1, j] - sat[i1, j])
        out[j] = b - a


@njit(cache=True)
def _scores(
    sat: np.ndarray,
    width: int,
    height: int,
    cw: int,
    ch: int,
    s: float,
    xs: np.ndarray,
    ys: np.ndarray,
    cut_weight: float,
    cut_band: float,
    zoom_weight: float,
) -> np.ndarray:
    """Scores of the cw x ch windows at every (ys[b], xs[a]); [b, a] layout.

    Rows are interpolated once per y offset and columns located once per x offset, so each
    window costs ten 1-D interpolations at known cells.
    """
    gh = sat.shape[0] - 1
    gw = sat.shape[1] - 1
    kx = gw / width
    ky = gh / height
    flat = 1.0 / (gw * gh)  # heat per unit of cell area on a flat map
    hb = 0.5 * cut_band * min(cw, ch)
    zoom = zoom_weight * (1.0 - s)
    nx = xs.size
    # Per x offset, grid x of: left, right, left band lo/hi, right band lo/hi; their cells.
    xc = np.empty((nx, 6), dtype=np.float64)
    xj = np.empty((nx, 6), dtype=np.int64)
    xf = np.empty((nx, 6), dtype=np.float64)
    for a in range(nx):
        x0 = xs[a]
        x1 = x0 + cw
        xc[a, 0] = x0 * kx
        xc[a, 1] = x1 * kx
        xc[a, 2] = max(x0 - hb, 0.0) * kx
        xc[a, 3] = min(x0 + hb, width) * kx
        xc[a, 4] = max(x1 - hb, 0.0) * kx
        xc[a, 5] = min(x1 + hb, width) * kx
        for c in range(6):
            xj[a, c], xf[a, c] = _locate(xc[a, c], gw)
    d_in = np.empty(gw + 1, dtype=np.float64)
    d_top = np.empty(gw + 1, dtype=np.float64)
    d_bot = np.empty(gw + 1, dtype=np.float64)
    out = np.empty((ys.size, nx), dtype=np.float64)
    for b in range(ys.size):
        y0 = ys[b]
        y1 = y0 + ch
        t_lo, t_hi = max(y0 - hb, 0.0) * ky, min(y0 + hb, height) * ky
        b_lo, b_hi = max(y1 - hb, 0.0) * ky, min(y1 + hb, height) * ky
        _rows_between(sat, y0 * ky, y1 * ky, d_in)
        _rows_between(sat, t_lo, t_hi, d_top)
        _rows_between(sat, b_lo, b_hi, d_bot)
        in_h = (y1 - y0) * ky
        for a in range(nx):
            w = xc[a, 1] - xc[a, 0]
            inside = _lerp(d_in, xj[a, 1], xf[a, 1]) - _lerp(d_in, xj[a, 0], xf[a, 0])
            cut = 0.0
            if xs[a] > 0:
                m = _lerp(d_in, xj[a, 3], xf[a, 3]) - _lerp(d_in, xj[a, 2], xf[a, 2])
                cut += max(0.0, m - (xc[a, 3] - xc[a, 2]) * in_h * flat)
            if xs[a] + cw < width:
                m = _lerp(d_in, xj[a, 5], xf[a, 5]) - _lerp(d_in, xj[a, 4], xf[a, 4])
                cut += max(0.0, m - (xc[a, 5] - xc[a, 4]) * in_h * flat)
            if y0 > 0:
                m = _lerp(d_top, xj[a, 1], xf[a, 1]) - _lerp(d_top, xj[a, 0], xf[a, 0])
                cut += max(0.0, m - w * (t_hi - t_lo) * flat)
            if y1 < height:
                m = _lerp(d_bot, xj[a, 1], xf[a, 1]) - _lerp(d_bot, xj[a, 0], xf[a, 0])
                cut += max(0.0, m - w * (b_hi - b_lo) * flat)
            out[b, a] = inside - cut_weight * cut - zoom
    return out


@njit(cache=True)
def _box_score(
    sat: np.ndarray,
    width: int,
    height: int,
    x: int,
    y: int,
    cw: int,
    ch: int,
    s: float,
    cut_weight: float,
    cut_band: float,
    zoom_weight: float,
) -> float:
    """One window's score, through the same code as the search so equal windows score equal."""
    xs = np.full(1, x, dtype=np.int64)
    ys = np.full(1, y, dtype=np.int64)
    return _scores(sat, width, height, cw, ch, s, xs, ys, cut_weight, cut_band, zoom_weight)[0, 0]


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
def _search_kernel(
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
    csat: np.ndarray,
    cut_weight: float,
    cut_band: float,
    zoom_weight: float,
) -> tuple[bool, int, int, int, float, float, int]:
    """(found, x, y, scale index, score, centre-crop score, faces sliced); found is False only
    with keep. ``faces`` [N, 4] (none: the plain search) adds the face rule of kernels.faces:
    fewest faces sliced first, then score + face_weight x the share of faces kept."""
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
        xs = _offsets(width - cw, steps, lox, hix)
        ys = _offsets(height - ch, steps, loy, hiy)
        if nf > 0:
            xs = _face_offsets(xs, fx0, fx1, cw, lox, hix)
            ys = _face_offsets(ys, fy0, fy1, ch, loy, hiy)
        sc = _scores(
            sat, width, height, cw, ch, scales[k], xs, ys, cut_weight, cut_band, zoom_weight
        )
        if csat.shape[0] > 0:
            sc += _comp_scores(csat, width, height, cw, ch, xs, ys)
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
    ) + _comp_box(csat, width, height, cx, cy, cws[0], chs[0])
    return found, bx, by, bk, best_score, center, best_sliced


@njit(cache=True)
def _comp_scores(
    csat: np.ndarray, width: int, height: int, cw: int, ch: int, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """[b, a]: the composition terms of the cw x ch windows at (ys[b], xs[a]), summed.

    Per y offset, the column-cumulative sums of each channel between its band's rows; per x
    offset, two interpolations per part, as _scores does for the heat."""
    gh = csat.shape[1] - 1
    gw = csat.shape[2] - 1
    kx = gw / width
    ky = gh / height
    g = COMP_GRID
    nx = xs.size
    # Per x offset, the grid x of the window's g + 1 column edges; their cells.
    xj = np.empty((nx, g + 1), dtype=np.int64)
    xf = np.empty((nx, g + 1), dtype=np.float64)
    for a in range(nx):
        for c in range(g + 1):
            xj[a, c], xf[a, c] = _locate((xs[a] + c * cw / g) * kx, gw)
    rows = np.empty((COMP_CHANNELS, gw + 1), dtype=np.float64)
    out = np.empty((ys.size, nx), dtype=np.float64)
    last = COMP_CHANNELS - 1
    for b in range(ys.size):
        y0 = float(ys[b])
        for r in range(g):
            for c in range(g):
                _rows_between(csat[r * g + c], (y0 + r * ch / g) * ky, (y0 + (r + 1) * ch / g) * ky,
                              rows[r * g + c])  # fmt: skip
        _rows_between(csat[last], y0 * ky, (y0 + ch) * ky, rows[last])
        total = csat[last, gh, gw]
        for a in range(nx):
            v = 0.0
            for r in range(g):
                for c in range(g):
                    d = rows[r * g + c]
                    v += _lerp(d, xj[a, c + 1], xf[a, c + 1]) - _lerp(d, xj[a, c], xf[a, c])
            d = rows[last]
            v += total - (_lerp(d, xj[a, g], xf[a, g]) - _lerp(d, xj[a, 0], xf[a, 0]))
            out[b, a] = v
    return out


@njit(cache=True)
def _comp_box(csat: np.ndarray, width: int, height: int, x: int, y: int, cw: int, ch: int) -> float:
    """One window's summed composition terms (0 without maps), through _comp_scores."""
    if csat.shape[0] == 0:
        return 0.0
    xs = np.full(1, x, dtype=np.int64)
    ys = np.full(1, y, dtype=np.int64)
    return _comp_scores(csat, width, height, cw, ch, xs, ys)[0, 0]


@njit(cache=True)
def _comp_terms(
    csat: np.ndarray, width: int, height: int, x: int, y: int, cw: int, ch: int, out: np.ndarray
) -> None:
    """Each channel's term of one window into out (composition_terms)."""
    gh = csat.shape[1] - 1
    gw = csat.shape[2] - 1
    kx = gw / width
    ky = gh / height
    g = COMP_GRID
    for r in range(g):
        for c in range(g):
            out[r * g + c] = _window_sum(
                csat[r * g + c], (x + c * cw / g) * kx, (y + r * ch / g) * ky,
                (x + (c + 1) * cw / g) * kx, (y + (r + 1) * ch / g) * ky,
            )  # fmt: skip
    last = COMP_CHANNELS - 1
    inside = _window_sum(csat[last], x * kx, y * ky, (x + cw) * kx, (y + ch) * ky)
    out[last] = csat[last, gh, gw] - inside


@njit(cache=True)
def _comp_sat_kernel(maps: np.ndarray) -> np.ndarray:
    """Every map's summed-area table (as _sat_kernel), divided by the cell count."""
    k, h, w = maps.shape
    out = np.zeros((k, h + 1, w + 1), dtype=np.float64)
    cells = float(h * w)
    for c in range(k):
        for i in range(h):
            row = 0.0
            for j in range(w):
                row += maps[c, i, j] / cells
                out[c, i + 1, j + 1] = out[c, i, j + 1] + row
    return out
