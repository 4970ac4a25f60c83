"""The sidecar through a real aiohttp server: real model, real JPEGs, memory caches."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import re
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from sidecar.app import make_app
from sidecar.background import finish_in_background
from sidecar.batcher import Batcher, ServiceModel
from sidecar.caches import heatmap_key
from sidecar.decode import decode
from sidecar.demo import write_demo_images
from sidecar.job import CropJob, IdentityMemo
from sidecar.legacy import Thumbor
from sidecar.metrics import CONTENT_TYPE
from sidecar.pipeline import run_crop
from sidecar.routes import SERVICES
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    KernelSettings,
    ServerSettings,
    Settings,
    SourceSettings,
)
from sidecar.sizes import Size
from sidecar.step_search import search_is_quick
from tests.support.images import jpeg
from tests.support.scripted_engine import ScriptedEngine
from tests.support.sidecar_metrics import scraped

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    coffee = jpeg(skdata.coffee())  # 600x400
    (root / "recipes").mkdir()
    (root / "recipes" / "coffee.jpg").write_bytes(coffee)
    (root / "cat.jpg").write_bytes(jpeg(skdata.chelsea()))  # 451x300
    for name in ("one", "two", "three", "four", "five"):
        (root / f"{name}.jpg").write_bytes(coffee)
    (root / "plats du jour").mkdir()
    (root / "plats du jour" / "crème brûlée.jpg").write_bytes(coffee)
    (root / "notes.jpg").write_bytes(b"this is not an image at all, only some words\n" * 20)
    (root / "truncated.jpg").write_bytes(coffee[: len(coffee) // 3])
    # The demo's off-centre photo (1320x400, the cup on the left): a smart box that clearly
    # beats the centre crop whatever the CPU's INT8 arithmetic (coffee.jpg's are near-centre).
    demo = tmp_path_factory.mktemp("demo")
    write_demo_images(demo)
    shutil.copyfile(demo / "recipes" / "coffee-wide.jpg", root / "recipes" / "coffee-wide.jpg")
    return root


def _settings(model_dir: Path, photos: Path, **server: object) -> Settings:
    return Settings(
        server=dataclasses.replace(
            ServerSettings(deadline_ms=10_000, override_token=TOKEN), **server
        ),
        source=SourceSettings(root=str(photos)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
    )


@pytest.fixture
async def client(aiohttp_client, model_dir: Path, photos: Path):
    return await aiohttp_client(make_app(_settings(model_dir, photos)))


def _box(resp) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in resp.headers["X-Heatcrop-Box"].split(","))
    return x0, y0, x1, y1


async def _raw_get(
    client,
    target: str,
    method: str = "GET",
    body: bytes = b"",
    auth: bytes = f"Bearer {TOKEN}".encode(),
) -> tuple[int, bytes]:
    """One request with the target (and the Authorization value) sent byte for byte:
    aiohttp's client would remove the dot segments before sending, while nginx passes them
    on."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        + b"Authorization: "
        + auth
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    writer.write(head + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def _crop(client, size: str, path: str = "recipes/coffee.jpg"):
    resp = await client.get(f"/crop/{size}/{path}")
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b""
    return resp


# -- smart answers and caches ---------------------------------------------------------------


async def test_smart_answer_has_a_box_inside_the_image_at_the_exact_aspect(client) -> None:
    resp = await _crop(client, "400x300", "recipes/coffee-wide.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    x0, y0, x1, y1 = _box(resp)
    assert 0 <= x0 < x1 <= 1320 and 0 <= y0 < y1 <= 400
    assert abs(3 * (x1 - x0) - 4 * (y1 - y0)) <= 4
    assert float(resp.headers["X-Heatcrop-Confidence"]) > 0.05
    assert x1 < 1320 // 2 + 200  # on the cup's side, not the centre crop
    url = Thumbor().crop_url("recipes/coffee-wide.jpg", (x0, y0, x1, y1), Size(400, 300))
    assert resp.headers["X-Accel-Redirect"] == "/@legacy" + url
    assert f"/{x0}x{y0}:{x1}x{y1}/400x300/recipes/coffee-wide.jpg" in url
    assert resp.headers["ETag"]  # what nginx's cache revalidates with


async def test_a_revalidation_is_304_while_the_crop_is_the_same(client) -> None:
    path = "/crop/400x300/recipes/coffee-wide.jpg"
    etag = (await _crop(client, "400x300", "recipes/coffee-wide.jpg")).headers["ETag"]
    same = await client.get(path, headers={"If-None-Match": etag})
    assert same.status == 304 and same.headers["ETag"] == etag
    assert "X-Accel-Redirect" not in same.headers
    other = await client.get(path, headers={"If-None-Match": '"another-box"'})
    assert other.status == 200 and other.headers["ETag"] == etag
    assert other.headers["X-Accel-Redirect"].startswith("/@legacy/")
    # A fallback carries no ETag: nginx keeps it 30 s and never revalidates it.
    plain = await _crop(client, "300x0")
    assert "ETag" not in plain.headers


async def test_low_confidence_answers_the_legacy_crop(aiohttp_client, model_dir, photos) -> None:
    # A threshold no box can reach (confidence is a share of the heat, below 1), so the answer
    # does not depend on the tuned defaults (which have no cut-off: it cost quality).
    settings = dataclasses.replace(
        _settings(model_dir, photos), kernel=KernelSettings(min_confidence=1.0)
    )
    client = await aiohttp_client(make_app(settings))
    resp = await _crop(client, "300x400")
    assert resp.headers["X-Heatcrop-Path"] == "low-confidence"
    url = Thumbor().plain_url("recipes/coffee.jpg", Size(300, 400))
    assert resp.headers["X-Accel-Redirect"] == "/@legacy" + url
    assert "max_age(30)" in url


async def test_second_request_and_same_aspect_are_cached_with_the_same_box(client) -> None:
    first = await _crop(client, "300x100")
    again = await _crop(client, "300x100")
    bigger = await _crop(client, "900x300")
    assert first.headers["X-Heatcrop-Path"] == "smart"
    assert again.headers["X-Heatcrop-Path"] == "cached"
    assert bigger.headers["X-Heatcrop-Path"] == "cached"
    assert _box(first) == _box(again) == _box(bigger)
    assert "/900x300/" in bigger.headers["X-Accel-Redirect"]
    assert await scraped(client, "heatcrop_cache_requests_total", cache="box", result="hit") == 2
    # The identity was remembered: cache hits did not read the original again.
    assert await scraped(client, "heatcrop_stage_seconds_count", stage="fetch") == 1


async def test_another_aspect_reuses_the_heatmap(client) -> None:
    await _crop(client, "300x100")
    square = await _crop(client, "400x400")
    assert square.headers["X-Heatcrop-Path"] in ("smart", "low-confidence")
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    hits = await scraped(client, "heatcrop_cache_requests_total", cache="heatmap", result="hit")
    assert hits == 1
    x0, y0, x1, y1 = _box(square)
    assert abs((x1 - x0) - (y1 - y0)) <= 1


async def test_concurrent_requests_for_a_new_original_run_the_model_once(client) -> None:
    sizes = ["400x400", "300x100", "100x300", "640x480", "200x200", "800x600"]
    answers = await asyncio.gather(*(_crop(client, s, "two.jpg") for s in sizes))
    # Sizes of one aspect share a box: whoever searches second may find it cached.
    paths = {r.headers["X-Heatcrop-Path"] for r in answers}
    assert paths <= {"smart", "low-confidence", "cached"}
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    assert await scraped(client, "heatcrop_requests_total", outcome="giveup") == 0
    # Requests that joined the run in flight never looked the heatmap up themselves; had they
    # come one after the other, each would have (one miss, then hits).
    hits = await scraped(client, "heatcrop_cache_requests_total", cache="heatmap", result="hit")
    misses = await scraped(client, "heatcrop_cache_requests_total", cache="heatmap", result="miss")
    assert hits + misses < len(sizes)


async def test_encoded_paths_reach_the_source_and_the_legacy_url_quoted(client) -> None:
    resp = await _crop(client, "300x100", "plats%20du%20jour/cr%C3%A8me%20br%C3%BBl%C3%A9e.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    redirect = resp.headers["X-Accel-Redirect"]
    assert redirect.endswith("/300x100/plats%20du%20jour/cr%C3%A8me%20br%C3%BBl%C3%A9e.jpg")


async def test_no_crop_when_one_side_is_zero(client) -> None:
    resp = await _crop(client, "400x0")
    assert resp.headers["X-Heatcrop-Path"] == "no-crop"
    assert "X-Heatcrop-Box" not in resp.headers
    url = Thumbor().plain_url("recipes/coffee.jpg", Size(400, 0))
    assert resp.headers["X-Accel-Redirect"] == "/@legacy" + url
    assert "max_age(30)" in url
    assert await scraped(client, "heatcrop_nn_runs_total") == 0


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0x0", "100000x100", "4001x10", "abc", "-1x3", "1x"])
async def test_bad_sizes_are_refused(client, size: str) -> None:
    resp = await client.get(f"/crop/{size}/recipes/coffee.jpg")
    assert resp.status == 400
    assert "size" in await resp.text()


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "recipes/../../x.jpg", "%2e%2e/x.jpg", "recipes/%252e%252e/%252e%252e/x"],
)
async def test_path_traversal_is_refused(client, path: str) -> None:
    status, body = await _raw_get(client, f"/crop/400x300/{path}")
    assert status == 400
    assert body == b"invalid path"


async def test_missing_file_is_404(client) -> None:
    resp = await client.get("/crop/400x300/recipes/nope.jpg")
    assert resp.status == 404
    assert await resp.text() == "source not found"


async def test_not_an_image_is_415(client) -> None:
    resp = await client.get("/crop/400x300/notes.jpg")
    assert resp.status == 415
    assert await resp.text() == "source is not an image"
    assert await scraped(client, "heatcrop_requests_total", outcome="error") == 1


async def test_truncated_jpeg_falls_back_to_the_legacy_crop(client) -> None:
    resp = await _crop(client, "400x300", "truncated.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "giveup"
    assert "X-Heatcrop-Box" not in resp.headers
    url = Thumbor().plain_url("truncated.jpg", Size(400, 300))
    assert resp.headers["X-Accel-Redirect"] == "/@legacy" + url


class _BrokenSource:
    """A source with a bug in it: anything but a typed error."""

    async def fetch(self, path: str, budget_s: float | None = None):
        raise RuntimeError(f"bug while fetching {path}")

    async def close(self) -> None:
        return None


async def test_an_unexpected_exception_is_logged_and_answers_the_legacy_crop(
    client, caplog: pytest.LogCaptureFixture
) -> None:
    client.app[SERVICES].source = _BrokenSource()
    with caplog.at_level(logging.ERROR, logger="heatcrop.routes"):
        resp = await _crop(client, "300x100", "one.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "giveup"
    assert resp.headers["X-Accel-Redirect"] == "/@legacy" + Thumbor().plain_url(
        "one.jpg", Size(300, 100)
    )
    assert "bug while fetching one.jpg" in caplog.text
    assert await scraped(client, "heatcrop_requests_total", outcome="error") == 1


async def test_tiny_deadline_gives_up_with_the_legacy_crop(aiohttp_client, model_dir, photos):
    tiny = _settings(model_dir, photos, deadline_ms=1, answer_margin_ms=0)
    client = await aiohttp_client(make_app(tiny))
    resp = await _crop(client, "400x300", "three.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "giveup"
    url = Thumbor().plain_url("three.jpg", Size(400, 300))
    assert resp.headers["X-Accel-Redirect"] == "/@legacy" + url
    assert await scraped(client, "heatcrop_requests_total", outcome="giveup") == 1


async def test_give_up_after_decode_finishes_the_heatmap_in_the_background(client) -> None:
    # An engine believed to take a minute an image: the request is refused at admission after
    # its decode (no timing involved), the idle engine takes the pixels as background work, and
    # the heatmap lands in the cache, so the next request for the original is answered from it.
    svc = client.app[SERVICES]
    svc.batcher.model = ServiceModel(svc.batcher.max_batch, prior_s=60.0)
    resp = await _crop(client, "400x300", "four.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "giveup"
    assert await scraped(client, "heatcrop_giveups_total", reason="admission") == 1
    assert await _wait_for_nn_run(client)
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    for _ in range(100):  # the cache write follows the engine call on the loop
        resp = await _crop(client, "300x400", "four.jpg")
        if resp.headers["X-Heatcrop-Path"] != "giveup":
            break
        await asyncio.sleep(0.01)
    assert resp.headers["X-Heatcrop-Path"] in ("smart", "low-confidence")
    assert await scraped(client, "heatcrop_nn_runs_total") == 1


async def _wait_for_nn_run(client, polls: int = 100) -> bool:
    for _ in range(polls):
        if await scraped(client, "heatcrop_nn_runs_total") >= 1:
            return True
        await asyncio.sleep(0.05)
    return False


# -- overrides ------------------------------------------------------------------------------


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_override_needs_the_token(client) -> None:
    body = {"box": [10, 10, 60, 60]}
    assert (await client.put("/override/cat.jpg", json=body)).status == 401
    wrong = await client.put("/override/cat.jpg", json=body, headers=_auth("nope"))
    assert wrong.status == 403
    assert (await client.delete("/override/cat.jpg")).status == 401


async def test_overrides_are_off_without_a_configured_token(aiohttp_client, model_dir, photos):
    client = await aiohttp_client(make_app(_settings(model_dir, photos, override_token="")))
    resp = await client.put("/override/cat.jpg", json={"box": [1, 1, 5, 5]}, headers=_auth(""))
    assert resp.status == 403


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2, 3, 4]",
        b'{"box": [1, 2, 3]}',
        b'{"box": [1, 2, 3, 4.5]}',
        b'{"box": [5, 2, 3, 4]}',
        b'{"box": [1, 4, 3, 4]}',
        b'{"box": [-1, 2, 3, 4]}',
        b'{"box": [true, 2, 3, 4]}',
    ],
)
async def test_bad_override_bodies_are_400(client, body: bytes) -> None:
    resp = await client.put("/override/cat.jpg", data=body, headers=_auth())
    assert resp.status == 400


async def test_an_undecodable_authorization_header_is_403_not_500(client) -> None:
    body = b'{"box": [1, 1, 5, 5]}'
    for auth in (b"Bearer \xff\xfe", b"Bearer " + TOKEN.encode() + b"\xc3"):
        assert await _raw_get(client, "/override/cat.jpg", "PUT", body, auth) == (
            403,
            b"wrong token",
        )


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (b"[" * 3000, b"body must be JSON"),  # nested deeper than the JSON parser recurses
        (b"[" * 200_000, b"body too large"),
        (b'{"box": [1, 1, 5, 5], "pad": "' + b"x" * 5000 + b'"}', b"body too large"),
    ],
)
async def test_hostile_override_bodies_are_400(client, body: bytes, answer: bytes) -> None:
    assert await _raw_get(client, "/override/cat.jpg", "PUT", body) == (400, answer)


async def test_an_override_body_arriving_in_pieces_is_read_whole(client) -> None:
    body = b'{"box": [10, 10, 60, 60]}'
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PUT /override/cat.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:9]
    )
    await writer.drain()
    await asyncio.sleep(0.05)  # the server's first read sees only the start of the body
    writer.write(body[9:])
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert b'"version": 1' in raw


async def test_an_absolute_form_request_target_reads_the_same_original(client) -> None:
    status, _ = await _raw_get(client, "http://x/crop/400x300/recipes/coffee.jpg")
    assert status == 200
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    assert (await _crop(client, "400x300")).headers["X-Heatcrop-Path"] in (
        "cached",
        "low-confidence",
    )


@pytest.mark.parametrize("path", ["../x.jpg", "%2e%2e/x.jpg", "a/%2F..%2Fx"])
async def test_override_path_traversal_is_400(client, path: str) -> None:
    body = b'{"box": [1, 1, 5, 5]}'
    status, answer = await _raw_get(client, f"/override/{path}", method="PUT", body=body)
    assert (status, answer) == (400, b"invalid path")


async def test_override_is_kept_and_delete_restores(client) -> None:
    before = await _crop(client, "300x300", "cat.jpg")
    focal = (20, 20, 80, 90)  # top-left corner, away from the cat's face
    put = await client.put("/override/cat.jpg", json={"box": list(focal)}, headers=_auth())
    assert put.status == 200
    assert (await put.json())["version"] == 1
    kept = await _crop(client, "300x300", "cat.jpg")
    assert kept.headers["X-Heatcrop-Path"] == "override"
    x0, y0, x1, y1 = _box(kept)
    assert x0 <= focal[0] and y0 <= focal[1] and x1 >= focal[2] and y1 >= focal[3]
    assert abs((x1 - x0) - (y1 - y0)) <= 1
    assert _box(kept) != _box(before)
    again = await _crop(client, "600x600", "cat.jpg")  # box cache hit, still an override
    assert again.headers["X-Heatcrop-Path"] == "override"
    assert _box(again) == _box(kept)

    deleted = await client.delete("/override/cat.jpg", headers=_auth())
    assert deleted.status == 204
    restored = await _crop(client, "300x300", "cat.jpg")
    # The box found before the override is valid again: box keys name the override's box.
    assert restored.headers["X-Heatcrop-Path"] in ("cached", "low-confidence")
    assert _box(restored) == _box(before)
    assert await scraped(client, "heatcrop_nn_runs_total") == 1


async def test_a_new_override_after_a_delete_is_not_served_a_stale_box(client) -> None:
    left, right = (10, 100, 60, 200), (380, 100, 440, 200)
    await client.put("/override/cat.jpg", json={"box": list(left)}, headers=_auth())
    first = await _crop(client, "200x300", "cat.jpg")
    await client.delete("/override/cat.jpg", headers=_auth())
    put = await client.put("/override/cat.jpg", json={"box": list(right)}, headers=_auth())
    assert (await put.json())["version"] == 3
    second = await _crop(client, "200x300", "cat.jpg")
    for resp, focal in ((first, left), (second, right)):
        assert resp.headers["X-Heatcrop-Path"] == "override"
        x0, y0, x1, y1 = _box(resp)
        assert x0 <= focal[0] and y0 <= focal[1] and x1 >= focal[2] and y1 >= focal[3]


async def test_override_outside_the_image_is_clamped(client) -> None:
    put = await client.put(
        "/override/five.jpg", json={"box": [550, 350, 5000, 5000]}, headers=_auth()
    )
    assert put.status == 200
    resp = await _crop(client, "200x100", "five.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "override"
    x0, y0, x1, y1 = _box(resp)
    assert (x1, y1) == (600, 400) and min(x0, y0) >= 0
    assert abs((x1 - x0) - 2 * (y1 - y0)) <= 2


async def test_an_override_beyond_the_image_is_stored_clipped_and_every_crop_holds_it(
    client,
) -> None:
    # five.jpg is 600x400: the stored box is what the crops can keep, and the editor sees it.
    put = await client.put(
        "/override/five.jpg", json={"box": [430, 50, 5000, 290]}, headers=_auth()
    )
    assert put.status == 200
    assert (await put.json())["box"] == [430, 50, 600, 290]
    for size in ("200x100", "300x300", "100x200", "400x300", "160x90"):
        resp = await _crop(client, size, "five.jpg")
        assert resp.headers["X-Heatcrop-Path"] == "override"
        x0, y0, x1, y1 = _box(resp)
        assert x0 <= 430 and y0 <= 50 and x1 == 600 and y1 >= 290, (size, _box(resp))


@pytest.mark.parametrize(
    ("path", "box", "status"),
    [
        ("five.jpg", [600, 0, 700, 100], 400),  # starts at the right edge: nothing inside
        ("five.jpg", [0, 400, 50, 450], 400),
        ("missing.jpg", [1, 1, 5, 5], 404),
    ],
)
async def test_an_override_outside_the_image_or_for_no_image_is_refused(
    client, path: str, box: list[int], status: int
) -> None:
    put = await client.put(f"/override/{path}", json={"box": box}, headers=_auth())
    assert put.status == status, await put.text()
    if status == 400:
        assert await put.text() == "box lies outside the 600x400 image"
        resp = await _crop(client, "200x100", path)
        assert resp.headers["X-Heatcrop-Path"] != "override"


def test_identity_memo_expires_and_stays_bounded() -> None:
    memo = IdentityMemo(ttl_s=10.0, max_entries=2)
    memo.put("a.jpg", "file:a.jpg:1", now=0.0)
    assert memo.get("a.jpg", now=9.9) == "file:a.jpg:1"
    assert memo.get("a.jpg", now=10.0) is None
    memo.put("a.jpg", "file:a.jpg:2", now=20.0)
    memo.put("b.jpg", "file:b.jpg:1", now=20.0)
    assert memo.get("a.jpg", now=21.0) == "file:a.jpg:2"  # a is now the most recent
    memo.put("c.jpg", "file:c.jpg:1", now=21.0)
    assert memo.get("b.jpg", now=21.0) is None
    assert memo.get("a.jpg", now=21.0) == "file:a.jpg:2"
    assert memo.get("c.jpg", now=21.0) == "file:c.jpg:1"


# -- health and metrics ---------------------------------------------------------------------


async def test_healthz(client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.text() == "ok"


async def test_healthz_says_when_the_engine_keeps_failing(client, monkeypatch) -> None:
    from sidecar.routes import ENGINE_FAILING_AFTER

    engine = client.app[SERVICES].engine
    real = engine.infer

    def broken(batch):
        raise RuntimeError("the GPU is in a sticky error state")

    monkeypatch.setattr(engine, "infer", broken)
    for n in range(ENGINE_FAILING_AFTER):
        # Each request still gets the legacy crop, and alone says nothing is wrong.
        resp = await client.get("/crop/400x300/recipes/coffee.jpg")
        assert resp.headers["X-Heatcrop-Path"] == "giveup"
        expected = 200 if n + 1 < ENGINE_FAILING_AFTER else 503
        assert (await client.get("/healthz")).status == expected
    assert "engine failing" in await (await client.get("/healthz")).text()
    monkeypatch.setattr(engine, "infer", real)
    await _crop(client, "400x300")
    assert (await client.get("/healthz")).status == 200


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+$')


async def test_metrics_are_prometheus_text(client) -> None:
    await _crop(client, "300x100")
    await _crop(client, "300x100")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE
    for line in (await resp.text()).splitlines():
        if line and not line.startswith("#"):
            assert _SAMPLE.match(line), line
            value = line.rsplit(" ", 1)[1]
            assert value in ("+Inf", "NaN") or math.isfinite(float(value))
    assert await scraped(client, "heatcrop_requests_total", outcome="smart") == 1
    assert await scraped(client, "heatcrop_requests_total", outcome="cached") == 1
    for stage in ("fetch", "decode", "search", "total"):
        count = await scraped(client, "heatcrop_stage_seconds_count", stage=stage)
        assert count >= 1, stage


async def test_a_busy_engine_refuses_before_the_decode(aiohttp_client, model_dir, photos) -> None:
    # When even the cheapest image could not be admitted after its decode, the decode is
    # skipped: under overload that CPU is what the requests that can still make it need.
    client = await aiohttp_client(make_app(_settings(model_dir, photos, deadline_ms=120)))
    async with busy_engine(client.app[SERVICES]):
        decodes = await scraped(client, "heatcrop_stage_seconds_count", stage="decode")
        resp = await _crop(client, "300x200", "five.jpg")
        assert resp.headers["X-Heatcrop-Path"] == "giveup"
        assert await scraped(client, "heatcrop_giveups_total", reason="admission") >= 1
        assert await scraped(client, "heatcrop_stage_seconds_count", stage="decode") == decodes


async def test_a_known_original_is_not_even_read_when_the_engine_is_busy(
    aiohttp_client, model_dir, photos
) -> None:
    settings = _settings(model_dir, photos, deadline_ms=120)
    settings = dataclasses.replace(settings, cache=CacheSettings(heatmap_entries=1))
    client = await aiohttp_client(make_app(settings))
    await _crop(client, "300x200", "four.jpg")  # its identity is now known...
    await _crop(client, "300x200", "three.jpg")  # ...and its heatmap evicted by this one
    async with busy_engine(client.app[SERVICES]):
        reads = await scraped(client, "heatcrop_stage_seconds_count", stage="fetch")
        resp = await _crop(client, "200x300", "four.jpg")
        assert resp.headers["X-Heatcrop-Path"] == "giveup"
        assert await scraped(client, "heatcrop_stage_seconds_count", stage="fetch") == reads


@contextlib.asynccontextmanager
async def busy_engine(svc) -> AsyncIterator[None]:
    """The batcher holding seconds of queued work at any plausible engine speed (cancelled on
    the way out, so mostly never run): no new image could be admitted in 120 ms."""
    shape = max(svc.engine.input_shapes, key=lambda s: s[0] * s[1])
    filler = np.zeros((*shape, 3), np.uint8)
    far = asyncio.get_running_loop().time() + 3600
    backlog = [asyncio.create_task(svc.batcher.infer(filler, far)) for _ in range(200)]
    try:
        await _until(lambda: svc.batcher.depth >= 100)
        yield
    finally:
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)


async def test_start_up_objects_are_frozen_out_of_collections(client) -> None:
    # Full collections walking the model, numba and aiohttp paused the loop 80-120 ms under load.
    assert gc.get_freeze_count() > 0
    assert (await client.get("/healthz")).status == 200


async def test_a_miss_takes_back_a_queued_background_image_instead_of_decoding_again(
    client, photos
) -> None:
    svc = client.app[SERVICES]
    engine = ScriptedEngine(svc.engine.input_shapes, gated=True)
    svc.batcher = Batcher(engine, max_batch=4, max_wait_ms=0, max_queue=16)
    await svc.batcher.start()
    try:
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(
            svc.batcher.infer(np.full((*engine.input_shapes[0], 3), 1, np.uint8), loop.time() + 60)
        )
        await _until(lambda: len(engine.calls) == 1)  # the engine is busy, blocked on the gate
        original = await svc.source.fetch("five.jpg")
        key = heatmap_key(original.identity, svc.engine.version)
        decoded = decode(original.data, max_bytes=10**8, max_pixels=10**8)
        decoded.pixels[0, 0, 0] = 7  # a marker the scripted engine reports
        finish_in_background(svc, decoded, key)  # a give-up's pixels, queued
        assert svc.batcher.background_depth == 1
        decodes = await scraped(client, "heatcrop_stage_seconds_count", stage="decode")
        job = CropJob("five.jpg", Size(300, 200), deadline=loop.time() + 60)
        analysing = asyncio.create_task(run_crop(svc, job))
        await _until(lambda: svc.batcher.depth == 1)  # in the foreground queue now
        assert svc.batcher.background_depth == 0
        engine.gate.set()
        await asyncio.wait_for(analysing, 10)
        await blocker
    finally:
        engine.gate.set()
        await svc.batcher.close()
    assert job.analysis is not None and job.analysis.width == decoded.width
    assert job.box is not None and not job.cached
    assert engine.batches == [[1], [7]]  # the marked pixels ran once, in the foreground
    assert await scraped(client, "heatcrop_stage_seconds_count", stage="decode") == decodes


async def _until(condition, polls: int = 1000) -> None:
    for _ in range(polls):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


async def test_a_quick_search_runs_on_the_loop_and_a_slow_one_in_its_thread(client) -> None:
    core = client.app[SERVICES].core
    assert search_is_quick(core, limit_s=10.0)
    assert not search_is_quick(core, limit_s=0.0)
    svc = client.app[SERVICES]
    threads: set[str] = set()
    box = core.box

    def recording_box(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return box(*args, **kwargs)

    core.box = recording_box  # type: ignore[method-assign]
    try:
        for inline, size in ((True, "301x200"), (False, "302x200")):
            svc.search_inline = inline
            assert (await _crop(client, size)).headers["X-Heatcrop-Path"] != "giveup"
    finally:
        del core.box
    assert threads == {threading.main_thread().name, "heatcrop-search_0"}
