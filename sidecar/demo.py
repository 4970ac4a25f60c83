"""Demo originals for ``make run``: real photos shipped inside scikit-image, no download.

Written as JPEGs under ``demo/images/`` (git-ignored), in a ``recipes/`` and a ``photos/``
folder so URLs look like production ones (``/img/400x300/recipes/coffee.jpg``). Those photos
have their subject in the middle, where a centre crop is already right; the ``*-wide`` ones
put it to one side of a wider frame (the edge pixels stretched outward), which is where a
smart crop differs from the centre crop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyvips

# name in skimage.data → path under the demo root
PHOTOS: dict[str, str] = {
    "coffee": "recipes/coffee.jpg",
    "chelsea": "photos/chelsea.jpg",
    "astronaut": "photos/astronaut.jpg",
    "rocket": "photos/rocket.jpg",
    "stereo_motorcycle": "photos/motorcycle.jpg",
}
# path under the demo root → (source photo, subject side "left" | "right", frame width / width)
OFF_CENTRE: dict[str, tuple[str, str, float]] = {
    "recipes/coffee-wide.jpg": ("recipes/coffee.jpg", "left", 2.2),
    "photos/chelsea-wide.jpg": ("photos/chelsea.jpg", "right", 2.2),
}


def write_demo_images(root: Path) -> list[Path]:
    """Write each demo photo once; returns the paths. Idempotent."""
    import skimage.data

    written = []
    for name, rel in PHOTOS.items():
        path = root / rel
        if not path.exists():
            pixels = getattr(skimage.data, name)()
            if isinstance(pixels, tuple):  # stereo pairs: keep the left view
                pixels = pixels[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            pyvips.Image.new_from_array(pixels, interpretation="srgb").jpegsave(str(path), Q=92)
        written.append(path)
    for rel, (src, side, factor) in OFF_CENTRE.items():
        path = root / rel
        if not path.exists():
            photo = pyvips.Image.new_from_file(str(root / src))
            width = round(photo.width * factor)
            left = 0 if side == "left" else width - photo.width
            wide = photo.embed(left, 0, width, photo.height, extend="copy")
            wide.jpegsave(str(path), Q=92)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("demo/images"))
    args = parser.parse_args()
    for path in write_demo_images(args.root):
        print(path)


if __name__ == "__main__":
    main()
