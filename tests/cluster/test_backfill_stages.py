"""The backfill's two stages without Ray, as Ray Data calls them, on an HTTP origin (the
listing's paths fetched from it) and a real redis-server; then a sidecar on the same origin."""

from __future__ import annotations

import asyncio
import json
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import redis
from aiohttp import web
from skimage import data as skdata

import sidecar.app
from sidecar.app import make_app
from sidecar.backfill import Analyse, Backfill, Prepare, service_version
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


def _folder_settings(model_dir: Path, root: Path, count: int, url: str) -> Settings:
    """``count`` originals of one size (one shape bucket) under ``root``: 0.jpg, 1.jpg ..."""
    root.mkdir()
    for i in range(count):
        (root / f"{i}.jpg").write_bytes(jpeg(skdata.coffee()))
    return Settings(
        source=SourceSettings(root=str(root)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=CacheSettings(backend="redis", redis_url=url),
    ).validate()


def _counts(backfill: Backfill, *paths: str) -> dict[str, int]:
    """One listing row through the actor's callable, as Ray Data calls it."""
    row = np.empty(1, dtype=object)
    row[0] = list(paths)
    return dict(json.loads(str(backfill({"paths": row})["counts"][0])))


def test_a_worker_keeps_its_redis_connections_and_read_threads_from_batch_to_batch(
    model_dir, redis_server, tmp_path
) -> None:
    settings = _folder_settings(model_dir, tmp_path / "originals", 6, redis_server.url)
    backfill = Backfill(settings, service_version(settings))
    server = redis.Redis(port=redis_server.port)
    opened, readers = [], []
    try:
        for batch in (("0.jpg", "1.jpg"), ("2.jpg", "3.jpg"), ("4.jpg", "5.jpg")):
            assert _counts(backfill, *batch) == {"done": 2}
            opened.append(server.info("stats")["total_connections_received"])
            names = threading.enumerate()
            readers.append({t.ident for t in names if t.name.startswith("heatcrop-read")})
    finally:
        backfill.close()
        server.close()
    # Made per batch, the source's read threads ended with each batch and each batch's
    # lookup opened a new connection to Redis.
    assert opened[1:] == [opened[0]] * 2, opened
    assert readers[0] and readers[1:] == [readers[0]] * 2


def test_a_heatmap_the_shared_tier_refused_is_not_skipped_when_listed_again(
    model_dir, redis_server, tmp_path
) -> None:
    settings = _folder_settings(model_dir, tmp_path / "originals", 1, redis_server.url)
    server = redis.Redis(port=redis_server.port)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)  # every write refused (OOM), reads answered
    backfill = Backfill(settings, service_version(settings))
    try:
        assert _counts(backfill, "0.jpg") == {"CacheWriteFailed": 1}
        # The worker's memory tier took it; its lookups must not count that as stored.
        again = _counts(backfill, "0.jpg")
    finally:
        backfill.close()
        server.close()
    assert set(again) <= {"CacheWriteFailed", "CacheUnavailable"}, again
