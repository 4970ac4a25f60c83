"""What the edge's cache keeps is what the sidecar and the legacy server mean: no key two names
share, an editor's override reaches cached URLs, answers of no sidecar of ours are never kept,
and a refusal says the same with the sidecar up or down. Real nginx, sidecar and Thumbor.
"""

from __future__ import annotations

import http.client
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pyvips

from nginx.stack import HOST, Service, Stack, StackOptions, free_port
from tests.support.edge_stack import (
    SMART,
    Resp,
    fake_sidecar,
    fetch,
    make_images,
    pixels,
    require_tools,
    side_edge,
    sidecar_env,
)

pytestmark = pytest.mark.slow
TOKEN = "cache-token"
REVALIDATE_S = 2
MAX_BYTES = 2_000_000
ODD = ("status-429", "status-501", "status-401", "status-302", "no-redirect")


@dataclass
class Edges:
    stack: Stack
    by_state: dict[str, str]  # "up", "down" and each ODD mode -> public base URL


def _images(root: Path) -> Path:
    make_images(root)
    recipes = root / "recipes"
    # A file whose name ends in `#x`: nginx's $uri stops at a raw '#'.
    shutil.copyfile(root / "photos" / "rocket.jpg", recipes / "coffee.jpg#x")
    shutil.copyfile(root / "photos" / "chelsea.jpg", recipes / "what?.jpg")
    pyvips.Image.black(9000, 9000).write_to_file(str(recipes / "bomb.png"), compression=9)
    noise = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    pyvips.Image.new_from_array(noise).write_to_file(str(recipes / "heavy.jpg"), Q=100)
    assert (recipes / "heavy.jpg").stat().st_size > MAX_BYTES
    return root


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Edges]:
    require_tools()
    base = tmp_path_factory.mktemp("cache")
    images = _images(base / "images")
    env = sidecar_env(
        model_dir,
        HEATCROP_SERVER_OVERRIDE_TOKEN=TOKEN,
        HEATCROP_SOURCE_MAX_BYTES=str(MAX_BYTES),
    )
    options = StackOptions(
        workdir=base / "stack", images=images, sidecar_env=env, sidecar_timeout_ms=3000
    )
    services: list[Service] = []
    with Stack(options) as stack:
        stack.restart_edge(revalidate_s=REVALIDATE_S)
        by_state = {"up": stack.public}
        try:
            by_state["down"] = side_edge(services, base / "down", f"{HOST}:{free_port()}", stack)
            for mode in ODD:
                port = free_port()
                services.append(fake_sidecar(base / mode, mode, port).start())
                by_state[mode] = side_edge(services, base / mode, f"{HOST}:{port}", stack)
            yield Edges(stack, by_state)
        finally:
            for svc in reversed(services):
                svc.stop()


def _raw_get(base: str, target: str) -> tuple[int, bytes]:
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _mean_colour(data: bytes) -> np.ndarray:
    return pixels(data).reshape(-1, 3).mean(axis=0)


# -- item 4: one key per name -----------------------------------------------------------------


def test_a_raw_hash_is_refused_and_poisons_no_other_url(edges: Edges) -> None:
    base = edges.by_state["up"]
    status, body = _raw_get(base, "/img/555x300/recipes/coffee.jpg#x")
    assert (status, body) == (400, b"invalid path")
    coffee = fetch(f"{base}/img/555x300/recipes/coffee.jpg")
    hashed = fetch(f"{base}/img/555x300/recipes/coffee.jpg%23x")  # the file named with '#'
    reference = fetch(f"{base}/img/556x300/recipes/coffee.jpg")
    assert coffee.status == hashed.status == reference.status == 200
    colour = _mean_colour(coffee.body)
    assert (
        np.abs(colour - _mean_colour(reference.body)).sum()
        < np.abs(colour - _mean_colour(hashed.body)).sum()
    )
    assert fetch(f"{base}/img/555x300/recipes/coffee.jpg").header("X-Heatcrop-Cache") == "HIT"


@pytest.mark.parametrize("state", ["up", "down"])
def test_a_name_with_a_question_mark_is_served(edges: Edges, state: str) -> None:
    resp = fetch(f"{edges.by_state[state]}/img/400x300/recipes/what%3F.jpg")
    assert resp.status == 200 and pixels(resp.body).shape == (300, 400, 3)


# -- item 5: overrides reach cached URLs ------------------------------------------------------


def _box(resp: Resp) -> tuple[str | None, str | None]:
    return resp.header("X-Heatcrop-Path"), resp.header("X-Heatcrop-Box")


def _until(url: str, wanted: object, get: object = _box, limit_s: float = 20.0) -> Resp:
    deadline = time.monotonic() + limit_s
    while True:
        resp = fetch(url)
        if get(resp) == wanted or time.monotonic() > deadline:  # type: ignore[operator]
            return resp
        time.sleep(0.25)


def test_an_override_reaches_a_cached_url_and_so_does_its_removal(edges: Edges) -> None:
    url = f"{edges.stack.public}/img/400x300/recipes/{SMART}.jpg"
    first = fetch(url)
    assert first.status == 200 and first.header("X-Heatcrop-Path") in ("smart", "cached")
    assert first.header("ETag")
    assert fetch(url).header("X-Heatcrop-Cache") == "HIT"
    smart_box = first.header("X-Heatcrop-Box")
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    admin = f"{edges.stack.admin}/override/recipes/{SMART}.jpg"
    put = fetch(admin, method="PUT", data=b'{"box": [0, 0, 200, 150]}', headers=auth)
    assert put.status == 200, put.body
    after = _until(url, "override", get=lambda r: r.header("X-Heatcrop-Path"))
    path, box = _box(after)
    assert path == "override" and box is not None
    x0, y0, x1, y1 = (int(v) for v in box.split(","))
    assert x0 <= 0 and y0 <= 0 and x1 >= 200 and y1 >= 150  # the must-keep box, kept
    assert fetch(admin, method="DELETE", headers=auth).status in (200, 204)
    back = _until(url, smart_box, get=lambda r: r.header("X-Heatcrop-Box"))
    assert back.header("X-Heatcrop-Box") == smart_box and back.header("X-Heatcrop-Path") != (
        "override"
    )


def test_a_cached_smart_crop_outlives_a_sidecar_outage(edges: Edges) -> None:
    url = f"{edges.stack.public}/img/300x300/recipes/{SMART}.jpg"
    first = fetch(url)
    assert first.header("X-Heatcrop-Served") == "smart"
    sidecar = edges.stack.sidecars[0]
    sidecar.stop()
    try:
        time.sleep(REVALIDATE_S + 1)
        for _ in range(3):  # revalidated while the sidecar is down: kept, not the legacy crop
            resp = fetch(url)
            assert resp.status == 200 and resp.header("X-Heatcrop-Served") == "smart"
            assert resp.body == first.body
    finally:
        sidecar.start()


# -- item 9: odd sidecar answers, refusals alike with the sidecar up or down -----------------


@pytest.mark.parametrize("mode", ODD)
def test_an_answer_of_no_sidecar_of_ours_is_never_kept(edges: Edges, mode: str) -> None:
    url = f"{edges.by_state[mode]}/img/400x300/recipes/{SMART}.jpg"
    first = fetch(url)
    if mode == "no-redirect":
        assert first.status == 200 and "max-age=86400" not in (first.header("Cache-Control") or "")
        assert fetch(url).header("X-Heatcrop-Cache") != "HIT"
    else:  # the legacy crop, as for a sidecar that is down
        assert first.status == 200 and first.header("X-Heatcrop-Served") == "fallback"
        assert pixels(first.body).shape == (300, 400, 3)
        assert "max-age=30" in (first.header("Cache-Control") or "")


@pytest.mark.parametrize(
    ("name", "status", "said"),
    [
        ("bomb.png", 413, b"source has too many pixels"),
        ("heavy.jpg", 413, b"source too large"),
        ("missing.jpg", 404, b"source not found"),
    ],
)
def test_a_refusal_says_the_same_whatever_the_sidecar_does(
    edges: Edges, name: str, status: int, said: bytes
) -> None:
    for state in ("up", "down", "status-501"):
        resp = fetch(f"{edges.by_state[state]}/img/400x300/recipes/{name}")
        assert (resp.status, resp.body.strip()) == (status, said), state
        assert (resp.header("Content-Type") or "").startswith("text/plain"), state


def test_the_legacy_servers_key_is_its_owners_alone(edges: Edges) -> None:
    conf = edges.stack.workdir / "thumbor.conf"
    assert stat.S_IMODE(conf.stat().st_mode) & 0o077 == 0
