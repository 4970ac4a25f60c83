"""Photos with known faces, made at test time from scikit-image's bundled photos.

The astronaut photo (Eileen Collins, 512x512, public domain) holds one face; its head, hair
included, is ``HEAD`` in its pixels: what a person labelling heads would draw, and what a crop
must keep whole. The composites paste that photo, or its head, onto scikit-image's coffee
photo: ``portrait_near_edge`` one face close to the right edge of the frame,
``small_group`` three faces of different sizes (one mirrored) side by side. Each returns the
JPEG and its head boxes in its own pixels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyvips
from skimage import data as skdata

from engines.faces import FACES_MANIFEST_NAME
from tests.support.images import jpeg

# The astronaut's head (hair to chin, ear to ear) in her photo: x0, y0, x1, y1.
HEAD = (150, 25, 295, 205)
# Where the detector's face box sits in her photo (its measured box within ~10 px).
FACE = (178, 65, 270, 176)

Boxes = list[tuple[float, float, float, float]]


def _scaled(pixels: npt.NDArray[np.uint8], factor: float) -> npt.NDArray[np.uint8]:
    image = pyvips.Image.new_from_array(np.ascontiguousarray(pixels), interpretation="srgb")
    out = image.resize(factor)
    return np.asarray(out.numpy(), dtype=np.uint8)[:, :, :3]


def _background(width: int, height: int) -> npt.NDArray[np.uint8]:
    coffee = skdata.coffee()  # 600x400
    factor = max(width / coffee.shape[1], height / coffee.shape[0])
    return np.ascontiguousarray(_scaled(coffee, factor)[:height, :width])


def portrait_near_edge() -> tuple[bytes, Boxes]:
    """900x600: the left 300 columns of the astronaut photo (her face ~30 px from their right
    edge), scaled to 600 px high, against the right edge of the frame, on the coffee photo."""
    canvas = _background(900, 600)
    cut = 300
    factor = 600 / 512
    person = _scaled(skdata.astronaut()[:, :cut], factor)
    x = 900 - person.shape[1]
    canvas[:, x:] = person[:600]
    head = (
        x + HEAD[0] * factor,
        HEAD[1] * factor,
        x + min(HEAD[2], cut) * factor,
        HEAD[3] * factor,
    )
    return jpeg(canvas), [head]


def small_group() -> tuple[bytes, Boxes]:
    """1200x600: three heads (scales 0.8, 1.0 mirrored, 0.7) in a row on the coffee photo."""
    canvas = _background(1200, 600)
    crop = (130, 20, 320, 240)  # around HEAD, with some shoulder and background
    head = skdata.astronaut()[crop[1] : crop[3], crop[0] : crop[2]]
    heads: Boxes = []
    for x, factor, mirror in ((100, 0.8, False), (450, 1.0, True), (800, 0.7, False)):
        part = _scaled(head[:, ::-1] if mirror else head, factor)
        y = 150
        canvas[y : y + part.shape[0], x : x + part.shape[1]] = part
        hx0, hx1 = HEAD[0] - crop[0], HEAD[2] - crop[0]
        if mirror:
            hx0, hx1 = (crop[2] - crop[0]) - hx1, (crop[2] - crop[0]) - hx0
        f = part.shape[1] / head.shape[1]
        heads.append(
            (x + hx0 * f, y + (HEAD[1] - crop[1]) * f, x + hx1 * f, y + (HEAD[3] - crop[1]) * f)
        )
    return jpeg(canvas), heads


def without_faces(model_dir: Path, out: Path) -> Path:
    """``out``: a copy of ``model_dir`` without the face detector (no faces.json, no graph)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name != FACES_MANIFEST_NAME and "-faces-" not in path.name:
            shutil.copy2(path, out / path.name)
    return out
