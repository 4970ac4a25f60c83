"""Input shape buckets: a small fixed set so same-shape images batch together.

The short side is 224 (Lite0's native size; the cost budget is set there), the long side one
of a few multiples of 32. An image goes to the bucket nearest its aspect ratio (in log
space) and is resized to it exactly, a squash of at most ~6 %, which the CNN does not
notice, so the heatmap always covers the whole original.
"""

from __future__ import annotations

import math

STRIDE = 32
# Lite0's native input size, and the short side every shipped model was built for.
NATIVE_SHORT_SIDE = 224
# The build-time knob: the CNN's cost scales with the pixels (192: 0.80x, 160: 0.62x the
# CNN's time at 224), but with the read-out fitted on 224-bucket features 192 loses 3.4-4.0
# points of headroom share on saliency_dev and osie_train, outside the noise (160: 5.9-10.1;
# bench/results/bucket.md), so 224 stays until a read-out fitted at another side is measured
# (training/ decodes with these buckets too). Another value needs `make setup`: the export
# writes the buckets into the manifest and, for any but the native side, into the model's bytes
# (its hash, so heatmaps, INT8 graphs and TensorRT plans of other buckets never share a key);
# engines/model.find_model refuses a model built for other buckets than these.
SHORT_SIDE = 224
# The heatmap's grid: the read-out's (engines/readout.grid_of of the shipped weights; the
# export refuses weights of another grid), every channel upsampled to it inside the graph.
HEATMAP_STRIDE = 16


def long_sides(short: int) -> tuple[int, ...]:
    """The long sides for a short side: multiples of 32 up to twice it (aspects 1 to 2)."""
    if short <= 0 or short % STRIDE:
        raise ValueError(f"short side must be a positive multiple of {STRIDE}, got {short}")
    return tuple(range(short, 2 * short + 1, STRIDE))


def all_buckets(short: int | None = None) -> tuple[tuple[int, int], ...]:
    """Every (height, width) bucket of a short side (None: SHORT_SIDE, read at call time):
    landscape, square, portrait."""
    short = SHORT_SIDE if short is None else short
    longs = long_sides(short)
    landscape = [(short, long) for long in longs]
    portrait = [(long, short) for long in longs if long != short]
    return tuple(landscape + portrait)


def bucket_for(width: int, height: int, short: int | None = None) -> tuple[int, int]:
    """The (height, width) bucket closest in aspect ratio to a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(all_buckets(short), key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), hw))


def heatmap_shape(bucket: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of the model's heatmap for an input bucket."""
    return bucket[0] // HEATMAP_STRIDE, bucket[1] // HEATMAP_STRIDE
