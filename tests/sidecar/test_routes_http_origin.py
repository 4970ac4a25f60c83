"""The sidecar against a real HTTP origin: good, missing, slow, huge, empty and hostile originals.

The origin is a real aiohttp server on 127.0.0.1; the sidecar fetches through its HttpSource,
so timeouts, body caps and ETags are exercised over a socket, not mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import pyvips
from aiohttp import web
from skimage import data as skdata

from sidecar.app import make_app
from sidecar.routes import SERVICES
from sidecar.settings import EngineSettings, ServerSettings, Settings, SourceSettings
from tests.support.images import jpeg
from tests.support.sidecar_metrics import scraped

MAX_BYTES = 2 * 1024 * 1024
# What huge.jpg would send: far more than the cap plus every socket buffer on the way.
HUGE_BYTES = 64 * MAX_BYTES
SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="600" height="400">'
    b'<rect width="600" height="400" fill="red"/></svg>\n'
)


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return jpeg(skdata.coffee())  # 600x400


@pytest.fixture(scope="module")
def bomb() -> bytes:
    # 900 million pixels in a few hundred KB: only the header may be read.
    return pyvips.Image.black(30000, 30000).pngsave_buffer(compression=9)


@dataclasses.dataclass
class Origin:
    """What the origin serves; the ETag may change during a test."""

    coffee: bytes
    bomb: bytes
    etag: str = '"v1"'
    slow_s: float = 5.0
    slow_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    huge_written: int = 0  # bytes of huge.jpg the origin got onto the socket
    huge_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def _origin_app(origin: Origin) -> web.Application:
    async def photo(request: web.Request) -> web.Response:
        return web.Response(
            body=origin.coffee, content_type="image/jpeg", headers={"ETag": origin.etag}
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(origin.slow_s)
        origin.slow_done.set()
        return web.Response(body=origin.coffee, content_type="image/jpeg")

    async def huge(request: web.Request) -> web.StreamResponse:
        # Chunked, so no Content-Length warns the client: only the running count can stop it.
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"\xff" * (256 * 1024)
        try:
            for _ in range(HUGE_BYTES // len(chunk)):
                await resp.write(chunk)
                origin.huge_written += len(chunk)
        except (ConnectionResetError, RuntimeError):
            pass  # the sidecar hung up once it had seen enough
        finally:
            origin.huge_done.set()
        return resp

    async def empty(request: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="image/jpeg")

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="this is not an image at all, only some words\n" * 20)

    async def truncated(request: web.Request) -> web.Response:
        return web.Response(
            body=origin.coffee[: len(origin.coffee) // 3], content_type="image/jpeg"
        )

    async def png_bomb(request: web.Request) -> web.Response:
        return web.Response(body=origin.bomb, content_type="image/png")

    async def svg(request: web.Request) -> web.Response:
        return web.Response(body=SVG, content_type="image/svg+xml")

    app = web.Application()
    app.router.add_get("/img/coffee.jpg", photo)
    app.router.add_get("/img/slow.jpg", slow)
    app.router.add_get("/img/huge.jpg", huge)
    app.router.add_get("/img/empty.jpg", empty)
    app.router.add_get("/img/notes.jpg", text)
    app.router.add_get("/img/truncated.jpg", truncated)
    app.router.add_get("/img/bomb.png", png_bomb)
    app.router.add_get("/img/drawing.svg", svg)
    return app


@pytest.fixture
def origin(coffee: bytes, bomb: bytes) -> Origin:
    return Origin(coffee, bomb)


def _settings(model_dir: Path, base_url: str, **source: object) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=dataclasses.replace(
            SourceSettings(kind="http", base_url=base_url, max_bytes=MAX_BYTES), **source
        ),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
    )


async def _sidecar(aiohttp_client, aiohttp_server, model_dir: Path, origin: Origin, **source):
    server = await aiohttp_server(_origin_app(origin), host="127.0.0.1")
    base_url = f"http://127.0.0.1:{server.port}/img/"
    return await aiohttp_client(make_app(_settings(model_dir, base_url, **source)))


@pytest.fixture
async def client(aiohttp_client, aiohttp_server, model_dir: Path, origin: Origin):
    return await _sidecar(aiohttp_client, aiohttp_server, model_dir, origin)


async def _get(client, target: str):
    resp = await client.get(target)
    assert resp.status != 500, await resp.text()
    return resp


def _assert_giveup(resp) -> None:
    assert resp.status == 200
    assert resp.headers["X-Heatcrop-Path"] == "giveup"
    assert resp.headers["X-Accel-Redirect"].startswith("/@legacy")
    assert "X-Heatcrop-Box" not in resp.headers


def _assert_fallback_or(resp, status: int) -> None:
    if resp.status == 200:
        _assert_giveup(resp)
    else:
        assert resp.status == status


async def _assert_smart_or_low_confidence(client, size: str = "300x100") -> None:
    resp = await _get(client, f"/crop/{size}/coffee.jpg")
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Heatcrop-Path"] in ("smart", "low-confidence", "cached")
    assert resp.headers["X-Accel-Redirect"].startswith("/@legacy")
    x0, y0, x1, y1 = (int(v) for v in resp.headers["X-Heatcrop-Box"].split(","))
    assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 400


async def test_good_jpeg_from_the_origin_gets_a_box(client) -> None:
    resp = await _get(client, "/crop/300x100/coffee.jpg")
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Heatcrop-Path"] in ("smart", "low-confidence")
    await _assert_smart_or_low_confidence(client)
    assert await scraped(client, "heatcrop_nn_runs_total") == 1


async def test_origin_404_is_a_404(client) -> None:
    resp = await _get(client, "/crop/300x100/missing.jpg")
    assert resp.status == 404


async def test_slow_origin_times_out_into_the_legacy_crop(
    aiohttp_client, aiohttp_server, model_dir: Path, origin: Origin
) -> None:
    client = await _sidecar(aiohttp_client, aiohttp_server, model_dir, origin, read_timeout_ms=200)
    resp = await _get(client, "/crop/300x100/slow.jpg")
    _assert_giveup(resp)
    # The read timeout ended it, not the origin (which would have answered a good JPEG) nor the
    # 10 s deadline (a timely give-up, counted as giveup rather than error).
    assert not origin.slow_done.is_set()
    assert await scraped(client, "heatcrop_requests_total", outcome="error") == 1
    assert await scraped(client, "heatcrop_requests_total", outcome="giveup") == 0


async def test_body_over_the_cap_without_content_length_is_refused(client, origin) -> None:
    resp = await _get(client, "/crop/300x100/huge.jpg")
    # The legacy server has the same byte limit: a clear 413, not a fallback it would refuse.
    assert resp.status == 413 and await resp.text() == "source too large"
    # The running count stopped the read: the origin could not send the rest of its 128 MB
    # (what it got onto the socket is the cap plus the socket buffers at most).
    await asyncio.wait_for(origin.huge_done.wait(), 10)
    assert origin.huge_written < HUGE_BYTES // 2
    await _assert_smart_or_low_confidence(client)


@pytest.mark.parametrize("name", ["empty.jpg", "notes.jpg"])
async def test_empty_or_text_body_is_not_an_image(client, name: str) -> None:
    resp = await _get(client, f"/crop/300x100/{name}")
    assert resp.status == 415


async def test_truncated_jpeg_falls_back_or_is_damaged(client) -> None:
    resp = await _get(client, "/crop/300x100/truncated.jpg")
    _assert_fallback_or(resp, 422)


async def test_png_bomb_is_refused_and_the_sidecar_keeps_answering(client) -> None:
    resp = await _get(client, "/crop/300x100/bomb.png")
    # One pixel limit for the sidecar and the legacy server: a 413 that says why.
    assert resp.status == 413 and await resp.text() == "source has too many pixels"
    assert await scraped(client, "heatcrop_nn_runs_total") == 0
    await _assert_smart_or_low_confidence(client)


async def test_svg_is_refused(client) -> None:
    # make_app blocks libvips' untrusted loaders (svgload among them in 8.18): no loader
    # recognises the SVG, so it is NotAnImage, a 415, whichever way the app was started.
    resp = await _get(client, "/crop/300x100/drawing.svg")
    assert resp.status == 415


async def test_changed_etag_gets_a_new_heatmap_after_the_memo_expires(
    client, origin: Origin
) -> None:
    client.app[SERVICES].identities.ttl_s = 0.0
    await _assert_smart_or_low_confidence(client)
    await _assert_smart_or_low_confidence(client)
    # Same ETag: the fetch happens again, but the heatmap is reused.
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    origin.etag = '"v2"'
    await _assert_smart_or_low_confidence(client)
    assert await scraped(client, "heatcrop_nn_runs_total") == 2
