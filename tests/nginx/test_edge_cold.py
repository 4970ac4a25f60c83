"""The latency-first edge end to end: real nginx + the real sidecar with
``HEATCROP_SERVER_COLD_POLICY=legacy`` + real Thumbor on loopback; and the per-hop access log
the load benchmark reads (bench/hops.py), as this nginx writes it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.hops import read_lines, summarise
from nginx.render import HOPS_LOG
from nginx.stack import Stack, StackOptions
from tests.support.edge_stack import (
    SMART,
    fetch,
    make_images,
    metric,
    nn_runs,
    pixels,
    require_tools,
    sidecar_env,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    require_tools()
    options = StackOptions(
        workdir=tmp_path_factory.mktemp("edge-cold"),
        images=make_images(tmp_path_factory.mktemp("edge-cold-images")),
        sidecar_env=sidecar_env(model_dir, HEATCROP_SERVER_COLD_POLICY="legacy"),
        sidecar_timeout_ms=5000,
        access_log=True,
    )
    with Stack(options) as running:
        yield running


def _heatmaps_stored(stack: Stack) -> int:
    text = fetch(stack.admin + "/metrics").body.decode()
    return int(metric(text, "heatcrop_cold_heatmaps_total", result="computed"))


def test_first_sight_is_the_legacy_crop_briefly_cached_and_the_next_size_is_smart(
    stack: Stack,
) -> None:
    first = fetch(f"{stack.public}/img/400x300/recipes/{SMART}.jpg")
    assert first.status == 200
    assert first.header("X-Heatcrop-Served") == "fallback"
    assert first.header("X-Heatcrop-Path") == "cold"
    assert first.max_age is not None and 0 < first.max_age <= 30
    assert pixels(first.body).shape == (300, 400, 3)
    # The heatmap is made in the background: the CNN runs once, with nobody waiting.
    for _ in range(600):
        if nn_runs(stack.admin) >= 1 and _heatmaps_stored(stack) == 1:
            break
        time.sleep(0.05)
    assert nn_runs(stack.admin) == 1
    time.sleep(0.2)  # the cache write follows the engine call on the sidecar's loop
    second = fetch(f"{stack.public}/img/300x400/recipes/{SMART}.jpg")
    assert second.status == 200
    assert second.header("X-Heatcrop-Served") == "smart"
    assert (second.max_age or 0) >= 3600
    assert pixels(second.body).shape == (400, 300, 3)
    assert nn_runs(stack.admin) == 1
    # The first URL stays the legacy crop until its 30 s are over: a cache hit.
    again = fetch(f"{stack.public}/img/400x300/recipes/{SMART}.jpg")
    assert (again.header("X-Heatcrop-Cache"), again.header("X-Heatcrop-Served")) == (
        "HIT",
        "fallback",
    )


def test_the_hop_log_names_each_misses_sidecar_and_legacy_hop(stack: Stack) -> None:
    url = "/img/200x200/photos/rocket.jpg"
    fetch(stack.public + url)
    assert stack.edge_config is not None
    logs = stack.edge_config.out / "logs"
    for _ in range(100):  # nginx writes a request's line once it has answered it
        public = read_lines(logs / "access.log", 0, "public")
        inner = read_lines(logs / HOPS_LOG, 0, "inner")
        if any(url in line.request for line in public) and any(url in x.request for x in inner):
            break
        time.sleep(0.02)
    assert inner and all(len(line.hops) == 2 for line in inner)
    sidecar, legacy = inner[-1].hops
    assert sidecar.addr == stack.sidecars[0].address and sidecar.status == "200"
    assert legacy.addr == stack.legacy_addr and legacy.status == "200"
    summary = summarise(public, inner)
    assert summary.misses.n == len(inner)
    assert "cold" in summary.by_path
