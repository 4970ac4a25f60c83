"""What a cached analysis or box must be for this service to use it: checked on every read.

The codec (sidecar/codec.py) refuses bytes that are not a record at all. A record can still be
well formed and wrong for the request: Redis is shared, and whoever can write to it can store an
analysis with one channel (the window search then fails on every request for the original), one
claiming a 1x1 or 10^6 x 10^6 original, or a box of another image (served as a smart crop and
cached a day at the edge). So every record read is held against what the service expects:

- an analysis has one float16 channel per profile, a heatmap of the shape the engine makes for
  its dimensions (``engines.buckets``: the bucket nearest their aspect, at the heatmap stride),
  plausible dimensions, those of the original being served when they are known (its header,
  read with the fetch: ``sidecar.sources.Original.size``), and faces inside them;
- a box belongs to the path asked for, lies inside the original, and has the size of a window
  the search makes for that aspect with these settings (``CropCore.window_sizes``), within a
  pixel.

A record that fails is dropped by the caches (sidecar/caches.py, ``Caches``), with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.base import PROFILES
from engines.buckets import bucket_for, heatmap_shape
from kernels.window import MAX_SIDE
from sidecar.codec import BoxRecord
from sidecar.core import Analysis

Size = tuple[int, int]  # width, height in pixels

CHANNELS = len(PROFILES)
# Faces are clipped to the original in the detector's pixels, then scaled to the original's:
# float32 rounding may leave them a hair outside.
FACE_SLACK = 1.0
# A box's size may differ from the window sizes by this many pixels (a rounding changed since
# it was stored); its place never: a box outside the original crops junk at the legacy server.
BOX_SLACK = 1


class BadRecord(ValueError):
    """A well-formed record that is not what the service expects; the message says why."""


@dataclass(frozen=True)
class AnalysisExpect:
    """What an analysis read from the cache must match.

    size: the original's (width, height) in display orientation, when known; None: only
        plausible dimensions are required. max_pixels: the source's pixel limit (None: none).
    """

    size: Size | None = None
    max_pixels: int | None = None


@dataclass(frozen=True)
class BoxExpect:
    """What a box read from the cache must match: the path asked for, the original's size,
    and the (width, height) of every window the search can return at the requested aspect."""

    path: str
    size: Size
    windows: frozenset[Size]


def check_analysis(a: Analysis, expect: AnalysisExpect) -> None:
    """BadRecord unless ``a`` is an analysis this service could have made for the original."""
    maps = a.heatmaps
    if maps.dtype != np.float16 or maps.ndim != 3 or maps.shape[0] != CHANNELS:
        raise BadRecord(
            f"heatmaps {maps.dtype} {maps.shape}: expected float16 with {CHANNELS} channels"
        )
    width, height = a.width, a.height
    if expect.size is not None and (width, height) != expect.size:
        w, h = expect.size
        raise BadRecord(f"claims a {width}x{height} original; it is {w}x{h}")
    too_many = expect.max_pixels is not None and width * height > expect.max_pixels
    if too_many or not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise BadRecord(f"claims a {width}x{height} original, beyond the limits")
    grid = heatmap_shape(bucket_for(width, height))
    if maps.shape[1:] != grid:
        raise BadRecord(f"heatmap {maps.shape[1:]} for a {width}x{height} original, not {grid}")
    _check_faces(a.faces, width, height)


def _check_faces(faces: np.ndarray, width: int, height: int) -> None:
    if not len(faces):
        return
    x0, y0, x1, y1 = faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 3]
    inside = (
        (x0 >= -FACE_SLACK)
        & (y0 >= -FACE_SLACK)
        & (x1 <= width + FACE_SLACK)
        & (y1 <= height + FACE_SLACK)
        & (x0 <= x1)
        & (y0 <= y1)
    )
    if not inside.all():
        raise BadRecord(f"a face box lies outside the {width}x{height} original")


def check_box(record: BoxRecord, expect: BoxExpect) -> None:
    """BadRecord unless ``record`` is a box the search could have made for this request."""
    if record.path != expect.path:
        raise BadRecord(f"a box of {record.path[:64]!r}")
    x0, y0, x1, y1 = record.box
    width, height = expect.size
    if x1 > width or y1 > height:
        raise BadRecord(f"box {record.box} outside the {width}x{height} original")
    w, h = x1 - x0, y1 - y0
    if not any(abs(w - cw) <= BOX_SLACK and abs(h - ch) <= BOX_SLACK for cw, ch in expect.windows):
        raise BadRecord(f"box {record.box} is no window the search makes at this aspect")
    if record.confidence < 0:
        raise BadRecord(f"confidence {record.confidence} < 0")
