"""Slow, obviously-correct references for kernels/: plain loops, explicit partial-cell areas.

Nothing here shares code with kernels/ (only the spec): window sums are computed cell by cell
from overlap lengths instead of the summed-area table, band masses and areas from the clamped
bands themselves, and the search is a Python loop over every candidate.
"""

from __future__ import annotations

import math

import numpy as np

TIE_EPS = 1e-9


def naive_sat(heat: np.ndarray) -> np.ndarray:
    h, w = heat.shape
    out = np.zeros((h + 1, w + 1))
    for i in range(h + 1):
        for j in range(w + 1):
            total = 0.0
            for a in range(i):
                for b in range(j):
                    total += float(heat[a, b])
            out[i, j] = total
    return out


def overlaps(lo: float, hi: float, n: int) -> np.ndarray:
    """Length of [lo, hi] inside each cell [k, k+1] of an axis of n cells."""
    return np.array([max(0.0, min(hi, k + 1.0) - max(lo, float(k))) for k in range(n)])


def rect_mass(heat: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Integral of the piecewise-constant map over [x0, x1] x [y0, y1]: cell value x overlap."""
    oy = overlaps(y0, y1, heat.shape[0])
    ox = overlaps(x0, x1, heat.shape[1])
    return float(np.sum(heat * np.outer(oy, ox)))


def rect_mass_loops(heat: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """The same integral with nothing but loops, to check rect_mass itself on small maps."""
    total = 0.0
    for i in range(heat.shape[0]):
        dy = max(0.0, min(y1, i + 1.0) - max(y0, float(i)))
        for j in range(heat.shape[1]):
            dx = max(0.0, min(x1, j + 1.0) - max(x0, float(j)))
            total += float(heat[i, j]) * dx * dy
    return total


def naive_bilinear(src: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize with edge clamping, one output cell at a time."""
    h, w = src.shape
    out = np.zeros((gh, gw))
    for i in range(gh):
        for j in range(gw):
            y = min(max((i + 0.5) * h / gh - 0.5, 0.0), h - 1.0)
            x = min(max((j + 0.5) * w / gw - 0.5, 0.0), w - 1.0)
            ya, xa = math.floor(y), math.floor(x)
            yb, xb = min(ya + 1, h - 1), min(xa + 1, w - 1)
            fy, fx = y - ya, x - xa
            out[i, j] = (
                src[ya, xa] * (1 - fy) * (1 - fx)
                + src[ya, xb] * (1 - fy) * fx
                + src[yb, xa] * fy * (1 - fx)
                + src[yb, xb] * fy * fx
            )
    return out


def naive_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur as a direct 2-D sum over every source cell, edges replicated (each
    out-of-range index clamped), taps out to 4 sigma and normalised."""
    radius = int(4.0 * sigma + 0.5)
    gh, gw = img.shape
    out = np.zeros((gh, gw))
    weights = {d: math.exp(-0.5 * (d / sigma) ** 2) for d in range(-radius, radius + 1)}
    norm = sum(weights.values())
    for i in range(gh):
        for j in range(gw):
            acc = 0.0
            for di, wi in weights.items():
                for dj, wj in weights.items():
                    ii = min(max(i + di, 0), gh - 1)
                    jj = min(max(j + dj, 0), gw - 1)
                    acc += wi * wj * img[ii, jj]
            out[i, j] = acc / (norm * norm)
    return out


def window_size(width: int, height: int, aspect: float, s: float) -> tuple[int, int]:
    if width >= height * aspect:  # the image is wider than the aspect: height-bound
        ch = max(1, math.floor(height * s + 0.5))
        cw = max(1, min(width, math.floor(ch * aspect + 0.5)))
    else:
        cw = max(1, math.floor(width * s + 0.5))
        ch = max(1, min(height, math.floor(cw / aspect + 0.5)))
    return cw, ch


def scale_list(min_scale: float, scales: int) -> list[float]:
    if scales == 1 or min_scale >= 1.0:
        return [1.0]
    return [1.0 - (1.0 - min_scale) * k / (scales - 1) for k in range(scales)]


def offsets(m: int, steps: int, lo: int, hi: int) -> list[int]:
    if m + 1 <= steps:
        values = set(range(m + 1))
    else:
        values = {math.floor(i * m / (steps - 1) + 0.5) for i in range(steps)} | {m // 2}
    return sorted({v for v in values if lo <= v <= hi} | {lo, hi})


def composition_terms(comp, width: int, height: int, x: int, y: int, cw: int, ch: int) -> list:
    """Each composition map's integral over its part of the window, over the map's cell count:
    parts 0-8 the window's thirds row-major, 9 the image outside the window (whole minus inside,
    each from its own cell-by-cell overlaps)."""
    out = []
    for k in range(9):
        m = np.asarray(comp[k], dtype=np.float64)
        gh, gw = m.shape
        r, c = divmod(k, 3)
        px0, px1 = x + c * cw / 3, x + (c + 1) * cw / 3
        py0, py1 = y + r * ch / 3, y + (r + 1) * ch / 3
        mass = rect_mass(
            m, px0 * gw / width, py0 * gh / height, px1 * gw / width, py1 * gh / height
        )
        out.append(mass / (gh * gw))
    m = np.asarray(comp[9], dtype=np.float64)
    gh, gw = m.shape
    inside = rect_mass(
        m, x * gw / width, y * gh / height, (x + cw) * gw / width, (y + ch) * gh / height
    )
    out.append((float(m.sum()) - inside) / (gh * gw))
    return out


def score(
    heat: np.ndarray,
    width: int,
    height: int,
    x: int,
    y: int,
    cw: int,
    ch: int,
    s: float,
    params,
    comp=None,
) -> float:
    """inside - cut_weight * sum of band excess over flat - zoom_weight * (1 - s) [+ the sum of
    the composition terms]."""
    gh, gw = heat.shape
    kx, ky = gw / width, gh / height
    flat = 1.0 / (gw * gh)
    hb = 0.5 * params.cut_band * min(cw, ch)
    x1, y1 = x + cw, y + ch
    inside = rect_mass(heat, x * kx, y * ky, x1 * kx, y1 * ky)
    bands = []  # (x0, y0, x1, y1) pixel rectangles straddling edges not on the image border
    if x > 0:
        bands.append((x - hb, y, x + hb, y1))
    if x1 < width:
        bands.append((x1 - hb, y, x1 + hb, y1))
    if y > 0:
        bands.append((x, y - hb, x1, y + hb))
    if y1 < height:
        bands.append((x, y1 - hb, x1, y1 + hb))
    cut = 0.0
    for bx0, by0, bx1, by1 in bands:
        bx0, bx1 = max(bx0, 0.0) * kx, min(bx1, width) * kx
        by0, by1 = max(by0, 0.0) * ky, min(by1, height) * ky
        mass = rect_mass(heat, bx0, by0, bx1, by1)
        area = overlaps(bx0, bx1, gw).sum() * overlaps(by0, by1, gh).sum()
        cut += max(0.0, mass - area * flat)
    extra = 0.0 if comp is None else sum(composition_terms(comp, width, height, x, y, cw, ch))
    return inside - params.cut_weight * cut - params.zoom_weight * (1.0 - s) + extra


def best_window(
    heat: np.ndarray, width: int, height: int, aspect: float, params, keep=None, comp=None
) -> tuple[tuple[int, int, int, int], float, float]:
    """(box, score, centre score) by trying every candidate in the spec's order."""
    heat = np.asarray(heat, dtype=np.float64)
    total = heat.sum()
    heat = heat / total if total > 0 else np.full(heat.shape, 1.0 / heat.size)
    scales = scale_list(params.min_scale, params.scales)
    sizes = [window_size(width, height, aspect, s) for s in scales]
    best = None  # (score, d2, box)
    for s, (cw, ch) in zip(scales, sizes, strict=True):
        lox, hix, loy, hiy = 0, width - cw, 0, height - ch
        if keep is not None:
            lox, hix = max(lox, keep[2] - cw), min(hix, keep[0])
            loy, hiy = max(loy, keep[3] - ch), min(hiy, keep[1])
            if lox > hix or loy > hiy:
                continue
        for y in offsets(height - ch, params.steps, loy, hiy):
            for x in offsets(width - cw, params.steps, lox, hix):
                v = score(heat, width, height, x, y, cw, ch, s, params, comp)
                d2 = (2 * x + cw - width) ** 2 + (2 * y + ch - height) ** 2
                if (
                    best is None
                    or v > best[0] + TIE_EPS
                    or (abs(v - best[0]) <= TIE_EPS and d2 < best[1])
                ):
                    best = (v, d2, (x, y, x + cw, y + ch))
    cw, ch = sizes[0]
    cx, cy = (width - cw) // 2, (height - ch) // 2
    center = score(heat, width, height, cx, cy, cw, ch, 1.0, params, comp)
    if best is None:  # keep cannot fit: the largest window centred on it, clamped
        x = min(max(math.floor((keep[0] + keep[2] - cw) / 2), 0), width - cw)
        y = min(max(math.floor((keep[1] + keep[3] - ch) / 2), 0), height - ch)
        return (
            (x, y, x + cw, y + ch),
            score(heat, width, height, x, y, cw, ch, 1.0, params, comp),
            center,
        )
    return best[2], best[0], center


def face_kept(face, box) -> float:
    """Share of a face box's area inside box, by the rectangles' own overlap."""
    fx0, fy0, fx1, fy1 = (float(v) for v in face[:4])
    ox = max(0.0, min(fx1, box[2]) - max(fx0, box[0]))
    oy = max(0.0, min(fy1, box[3]) - max(fy0, box[1]))
    return ox * oy / ((fx1 - fx0) * (fy1 - fy0))


def best_window_faces(
    heat: np.ndarray,
    width: int,
    height: int,
    aspect: float,
    params,
    faces,
    keep=None,
    face_weight: float = 0.0,
    comp=None,
) -> tuple[tuple[int, int, int, int], float, int]:
    """(box, score, faces sliced): every candidate of the spec, the face rule's order."""
    heat = np.asarray(heat, dtype=np.float64)
    total = heat.sum()
    heat = heat / total if total > 0 else np.full(heat.shape, 1.0 / heat.size)
    faces = [f for f in faces]
    scales = scale_list(params.min_scale, params.scales)
    sizes = [window_size(width, height, aspect, s) for s in scales]
    best = None  # (sliced, value, d2, box, score)
    for s, (cw, ch) in zip(scales, sizes, strict=True):
        lox, hix, loy, hiy = 0, width - cw, 0, height - ch
        if keep is not None:
            lox, hix = max(lox, keep[2] - cw), min(hix, keep[0])
            loy, hiy = max(loy, keep[3] - ch), min(hiy, keep[1])
            if lox > hix or loy > hiy:
                continue
        xs = set(offsets(width - cw, params.steps, lox, hix))
        ys = set(offsets(height - ch, params.steps, loy, hiy))
        for f in faces:
            for v in (
                math.floor(f[0]),
                math.ceil(f[2]) - cw,
                math.ceil(f[2]),
                math.floor(f[0]) - cw,
            ):
                if lox <= v <= hix:
                    xs.add(v)
            for v in (
                math.floor(f[1]),
                math.ceil(f[3]) - ch,
                math.ceil(f[3]),
                math.floor(f[1]) - ch,
            ):
                if loy <= v <= hiy:
                    ys.add(v)
        for y in sorted(ys):
            for x in sorted(xs):
                box = (x, y, x + cw, y + ch)
                shares = [face_kept(f, box) for f in faces]
                sliced = sum(1 for v in shares if 0.1 < v < 0.9)
                kept = sum(1 for v in shares if v >= 0.9)
                sc = score(heat, width, height, x, y, cw, ch, s, params, comp)
                v = sc + (face_weight * kept / len(faces) if faces else 0.0)
                d2 = (2 * x + cw - width) ** 2 + (2 * y + ch - height) ** 2
                if (
                    best is None
                    or sliced < best[0]
                    or (
                        sliced == best[0]
                        and (
                            v > best[1] + TIE_EPS or (abs(v - best[1]) <= TIE_EPS and d2 < best[2])
                        )
                    )
                ):
                    best = (sliced, v, d2, box, sc)
    if best is None:
        cw, ch = sizes[0]
        x = min(max(math.floor((keep[0] + keep[2] - cw) / 2), 0), width - cw)
        y = min(max(math.floor((keep[1] + keep[3] - ch) / 2), 0), height - ch)
        box = (x, y, x + cw, y + ch)
        sliced = sum(1 for f in faces if 0.1 < face_kept(f, box) < 0.9)
        return box, score(heat, width, height, x, y, cw, ch, 1.0, params, comp), sliced
    return best[3], best[4], best[0]
