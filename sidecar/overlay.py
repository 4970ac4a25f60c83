"""Debug picture: the original with its heatmap overlaid, the chosen box, the centre box and the
faces the crop keeps whole."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pyvips

from kernels.window import CropBox
from sidecar.decode import display_pixels

DISPLAY_LONG_SIDE = 800
CHOSEN = (40, 230, 60)
CENTRE = (255, 255, 255)
FACE = (0, 200, 255)


def render_overlay(
    data: bytes,
    heat: npt.NDArray[np.float32],
    chosen: CropBox,
    centre: CropBox,
    width: int,
    height: int,
    faces: npt.NDArray[np.float32] | None = None,
) -> bytes:
    """PNG bytes: the photo as the decoder sees it (``display_pixels``), its long side
    ``DISPLAY_LONG_SIDE``; heat as a colour wash, boxes as frames, ``faces`` ([k, >= 4], the
    head boxes the face rule keeps whole) as thin cyan frames. ``width`` x ``height``: the
    original's display size, the frame of the boxes."""
    fit = DISPLAY_LONG_SIDE / max(width, height)
    shown_w, shown_h = max(1, round(width * fit)), max(1, round(height * fit))
    photo = display_pixels(data, shown_w, shown_h)
    scale = shown_w / width
    wash = _colourise(_resize(heat, shown_w, shown_h))
    pixels = (0.55 * photo.astype(np.float32) + 0.45 * wash).astype(np.uint8)
    canvas = pyvips.Image.new_from_array(pixels, interpretation="srgb")
    for face in np.zeros((0, 4)) if faces is None else faces:
        x0, y0, x1, y1 = (max(0, round(float(v))) for v in face[:4])
        canvas = _frame(canvas, CropBox(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), scale, FACE, 1)
    for box, colour in ((centre, CENTRE), (chosen, CHOSEN)):
        canvas = _frame(canvas, box, scale, colour)
    return bytes(canvas.pngsave_buffer(compression=3))


def _resize(heat: npt.NDArray[np.float32], width: int, height: int) -> npt.NDArray[np.float32]:
    src = pyvips.Image.new_from_array(np.ascontiguousarray(heat, dtype=np.float32))
    out = src.resize(width / src.width, vscale=height / src.height, kernel="linear")
    arr = np.asarray(out.numpy(), dtype=np.float32).reshape(out.height, out.width)
    return arr[:height, :width]


def _colourise(heat: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A blue → red ramp, normalised per image: only the shape of the heat matters here."""
    span = float(heat.max() - heat.min())
    t = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    red = np.clip(1.5 * t - 0.25, 0, 1)
    green = np.clip(1.5 - np.abs(2 * t - 1) * 1.5, 0, 1)
    blue = np.clip(1.25 - 1.5 * t, 0, 1)
    return np.stack([red, green, blue], axis=-1) * 255.0


def _frame(
    canvas: pyvips.Image, box: CropBox, scale: float, colour: tuple[int, int, int], lines: int = 3
) -> pyvips.Image:
    x0, y0 = round(box.x0 * scale), round(box.y0 * scale)
    w = max(1, round((box.x1 - box.x0) * scale))
    h = max(1, round((box.y1 - box.y0) * scale))
    x0, y0 = min(x0, canvas.width - 1), min(y0, canvas.height - 1)
    w, h = min(w, canvas.width - x0), min(h, canvas.height - y0)
    for inset in range(lines):
        if w - 2 * inset > 0 and h - 2 * inset > 0:
            canvas = canvas.draw_rect(
                list(colour), x0 + inset, y0 + inset, w - 2 * inset, h - 2 * inset, fill=False
            )
    return canvas
