"""server.cold_policy = "legacy": a first sight answers the legacy crop at once and finishes its
heatmap in the background. The real sidecar app through aiohttp's test server, the real model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from sidecar.app import make_app
from sidecar.caches import heatmap_key
from sidecar.legacy import Thumbor
from sidecar.routes import SERVICES
from sidecar.settings import (
    EngineSettings,
    ServerSettings,
    Settings,
    SettingsError,
    SourceSettings,
    load,
)
from sidecar.sizes import Size
from tests.support.images import jpeg
from tests.support.sidecar_metrics import scraped


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    coffee = jpeg(skdata.coffee())  # 600x400
    for name in ("one", "two", "three", "four"):
        (root / f"{name}.jpg").write_bytes(coffee)
    (root / "notes.jpg").write_bytes(b"this is not an image at all, only some words\n" * 20)
    (root / "truncated.jpg").write_bytes(coffee[: len(coffee) // 3])
    return root


def _settings(model_dir: Path, photos: Path, policy: str = "legacy", **source: object) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000, cold_policy=policy),
        source=dataclasses.replace(SourceSettings(root=str(photos)), **source),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
    )


@pytest.fixture
async def client(aiohttp_client, model_dir: Path, photos: Path):
    return await aiohttp_client(make_app(_settings(model_dir, photos)))


async def _get(client, size: str, path: str):
    resp = await client.get(f"/crop/{size}/{path}")
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b""
    return resp


async def _until(condition, polls: int = 2000) -> None:
    for _ in range(polls):
        if await condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def _heatmap_cached(client, path: str) -> bool:
    svc = client.app[SERVICES]
    original = await svc.source.fetch(path)
    key = heatmap_key(original.identity, svc.engine.version)
    return await svc.caches.get_analysis(key) is not None


def _is_legacy_answer(resp, path: str, size: Size) -> bool:
    return (
        resp.headers["X-Heatcrop-Path"] == "cold"
        and "X-Heatcrop-Box" not in resp.headers
        # The same plain URL every fallback names: the legacy server marks it max-age 30 s.
        and resp.headers["X-Accel-Redirect"] == "/@legacy" + Thumbor().plain_url(path, size)
    )


async def test_first_sight_is_the_legacy_crop_and_the_next_request_is_smart(client) -> None:
    resp = await _get(client, "400x300", "one.jpg")
    assert _is_legacy_answer(resp, "one.jpg", Size(400, 300))
    assert "max_age(30)" in resp.headers["X-Accel-Redirect"]
    assert await scraped(client, "heatcrop_requests_total", outcome="cold") == 1
    assert await scraped(client, "heatcrop_cold_total", result="queued") == 1
    # Never seen, memory caches: nothing can be cached, so the request read nothing.
    assert await scraped(client, "heatcrop_stage_seconds_count", stage="fetch") == 0

    async def cached() -> bool:
        return await _heatmap_cached(client, "one.jpg")

    await _until(cached)
    # Another size of the same original: a heatmap-cache hit, the CNN ran once. 3:1 is an
    # aspect where the cup clearly beats the centre crop.
    resp = await _get(client, "300x100", "one.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert "X-Heatcrop-Box" in resp.headers
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    assert await scraped(client, "heatcrop_cold_heatmaps_total", result="computed") == 1
    assert await scraped(client, "heatcrop_requests_total", outcome="error") == 0


async def test_concurrent_first_sights_make_one_background_heatmap(client) -> None:
    sizes = ("400x300", "300x300", "640x360", "240x320", "160x90")
    answers = await asyncio.gather(*(_get(client, s, "two.jpg") for s in sizes))
    assert [r.headers["X-Heatcrop-Path"] for r in answers] == ["cold"] * 5

    async def cached() -> bool:
        return await _heatmap_cached(client, "two.jpg")

    await _until(cached)
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    assert await scraped(client, "heatcrop_cold_total", result="queued") == 1
    assert await scraped(client, "heatcrop_cold_total", result="already") == 4


async def test_a_seen_original_whose_identity_expired_is_read_and_found(client) -> None:
    # The identity is trusted 30 s; past that, a request must not answer cold for a heatmap
    # that is in the cache all along: it reads the original to learn its key.
    await _get(client, "400x300", "three.jpg")

    async def cached() -> bool:
        return await _heatmap_cached(client, "three.jpg")

    await _until(cached)
    svc = client.app[SERVICES]
    svc.identities.ttl_s = 0.0
    svc.identities.put("three.jpg", "stale-on-purpose", 0.0)  # expired at once, still seen
    resp = await _get(client, "300x100", "three.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert await scraped(client, "heatcrop_stage_seconds_count", stage="fetch") == 1
    assert await scraped(client, "heatcrop_requests_total", outcome="cold") == 1


class _GatedSource:
    """The real folder source, each read held until ``gate`` is set: the background queue then
    holds its paths for as long as the test needs (a source, not the engine)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = asyncio.Event()

    async def fetch(self, path: str, budget_s: float | None = None):
        await self.gate.wait()
        return await self.inner.fetch(path, budget_s)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_full_background_queue_still_answers_the_legacy_crop(
    aiohttp_client, model_dir: Path, photos: Path
) -> None:
    settings = _settings(model_dir, photos)
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, max_batch=1)
    )
    client = await aiohttp_client(make_app(settings))
    svc = client.app[SERVICES]
    gated = svc.source = _GatedSource(svc.source)
    assert svc.batcher.max_background == 1  # the queue holds as many paths as that
    first = await _get(client, "400x300", "one.jpg")
    second = await _get(client, "400x300", "two.jpg")
    assert _is_legacy_answer(first, "one.jpg", Size(400, 300))
    assert _is_legacy_answer(second, "two.jpg", Size(400, 300))
    assert await scraped(client, "heatcrop_cold_total", result="refused") == 1
    assert list(svc.cold) == ["one.jpg"]
    gated.gate.set()

    async def cached() -> bool:
        return await _heatmap_cached(client, "one.jpg")

    await _until(cached)
    assert not await _heatmap_cached(client, "two.jpg")
    # With room again, the next request queues it, and the one after is smart.
    assert (await _get(client, "300x300", "two.jpg")).headers["X-Heatcrop-Path"] == "cold"

    async def cached_two() -> bool:
        return await _heatmap_cached(client, "two.jpg")

    await _until(cached_two)
    assert (await _get(client, "300x100", "two.jpg")).headers["X-Heatcrop-Path"] == "smart"
    assert await scraped(client, "heatcrop_requests_total", outcome="error") == 0
    assert await scraped(client, "heatcrop_requests_total", outcome="giveup") == 0


async def test_a_busy_engine_drops_the_background_heatmap_without_decoding(client) -> None:
    svc = client.app[SERVICES]
    async with busy_engine(svc):
        decodes = await scraped(client, "heatcrop_stage_seconds_count", stage="decode")
        resp = await _get(client, "400x300", "four.jpg")
        assert _is_legacy_answer(resp, "four.jpg", Size(400, 300))

        async def dropped() -> bool:
            return await scraped(client, "heatcrop_cold_heatmaps_total", result="dropped") == 1

        await _until(dropped)
        # Nothing was decoded for a heatmap the batcher could not take.
        assert await scraped(client, "heatcrop_stage_seconds_count", stage="decode") == decodes
    assert not svc.cold and not await _heatmap_cached(client, "four.jpg")


@contextlib.asynccontextmanager
async def busy_engine(svc) -> AsyncIterator[None]:
    """The batcher holding seconds of queued foreground work (cancelled on the way out, so mostly
    never run): it takes no background image meanwhile."""
    shape = max(svc.engine.input_shapes, key=lambda s: s[0] * s[1])
    filler = np.zeros((*shape, 3), np.uint8)
    far = asyncio.get_running_loop().time() + 3600
    backlog = [asyncio.create_task(svc.batcher.infer(filler, far)) for _ in range(200)]
    try:
        for _ in range(1000):
            if svc.batcher.depth >= 100:
                break
            await asyncio.sleep(0.001)
        assert not svc.batcher.takes_background()
        yield
    finally:
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)


async def test_originals_over_the_limits_get_the_legacy_answer_and_are_not_decoded(
    aiohttp_client, model_dir: Path, photos: Path
) -> None:
    # The legacy server has the same limits and refuses them itself (nginx/limits.py).
    client = await aiohttp_client(make_app(_settings(model_dir, photos, max_pixels=10_000)))
    for path in ("four.jpg", "notes.jpg", "truncated.jpg"):
        resp = await _get(client, "400x300", path)
        assert _is_legacy_answer(resp, path, Size(400, 300))

    async def failed() -> bool:
        return await scraped(client, "heatcrop_cold_heatmaps_total", result="failed") == 3

    await _until(failed)
    assert await scraped(client, "heatcrop_nn_runs_total") == 0


async def test_wait_is_the_default_and_a_first_sight_is_smart_there(
    aiohttp_client, model_dir: Path, photos: Path
) -> None:
    assert ServerSettings().cold_policy == "wait"
    client = await aiohttp_client(make_app(_settings(model_dir, photos, policy="wait")))
    resp = await _get(client, "300x100", "four.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert await scraped(client, "heatcrop_requests_total", outcome="cold") == 0


def test_the_policy_is_read_from_the_environment_and_checked() -> None:
    env = {"HEATCROP_SERVER_COLD_POLICY": "legacy"}
    assert load(environ=env).server.cold_policy == "legacy"
    with pytest.raises(SettingsError, match="HEATCROP_SERVER_COLD_POLICY='later'"):
        load(environ={"HEATCROP_SERVER_COLD_POLICY": "later"})
