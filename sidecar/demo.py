"""Demo originals for ``make run``: real photos shipped inside scikit-image, no download.

Written as JPEGs under ``demo/images/`` (git-ignored), in a ``recipes/`` and a ``photos/``
folder so URLs look like production ones (``/img/400x300/recipes/coffee.jpg``).
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
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("demo/images"))
    args = parser.parse_args()
    for path in write_demo_images(args.root):
        print(path)


if __name__ == "__main__":
    main()
