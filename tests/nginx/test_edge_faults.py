"""Whatever happens to the sidecar, the client gets the legacy crop (200, an image), kept 30 s
at most. Real nginx and real Thumbor; the sidecars are real processes that are down, hung,
answer 500, have a failing engine, or lose their Redis.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nginx.render import NginxConfig
from nginx.stack import (
    HOST,
    Service,
    Stack,
    StackOptions,
    free_port,
    nginx_service,
    sidecar_service,
    thumbor_service,
)
from tests.support.edge_stack import (
    SMART,
    fake_sidecar,
    fetch,
    make_images,
    pixels,
    require_tools,
    sidecar_env,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow
TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("fault-images"))


@pytest.fixture(scope="module")
def thumbor(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Iterator[Service]:
    require_tools()
    svc = thumbor_service(tmp_path_factory.mktemp("fault-thumbor"), images).start()
    try:
        yield svc
    finally:
        svc.stop()


def _edge(workdir: Path, sidecars: tuple[str, ...], thumbor: Service, **kw: object) -> Service:
    cfg = NginxConfig(
        out=workdir / "nginx",
        listen=f"{HOST}:{free_port()}",
        sidecars=sidecars,
        legacy=thumbor.address,
        **{  # type: ignore[arg-type]
            "sidecar_timeout_ms": TIMEOUT_MS,
            "admin_listen": f"{HOST}:{free_port()}",
            **kw,
        },
    )
    return nginx_service(cfg)


def _public(edge: Service) -> str:
    return f"http://{edge.address}"


def _assert_legacy_crop(resp_url: str, size: tuple[int, int] = (400, 300)) -> None:
    resp = fetch(resp_url)
    assert resp.status == 200, resp.body[:200]
    assert resp.header("Content-Type") == "image/jpeg"
    assert resp.header("X-Heatcrop-Served") == "fallback"
    assert resp.max_age is not None and 0 < resp.max_age <= 30
    w, h = size
    assert pixels(resp.body).shape == (h, w, 3)


def test_sidecar_down_serves_the_legacy_crop_which_expires(
    tmp_path: Path, thumbor: Service
) -> None:
    nobody = f"{HOST}:{free_port()}"  # nothing listens there
    # A 1 s fallback lifetime instead of 30 s, so that expiry is seen within the test.
    edge = _edge(
        tmp_path,
        (nobody,),
        thumbor,
        fallback_max_age_s=1,
        plain_path="/unsafe/$crop_size/filters:max_age(1)/$crop_source",
    ).start()
    try:
        url = f"{_public(edge)}/img/400x300/recipes/{SMART}.jpg"
        first = fetch(url)
        assert first.status == 200
        assert first.header("X-Heatcrop-Served") == "fallback"
        assert first.header("X-Heatcrop-Path") == "edge-fallback"
        assert first.max_age == 1
        assert pixels(first.body).shape == (300, 400, 3)
        assert fetch(url).header("X-Heatcrop-Cache") == "HIT"
        time.sleep(2.2)
        assert fetch(url).header("X-Heatcrop-Cache") in ("EXPIRED", "MISS")
    finally:
        edge.stop()


def test_a_plain_path_without_max_age_still_expires_at_the_fallback_age(
    tmp_path: Path, thumbor: Service
) -> None:
    # Thumbor keeps an unfiltered result a day; nginx caps what it keeps and what browsers see.
    nobody = f"{HOST}:{free_port()}"
    plain = "/unsafe/$crop_size/$crop_source"
    edge = _edge(tmp_path, (nobody,), thumbor, fallback_max_age_s=1, plain_path=plain).start()
    try:
        url = f"{_public(edge)}/img/400x300/recipes/{SMART}.jpg"
        first = fetch(url)
        assert first.header("X-Heatcrop-Path") == "edge-fallback"
        assert first.max_age == 1 and first.header("Expires") == ""
        time.sleep(2.2)
        assert fetch(url).header("X-Heatcrop-Cache") in ("EXPIRED", "MISS")
    finally:
        edge.stop()


@dataclass
class TwoFakes:
    """An edge in front of two fake sidecars that count the requests reaching them."""

    public: str
    admin: str
    ports: tuple[int, int]

    def counts(self) -> list[int]:
        return [int(fetch(f"http://{HOST}:{p}/count").body) for p in self.ports]


@contextlib.contextmanager
def two_fakes(tmp_path: Path, thumbor: Service, mode: str) -> Iterator[TwoFakes]:
    ports = (free_port(), free_port())
    fakes = [fake_sidecar(tmp_path, mode, p).start() for p in ports]
    admin_listen = f"{HOST}:{free_port()}"
    sidecars = tuple(f"{HOST}:{p}" for p in ports)
    edge = _edge(tmp_path, sidecars, thumbor, admin_listen=admin_listen)
    try:
        edge.start()
        yield TwoFakes(_public(edge), f"http://{admin_listen}", ports)
    finally:
        edge.stop()
        for fake in fakes:
            fake.stop()


def test_one_timeout_does_not_move_an_original_to_another_sidecar(
    tmp_path: Path, thumbor: Service
) -> None:
    # Each original is hashed to one sidecar, whose memory holds its heatmap. A single slow
    # answer must not evict that sidecar and send the original's other sizes elsewhere.
    with two_fakes(tmp_path, thumbor, "hang-first") as edge:
        for n in range(4):
            resp = fetch(f"{edge.public}/img/{400 + n}x300/recipes/{SMART}.jpg")
            assert resp.status == 200 and resp.header("X-Heatcrop-Path") == "edge-fallback"
        assert sorted(edge.counts()) == [0, 4]


def test_admin_requests_for_an_original_reach_the_sidecar_that_serves_it(
    tmp_path: Path, thumbor: Service
) -> None:
    # An override lands in the memory of the sidecar it reaches: without Redis, that must be
    # the sidecar the original's public URLs are hashed to.
    with two_fakes(tmp_path, thumbor, "error") as edge:
        for name in "ghijklmn":
            before = edge.counts()
            fetch(f"{edge.public}/img/400x300/x/{name}.jpg")
            public = edge.counts()
            fetch(f"{edge.admin}/override/x/{name}.jpg", method="PUT", data=b"{}")
            fetch(f"{edge.admin}/debug/400x300/x/{name}.jpg")
            after = edge.counts()
            hit = [i for i in range(2) if public[i] > before[i]]
            assert len(hit) == 1
            assert after[hit[0]] - public[hit[0]] == 2, (name, before, public, after)


@pytest.mark.parametrize("mode", ["hang", "error"])
def test_hung_or_failing_sidecar_serves_the_legacy_crop(
    tmp_path: Path, thumbor: Service, mode: str
) -> None:
    port = free_port()
    fake = fake_sidecar(tmp_path, mode, port)
    edge = _edge(tmp_path, (f"{HOST}:{port}",), thumbor)
    try:
        fake.start()
        edge.start()
        _assert_legacy_crop(f"{_public(edge)}/img/400x300/photos/chelsea.jpg")
        _assert_legacy_crop(f"{_public(edge)}/img/200x200/recipes/{SMART}.jpg", (200, 200))
        assert fake.running and edge.running
    finally:
        edge.stop()
        fake.stop()


def test_engine_raising_serves_the_legacy_crop(
    tmp_path: Path, thumbor: Service, images: Path, model_dir: Path
) -> None:
    sidecar = sidecar_service(
        tmp_path,
        images=images,
        legacy_base=f"http://{thumbor.address}",
        env=sidecar_env(model_dir),
        nginx_timeout_ms=2000,
    )
    sidecar.cmd = [*sidecar.cmd[:1], "-m", "tests.support.edge_servers", "broken-engine"]
    edge = _edge(tmp_path, (sidecar.address,), thumbor, sidecar_timeout_ms=2000)
    try:
        sidecar.start()
        edge.start()
        resp = fetch(f"{_public(edge)}/img/400x300/recipes/{SMART}.jpg")
        assert resp.header("X-Heatcrop-Path") == "giveup"  # the sidecar's own fallback answer
        _assert_legacy_crop(f"{_public(edge)}/img/300x200/photos/rocket.jpg", (300, 200))
        assert sidecar.running
    finally:
        edge.stop()
        sidecar.stop()


def test_redis_down_still_serves_every_request(
    tmp_path: Path, thumbor: Service, images: Path, model_dir: Path, redis_server: RedisServer
) -> None:
    options = StackOptions(
        workdir=tmp_path / "stack",
        images=images,
        legacy=thumbor.address,
        sidecar_env=sidecar_env(model_dir, redis_server.url),
        sidecar_timeout_ms=3000,
    )
    with Stack(options) as stack:
        assert fetch(f"{stack.public}/img/400x300/photos/rocket.jpg").status == 200
        redis_server.kill()
        for size in ("400x300", "300x300", "160x90"):
            resp = fetch(f"{stack.public}/img/{size}/recipes/{SMART}.jpg")
            assert resp.status == 200, resp.body[:200]
            assert resp.header("Content-Type") == "image/jpeg"
            assert resp.header("X-Heatcrop-Served") in ("smart", "fallback")
        assert all(svc.running for svc in stack.services())


def test_sidecar_killed_then_restarted(
    tmp_path: Path, thumbor: Service, images: Path, model_dir: Path
) -> None:
    options = StackOptions(
        workdir=tmp_path / "stack",
        images=images,
        legacy=thumbor.address,
        sidecar_env=sidecar_env(model_dir),
        sidecar_timeout_ms=3000,
    )
    with Stack(options) as stack:
        stack.sidecars[0].kill()
        _assert_legacy_crop(f"{stack.public}/img/400x300/recipes/{SMART}.jpg")
        stack.sidecars[0].start()
        resp = fetch(f"{stack.public}/img/480x360/recipes/{SMART}.jpg")
        assert resp.status == 200
        assert resp.header("X-Heatcrop-Served") == "smart"
