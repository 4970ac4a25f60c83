"""``heatcrop`` command line: ``heatcrop crop PHOTO --size 400x300``, ``heatcrop serve``,
``heatcrop warm``, ``heatcrop backfill``, ``heatcrop engines list``, ``heatcrop settings``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import settings as settings_mod
from sidecar.core import SEARCH_PROFILES
from sidecar.errors import HeatcropError
from sidecar.sizes import parse_size

if TYPE_CHECKING:
    from engines.plans import Probe


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


# Every command reads the same settings; the epilog says where from, in settings' own terms.
SETTINGS_EPILOG = (
    "Settings: defaults, then the TOML file (--config or $"
    + settings_mod.CONFIG_ENV
    + "), then "
    + settings_mod.ENV_PREFIX
    + "<SECTION>_<FIELD> variables. Every key: `heatcrop settings` (docs/configuration.md)."
)


def _setting(section: str, name: str) -> str:
    """How a help text names the setting an option defaults to."""
    return f"{section}.{name}, ${settings_mod.env_name(section, name)}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heatcrop", description=__doc__, epilog=SETTINGS_EPILOG)
    parser.add_argument("--config", help=f"settings TOML (default: ${settings_mod.CONFIG_ENV})")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    crop = sub.add_parser(
        "crop",
        help="decide the crop box of one photo and print it as JSON",
        epilog=SETTINGS_EPILOG,
    )
    crop.add_argument("photo", type=Path)
    crop.add_argument("--size", required=True, help="WxH, e.g. 400x300 (0 on one side: no crop)")
    crop.add_argument(
        "--profile",
        choices=SEARCH_PROFILES,
        help=f"heatmap profile (default: {_setting('engine', 'profile')})",
    )
    crop.add_argument("--debug", type=Path, help="write a PNG: heatmap, chosen box, centre box")
    crop.add_argument("--out", type=Path, help="write the cropped and resized image")
    crop.set_defaults(func=_crop)
    serve = sub.add_parser(
        "serve",
        help="run the sidecar HTTP service (aiohttp on uvloop)",
        description="Serve /crop, /override, /healthz, /metrics and /debug on "
        f"server.host:server.port (${settings_mod.env_name('server', 'host')}, "
        f"${settings_mod.env_name('server', 'port')}).",
        epilog=SETTINGS_EPILOG,
    )
    serve.set_defaults(func=_serve)
    warm = sub.add_parser(
        "warm",
        help="precompute heatmaps of a list of paths into the cache",
        description="Read, decode and analyse each original into the configured cache "
        f"({_setting('cache', 'backend')}: redis for a cache the sidecars share); "
        "prints a JSON summary.",
        epilog=SETTINGS_EPILOG,
    )
    warm.add_argument(
        "--list",
        required=True,
        type=Path,
        help="paths under the source root as named there (not URL-encoded), one a line",
    )
    warm.add_argument("--concurrency", type=int, default=4, help="originals in flight at once")
    warm.set_defaults(func=_warm)
    backfill = sub.add_parser(
        "backfill",
        help="precompute the heatmaps of millions of originals on Ray (the cluster extra)",
        description="Ray Data: each actor of a pool fetches, decodes and runs the engine, "
        f"the heatmaps into the shared cache ({_setting('cache', 'redis_url')}: a Redis or a "
        "Redis Cluster); what is cached already is skipped, so a run killed and started again "
        "resumes. Progress on stderr, a JSON summary on stdout. Needs "
        "`pip install 'heatcrop[cluster]'`; docs/scaling.md.",
        epilog=SETTINGS_EPILOG,
    )
    which = backfill.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--list",
        type=Path,
        help="paths under the source root as named there (not URL-encoded), one a line; "
        "read in ranges, never whole",
    )
    which.add_argument(
        "--walk",
        action="store_true",
        help=f"every file under the folder source's root ({_setting('source', 'root')})",
    )
    backfill.add_argument(
        "--address",
        help="the Ray cluster to join (e.g. auto, or ray://head:10001); default: start Ray here",
    )
    backfill.add_argument(
        "--workers", type=int, help="CPU workers, one core each (default: every CPU of the cluster)"
    )
    backfill.add_argument(
        "--gpus", type=int, default=0, help="GPU workers instead, one GPU each (TensorRT plans)"
    )
    backfill.add_argument(
        "--actors-per-gpu",
        type=int,
        default=1,
        help="actors sharing each GPU, a core each: each decodes (and, with faces, runs the "
        "detector) on its core",
    )
    backfill.add_argument("--batch", type=int, default=32, help="originals per batch")
    backfill.add_argument("--progress-every", type=float, default=10.0, help="seconds")
    backfill.set_defaults(func=_backfill)
    engines = sub.add_parser("engines", help="TensorRT plans (see `make engines`)")
    engines_sub = engines.add_subparsers(required=True, metavar="ACTION")
    listing = engines_sub.add_parser(
        "list", help="plans, and whether each fits this machine", epilog=SETTINGS_EPILOG
    )
    listing.add_argument("--plan-dir", type=Path, help=f"default: {_setting('engine', 'plan_dir')}")
    listing.add_argument(
        "--model-dir", type=Path, help=f"default: {_setting('engine', 'model_dir')}"
    )
    listing.add_argument("--json", action="store_true", help="one JSON document instead")
    listing.set_defaults(func=_engines_list)
    reference = sub.add_parser(
        "settings",
        help="print the settings reference (markdown): every key, variable, default, bound",
        epilog=SETTINGS_EPILOG,
    )
    reference.set_defaults(func=_settings)
    return parser


def _settings(args: argparse.Namespace) -> int:
    from sidecar.settings_doc import reference_markdown

    print(reference_markdown(), end="")
    return 0


def _engines_list(args: argparse.Namespace, probe: Callable[[], Probe] | None = None) -> int:
    """Works without TensorRT: the plans are still listed, and the machine line says why
    none can be used here."""
    from engines.model import read_manifest
    from engines.plans import detect_machine, judge, list_plans

    settings = settings_mod.load(args.config)
    plan_dir = args.plan_dir or Path(settings.engine.plan_dir)
    model_dir = args.model_dir or Path(settings.engine.model_dir)
    machine = (probe or detect_machine)()
    try:
        model_sha: str | None = str(read_manifest(model_dir)["sha256"])
    except HeatcropError:
        model_sha = None
    rows = []
    for entry in list_plans(plan_dir):
        m = entry.manifest
        if m is None:
            rows.append({"manifest": entry.path.name, "status": "broken", "why": entry.error})
            continue
        verdict = judge(m, machine, model_sha)
        rows.append(
            {
                "plan": m.plan_file,
                "precision": m.precision,
                "gpu": f"{m.gpu_name} ({m.machine.sm})",
                "tensorrt": m.trt_version,
                "model": m.model_sha256[:12],
                "buckets": len(m.buckets),
                "batch": f"1..{m.max_batch}",
                "status": verdict.status.value,
                "why": verdict.reason,
            }
        )
    head = {
        "machine": machine.describe(),
        "model": model_sha[:12] if model_sha else f"not built in {model_dir}",
        "plan_dir": str(plan_dir),
    }
    if args.json:
        print(json.dumps({**head, "plans": rows}, indent=2))
        return 0
    print(f"this machine: {head['machine']}")
    print(f"model: {head['model']}")
    print(f"plans in {plan_dir}: {len(rows)}" + ("" if rows else " (build with `make engines`)"))
    for row in rows:
        name = row.get("plan") or row["manifest"]
        if "precision" in row:
            detail = (
                f"{row['precision']}  {row['gpu']}  TensorRT {row['tensorrt']}  "
                f"model {row['model']}  {row['buckets']} buckets  batch {row['batch']}"
            )
        else:
            detail = "unreadable manifest"
        print(f"  {name}\n    {detail}\n    {row['status']}: {row['why']}")
    return 0


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


def _backfill(args: argparse.Namespace) -> int:
    import logging

    from sidecar.backfill import require_shared_cache

    settings = settings_mod.load(args.config)
    require_shared_cache(settings)
    if args.walk and settings.source.kind != "folder":
        print("heatcrop: --walk needs source.kind = folder; give --list", file=sys.stderr)
        return 2
    if args.list is not None and not args.list.is_file():
        print(f"heatcrop: --list {args.list}: no such file", file=sys.stderr)
        return 2
    try:
        import ray

        from sidecar.backfill_ray import Listing, Plan, run_backfill
    except ImportError as exc:
        print(f"heatcrop: backfill needs heatcrop[cluster] ({exc})", file=sys.stderr)
        return 2
    listing = Listing(file=args.list) if args.list else Listing(walk=Path(settings.source.root))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        plan = Plan(workers, args.gpus, args.actors_per_gpu, args.batch)
        summary = run_backfill(settings, listing, plan, every_s=args.progress_every)
    except ValueError as exc:  # a plan out of bounds
        print(f"heatcrop: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
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
    from sidecar.faces import with_faces

    settings = settings_mod.load(args.config)
    size = parse_size(
        args.size, max_width=settings.server.max_width, max_height=settings.server.max_height
    )
    data = _read(args.photo, settings.source.max_bytes)
    configure_vips()
    t0 = time.perf_counter()
    engine = with_faces(load_engine(settings.engine, warm=False), settings, warm=False)
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
        "faces": [[round(float(v), 1) for v in f] for f in analysis.faces],
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
            faces = core.protected(analysis)
            args.debug.write_bytes(
                render_overlay(data, heat, box, centre, analysis.width, analysis.height, faces)
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
