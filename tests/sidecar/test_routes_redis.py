"""Two sidecars sharing one real redis-server: heatmaps and boxes travel, Redis down is survived."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import pytest
from skimage import data as skdata

import sidecar.app
import sidecar.caches
from sidecar.app import make_app
from sidecar.caches import make_caches
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    SourceSettings,
)
from tests.support.images import jpeg
from tests.support.redis_server import RedisServer
from tests.support.sidecar_metrics import scraped

ANSWERS = ("smart", "cached", "low-confidence")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    (root / "recipes").mkdir()
    (root / "recipes" / "coffee.jpg").write_bytes(jpeg(skdata.coffee()))
    (root / "cat.jpg").write_bytes(jpeg(skdata.chelsea()))
    (root / "rocket.jpg").write_bytes(jpeg(skdata.rocket()))
    return root


@pytest.fixture(autouse=True)
def patient_app_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    # The service's 50 ms Redis budget could trip its breaker on a busy 2-core test machine,
    # and a skipped Redis read would look like a missing heatmap here. A stopped Redis still
    # fails at once (connection refused), so the outage tests lose nothing.
    monkeypatch.setattr(sidecar.app, "make_caches", partial(make_caches, l2_timeout_s=2.0))


@pytest.fixture
def settings(model_dir: Path, photos: Path, redis_server: RedisServer) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=SourceSettings(root=str(photos)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=CacheSettings(backend="redis", redis_url=redis_server.url),
    )


async def _crop(client, size: str, path: str) -> str:
    """The answer's X-Heatcrop-Path; it must be a 200 redirect to the legacy server."""
    resp = await client.get(f"/crop/{size}/{path}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Accel-Redirect"].startswith("/@legacy")
    return resp.headers["X-Heatcrop-Path"]


async def test_a_heatmap_computed_by_one_sidecar_serves_the_other(aiohttp_client, settings) -> None:
    first = await aiohttp_client(make_app(settings))
    second = await aiohttp_client(make_app(settings))

    assert await _crop(first, "300x100", "recipes/coffee.jpg") in ("smart", "low-confidence")
    assert await scraped(first, "heatcrop_nn_runs_total") == 1

    # Same aspect: the box itself comes from Redis.
    assert await _crop(second, "600x200", "recipes/coffee.jpg") in ("cached", "low-confidence")
    # Another aspect: a new box, searched on the heatmap from Redis.
    assert await _crop(second, "100x100", "recipes/coffee.jpg") in ("smart", "low-confidence")
    assert await scraped(second, "heatcrop_nn_runs_total") == 0
    hits = await scraped(second, "heatcrop_cache_requests_total", cache="heatmap", result="hit")
    assert hits >= 1


async def test_redis_going_down_mid_test_never_breaks_crop(
    aiohttp_client, settings, redis_server, caplog
) -> None:
    first = await aiohttp_client(make_app(settings))
    assert await _crop(first, "300x100", "recipes/coffee.jpg") in ANSWERS

    redis_server.kill()  # a crash: pooled connections are left dangling
    with caplog.at_level(logging.WARNING):
        # A sidecar whose Redis connections were open, on an original it has not seen...
        assert await _crop(first, "300x100", "cat.jpg") in ANSWERS
        # ...and on one it has (its memory tier still answers).
        assert await _crop(first, "100x100", "recipes/coffee.jpg") in ANSWERS
        # A sidecar starting while Redis is down.
        second = await aiohttp_client(make_app(settings))
        for path in ("rocket.jpg", "recipes/coffee.jpg"):
            assert await _crop(second, "300x100", path) in ANSWERS
    assert await scraped(second, "heatcrop_nn_runs_total") == 2
    assert "redis failed" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_override_that_redis_cannot_take_is_refused_not_half_stored(
    aiohttp_client, settings, redis_server, monkeypatch
) -> None:
    # The local copy of an override lives 2 s in a shared deployment; a slow first crop on a
    # busy machine must not let it expire mid-test.
    monkeypatch.setattr(sidecar.caches, "OVERRIDE_L1_TTL_S", 60.0)
    shared = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, override_token="t")
    )
    client = await aiohttp_client(make_app(shared))
    auth = {"Authorization": "Bearer t"}
    box = {"box": [0, 0, 50, 50]}
    put = await client.put("/override/cat.jpg", json=box, headers=auth)
    assert put.status == 200 and (await put.json())["version"] == 1
    assert await _crop(client, "100x300", "cat.jpg") == "override"

    redis_server.kill()
    moved = await client.put("/override/cat.jpg", json={"box": [400, 250, 440, 290]}, headers=auth)
    assert moved.status == 503
    assert (await client.delete("/override/cat.jpg", headers=auth)).status == 503
    # Nothing changed here either: this sidecar still applies the override it had.
    resp = await client.get("/crop/100x300/cat.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "override"
    x0, _, x1, _ = (int(v) for v in resp.headers["X-Heatcrop-Box"].split(","))
    assert x0 == 0 and x1 >= 50
