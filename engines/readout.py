"""The learned read-out head: which feature maps it reads and how its centre bias is laid out.

Shared by the graph builder (engines/graph.py), which bakes the fitted weights into the ONNX
model, and the fitting script (training/fit_readout.py), which computes the same features from
the exported model's tapped outputs. Weights live in engines/readout_weights.npz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

WEIGHTS_PATH = Path(__file__).with_name("readout_weights.npz")
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Tap:
    tensor: str  # graph tensor name (engines/graph.py naming)
    channels: int
    pool: int  # average-pool factor down to the stride-32 grid


# Multi-scale: the end of the stride-8 and stride-16 stages pooled to the stride-32 grid, the
# last block's output and the head's 1280 features.
TAPS: tuple[Tap, ...] = (
    Tap("_blocks.4.residual", 40, 4),
    Tap("_blocks.10.residual", 112, 2),
    Tap("_blocks.15._project_conv", 320, 1),
    Tap("_conv_head.relu6", 1280, 1),
)
FEATURES = sum(t.channels for t in TAPS)
# The same four places in EfficientNet-Lite2 (engines/graph.LITE2_STAGES): the end of its
# stride-8 and stride-16 stages, its last block and its head (measured as a second backbone,
# training/backbones.py).
LITE2_TAPS: tuple[Tap, ...] = (
    Tap("_blocks.6.residual", 48, 4),
    Tap("_blocks.14.residual", 120, 2),
    Tap("_blocks.20._project_conv", 352, 1),
    Tap("_conv_head.relu6", 1280, 1),
)
# Weights of the optional food head, whose output is multiplied by the image's own food
# probability (the graph's food_mass) and added to the read-out's logits.
GATE_PREFIX = "gate_"
# Weights of the optional expert-crop head (issue 24, measured, not in the graph): its output
# times sigmoid(xgate_v . the image's mean features + xgate_c) is added to the logits.
XGATE_PREFIX = "xgate_"
# Centre bias terms, in relative cell coordinates u, v in (-1, 1): u, v, u², v².
COORD_TERMS = 4
# Composition maps (issue 24): kernels.window.COMP_CHANNELS signed maps per aspect bucket,
# comp_w [buckets * COMP_MAPS, FEATURES] and comp_b [buckets * COMP_MAPS], linear in the
# features. Buckets of the requested aspect (w / h): below the first edge, between, above the
# second (one bucket: the same maps for every aspect).
COMP_MAPS = 10
ASPECT_EDGES = (0.8, 1.25)


def coord_axis(n: int) -> npt.NDArray[np.float64]:
    """Relative coordinates of the n cell centres of one axis, in (-1, 1)."""
    return (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0


def coord_features(h: int, w: int) -> npt.NDArray[np.float64]:
    """[h * w, COORD_TERMS] centre-bias terms (u, v, u², v²) per cell, row-major."""
    v, u = np.meshgrid(coord_axis(h), coord_axis(w), indexing="ij")
    u, v = u.ravel(), v.ravel()
    return np.column_stack([u, v, u * u, v * v])


def load_weights(path: Path = WEIGHTS_PATH) -> dict[str, npt.NDArray[np.float32]]:
    """The shipped read-out: layers w1 [H1, FEATURES], b1 [H1], w2 [H2, H1], b2 [H2], ...
    (the last one has one output; ReLU between layers); optionally the food head gate_w1,
    gate_b1, ... (same layout) and blur (sigma in cells, a scalar); a [4]."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def grid_of(weights: dict[str, npt.NDArray[np.float32]]) -> int:
    """The read-out grid's stride in input pixels: 32 (the backbone's last feature map) unless
    the weights say 16 (`grid`), where the stride-8 tap is pooled x2 and the stride-32 taps
    and both CAM heads are upsampled x2 (training/backbones.py's lite0-s16)."""
    grid = int(weights["grid"]) if "grid" in weights else 32
    if grid not in (16, 32):
        raise ValueError(f"read-out grid must be 16 or 32, got {grid}")
    return grid


def upsampled2(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """[C, H, W] -> [C, 2H, 2W], bilinear with half-pixel centres and clamped edges (the numpy
    reference of engines/graph.py's Resize, linear mode, on a stride-16 read-out grid)."""

    def axis(a: npt.NDArray[np.float32], dim: int) -> npt.NDArray[np.float32]:
        n = a.shape[dim]
        pos = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        t = (pos - lo).astype(np.float32)
        shape = [1] * a.ndim
        shape[dim] = -1
        t = t.reshape(shape)
        return np.take(a, lo, axis=dim) * (1 - t) + np.take(a, hi, axis=dim) * t

    return axis(axis(x.astype(np.float32), 1), 2)


def layer_count(weights: dict[str, npt.NDArray[np.float32]], prefix: str = "") -> int:
    """How many 1x1 layers the weights carry under `prefix` (w1, w2, ... contiguous)."""
    k = 0
    while f"{prefix}w{k + 1}" in weights:
        k += 1
    return k


def blur_kernel(sigma: float) -> npt.NDArray[np.float64]:
    """The 1-D Gaussian of the read-out's blur: radius ceil(2 sigma) cells, sums to 1."""
    r = max(1, math.ceil(2.0 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _chain(weights: dict[str, npt.NDArray[np.float32]], prefix: str, x: F64) -> F64:
    for k in range(1, layer_count(weights, prefix) + 1):
        if k > 1:
            x = np.maximum(x, 0.0)
        w = weights[f"{prefix}w{k}"].astype(np.float64)
        x = x @ w.T + weights[f"{prefix}b{k}"].astype(np.float64)
    return x


def blur_map(z: F64, sigma: float) -> F64:
    """[h, w] z blurred as the graph does: zero padding, divided by the blur of ones."""
    k = blur_kernel(sigma)
    r = len(k) // 2

    def conv(m: F64) -> F64:
        p = np.pad(m, r)
        rows = sum(k[i] * p[i : i + m.shape[0], :] for i in range(len(k)))
        return sum(k[j] * rows[:, j : j + m.shape[1]] for j in range(len(k)))

    return conv(z) / conv(np.ones_like(z))


def head_logits(
    weights: dict[str, npt.NDArray[np.float32]],
    features: npt.NDArray[np.floating],
    shape: tuple[int, int],
    food_mass: float = 0.0,
) -> F64:
    """[h, w] logits of the read-out (before exp and the peak normalisation), in numpy: the
    reference the ONNX graph (engines/graph.py) and the fitters (training/) agree with.
    `features` are the [h * w, FEATURES] tapped features, row-major over cells."""
    x = np.asarray(features, dtype=np.float64)
    z = _chain(weights, "", x)[:, 0]
    if layer_count(weights, GATE_PREFIX):
        z = z + food_mass * _chain(weights, GATE_PREFIX, x)[:, 0]
    if layer_count(weights, XGATE_PREFIX):
        v, c = weights[XGATE_PREFIX + "v"], weights[XGATE_PREFIX + "c"]
        gate = 1.0 / (1.0 + np.exp(-(x.mean(0) @ v.astype(np.float64) + float(c[0]))))
        z = z + gate * _chain(weights, XGATE_PREFIX, x)[:, 0]
    h, w = shape
    z = z.reshape(h, w)
    sigma = float(weights["blur"]) if "blur" in weights else 0.0
    if sigma > 0.0:
        z = blur_map(z, sigma)
    return z + (coord_features(h, w) @ weights["a"].astype(np.float64)).reshape(h, w)


def aspect_bucket(aspect: float, buckets: int) -> int:
    """Which of `buckets` (1 or 3) composition read-outs serves a requested aspect."""
    if buckets == 1:
        return 0
    if buckets != len(ASPECT_EDGES) + 1:
        raise ValueError(f"composition buckets must be 1 or {len(ASPECT_EDGES) + 1}, got {buckets}")
    return 0 if aspect < ASPECT_EDGES[0] else 2 if aspect > ASPECT_EDGES[1] else 1


def comp_maps(
    weights: dict[str, npt.NDArray[np.float32]],
    features: npt.NDArray[np.floating],
    shape: tuple[int, int],
    aspect: float,
) -> npt.NDArray[np.float32]:
    """[COMP_MAPS, h, w] composition maps for a window of `aspect` (the numpy reference the
    graph follows): the aspect's bucket of comp_w / comp_b on the [h * w, FEATURES] tapped
    features, row-major over cells."""
    w_all, b_all = weights["comp_w"].astype(np.float64), weights["comp_b"].astype(np.float64)
    k = aspect_bucket(aspect, len(b_all) // COMP_MAPS) * COMP_MAPS
    m = (
        np.asarray(features, dtype=np.float64) @ w_all[k : k + COMP_MAPS].T
        + b_all[k : k + COMP_MAPS]
    )
    h, w = shape
    return m.T.reshape(COMP_MAPS, h, w).astype(np.float32)
