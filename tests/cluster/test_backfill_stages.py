"""The backfill's two stages without Ray, as Ray Data calls them, on an HTTP origin (the
listing's paths fetched from it) and a real redis-server; then a sidecar on the same origin."""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
import pytest
from aiohttp import web
from skimage import data as skdata

import sidecar.app
from sidecar.app import make_app
from sidecar.backfill import Analyse, Prepare, service_version
from sidecar.caches import make_caches
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    SourceSettings,
)
from tests.support.images import jpeg
from tests.support.sidecar_metrics import scraped

PHOTOS = {"a.jpg": skdata.coffee(), "b.jpg": skdata.chelsea()}
ORDER = ("a.jpg", "b.jpg", "gone.jpg", "../up.jpg")


def _outcomes(batch: dict[str, np.ndarray]) -> list[str]:
    """The outcomes in ORDER (a stage returns its rows in its own order)."""
    by_path = dict(zip(batch["path"], batch["outcome"], strict=True))
    return [by_path[p] for p in ORDER if p in by_path]


@pytest.fixture
async def origin(aiohttp_server):
    bodies = {name: jpeg(pixels) for name, pixels in PHOTOS.items()}

    async def photo(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in bodies:
            raise web.HTTPNotFound()
        headers = {"ETag": f'"{name}-1"'}
        return web.Response(body=bodies[name], content_type="image/jpeg", headers=headers)

    app = web.Application()
    app.router.add_get("/images/{name}", photo)
    return await aiohttp_server(app)


async def test_an_http_origin_backfilled_stage_by_stage_is_served_without_the_cnn(
    aiohttp_client, origin, model_dir, redis_server, monkeypatch
) -> None:
    monkeypatch.setattr(sidecar.app, "make_caches", partial(make_caches, l2_timeout_s=2.0))
    settings = Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=SourceSettings(kind="http", base_url=f"http://127.0.0.1:{origin.port}/images/"),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=CacheSettings(backend="redis", redis_url=redis_server.url),
    ).validate()
    version = await asyncio.to_thread(service_version, settings)
    batch = {"path": np.array(ORDER, dtype=object)}

    # Prepare opens its own event loop, as in a Ray task: a thread of its own here.
    prepared = await asyncio.to_thread(Prepare(settings, version), batch)
    assert _outcomes(prepared) == ["todo", "todo", "SourceNotFound", "BadPath"]
    analyse = await asyncio.to_thread(Analyse, settings, version)
    try:
        out = await asyncio.to_thread(analyse, prepared)
    finally:
        await asyncio.to_thread(analyse.close)
    assert _outcomes(out) == ["done", "done", "SourceNotFound", "BadPath"]
    assert out["cpu_s"].sum() > 0

    again = await asyncio.to_thread(Prepare(settings, version), batch)
    assert _outcomes(again) == ["skipped", "skipped", "SourceNotFound", "BadPath"]

    client = await aiohttp_client(make_app(settings))
    for name in PHOTOS:
        resp = await client.get(f"/crop/400x300/{name}")
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert await scraped(client, "heatcrop_nn_runs_total") == 0


async def test_with_the_shared_cache_down_nothing_is_computed(
    origin, model_dir, redis_server
) -> None:
    settings = Settings(
        source=SourceSettings(kind="http", base_url=f"http://127.0.0.1:{origin.port}/images/"),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=CacheSettings(backend="redis", redis_url=redis_server.url),
    ).validate()
    redis_server.stop()
    batch = {"path": np.array(["a.jpg", "gone.jpg"], dtype=object)}
    prepared = await asyncio.to_thread(Prepare(settings, "some-version"), batch)
    assert _outcomes(prepared) == ["CacheUnavailable", "SourceNotFound"]
