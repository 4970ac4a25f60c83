"""The edge end to end: real nginx + the real sidecar (real model) + real Thumbor on loopback.

One stack for the module (nginx.stack, the code `make run` uses); nginx's sidecar timeout is
generous here so that smart answers do not depend on this shared machine's load (the
fallbacks have their own tests with tight timeouts, test_edge_faults.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nginx.stack import Stack, StackOptions
from tests.support.edge_stack import (
    SMART,
    crop_requests,
    crop_resized,
    fetch,
    make_images,
    mean_abs_diff,
    nn_runs,
    pixels,
    require_tools,
    sidecar_env,
)

pytestmark = pytest.mark.slow
TOKEN = "edge-test-token"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("edge-images"))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, images: Path, model_dir: Path
) -> Iterator[Stack]:
    require_tools()
    options = StackOptions(
        workdir=tmp_path_factory.mktemp("edge-stack"),
        images=images,
        sidecar_env=sidecar_env(model_dir, HEATCROP_SERVER_OVERRIDE_TOKEN=TOKEN),
        sidecar_timeout_ms=5000,
    )
    with Stack(options) as running:
        yield running


def _box(header: str) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in header.split(","))
    return x0, y0, x1, y1


def test_smart_path_serves_thumbors_crop_of_the_box(stack: Stack, images: Path) -> None:
    resp = fetch(f"{stack.public}/img/400x300/recipes/{SMART}.jpg")
    assert resp.status == 200, resp.body[:200]
    assert resp.header("Content-Type") == "image/jpeg"
    assert resp.header("X-Heatcrop-Served") == "smart"
    assert resp.header("X-Heatcrop-Path") == "smart"
    assert resp.header("X-Heatcrop-Cache") == "MISS"
    # Thumbor's own Cache-Control (a day): smart crops are kept long, by nginx and browsers.
    assert (resp.max_age or 0) >= 3600
    got = pixels(resp.body)
    assert got.shape == (300, 400, 3)
    box = _box(resp.header("X-Heatcrop-Box"))
    original = images / "recipes" / f"{SMART}.jpg"
    expected = crop_resized(original, box, 400, 300)
    # The same region, resized by another library and JPEG-coded twice: close, not equal.
    # The centre crop of this photo (its subject is on the left) must look clearly different,
    # or the comparison would prove nothing.
    width, height = 1320, 400
    cw = round(height * 4 / 3)
    centre = ((width - cw) // 2, 0, (width - cw) // 2 + cw, height)
    assert box[0] < centre[0]
    assert mean_abs_diff(got, expected) < 12.0
    assert mean_abs_diff(got, crop_resized(original, centre, 400, 300)) > 25.0


def test_repeat_is_a_cache_hit_that_skips_the_sidecar(stack: Stack) -> None:
    url = f"{stack.public}/img/320x240/recipes/{SMART}.jpg"
    first = fetch(url)
    assert first.status == 200
    assert first.header("X-Heatcrop-Cache") == "MISS"
    before = crop_requests(stack.sidecar_base())
    again = fetch(url)
    assert again.status == 200
    assert again.header("X-Heatcrop-Cache") == "HIT"
    assert again.header("X-Heatcrop-Served") == first.header("X-Heatcrop-Served")
    assert again.body == first.body
    assert crop_requests(stack.sidecar_base()) == before


def test_sizes_of_one_original_run_the_cnn_once(stack: Stack) -> None:
    before = nn_runs(stack.admin)
    served = []
    for size in ("300x300", "200x400", "640x360", "100x100", "500x200"):
        resp = fetch(f"{stack.public}/img/{size}/photos/chelsea-wide.jpg")
        assert resp.status == 200
        w, h = (int(v) for v in size.split("x"))
        assert pixels(resp.body).shape == (h, w, 3)
        served.append(resp.header("X-Heatcrop-Served"))
    assert nn_runs(stack.admin) - before == 1
    assert "smart" in served


def test_fallback_answers_are_kept_30_s_at_most(stack: Stack) -> None:
    # W = 0: "keep the aspect", nothing to decide; the sidecar answers the legacy crop.
    resp = fetch(f"{stack.public}/img/300x0/photos/rocket.jpg")
    assert resp.status == 200
    assert resp.header("X-Heatcrop-Served") == "fallback"
    assert resp.header("X-Heatcrop-Path") == "no-crop"
    assert resp.max_age is not None and 0 < resp.max_age <= 30
    assert pixels(resp.body).shape[1] == 300


@pytest.mark.parametrize(
    "path", ["/healthz", "/metrics", "/debug/gallery?src=recipes/coffee.jpg",
             "/debug/400x300/recipes/coffee.jpg", "/crop/400x300/recipes/coffee.jpg"]
)  # fmt: skip
def test_operator_endpoints_are_not_public(stack: Stack, path: str) -> None:
    assert fetch(stack.public + path).status == 404
    assert fetch(stack.admin + path).status == 200


def test_operators_see_the_sidecars_redirect_on_the_admin_server(stack: Stack) -> None:
    # An aspect no other test asks of this module's sidecar: its box cache is shared.
    resp = fetch(f"{stack.admin}/crop/350x200/recipes/{SMART}.jpg")
    assert resp.status == 200 and resp.body == b""
    assert resp.header("X-Accel-Redirect").startswith("/@legacy/")
    assert resp.header("X-Heatcrop-Path") in ("smart", "cached", "low-confidence")


def test_override_writes_go_through_admin_with_the_token(stack: Stack) -> None:
    body = json.dumps({"box": [0, 0, 200, 200]}).encode()
    path = "/override/photos/astronaut.jpg"
    assert fetch(stack.public + path, method="PUT", data=body).status == 404
    assert fetch(stack.admin + path, method="PUT", data=body).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert fetch(stack.admin + path, method="PUT", data=body, headers=wrong).status == 403
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert fetch(stack.admin + path, method="PUT", data=body, headers=right).status == 200
    resp = fetch(f"{stack.public}/img/250x250/photos/astronaut.jpg")
    assert resp.status == 200
    assert resp.header("X-Heatcrop-Path") == "override"
    x0, y0, x1, y1 = _box(resp.header("X-Heatcrop-Box"))
    assert x0 <= 0 and y0 <= 0 and x1 >= 200 and y1 >= 200


@pytest.mark.parametrize(
    ("path", "statuses"),
    [
        ("/img/400x300/../../etc/passwd", {404}),
        ("/img/400x300/recipes/%2e%2e/%2e%2e/etc/passwd", {400, 404}),
        ("/img/400x300/recipes/..%2f..%2fetc%2fpasswd", {400, 404}),
        ("/img/400x300/%2fetc/passwd", {400, 404}),
        ("/img/100000x1/recipes/coffee.jpg", {404}),
        ("/img/0x0/recipes/coffee.jpg", {400}),
        ("/img/9999x9999/recipes/coffee.jpg", {400}),
        ("/img/400x300/recipes/missing.jpg", {404}),
        ("/img/400x300/recipes/notes.jpg", {415}),
        ("/img/400x300/recipes/empty.jpg", {415}),
    ],
)
def test_bad_public_urls_get_4xx_and_everything_stays_up(
    stack: Stack, path: str, statuses: set[int]
) -> None:
    resp = fetch(stack.public + path)
    assert resp.status in statuses, (resp.status, resp.body[:200])
    assert all(svc.running for svc in stack.services())
    ok = fetch(f"{stack.public}/img/120x90/photos/rocket.jpg")
    assert ok.status == 200 and ok.header("Content-Type") == "image/jpeg"
