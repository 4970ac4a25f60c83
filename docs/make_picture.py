"""The README's before/after picture, made by heatcrop itself from a demo photo.

    .venv/bin/python docs/make_picture.py    # after `make setup`: docs/img/before-after.jpg

The photo is a demo original of `make run` (sidecar/demo.py: `recipes/coffee-wide.jpg`, the cup
on the left of a wider frame). It goes through the same CropCore as `heatcrop crop` with the
default settings; the top row is the project's debug overlay (sidecar/overlay.py: the heatmap as
a colour wash, heatcrop's box in green, the centre box in white), the bottom row the centre crop
(before) and heatcrop's crop (after) at 400x300, as sidecar/debug.py renders them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pyvips

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.loader import load_engine  # noqa: E402
from sidecar import settings as settings_mod  # noqa: E402
from sidecar.core import CropCore  # noqa: E402
from sidecar.debug import crop_jpeg  # noqa: E402
from sidecar.decode import configure_vips  # noqa: E402
from sidecar.demo import write_demo_images  # noqa: E402
from sidecar.overlay import render_overlay  # noqa: E402
from sidecar.sizes import Size  # noqa: E402

PHOTO = "recipes/coffee-wide.jpg"
SIZE = Size(400, 300)
WIDTH = 720  # of the whole picture
GAP = 8
BACKGROUND = [24, 24, 24]


def picture() -> bytes:
    """The JPEG: overlay on top, the centre crop and heatcrop's crop below."""
    settings = settings_mod.load()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_images(Path(tmp))
        data = (Path(tmp) / PHOTO).read_bytes()
    configure_vips()
    engine = load_engine(settings.engine, warm=False)
    try:
        core = CropCore.from_settings(settings, engine)
        analysis = core.analyse(data)
        box = core.box(analysis, SIZE.aspect, core.profile)
        centre = core.center(analysis, SIZE.aspect)
        heat = core.prepared(analysis, core.profile)
    finally:
        engine.close()
    w, h = analysis.width, analysis.height
    overlay = _image(render_overlay(data, heat, box, centre, w, h))
    crops = [
        _labelled(_image(crop_jpeg(data, w, h, b, SIZE)), text)
        for b, text in ((centre, "before: the centre crop"), (box, "after: heatcrop's crop"))
    ]
    top = _labelled(overlay, "heatmap; heatcrop's box in green, the centre box in white")
    whole = _stack(_fit(top, WIDTH), _row(crops, WIDTH))
    return bytes(whole.jpegsave_buffer(Q=72, keep="none", optimize_coding=True))


def _image(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "").extract_band(0, n=3)


def _fit(image: pyvips.Image, width: int) -> pyvips.Image:
    return image.resize(width / image.width, kernel="lanczos3")


def _labelled(image: pyvips.Image, text: str) -> pyvips.Image:
    label = pyvips.Image.text(text, dpi=110, font="sans")
    band = label.embed(6, 4, image.width, label.height + 8)
    rgb = band.ifthenelse([235, 235, 235], BACKGROUND, blend=True).cast("uchar")
    return rgb.join(image, "vertical")


def _row(images: list[pyvips.Image], width: int) -> pyvips.Image:
    each = (width - GAP * (len(images) - 1)) / len(images)
    fitted = [_fit(im, each) for im in images]
    out = fitted[0]
    for im in fitted[1:]:
        out = out.join(im, "horizontal", shim=GAP, background=BACKGROUND)
    return out


def _stack(top: pyvips.Image, bottom: pyvips.Image) -> pyvips.Image:
    return top.join(bottom, "vertical", shim=GAP, background=BACKGROUND, expand=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "before-after.jpg")
    args = parser.parse_args()
    jpeg = picture()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(jpeg)
    print(f"{args.out}: {len(jpeg)} bytes")


if __name__ == "__main__":
    main()
