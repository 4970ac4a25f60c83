"""``heatcrop`` command line: ``heatcrop crop PHOTO --size 400x300``, ``heatcrop serve``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sidecar import settings as settings_mod
from sidecar.errors import HeatcropError
from sidecar.sizes import parse_size


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except HeatcropError as exc:
        print(
            json.dumps({"error": exc.public_message, "status": exc.status, "detail": exc.detail}),
            file=sys.stderr,
        )
        return 2
    except settings_mod.SettingsError as exc:
        print(f"heatcrop: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heatcrop", description=__doc__)
    parser.add_argument("--config", help="settings TOML (default: $HEATCROP_CONFIG)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    crop = sub.add_parser("crop", help="decide the crop box of one photo and print it as JSON")
    crop.add_argument("photo", type=Path)
    crop.add_argument("--size", required=True, help="WxH, e.g. 400x300 (0 on one side: no crop)")
    crop.add_argument("--profile", choices=("food", "generic", "auto"), help="heatmap profile")
    crop.add_argument("--debug", type=Path, help="write a PNG: heatmap, chosen box, centre box")
    crop.add_argument("--out", type=Path, help="write the cropped and resized image")
    crop.set_defaults(func=_crop)
    serve = sub.add_parser("serve", help="run the sidecar HTTP service (aiohttp on uvloop)")
    serve.set_defaults(func=_serve)
    warm = sub.add_parser("warm", help="precompute heatmaps of a list of paths into the cache")
    warm.add_argument("--list", required=True, type=Path, help="paths, one a line (# comments)")
    warm.add_argument("--concurrency", type=int, default=4, help="originals in flight at once")
    warm.set_defaults(func=_warm)
    return parser


def _warm(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from sidecar.decode import configure_vips
    from sidecar.warm import read_paths, warm

    if args.concurrency < 1:
        print("heatcrop: --concurrency must be >= 1", file=sys.stderr)
        return 2
    settings = settings_mod.load(args.config)
    try:
        paths = read_paths(args.list.read_text(encoding="utf-8").splitlines())
    except OSError as exc:
        print(f"heatcrop: {exc}", file=sys.stderr)
        return 2
    configure_vips()
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    summary = asyncio.run(warm(settings, paths, concurrency=args.concurrency))
    print(json.dumps(summary.as_dict()))
    return 1 if summary.failures else 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from sidecar.app import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(settings_mod.load(args.config))
    return 0


def _crop(args: argparse.Namespace) -> int:
    from engines.loader import load_engine
    from sidecar.core import CropCore
    from sidecar.decode import configure_vips

    settings = settings_mod.load(args.config)
    size = parse_size(
        args.size, max_width=settings.server.max_width, max_height=settings.server.max_height
    )
    data = _read(args.photo, settings.source.max_bytes)
    configure_vips()
    t0 = time.perf_counter()
    engine = load_engine(settings.engine, warm=False)
    t1 = time.perf_counter()
    core = CropCore.from_settings(settings, engine)
    core.warm()
    t_warm = time.perf_counter()
    profile = args.profile or core.profile
    analysis = core.analyse(data)
    report: dict[str, object] = {
        "photo": str(args.photo),
        "size": str(size),
        "original": [analysis.width, analysis.height],
        "profile": profile,
        "model": engine.version,
        "food_mass": round(analysis.food_mass, 4),
    }
    timings = {
        "engine_load": (t1 - t0) * 1e3,
        "kernel_load": (t_warm - t1) * 1e3,
        **analysis.timings_ms,
    }
    if size.crops:
        t2 = time.perf_counter()
        box = core.box(analysis, size.aspect, profile)
        timings["search"] = (time.perf_counter() - t2) * 1e3
        centre = core.center(analysis, size.aspect)
        confident = core.is_confident(box)
        chosen = box if confident else centre
        report |= {
            "box": list(chosen.as_tuple()),
            "confidence": round(box.confidence, 5),
            "path": "smart" if confident else "low-confidence",
            "smart_box": list(box.as_tuple()),
            "centre_box": list(centre.as_tuple()),
        }
        if args.debug:
            from sidecar.overlay import render_overlay

            heat = core.prepared(analysis, profile)
            args.debug.write_bytes(
                render_overlay(data, heat, box, centre, analysis.width, analysis.height)
            )
    else:
        chosen = None
        report |= {"box": [0, 0, analysis.width, analysis.height], "path": "no-crop"}
    if args.out:
        _write_crop(data, chosen, size, args.out)
    report["timings_ms"] = {k: round(v, 2) for k, v in timings.items()}
    report["kernel"] = dataclasses.asdict(settings.kernel)
    print(json.dumps(report, indent=2))
    engine.close()
    return 0


def _read(path: Path, max_bytes: int) -> bytes:
    from sidecar.errors import InputTooLarge, SourceNotFound

    try:
        if path.stat().st_size > max_bytes:
            raise InputTooLarge(f"{path}: over {max_bytes} bytes")
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise SourceNotFound(str(exc)) from exc


def _write_crop(data: bytes, box: object, size: object, out: Path) -> None:
    import pyvips

    from kernels.window import CropBox
    from sidecar.sizes import Size

    assert isinstance(size, Size)
    image = pyvips.Image.new_from_buffer(data, "").autorot()
    if isinstance(box, CropBox):
        image = image.extract_area(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0)
    width = size.width or round(image.width * size.height / image.height)
    height = size.height or round(image.height * size.width / image.width)
    image = image.thumbnail_image(width, height=height, size="force")
    image.write_to_file(str(out))


if __name__ == "__main__":
    sys.exit(main())
