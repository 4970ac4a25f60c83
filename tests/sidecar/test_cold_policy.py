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


async def _metric(client, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{inner}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


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
    assert await _metric(client, "heatcrop_requests_total", outcome="cold") == 1

    async def cached() -> bool:
        return await _heatmap_cached(client, "one.jpg")

    await _until(cached)
    assert await _metric(client, "heatcrop_cold_heatmaps_total", result="queued") == 1
    # Another size of the same original: a heatmap-cache hit, the CNN ran once. 3:1 is an
    # aspect where the cup clearly beats the centre crop.
    resp = await _get(client, "300x100", "one.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert "X-Heatcrop-Box" in resp.headers
    assert await _metric(client, "heatcrop_nn_runs_total") == 1
    assert await _metric(client, "heatcrop_requests_total", outcome="error") == 0


async def test_concurrent_first_sights_start_one_background_heatmap(client) -> None:
    sizes = ("400x300", "300x300", "640x360", "240x320", "160x90")
    answers = await asyncio.gather(*(_get(client, s, "two.jpg") for s in sizes))
    # Those that shared the first one's read (single-flight) are cold with it; one that came
    # after the heatmap landed may already be smart.
    assert answers[0].headers["X-Heatcrop-Path"] == "cold"
    assert {r.headers["X-Heatcrop-Path"] for r in answers} <= {"cold", "smart", "low-confidence"}

    async def cached() -> bool:
        return await _heatmap_cached(client, "two.jpg")

    await _until(cached)
    assert await _metric(client, "heatcrop_nn_runs_total") == 1
    assert await _metric(client, "heatcrop_cold_heatmaps_total", result="queued") == 1
    assert await _metric(client, "heatcrop_cold_heatmaps_total", result="refused") == 0


async def test_a_full_background_queue_still_answers_the_legacy_crop(client) -> None:
    svc = client.app[SERVICES]
    async with busy_engine(svc):
        decodes = await _metric(client, "heatcrop_stage_seconds_count", stage="decode")
        resp = await _get(client, "400x300", "three.jpg")
        assert _is_legacy_answer(resp, "three.jpg", Size(400, 300))
        assert await _metric(client, "heatcrop_cold_heatmaps_total", result="refused") == 1
        # Nothing was decoded for a heatmap the batcher could not take.
        assert await _metric(client, "heatcrop_stage_seconds_count", stage="decode") == decodes
    assert not svc.cold and "three.jpg" not in svc.flights
    assert not await _heatmap_cached(client, "three.jpg")
    # With room again, the next request queues it, and the one after is smart.
    resp = await _get(client, "400x300", "three.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "cold"

    async def cached() -> bool:
        return await _heatmap_cached(client, "three.jpg")

    await _until(cached)
    assert (await _get(client, "300x100", "three.jpg")).headers["X-Heatcrop-Path"] == "smart"
    assert await _metric(client, "heatcrop_requests_total", outcome="error") == 0
    assert await _metric(client, "heatcrop_requests_total", outcome="giveup") == 0


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


async def test_originals_the_legacy_server_would_refuse_are_answered_as_under_wait(
    aiohttp_client, model_dir: Path, photos: Path
) -> None:
    # The header is checked before the legacy answer: a 413 or 415 with the sidecar's words,
    # not a legacy crop the legacy server would refuse with an empty body.
    client = await aiohttp_client(make_app(_settings(model_dir, photos, max_pixels=10_000)))
    resp = await client.get("/crop/400x300/four.jpg")
    assert (resp.status, await resp.text()) == (413, "source has too many pixels")
    resp = await client.get("/crop/400x300/notes.jpg")
    assert (resp.status, await resp.text()) == (415, "source is not an image")
    assert await _metric(client, "heatcrop_cold_heatmaps_total", result="queued") == 0


async def test_a_damaged_original_answers_the_legacy_crop_and_counts_the_failed_decode(
    client,
) -> None:
    resp = await _get(client, "400x300", "truncated.jpg")
    assert _is_legacy_answer(resp, "truncated.jpg", Size(400, 300))

    async def failed() -> bool:
        return await _metric(client, "heatcrop_cold_heatmaps_total", result="failed") == 1

    await _until(failed)
    assert await _metric(client, "heatcrop_nn_runs_total") == 0


async def test_wait_is_the_default_and_a_first_sight_is_smart_there(
    aiohttp_client, model_dir: Path, photos: Path
) -> None:
    assert ServerSettings().cold_policy == "wait"
    client = await aiohttp_client(make_app(_settings(model_dir, photos, policy="wait")))
    resp = await _get(client, "300x100", "four.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert await _metric(client, "heatcrop_requests_total", outcome="cold") == 0


def test_the_policy_is_read_from_the_environment_and_checked() -> None:
    env = {"HEATCROP_SERVER_COLD_POLICY": "legacy"}
    assert load(environ=env).server.cold_policy == "legacy"
    with pytest.raises(SettingsError, match="HEATCROP_SERVER_COLD_POLICY='later'"):
        load(environ={"HEATCROP_SERVER_COLD_POLICY": "later"})
