"""Signed Thumbor URLs end to end, and two sidecars sharing heatmaps through a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nginx.render import NginxConfig
from nginx.stack import HOST, Stack, StackOptions, free_port, nginx_service
from sidecar.legacy import Thumbor
from sidecar.sizes import Size
from tests.support.edge_stack import (
    SMART,
    fetch,
    make_images,
    nn_runs,
    pixels,
    require_tools,
    sidecar_env,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow
KEY = "edge-signing-key"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("scale-images"))


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, images: Path, model_dir: Path
) -> Iterator[Stack]:
    require_tools()
    options = StackOptions(
        workdir=tmp_path_factory.mktemp("signed-stack"),
        images=images,
        thumbor_key=KEY,
        sidecar_env=sidecar_env(model_dir),
        sidecar_timeout_ms=5000,
    )
    with Stack(options) as stack:
        yield stack


def test_signed_smart_crop_passes_thumbors_check(signed: Stack) -> None:
    resp = fetch(f"{signed.public}/img/400x300/recipes/{SMART}.jpg")
    assert resp.status == 200, resp.body[:200]
    assert resp.header("X-Heatcrop-Served") == "smart"
    assert pixels(resp.body).shape == (300, 400, 3)


def test_signed_fallback_from_the_sidecar_passes_too(signed: Stack) -> None:
    resp = fetch(f"{signed.public}/img/300x0/photos/rocket.jpg")  # no-crop: the plain URL
    assert resp.status == 200, resp.body[:200]
    assert resp.header("X-Heatcrop-Path") == "no-crop"
    assert resp.max_age is not None and resp.max_age <= 30


def test_signed_fallback_from_nginx_when_the_sidecar_is_down(signed: Stack, tmp_path: Path) -> None:
    """nginx signs its own fallback URL (njs) with the same key, so Thumbor serves it."""
    assert signed.legacy_service is not None
    edge = nginx_service(
        NginxConfig(
            out=tmp_path / "nginx",
            listen=f"{HOST}:{free_port()}",
            admin_listen=f"{HOST}:{free_port()}",
            sidecars=(f"{HOST}:{free_port()}",),  # nothing listens there
            legacy=signed.legacy_service.address,
            legacy_key=KEY,
        )
    )
    try:
        edge.start()
        resp = fetch(f"http://{edge.address}/img/400x300/recipes/{SMART}.jpg")
        assert resp.status == 200, resp.body[:200]
        assert resp.header("X-Heatcrop-Path") == "edge-fallback"
        assert resp.max_age is not None and resp.max_age <= 30
        assert pixels(resp.body).shape == (300, 400, 3)
    finally:
        edge.stop()


def test_thumbor_refuses_wrong_and_missing_signatures(signed: Stack) -> None:
    size = Size(400, 300)
    box = (0, 0, 533, 400)
    ours = Thumbor(key=KEY).crop_url(f"recipes/{SMART}.jpg", box, size)
    assert fetch(signed.legacy_base + ours).status == 200
    wrong = Thumbor(key="not-the-key").crop_url(f"recipes/{SMART}.jpg", box, size)
    assert fetch(signed.legacy_base + wrong).status >= 400
    unsafe = Thumbor().crop_url(f"recipes/{SMART}.jpg", box, size)
    assert unsafe.startswith("/unsafe/")
    assert fetch(signed.legacy_base + unsafe).status >= 400
    # A signature of another path does not carry over.
    sig = ours.split("/")[1]
    tampered = ours.replace("533x400", "532x400")
    assert tampered.split("/")[1] == sig
    assert fetch(signed.legacy_base + tampered).status >= 400


def test_two_sidecars_share_heatmaps_through_redis(
    tmp_path: Path, images: Path, model_dir: Path, redis_server: RedisServer
) -> None:
    options = StackOptions(
        workdir=tmp_path / "stack",
        images=images,
        sidecar_ports=(0, 0),
        sidecar_env=sidecar_env(model_dir, redis_server.url),
        sidecar_timeout_ms=5000,
    )
    with Stack(options) as stack:
        a, b = stack.sidecar_base(0), stack.sidecar_base(1)
        # Through nginx: the hash sends every size of one original to the same sidecar.
        for size in ("400x300", "300x300", "200x400"):
            assert fetch(f"{stack.public}/img/{size}/photos/chelsea-wide.jpg").status == 200
        runs = (nn_runs(a), nn_runs(b))
        assert sorted(runs) == [0, 1]
        # The other sidecar finds that heatmap in Redis: a new size, and no CNN run.
        other = b if runs[0] == 1 else a
        resp = fetch(f"{other}/crop/640x360/photos/chelsea-wide.jpg")
        assert resp.status == 200
        assert resp.header("X-Heatcrop-Path") in ("smart", "low-confidence")
        assert nn_runs(other) == 0
        # And the first sidecar's computation is reused through the edge after it is gone.
        busy = a if other == b else b
        index = 0 if busy == a else 1
        stack.sidecars[index].kill()
        resp = fetch(f"{stack.public}/img/500x500/photos/chelsea-wide.jpg")
        assert resp.status == 200
        assert resp.header("Content-Type") == "image/jpeg"
        # The surviving sidecar answered (nginx's own fallback would be `edge-fallback`)...
        assert resp.header("X-Heatcrop-Path") in ("smart", "cached", "low-confidence")
        assert pixels(resp.body).shape == (500, 500, 3)
        # ...from the heatmap in Redis.
        assert nn_runs(other) == 0


def test_names_with_reserved_characters_keep_their_signature(signed: Stack, images: Path) -> None:
    # nginx would decode and re-escape a static proxy_pass URI (%2B -> +), and Thumbor checks
    # the signature against the path it receives: the sidecar's URL must reach it unchanged.
    name = "recipes/a+b (1),x'&=;@!$*.jpg"
    target = images / name
    if not target.exists():
        target.write_bytes((images / f"recipes/{SMART}.jpg").read_bytes())
    raw = "recipes/a%2Bb%20%281%29%2Cx%27%26%3D%3B%40%21%24%2A.jpg"
    for size, served in (("400x300", "smart"), ("300x0", "fallback")):
        resp = fetch(f"{signed.public}/img/{size}/{raw}")
        assert resp.status == 200, resp.body[:200]
        assert resp.header("X-Heatcrop-Served") == served
        assert resp.header("X-Heatcrop-Path") != "edge-fallback"
        assert pixels(resp.body).shape[2] == 3


def test_a_template_dialects_fallback_is_kept_briefly_and_smart_crops_long(
    tmp_path: Path, images: Path, model_dir: Path
) -> None:
    # The `template` dialect's plain URL carries no max-age filter: Thumbor would have its
    # fallback kept a day. nginx keeps a fallback the sidecar chose 30 s at most.
    require_tools()
    template = "/unsafe/{x0}x{y0}:{x1}x{y1}/{w}x{h}/{path}|/unsafe/{w}x{h}/{path}"
    env = sidecar_env(
        model_dir, HEATCROP_LEGACY_DIALECT="template", HEATCROP_LEGACY_TEMPLATE=template
    )
    options = StackOptions(
        workdir=tmp_path, images=images, sidecar_env=env, sidecar_timeout_ms=5000
    )
    with Stack(options) as stack:
        fallback = fetch(f"{stack.public}/img/300x0/photos/rocket.jpg")  # no-crop
        assert fallback.status == 200 and fallback.header("X-Heatcrop-Path") == "no-crop"
        assert fallback.max_age == 30 and fallback.header("Expires") == ""
        smart = fetch(f"{stack.public}/img/400x300/recipes/{SMART}.jpg")
        assert smart.status == 200 and smart.header("X-Heatcrop-Served") == "smart"
        assert smart.max_age == 86400 and smart.header("Expires") != ""
