"""Input shape buckets: a small fixed set so same-shape images batch together.

The short side is 224 (Lite0's native size; the cost budget is set there), the long side one
of a few multiples of 32. An image goes to the bucket nearest its aspect ratio (in log
space) and is resized to it exactly, a squash of at most ~6 %, which the CNN does not
notice, so the heatmap always covers the whole original.
"""

from __future__ import annotations

import math

SHORT_SIDE = 224
LONG_SIDES: tuple[int, ...] = (224, 256, 288, 320, 352, 384, 416, 448)
STRIDE = 32
# The heatmap's grid: the read-out's (engines/readout.grid_of of the shipped weights; the
# export refuses weights of another grid), every channel upsampled to it inside the graph.
HEATMAP_STRIDE = 16


def all_buckets() -> tuple[tuple[int, int], ...]:
    """Every (height, width) bucket: landscape, square, portrait."""
    landscape = [(SHORT_SIDE, long) for long in LONG_SIDES]
    portrait = [(long, SHORT_SIDE) for long in LONG_SIDES if long != SHORT_SIDE]
    return tuple(landscape + portrait)


def bucket_for(width: int, height: int) -> tuple[int, int]:
    """The (height, width) bucket closest in aspect ratio to a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(all_buckets(), key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), hw))


def heatmap_shape(bucket: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of the model's heatmap for an input bucket."""
    return bucket[0] // HEATMAP_STRIDE, bucket[1] // HEATMAP_STRIDE
