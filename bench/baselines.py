"""Baseline crops: libvips smartcrop (attention, entropy); the centred largest window, the other
baseline, is training.data.centre_box.

libvips' smartcrop returns the cropped pixels, not where they came from. We run it the way a
thumbnail pipeline would (on a working copy, long side ~512), then find the crop's offset in
the working image by matching pixels: for a largest window only one axis is free, so a
column (or row) profile pins the offset, and the candidate is then checked pixel for pixel.
The box is mapped back to original pixels by its centre, as the largest window at the aspect
of the original, so aspect and clamping are exact in original pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyvips
from numpy.lib.stride_tricks import sliding_window_view

from training.data import Box, largest_window

WORKING_LONG_SIDE = 512
SMARTCROP_KINDS: tuple[str, ...] = ("attention", "entropy")


class CropNotFoundError(RuntimeError):
    """smartcrop's output does not occur in its input at any single-axis offset."""


def place_window(cx: float, cy: float, width: int, height: int, aspect: float) -> Box:
    """The largest window at `aspect`, centred as near (cx, cy) as the image bounds allow."""
    cw, ch = largest_window(width, height, aspect)
    x0 = min(max(round(cx - cw / 2), 0), width - cw)
    y0 = min(max(round(cy - ch / 2), 0), height - ch)
    return Box(x0, y0, x0 + cw, y0 + ch)


def working_image(source: str | Path | bytes, long_side: int = WORKING_LONG_SIDE) -> pyvips.Image:
    """The original shrunk to fit long_side (shrink-on-load), in memory so pixels are stable."""
    if isinstance(source, bytes):
        image = pyvips.Image.thumbnail_buffer(source, long_side, height=long_side)
    else:
        image = pyvips.Image.thumbnail(str(source), long_side, height=long_side)
    return image.copy_memory()


def smartcrop_box(
    work: pyvips.Image, width: int, height: int, aspect: float, interesting: str
) -> Box:
    """libvips smartcrop's choice for the largest window at `aspect`, in original pixels.

    `work` is the working copy of a width x height original.
    """
    if abs(work.width * height / width - work.height) > 1:
        # e.g. thumbnail applied an EXIF rotation the ground truth does not know about.
        raise ValueError(f"working copy {work.width}x{work.height} is not {width}x{height} scaled")
    cw, ch = largest_window(work.width, work.height, aspect)
    crop = work.smartcrop(cw, ch, interesting=interesting)
    left, top = locate_crop(work.numpy(), crop.numpy())
    sx, sy = width / work.width, height / work.height
    return place_window((left + cw / 2) * sx, (top + ch / 2) * sy, width, height, aspect)


def locate_crop(image: npt.NDArray[np.uint8], crop: npt.NDArray[np.uint8]) -> tuple[int, int]:
    """(left, top) of `crop` inside `image`, where the crop spans the full height or width.

    Candidates come from an exact match of the column (row) sums, and each is confirmed
    pixel for pixel. If several offsets hold identical pixels (flat or periodic images),
    the one nearest the centre is returned: those crops are indistinguishable anyway.
    """
    image, crop = _hwc(image), _hwc(crop)
    h, w = image.shape[:2]
    ch, cw = crop.shape[:2]
    if ch == h:
        offsets = _profile_matches(
            image.sum(axis=0, dtype=np.int64), crop.sum(axis=0, dtype=np.int64)
        )
        exact = [o for o in offsets if np.array_equal(image[:, o : o + cw], crop)]
        free, size = w, cw
    elif cw == w:
        offsets = _profile_matches(
            image.sum(axis=1, dtype=np.int64), crop.sum(axis=1, dtype=np.int64)
        )
        exact = [o for o in offsets if np.array_equal(image[o : o + ch], crop)]
        free, size = h, ch
    else:
        raise ValueError(f"crop {cw}x{ch} spans neither axis of {w}x{h}")
    if not exact:
        raise CropNotFoundError(f"crop {cw}x{ch} not found in {w}x{h}")
    middle = (free - size) / 2
    best = min(exact, key=lambda o: (abs(o - middle), o))
    return (best, 0) if ch == h else (0, best)


def _hwc(a: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return a[:, :, np.newaxis] if a.ndim == 2 else a


def _profile_matches(profile: npt.NDArray[np.int64], part: npt.NDArray[np.int64]) -> list[int]:
    """Offsets o where profile[o:o+len(part)] equals part exactly ([n, bands] arrays)."""
    windows = sliding_window_view(profile, len(part), axis=0)  # [n - k + 1, bands, k]
    hits = (windows == part.T[np.newaxis]).all(axis=(1, 2))
    return [int(o) for o in np.flatnonzero(hits)]
