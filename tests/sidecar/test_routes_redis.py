"""Two sidecars sharing one real redis-server: heatmaps and boxes travel, Redis down is survived."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from skimage import data as skdata

import sidecar.app
import sidecar.caches
from sidecar.app import make_app
from sidecar.caches import make_caches
from sidecar.job import CropJob
from sidecar.routes import SERVICES
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    SourceSettings,
)
from sidecar.sizes import parse_size
from tests.support.hostile_records import analysis_blob, box_blob
from tests.support.images import jpeg
from tests.support.redis_server import RedisServer
from tests.support.sidecar_metrics import scraped

ANSWERS = ("smart", "cached", "low-confidence")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    (root / "recipes").mkdir()
    (root / "recipes" / "coffee.jpg").write_bytes(jpeg(skdata.coffee()))
    (root / "twin.jpg").write_bytes((root / "recipes" / "coffee.jpg").read_bytes())
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


# -- hostile cache records (issue 21, item 8) ----------------------------------------------

TARGET = "recipes/coffee.jpg"
SIZE = "300x100"
COFFEE = skdata.coffee().shape[1::-1]  # (width, height)
# A hostile value's own size: a GET of it blew the read budget and opened the breaker.
HUGE = 50 * 1024 * 1024
# What Redis may send while one crop is answered: records are a few KB at most.
MAX_SENT = 1024 * 1024

# case: (which key, the value a hostile writer stores there; None: a list, not a string)
HOSTILE: dict[str, tuple[str, bytes | None]] = {
    "analysis with one channel": ("heatmap", analysis_blob(*COFFEE, channels=1)),
    "analysis claiming 1x1": ("heatmap", analysis_blob(1, 1)),
    "analysis claiming 10^6 x 10^6": ("heatmap", analysis_blob(10**6, 10**6)),
    "analysis with another grid": ("heatmap", analysis_blob(*COFFEE, grid=(7, 7))),
    "50 MB value": ("heatmap", b"HCAN\x02" + bytes(HUGE)),
    "a list": ("heatmap", None),
    "box (0,0,1,1)": ("box", box_blob((0, 0, 1, 1), TARGET)),
    "box (0,0,1e6,1e6)": ("box", box_blob((0, 0, 10**6, 10**6), TARGET)),
    "box of another path": ("box", box_blob((0, 0, 450, 150), "cat.jpg")),
    "box of another aspect": ("box", box_blob((100, 0, 500, 400), TARGET)),
}


async def _answer(client, size: str, path: str) -> tuple[str, str]:
    """(X-Heatcrop-Path, X-Heatcrop-Box) of a 200 redirect to the legacy server."""
    resp = await client.get(f"/crop/{size}/{path}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Accel-Redirect"].startswith("/@legacy")
    return resp.headers["X-Heatcrop-Path"], resp.headers.get("X-Heatcrop-Box", "")


async def _redis_keys(client, size: str, path: str) -> dict[str, str]:
    """The Redis keys the sidecar reads for this crop's heatmap and box."""
    svc = client.app[SERVICES]
    job = CropJob(path, parse_size(size), deadline=0.0)
    identity = (await svc.source.fetch(path)).identity
    job.set_identity(identity, svc.heat_version, svc.core.search_version)
    return {
        "heatmap": f"heatcrop:v1:heatmaps:{job.heat_key}",
        "box": f"heatcrop:v1:boxes:{job.box_key}",
    }


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_cache_record_is_dropped_once_and_the_crop_is_right(
    aiohttp_client, settings, redis_server, caplog, case
) -> None:
    client = await aiohttp_client(make_app(settings))
    # The right answer: the same photo under another name, on a cache with nothing hostile.
    want = await _answer(client, SIZE, "twin.jpg")
    assert want[0] in ("smart", "low-confidence")
    kind, value = HOSTILE[case]
    key = (await _redis_keys(client, SIZE, TARGET))[kind]
    redis = aioredis.Redis(port=redis_server.port)
    try:
        if value is None:
            await redis.rpush(key, b"not a record")
        else:
            await redis.set(key, value)
        sent = (await redis.info("stats"))["total_net_output_bytes"]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = await _answer(client, SIZE, TARGET)
        sent = (await redis.info("stats"))["total_net_output_bytes"] - sent
        assert got == want  # no 500, no fallback: the crop a clean cache gives
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert key.rsplit(":", 1)[-1] in warnings[0] and "Traceback" not in caplog.text
        assert sent < MAX_SENT  # a huge value is never read whole
        if value is None:
            assert await redis.type(key) in (b"none", b"string")  # dropped, maybe replaced
        else:
            assert await redis.get(key) != value  # dropped, maybe replaced
    finally:
        await redis.aclose()
    stats = client.app[SERVICES].caches.stats()
    for tier in ("heatmaps", "boxes"):
        assert (stats[tier]["l2_errors"], stats[tier]["l2_up"]) == (0, 1)  # breaker closed
