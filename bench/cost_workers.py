"""The processes bench.cost times, each answering JSON lines on stdin/stdout.

    python -m bench.cost_workers attention    libvips attention as an image server runs it:
                                              its own process, libvips' defaults untouched
                                              (threads, operation cache): configure_vips() is
                                              never called here
    python -m bench.cost_workers core         heatcrop's CropCore as the sidecar runs it:
                                              configure_vips() (concurrency 1, no operation
                                              cache), the engine and face detector the
                                              settings (HEATCROP_* variables) ask for

Requests, one JSON object a line:
    {"op": "info"}                          what runs (versions, threads, detector)
    {"op": "one", "path": P}                one photo, timed in this process
    {"op": "pool", "n": N, "paths": [...]}  every path by N threads at once (attention only):
                                            wall and CPU seconds of this process
A reply is one JSON object a line; stdout carries nothing else.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyvips

# What an image server asks libvips for: the 400x300 thumbnail cropped by attention. avg()
# makes libvips compute the crop's pixels (an image server would encode them instead).
ATTENTION_CALL = 'pyvips.Image.thumbnail(path, 400, height=300, crop="attention").avg()'
ASPECT = 4 / 3

Reply = dict[str, Any]


def attention(path: str) -> float:
    return float(pyvips.Image.thumbnail(path, 400, height=300, crop="attention").avg())


def libvips_facts() -> Reply:
    return {
        "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        "vips_concurrency": int(pyvips.vips_lib.vips_concurrency_get()),
        "vips_cache_max": int(pyvips.cache_get_max()),
    }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def pool(fn: Callable[[str], object], n: int, paths: list[str]) -> Reply:
    """Every path through ``fn`` by ``n`` threads: wall and process CPU seconds."""
    with ThreadPoolExecutor(n) as workers:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in workers.map(fn, paths):
            pass
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "done": len(paths)}


def serve_attention(request: Reply) -> Reply:
    op = request["op"]
    if op == "info":
        return {"call": ATTENTION_CALL, **libvips_facts()}
    if op == "one":
        cpu0 = time.process_time()
        ms = timed(lambda: attention(request["path"]))
        return {"ms": ms, "cpu_ms": (time.process_time() - cpu0) * 1e3}
    if op == "pool":
        return pool(attention, int(request["n"]), list(request["paths"]))
    raise ValueError(f"unknown op {op!r}")


def core_server() -> Callable[[Reply], Reply]:
    """CropCore with the sidecar's engine (face detector joined as settings say), warmed."""
    from engines.loader import load_engine
    from sidecar import settings as settings_mod
    from sidecar.core import CropCore
    from sidecar.decode import configure_vips
    from sidecar.faces import with_faces

    configure_vips()
    settings = settings_mod.load()
    engine = with_faces(load_engine(settings.engine, warm=True), settings)
    core = CropCore.from_settings(settings, engine)
    core.warm()
    detector = getattr(engine, "detector", None)

    def one(path: str) -> Reply:
        cpu0, t0 = time.process_time(), time.perf_counter()
        analysis = core.analyse(Path(path).read_bytes())
        core.box(analysis, ASPECT)
        ms = (time.perf_counter() - t0) * 1e3
        cpu_ms = (time.process_time() - cpu0) * 1e3
        return {"ms": ms, "cpu_ms": cpu_ms, **analysis.timings_ms, "faces": len(analysis.faces)}

    def serve(request: Reply) -> Reply:
        op = request["op"]
        if op == "info":
            return {
                "engine": engine.version,
                "threads": settings.engine.threads,
                "precision": settings.engine.ort_precision,
                "faces": settings.kernel.faces,
                "detector": None if detector is None else detector.version,
                **libvips_facts(),
            }
        if op == "one":
            return one(request["path"])
        raise ValueError(f"unknown op {op!r}")

    return serve


def main(argv: list[str]) -> int:
    if argv[1:] == ["attention"]:
        serve = serve_attention
    elif argv[1:] == ["core"]:
        serve = core_server()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        print(json.dumps(serve(json.loads(line))), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
