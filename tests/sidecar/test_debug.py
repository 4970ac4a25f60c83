"""The operators' debug endpoints through the real app: real model, real JPEGs, and the gallery
page rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pyvips
from aiohttp import web
from skimage import data as skdata

from kernels.window import center_box
from sidecar.app import make_app
from sidecar.debug import gallery_sizes, gallery_urls, report_of
from sidecar.settings import EngineSettings, ServerSettings, Settings, SourceSettings
from tests.support.images import jpeg

CHROMIUM = "/usr/bin/chromium"
ODD_NAME = 'a<b"c&d.jpg'


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    coffee = jpeg(skdata.coffee())  # 600x400
    (root / "recipes").mkdir()
    (root / "recipes" / "coffee.jpg").write_bytes(coffee)
    (root / "plats du jour").mkdir()
    (root / "plats du jour" / "crème brûlée.jpg").write_bytes(coffee)
    (root / ODD_NAME).write_bytes(coffee)
    (root / "notes.jpg").write_bytes(b"this is not an image at all, only some words\n" * 20)
    return root


def _settings(model_dir: Path, photos: Path, **server: object) -> Settings:
    return Settings(
        server=dataclasses.replace(ServerSettings(deadline_ms=10_000), **server),
        source=SourceSettings(root=str(photos)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
    )


@pytest.fixture
async def client(aiohttp_client, model_dir: Path, photos: Path):
    return await aiohttp_client(make_app(_settings(model_dir, photos)))


def _box(resp) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in resp.headers["X-Heatcrop-Box"].split(","))
    return x0, y0, x1, y1


# -- overlay --------------------------------------------------------------------------------


async def test_overlay_is_a_png_of_the_original_with_timings(client) -> None:
    resp = await client.get("/debug/300x100/recipes/coffee.jpg")
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "image/png"
    image = pyvips.Image.new_from_buffer(await resp.read(), "")
    assert image.get("vips-loader") == "pngload_buffer"
    assert abs(image.width / image.height - 600 / 400) < 0.01
    assert image.bands == 3
    timings = dict(p.split("=") for p in resp.headers["X-Heatcrop-Timings"].split(";"))
    assert set(timings) == {"decode", "infer", "search"}
    # The first look at this original decoded and ran the model.
    assert all(re.fullmatch(r"\d+\.\dms", v) for v in timings.values()), timings
    again = await client.get("/debug/300x100/recipes/coffee.jpg")
    timings = dict(p.split("=") for p in again.headers["X-Heatcrop-Timings"].split(";"))
    assert timings == {"decode": "cached", "infer": "cached", "search": "cached"}
    assert _box(again) == _box(resp)


async def test_overlay_draws_the_chosen_box_in_green(client) -> None:
    resp = await client.get("/debug/300x100/recipes/coffee.jpg")
    image = pyvips.Image.new_from_buffer(await resp.read(), "").numpy()
    x0, y0, x1, _ = _box(resp)
    scale = image.shape[1] / 600
    # Middle of the chosen box's top edge, inside the 3-pixel frame.
    row = image[round(y0 * scale) + 1, round((x0 + x1) / 2 * scale)]
    assert tuple(int(v) for v in row) == (40, 230, 60)


async def test_overlay_and_crop_share_the_heatmap(client) -> None:
    await client.get("/debug/300x100/recipes/coffee.jpg")
    crop = await client.get("/crop/300x100/recipes/coffee.jpg")
    assert crop.headers["X-Heatcrop-Path"] == "cached"
    text = await (await client.get("/metrics")).text()
    assert re.search(r"^heatcrop_nn_runs_total 0(\.0)?$", text, re.M), "debug used the batcher"


# -- cropped --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["heatcrop", "centre", "attention"])
async def test_cropped_jpeg_has_exactly_the_size(client, method: str) -> None:
    resp = await client.get(f"/debug/cropped/300x533/recipes/coffee.jpg?method={method}")
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "image/jpeg"
    assert resp.headers["X-Heatcrop-Method"] == method
    image = pyvips.Image.new_from_buffer(await resp.read(), "")
    assert image.get("vips-loader") == "jpegload_buffer"
    assert (image.width, image.height) == (300, 533)
    x0, y0, x1, y1 = _box(resp)
    assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 400
    assert abs((x1 - x0) * 533 - (y1 - y0) * 300) <= 533


@pytest.mark.parametrize("size", ["300x100", "400x400", "100x300"])
async def test_each_method_crops_its_own_box(client, size: str) -> None:
    path = "recipes/coffee.jpg"
    crop = await client.get(f"/crop/{size}/{path}")
    heat = await client.get(f"/debug/cropped/{size}/{path}?method=heatcrop")
    centre = await client.get(f"/debug/cropped/{size}/{path}?method=centre")
    attention = await client.get(f"/debug/cropped/{size}/{path}?method=attention")
    assert _box(heat) == _box(crop)
    w, h = (int(v) for v in size.split("x"))
    assert _box(centre) == center_box(600, 400, w / h).as_tuple()
    # The attention box is libvips' own choice: the largest window of that aspect, somewhere.
    ax0, ay0, ax1, ay1 = _box(attention)
    cx0, cy0, cx1, cy1 = _box(centre)
    assert (ax1 - ax0, ay1 - ay0) == (cx1 - cx0, cy1 - cy0)


async def test_heatcrop_crop_shows_the_box_pixels(client) -> None:
    resp = await client.get("/debug/cropped/300x100/recipes/coffee.jpg?method=heatcrop")
    got = pyvips.Image.new_from_buffer(await resp.read(), "").numpy().astype(np.float32)
    x0, y0, x1, y1 = _box(resp)
    want = pyvips.Image.new_from_array(skdata.coffee()).crop(x0, y0, x1 - x0, y1 - y0)
    want = want.thumbnail_image(300, height=100, size="force").numpy().astype(np.float32)
    assert np.abs(got - want).mean() < 6


# -- gallery --------------------------------------------------------------------------------


async def test_gallery_links_every_method_and_the_overlay_at_every_aspect(client) -> None:
    resp = await client.get("/debug/gallery", params={"src": "recipes/coffee.jpg"})
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    sizes = [str(s) for s in gallery_sizes()]
    assert sizes == ["300x300", "300x375", "300x169", "300x533", "300x200"]
    for size in sizes:
        for method in ("heatcrop", "centre", "attention"):
            assert f'src="/debug/cropped/{size}/recipes/coffee.jpg?method={method}"' in page
        assert f'src="/debug/{size}/recipes/coffee.jpg"' in page
    assert page.count("<img ") == 20


async def test_gallery_escapes_the_path(client) -> None:
    resp = await client.get("/debug/gallery", params={"src": ODD_NAME})
    assert resp.status == 200
    page = await resp.text()
    assert ODD_NAME not in page
    assert "a<b" not in page and 'b"c' not in page
    assert "a&lt;b&quot;c&amp;d.jpg" in page  # the title
    assert 'src="/debug/300x300/a%3Cb%22c%26d.jpg"' in page
    # And the quoted URL reaches the same original.
    image = await client.get("/debug/cropped/300x300/a%3Cb%22c%26d.jpg?method=centre")
    assert image.status == 200


@pytest.mark.parametrize("query", [{}, {"src": ""}, {"src": "../etc/passwd"}, {"src": "/abs.jpg"}])
async def test_gallery_without_a_good_src_is_400(client, query: dict[str, str]) -> None:
    resp = await client.get("/debug/gallery", params=query)
    assert resp.status == 400
    assert "path" in await resp.text()


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status", "message"),
    [
        ("/debug/abc/recipes/coffee.jpg", 400, "size"),
        ("/debug/300x0/recipes/coffee.jpg", 400, "both sides"),
        ("/debug/5000x10/recipes/coffee.jpg", 400, "size"),
        ("/debug/300x300/missing.jpg", 404, "not found"),
        ("/debug/300x300/notes.jpg", 415, "not an image"),
        ("/debug/cropped/300x300/recipes/coffee.jpg?method=magic", 400, "method"),
        ("/debug/cropped/0x300/recipes/coffee.jpg", 400, "both sides"),
        ("/debug/cropped/300x300/missing.jpg?method=centre", 404, "not found"),
        ("/debug/cropped/300x300/notes.jpg?method=attention", 415, "not an image"),
    ],
)
async def test_bad_inputs_get_typed_4xx_answers(
    client, target: str, status: int, message: str
) -> None:
    resp = await client.get(target)
    assert resp.status == status
    assert message in await resp.text()


@pytest.mark.parametrize("route", ["/debug/300x300", "/debug/cropped/300x300"])
@pytest.mark.parametrize(
    "path", ["../etc/passwd", "recipes/../../x.jpg", "%2e%2e/x.jpg", "recipes/%252e%252e/x"]
)
async def test_path_traversal_is_refused(client, route: str, path: str) -> None:
    assert await _raw_get(client, f"{route}/{path}") == (400, b"invalid path")


async def _raw_get(client, target: str) -> tuple[int, bytes]:
    """One request with the target sent byte for byte: aiohttp's client would remove the dot
    segments before sending, while nginx passes them on."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_debug_sizes_are_not_limited_to_the_public_ones(
    aiohttp_client, model_dir: Path, photos: Path
) -> None:
    app = make_app(_settings(model_dir, photos, allowed_sizes=("400x300",)))
    client = await aiohttp_client(app)
    assert (await client.get("/crop/300x375/recipes/coffee.jpg")).status == 400
    resp = await client.get("/debug/cropped/300x375/recipes/coffee.jpg?method=centre")
    assert resp.status == 200


def test_gallery_urls_quote_the_path() -> None:
    urls = gallery_urls("plats du jour/crème brûlée.jpg", gallery_sizes()[0])
    assert urls["overlay"] == "/debug/300x300/plats%20du%20jour/cr%C3%A8me%20br%C3%BBl%C3%A9e.jpg"


# -- the gallery in a real browser ----------------------------------------------------------


async def test_gallery_renders_every_image_in_headless_chromium(
    model_dir: Path, photos: Path, tmp_path: Path
) -> None:
    chromium = shutil.which(CHROMIUM)
    assert chromium, f"{CHROMIUM} is missing: install it with `make apt-deps`"
    runner = web.AppRunner(make_app(_settings(model_dir, photos)), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/debug/gallery?src=plats%20du%20jour/cr%C3%A8me%20br%C3%BBl%C3%A9e.jpg"
        dom = await _dump_dom(chromium, url, tmp_path / "profile")
    finally:
        await runner.cleanup()
    report = report_of(dom)
    assert len(report) == 20, dom[-2000:]
    broken = [src for src, width in report if width <= 0]
    assert not broken, f"images that did not render: {broken}"
    widths = {src: width for src, width in report}
    assert all(w == 300 for src, w in widths.items() if "/cropped/" in src)


async def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("chromium did not finish in 120 s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()
