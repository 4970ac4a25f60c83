"""Picture gallery: heatcrop vs centre vs libvips attention on 12 fixed dev photos.

    python -m bench.gallery [--out build/gallery] [--eval-dir ../shared/eval]
        [--profile readout|auto|food|generic]

Writes index.html and one JPEG per photo and aspect: the photo with the crop boxes drawn on
it (heatcrop green, centre white, attention magenta) and the ground truth in yellow (the
expert crop, the dish boxes, or the eye fixations; on crowd_train also the labelled faces, in
cyan, with "faces sliced" per method), the faces the service keeps whole (the detector's, as
head boxes, in orange), plus the heatmap the search read (with the same faces). The
numbers benchmark the methods; the pictures show why they come out that way.
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyvips

from bench.baselines import smartcrop_box, working_image
from training.data import ASPECTS, Box, EvalItem, EvalSet, centre_box, load_set

# Evenly spaced through each set's sorted file names, fixed here so the page is comparable
# from run to run even if a manifest is reordered.
PHOTOS: dict[str, tuple[str, ...]] = {
    "fcdb_dev": (
        "10486758315_e04771f77c_c.jpg",
        "19490819674_8c4485c3d1_c.jpg",
        "3972047638_dc66f62fd4_b.jpg",
        "6102762874_42f370ed12_b.jpg",
    ),
    "food_dev": (
        "105_png.rf.18d04aefea5148e640d7b786b92b8b72.jpg",
        "31_png.rf.91af8aab9291580b60eb3656055ac0ba.jpg",
        "56_png.rf.dd25d879c94b623449de2070c56eae50.jpg",
        "84_png.rf.08539d69b50caf56f6808101325eb7f8.jpg",
    ),
    "saliency_dev": ("012.jpg", "118.jpg", "253.jpg", "381.jpg"),
    # A fit set (its map is in-sample there), shown for its labelled faces.
    "crowd_train": ("003.jpg", "119.jpg", "243.jpg", "368.jpg"),
}
TILE_LONG_SIDE = 360
COLOURS: dict[str, tuple[int, int, int]] = {
    "heatcrop": (40, 230, 60),
    "centre": (255, 255, 255),
    "attention": (255, 0, 255),
    "truth": (255, 220, 0),
    "face": (0, 200, 255),
    "kept whole": (255, 140, 0),
}


@dataclass(frozen=True)
class Tile:
    file: str
    caption: str


def draw_box(
    pixels: npt.NDArray[np.uint8],
    box: Box,
    scale: float,
    colour: tuple[int, int, int],
    thickness: int,
) -> None:
    """A frame inside `box` (original pixels) on a display image scaled by `scale`, in place."""
    h, w = pixels.shape[:2]
    x0, y0 = min(w - 1, round(box.x0 * scale)), min(h - 1, round(box.y0 * scale))
    x1, y1 = max(x0 + 1, min(w, round(box.x1 * scale))), max(y0 + 1, min(h, round(box.y1 * scale)))
    t = max(1, min(thickness, (x1 - x0) // 2, (y1 - y0) // 2))
    pixels[y0 : y0 + t, x0:x1] = colour
    pixels[y1 - t : y1, x0:x1] = colour
    pixels[y0:y1, x0 : x0 + t] = colour
    pixels[y0:y1, x1 - t : x1] = colour


def draw_points(
    pixels: npt.NDArray[np.uint8],
    points: npt.NDArray[np.float64],
    scale: float,
    colour: tuple[int, int, int],
) -> None:
    h, w = pixels.shape[:2]
    for x, y in points[:, :2] * scale:
        cx, cy = int(x), int(y)
        pixels[max(0, cy - 1) : min(h, cy + 2), max(0, cx - 1) : min(w, cx + 2)] = colour


def display_pixels(item: EvalItem) -> tuple[npt.NDArray[np.uint8], float]:
    image = pyvips.Image.thumbnail(str(item.path), TILE_LONG_SIDE, height=TILE_LONG_SIDE)
    image = image.colourspace("srgb")
    if image.bands == 1:
        image = image.bandjoin([image, image])
    pixels = np.ascontiguousarray(image.extract_band(0, n=3).cast("uchar").numpy())
    return pixels, image.width / item.width


def render_tile(
    item: EvalItem, kind: str, boxes: dict[str, Box], protected: npt.NDArray[np.float32]
) -> npt.NDArray[np.uint8]:
    pixels, scale = display_pixels(item)
    if kind == "saliency":
        draw_points(pixels, item.fixations, scale, COLOURS["truth"])
    else:
        for gt in item.boxes:
            draw_box(pixels, gt, scale, COLOURS["truth"], 1)
    for face in item.faces:  # the labelled faces a crop must not slice (crowd_train)
        draw_box(pixels, face, scale, COLOURS["face"], 1)
    for x0, y0, x1, y1, *_ in protected:  # the detector's faces the service keeps whole
        box = Box(max(0, int(x0)), max(0, int(y0)), int(x1), int(y1))
        draw_box(pixels, box, scale, COLOURS["kept whole"], 1)
    for name in ("centre", "attention", "heatcrop"):  # heatcrop last: on top
        draw_box(pixels, boxes[name], scale, COLOURS[name], 3 if name == "heatcrop" else 2)
    return pixels


def save_jpeg(pixels: npt.NDArray[np.uint8], path: Path) -> None:
    pyvips.Image.new_from_array(pixels, interpretation="srgb").jpegsave(str(path), Q=85)


def photo_tiles(
    eval_set: EvalSet, item: EvalItem, core: Any, profile: str, out: Path
) -> list[Tile]:
    from sidecar.overlay import render_overlay

    data = item.path.read_bytes()
    analysis = core.analyse(data)
    work = working_image(data)
    protocol = eval_set.protocol
    aspects = {**protocol.aspects(item), **ASPECTS}
    stem = f"{eval_set.name}_{Path(item.name).stem[:24]}"
    protected = core.protected(analysis)
    tiles = []
    for label, aspect in aspects.items():
        raw = core.box(analysis, aspect, profile)
        boxes = {
            "heatcrop": Box.of(raw),
            "centre": centre_box(item.width, item.height, aspect),
            "attention": smartcrop_box(work, item.width, item.height, aspect, "attention"),
        }
        name = f"{stem}_{label.replace(':', 'x')}.jpg"
        save_jpeg(render_tile(item, protocol.kind, boxes, protected), out / name)
        verdict = "" if core.is_confident(raw) else " → centre"
        caption = f"{label}: confidence {raw.confidence:.4f}{verdict}"
        if label in protocol.aspects(item):
            for metric in protocol.metrics[: 3 if item.faces else 1]:
                scores = ", ".join(
                    f"{m} {protocol.score(item, b)[metric.key]:.2f}" for m, b in boxes.items()
                )
                caption += f"<br>{metric.title}: {scores}"
        tiles.append(Tile(name, caption))
    heat_png = render_overlay(
        data,
        core.prepared(analysis, profile),
        core.box(analysis, 1.0, profile),
        core.center(analysis, 1.0),
        analysis.width,
        analysis.height,
        protected,
    )
    heat = pyvips.Image.new_from_buffer(heat_png, "").thumbnail_image(
        TILE_LONG_SIDE, height=TILE_LONG_SIDE
    )
    name = f"{stem}_heat.jpg"
    heat.jpegsave(str(out / name), Q=85)
    tiles.append(Tile(name, f"heatmap ({profile}), food mass {analysis.food_mass:.2f}"))
    return tiles


def page(sections: Sequence[tuple[str, list[Tile]]], profile: str) -> str:
    legend = " ".join(
        f'<span style="border-bottom:4px solid rgb{c};margin-right:1em">{html.escape(n)}</span>'
        for n, c in COLOURS.items()
    )
    body = []
    for title, tiles in sections:
        figures = "".join(
            f'<figure><img src="{t.file}"><figcaption>{t.caption}</figcaption></figure>'
            for t in tiles
        )
        body.append(f"<h2>{html.escape(title)}</h2><div class=row>{figures}</div>")
    style = (
        "body{font-family:sans-serif;background:#222;color:#ddd}"
        ".row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}"
        "figcaption{font-size:12px;max-width:360px}"
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>heatcrop gallery</title>"
        f"<style>{style}</style><h1>heatcrop ({html.escape(profile)}) vs centre vs "
        f"libvips attention</h1><p>{legend}</p><p>Truth: expert crop, dish boxes or eye "
        "fixations. Heatcrop's raw box is drawn; '→ centre' marks where the service's "
        "low-confidence rule would serve the centre crop instead.</p>" + "".join(body)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("build/gallery"))
    parser.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    parser.add_argument(
        "--profile", choices=("food", "generic", "readout", "auto"), default=None,
        help="heatmap profile (default: the settings' engine.profile)",
    )  # fmt: skip
    parser.add_argument("--config", help="heatcrop settings TOML (default: $HEATCROP_CONFIG)")
    args = parser.parse_args(argv)

    from engines.loader import load_engine
    from sidecar import settings as settings_mod
    from sidecar.core import CropCore
    from sidecar.decode import configure_vips
    from sidecar.faces import with_faces

    configure_vips()
    settings = settings_mod.load(args.config)
    args.profile = args.profile or settings.engine.profile
    engine = with_faces(load_engine(settings.engine), settings)
    core = CropCore(engine, settings.kernel, settings.source, args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    sections = []
    for set_name, names in PHOTOS.items():
        eval_set = load_set(args.eval_dir, set_name)
        by_name = {item.name: item for item in eval_set.items}
        for name in names:
            print(f"{set_name}/{name}", file=sys.stderr)
            tiles = photo_tiles(eval_set, by_name[name], core, args.profile, args.out)
            sections.append((f"{set_name} / {name}", tiles))
    (args.out / "index.html").write_text(page(sections, args.profile))
    print(args.out / "index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
