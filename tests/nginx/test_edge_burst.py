"""A burst of valid but expensive requests costs its sender, not everyone: real nginx, sidecar
and Thumbor on loopback. Each burst is bounded (a few dozen requests, a timeout on each).
"""

from __future__ import annotations

import http.client
import io
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pyvips
from PIL import Image

from nginx.limits import MAX_ANIMATION_PIXELS
from nginx.render import HOPS_LOG
from nginx.stack import Stack, StackOptions
from tests.support.edge_stack import fetch, make_images, require_tools, sidecar_env

pytestmark = pytest.mark.slow
PHOTOS = ("recipes/coffee.jpg", "photos/chelsea.jpg", "photos/astronaut.jpg", "photos/rocket.jpg")
# A second loopback address: the burst's sender, told apart from everyone else by nginx.
SENDER = "127.0.0.2"
OTHERS = "127.0.0.1"


@dataclass(frozen=True)
class Got:
    status: int | str
    seconds: float
    retry_after: str | None = None


def _get(base: str, path: str, source: str = OTHERS, timeout: float = 30.0) -> Got:
    host, _, port = base.removeprefix("http://").partition(":")
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return Got(resp.status, time.monotonic() - start, resp.getheader("Retry-After"))
    except OSError as exc:
        return Got(type(exc).__name__, time.monotonic() - start)
    finally:
        conn.close()


def _noise_gif(path: Path, frames: int, side: int) -> None:
    """An animated GIF that is slow to render: noise compresses badly frame after frame."""
    rng = np.random.default_rng(frames)
    images = [
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).convert("P")
        for _ in range(frames)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    require_tools()
    base = tmp_path_factory.mktemp("burst")
    images = make_images(base / "images")
    _noise_gif(images / "anim" / "noise.gif", frames=60, side=256)
    _noise_gif(images / "anim" / "small.gif", frames=3, side=64)
    # 72 Mpx (under the shared 75 Mpx limit), a PNG (no shrink-on-load): valid, and a few
    # seconds of Thumbor's time whatever the size asked.
    big = pyvips.Image.xyz(12000, 6000)[0].cast("uchar")
    big.bandjoin([big, big]).write_to_file(str(images / "recipes" / "big.png"), compression=1)
    options = StackOptions(
        workdir=base / "stack",
        images=images,
        sidecar_env=sidecar_env(model_dir),
        sidecar_timeout_ms=1000,
        access_log=True,
    )
    with Stack(options) as st:
        yield st


def _frames(data: bytes) -> int:
    return int(pyvips.Image.new_from_buffer(data, "", n=-1).get("n-pages"))


def test_an_animation_over_the_bound_is_rendered_as_its_first_frame(stack: Stack) -> None:
    assert 60 * 256 * 256 > MAX_ANIMATION_PIXELS >= 3 * 64 * 64
    big = fetch(f"{stack.legacy_base}/unsafe/128x128/anim/noise.gif", timeout=60)
    assert big.status == 200 and _frames(big.body) == 1
    small = fetch(f"{stack.legacy_base}/unsafe/32x32/anim/small.gif")
    assert small.status == 200 and _frames(small.body) == 3


def test_a_request_the_edge_gave_up_on_is_not_rendered(stack: Stack) -> None:
    url = f"{stack.legacy_base}/unsafe/400x300/recipes/coffee.jpg"
    past = str(int(time.time() * 1000) - 1)
    gone = fetch(url, headers={"X-Heatcrop-Deadline": past})
    assert gone.status == 504 and gone.body == b""
    future = str(int(time.time() * 1000) + 60_000)
    assert fetch(url, headers={"X-Heatcrop-Deadline": future}).status == 200
    assert fetch(url).status == 200  # no header: asked directly, nothing to go by


def _inner_hops(stack: Stack, needle: str) -> int:
    log = stack.workdir / "nginx" / "logs" / HOPS_LOG
    return sum(needle in line for line in log.read_text().splitlines())


def test_waiters_for_one_url_share_one_render(stack: Stack) -> None:
    path = "/img/3999x2000/recipes/big.png"
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda _: _get(stack.public, path), range(12)))
    # One request went in (the cache lock's holder); the 11 others waited for its answer,
    # whatever it was, instead of each sending the same render after 2 s.
    assert len({g.status for g in got}) == 1, got
    assert _inner_hops(stack, "3999x2000/recipes/big.png") == 1


def _burst_and_others(stack: Stack, burst: list[str], width: int) -> tuple[list[Got], list[Got]]:
    """``burst`` from SENDER, ``width`` at a time; meanwhile 40 new URLs of other clients."""
    others = [f"/img/{300 + i}x{211 + i % 7}/{PHOTOS[i % len(PHOTOS)]}" for i in range(40)]
    with ThreadPoolExecutor(width) as senders, ThreadPoolExecutor(4) as clients:
        sent = [senders.submit(_get, stack.public, p, SENDER) for p in burst]
        time.sleep(0.3)
        done = list(clients.map(lambda p: _get(stack.public, p), others))
        return [f.result() for f in sent], done


def test_one_clients_burst_of_large_sizes_leaves_room_for_others(stack: Stack) -> None:
    burst = [f"/img/4000x{1000 + i}/recipes/coffee.jpg" for i in range(48)]
    sent, others = _burst_and_others(stack, burst, width=16)
    assert Counter(g.status for g in others) == Counter({200: 40}), others
    statuses = Counter(g.status for g in sent)
    # The sender's misses beyond its share are refused at once, with a hint when to retry.
    assert set(statuses) <= {200, 429} and statuses[429] > 0, statuses
    assert all(g.retry_after == "1" for g in sent if g.status == 429)


def test_a_burst_for_one_slow_animation_leaves_room_for_others(stack: Stack) -> None:
    sent, others = _burst_and_others(stack, ["/img/200x200/anim/noise.gif"] * 20, width=20)
    assert Counter(g.status for g in others) == Counter({200: 40}), others
    assert Counter(g.status for g in sent) == Counter({200: 20}), sent
    image = Image.open(io.BytesIO(fetch(f"{stack.public}/img/200x200/anim/noise.gif").body))
    assert image.size == (200, 200)
