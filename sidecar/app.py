"""The sidecar's aiohttp application: ``make_app(settings)`` and ``python -m sidecar.app``.

Every long-lived resource is opened by its own ``cleanup_ctx`` context, in dependency order,
and closed in reverse when the app stops: metrics, engine (loaded and warmed once, with the face
detector joined to it: sidecar/faces.py), crop core (kernels warmed), batcher, caches, source,
decode pool, then the services the routes use.
The routes and their answers are described in ``sidecar.routes``; the pipeline in
``sidecar.pipeline``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial

from aiohttp import web

from engines.base import Engine
from engines.errors import HeatcropError
from engines.loader import load_engine
from sidecar import http_server
from sidecar import settings as settings_mod
from sidecar.admission import DecodeAdmission
from sidecar.batcher import Batcher
from sidecar.caches import Caches, make_caches
from sidecar.core import CropCore
from sidecar.cpu_budget import service_budget
from sidecar.debug import add_debug_routes
from sidecar.decode import configure_vips
from sidecar.faces import with_faces
from sidecar.job import Services
from sidecar.legacy import make_dialect
from sidecar.metrics import Metrics
from sidecar.priority import lowered_pool, run_lowered
from sidecar.routes import (
    DIALECT,
    HEALTH,
    OVERRIDE_LOCK,
    SERVICES,
    Health,
    OverrideLock,
    add_routes,
)
from sidecar.settings import Settings
from sidecar.sources import Source, make_source
from sidecar.step_search import search_is_quick

log = logging.getLogger("heatcrop.app")


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
ENGINE = web.AppKey("engine", Engine)
CORE = web.AppKey("core", CropCore)
BATCHER = web.AppKey("batcher", Batcher)
CACHES = web.AppKey("caches", Caches)
SOURCE = web.AppKey("source", Source)
POOL = web.AppKey("pool", Executor)
SEARCH_POOL = web.AppKey("search_pool", Executor)
# Clean-up waits this long for background cache writes (each bounded by its own timeout).
WRITES_DRAIN_S = 2.0

Context = Callable[[web.Application], AsyncIterator[None]]


def make_app(settings: Settings) -> web.Application:
    """The sidecar app; its resources open on start-up and close on clean-up."""
    # Process-wide libvips policy (threads, no operation cache, untrusted loaders blocked): set
    # here rather than in serve() so that every app answers a given input the same way.
    configure_vips()
    app = web.Application()
    app[SETTINGS] = settings
    app[DIALECT] = make_dialect(settings.legacy)
    app[HEALTH] = Health()
    app[OVERRIDE_LOCK] = OverrideLock()
    contexts: tuple[Context, ...] = (
        _metrics_ctx,
        _engine_ctx,
        _core_ctx,
        _batcher_ctx,
        _caches_ctx,
        _source_ctx,
        _pool_ctx,
        _services_ctx,
        _gc_ctx,
    )
    app.cleanup_ctx.extend(contexts)
    add_routes(app)
    add_debug_routes(app)  # operators only: see sidecar.debug
    return app


async def _gc_ctx(app: web.Application) -> AsyncIterator[None]:
    # What start-up loaded (the model, numba, libvips, aiohttp: hundreds of thousands of objects)
    # lives as long as the process, yet every full collection walked all of it: 80-120 ms
    # pauses of the event loop, every few seconds under load, which were the overload p99.
    # Frozen objects are left out of collections (reference counting still frees them).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    app[METRICS] = Metrics()
    yield


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    # Loading and warming take seconds of CPU: off the loop, before any request is served.
    # From a lowered thread: the runtime's own threads, started now, inherit its priority.
    settings = app[SETTINGS]
    load = partial(_load_engine, settings, app[METRICS])
    engine = await asyncio.to_thread(
        run_lowered, load, settings.server.worker_nice, "heatcrop-load"
    )
    app[ENGINE] = engine
    try:
        yield
    finally:
        app[HEALTH].engine_warm = False
        engine.close()


def _load_engine(settings: Settings, metrics: Metrics) -> Engine:
    return with_faces(load_engine(settings.engine, warm=True), settings, metrics)


async def _core_ctx(app: web.Application) -> AsyncIterator[None]:
    core = CropCore.from_settings(app[SETTINGS], app[ENGINE])
    await asyncio.to_thread(core.warm)
    app[CORE] = core
    app[HEALTH].engine_warm = True
    yield


async def _batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[SETTINGS].server
    batcher = Batcher(
        app[ENGINE],
        max_batch=server.max_batch,
        max_wait_ms=server.max_wait_ms,
        max_queue=server.max_queue,
        metrics=app[METRICS],
        worker_nice=server.worker_nice,
        budget=service_budget(server.background_cpu_share, app[METRICS]),
        lanes=app[SETTINGS].engine.session_per_core,
    )
    await batcher.start()
    app[BATCHER] = batcher
    try:
        yield
    finally:
        await batcher.close()


async def _caches_ctx(app: web.Application) -> AsyncIterator[None]:
    caches = make_caches(app[SETTINGS].cache)
    app[CACHES] = caches
    try:
        yield
    finally:
        await caches.close()


async def _source_ctx(app: web.Application) -> AsyncIterator[None]:
    source = make_source(app[SETTINGS].source)
    app[SOURCE] = source
    try:
        yield
    finally:
        await source.close()


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[SETTINGS].server
    pool = lowered_pool(server.decode_threads, server.worker_nice, "heatcrop-decode")
    # Window searches (a fraction of a millisecond) get their own thread: in the decode pool a
    # heatmap-cache hit would queue behind decodes of originals that are not cached.
    search_pool = ThreadPoolExecutor(1, thread_name_prefix="heatcrop-search")
    app[POOL] = pool
    app[SEARCH_POOL] = search_pool
    try:
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        search_pool.shutdown(wait=True, cancel_futures=True)


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    svc = app[SERVICES] = Services(
        settings=settings,
        engine=app[ENGINE],
        core=app[CORE],
        batcher=app[BATCHER],
        caches=app[CACHES],
        source=app[SOURCE],
        decodes=DecodeAdmission(
            app[POOL], settings.server.decode_threads, settings.source, app[METRICS]
        ),
        search_pool=app[SEARCH_POOL],
        search_inline=search_is_quick(app[CORE]),
        metrics=app[METRICS],
    )
    yield
    await svc.cancel_cold()
    await svc.drain_writes(WRITES_DRAIN_S)


def serve(settings: Settings) -> None:
    """Run the sidecar on uvloop until interrupted."""
    import uvloop

    # libvips reports every operation at INFO level: noise at hundreds of requests a second.
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    server = settings.server
    http_server.run(make_app(settings), server.host, server.port, uvloop.new_event_loop())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.app", description=__doc__)
    parser.add_argument("--config", help="settings TOML (default: $HEATCROP_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = settings_mod.load(args.config)
    except settings_mod.SettingsError as exc:
        print(f"heatcrop: {exc}", file=sys.stderr)
        return 2
    try:
        serve(settings)
    except HeatcropError as exc:
        # Start-up refused on purpose (no usable model: ModelNotBuilt says which file and the
        # command that builds it); a traceback would only bury that one line.
        print(f"heatcrop: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
