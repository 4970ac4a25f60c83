"""The fallback path is as safe as the smart path: with the sidecar up, down, hung or failing,
every bad public URL gets the same answer class (4xx) and every good one an image. Real nginx,
real Thumbor (the stack's loader and limits), a real sidecar and real fake sidecars.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pyvips

from nginx.stack import HOST, Service, Stack, StackOptions, free_port
from tests.support.edge_stack import (
    SMART,
    fake_sidecar,
    fetch,
    make_images,
    pixels,
    require_tools,
    side_edge,
    sidecar_env,
)

pytestmark = pytest.mark.slow
TOKEN = "guard-token"
TIMEOUT_MS = 400
# Thumbor's peak memory (VmHWM) under the absurd-size bursts below: a 4000x4000 render (the
# largest size anyone may ask for) needs ~200 MB; 99999x99999 asked 6 GB of it on main.
THUMBOR_PEAK_BOUND = 1024 * 1024 * 1024


@dataclass
class Edges:
    stack: Stack
    by_state: dict[str, str]  # sidecar state -> public base URL
    sidecar_log: Path


def _images(root: Path, outside: Path) -> Path:
    make_images(root)
    outside.mkdir(parents=True, exist_ok=True)
    pyvips.Image.black(64, 48).new_from_image([255, 0, 0]).write_to_file(
        str(outside / "secret.jpg")
    )
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "recipes" / "link.jpg").symlink_to(outside / "secret.jpg")
    # 81 Mpx: over the pixel limit the sidecar and Thumbor share (75 Mpx), a small PNG file.
    pyvips.Image.black(9000, 9000).write_to_file(str(root / "photos" / "huge.png"), compression=9)
    return root


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Edges]:
    require_tools()
    base = tmp_path_factory.mktemp("guard")
    images = _images(base / "images", base / "outside")
    env = sidecar_env(model_dir, HEATCROP_SERVER_OVERRIDE_TOKEN=TOKEN)
    options = StackOptions(
        workdir=base / "stack", images=images, sidecar_env=env, sidecar_timeout_ms=3000
    )
    services: list[Service] = []
    with Stack(options) as stack:
        by_state = {"up": stack.public}
        try:
            by_state["down"] = side_edge(
                services, base / "down", f"{HOST}:{free_port()}", stack, TIMEOUT_MS
            )
            for mode in ("hang", "error"):
                port = free_port()
                services.append(fake_sidecar(base / mode, mode, port).start())
                by_state[mode] = side_edge(
                    services, base / mode, f"{HOST}:{port}", stack, TIMEOUT_MS
                )
            yield Edges(stack, by_state, stack.sidecars[0].log_path)
        finally:
            for svc in reversed(services):
                svc.stop()


STATES = ("up", "down", "hang", "error")
BAD = [
    # sizes: what the sidecar refuses, nginx refuses with the same words
    ("/img/99999x99999/photos/astronaut.jpg", b"size over the limit 4000x4000"),
    ("/img/5000x100/photos/astronaut.jpg", b"size over the limit 4000x4000"),
    ("/img/0x0/photos/astronaut.jpg", b"size 0x0 has no area"),
    ("/img/4000x3/photos/astronaut.jpg", b"aspect ratio out of range"),
    # paths: traversal in any encoding, symlinks out of the root, odd bytes, length
    ("/img/400x300/recipes/%252e%252e/%252e%252e/etc/passwd", b"invalid path"),
    ("/img/400x300/recipes//coffee.jpg", b"invalid path"),
    ("/img/400x300/recipes/a%5cb.jpg", b"invalid path"),
    ("/img/400x300/recipes/a%01b.jpg", b"invalid path"),
    ("/img/400x300/" + "a" * 1100 + ".jpg", b"invalid path"),
    # a folder's name, and names that are not UTF-8 (each a file nobody can be served)
    ("/img/400x300/recipes/coffee.jpg/", b"invalid path"),
    ("/img/400x300/" + "%FF" * 400, b"invalid path"),
    ("/img/400x300/recipes/caf%E9.jpg", b"invalid path"),
    ("/img/400x300/escape/secret.jpg", None),
    ("/img/400x300/recipes/link.jpg", None),
    ("/img/400x300/recipes/missing.jpg", None),
    ("/img/400x300/recipes/notes.jpg", None),
    ("/img/400x300/photos/huge.png", None),  # over the shared pixel limit
]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize(("path", "said"), BAD)
def test_bad_urls_get_a_4xx_whatever_the_sidecar_does(
    edges: Edges, state: str, path: str, said: bytes | None
) -> None:
    resp = fetch(edges.by_state[state] + path)
    assert 400 <= resp.status < 500, (state, resp.status, resp.body[:200])
    if said is not None:
        assert resp.body.strip() == said
    else:
        assert resp.body.strip(), "a refusal says why"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("size", ["400x300", "120x90", "400x0", "4000x4000"])
def test_good_urls_get_an_image_whatever_the_sidecar_does(
    edges: Edges, state: str, size: str
) -> None:
    resp = fetch(f"{edges.by_state[state]}/img/{size}/recipes/{SMART}.jpg")
    assert resp.status == 200 and resp.header("Content-Type") == "image/jpeg"
    if size == "400x300":
        assert pixels(resp.body).shape == (300, 400, 3)


@pytest.mark.parametrize("state", STATES)
def test_other_methods_are_refused_by_nginx(edges: Edges, state: str) -> None:
    url = f"{edges.by_state[state]}/img/400x300/recipes/{SMART}.jpg"
    for method in ("POST", "DELETE", "FOO"):
        resp = fetch(url, method=method, data=b"x" if method == "POST" else None)
        assert resp.status == 405, (state, method, resp.status)


def test_the_outside_file_is_never_served(edges: Edges) -> None:
    # Thumbor alone, as nginx's fallback reaches it: its loader refuses what resolves outside.
    for name in ("escape/secret.jpg", "recipes/link.jpg", "escape/../escape/secret.jpg"):
        resp = fetch(f"{edges.stack.legacy_base}/unsafe/64x48/{name}")
        assert resp.status == 404, (name, resp.status)
    inside = fetch(f"{edges.stack.legacy_base}/unsafe/64x48/recipes/{SMART}.jpg")
    assert inside.status == 200


def test_too_many_pixels_is_a_clear_413_from_the_sidecar(edges: Edges) -> None:
    resp = fetch(f"{edges.stack.sidecar_base()}/crop/400x300/photos/huge.png")
    assert (resp.status, resp.body) == (413, b"source has too many pixels")
    # With the sidecar down, the stack's Thumbor loader refuses it alike, and nginx says why.
    down = fetch(edges.by_state["down"] + "/img/400x300/photos/huge.png")
    assert (down.status, down.body) == (413, b"source has too many pixels\n")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_thumbors_memory_stays_bounded_under_absurd_sizes(edges: Edges) -> None:
    thumbor = edges.stack.legacy_service
    assert thumbor is not None and thumbor.pid is not None
    for state in ("down", "hang"):
        for n in range(10):
            resp = fetch(f"{edges.by_state[state]}/img/9999{n}x9999{n}/photos/astronaut.jpg")
            assert resp.status == 400
    # The second wall: asked directly, Thumbor clamps to the largest size the sidecar accepts.
    for _ in range(3):
        resp = fetch(f"{edges.stack.legacy_base}/unsafe/99999x99999/photos/astronaut.jpg")
        assert resp.status == 200
        assert max(pyvips.Image.new_from_buffer(resp.body, "").width, 0) <= 4000
    assert _peak_rss(thumbor.pid) < THUMBOR_PEAK_BOUND
    assert thumbor.running


def _raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and body of the last answer to a raw request (or pipelined requests)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    starts = list(re.finditer(rb"HTTP/1\.[01] (\d{3}) ", data))
    assert starts, data[:200]
    return int(starts[-1].group(1)), data[starts[-1].end() :].partition(b"\r\n\r\n")[2]


def _get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize("state", STATES)
def test_sizes_are_ascii_digits_only(edges: Edges, state: str) -> None:
    port = int(edges.by_state[state].rpartition(":")[2])
    for digits in ("٤٠٠x٣٠٠", "４００x３００", "४००x३००"):
        status, _ = _raw(port, _get(f"/img/{digits}/photos/astronaut.jpg"))
        assert 400 <= status < 500, (state, digits, status)


def test_malformed_requests_to_the_sidecar_are_one_line_and_a_short_body(edges: Edges) -> None:
    port = edges.stack.sidecar_ports[0]
    log_before = edges.sidecar_log.read_text(errors="replace")
    crop = b"/crop/400x300/recipes/coffee.jpg"
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
    cases = [
        # an unknown method after a good request on the same connection
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nFOO " + crop + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /crop/400x300/" + b"a" * 12_000 + b".jpg HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET " + crop + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        b"GET " + crop + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n",
        _get("/crop/٤٠٠x٣٠٠/recipes/coffee.jpg"),
    ]
    for request in cases:
        status, body = _raw(port, request)
        assert 400 <= status < 500, (status, body[:200])
        assert len(body) < 64 and b"crop" not in body and b"aaaa" not in body, body[:200]
    time.sleep(0.5)
    new = edges.sidecar_log.read_text(errors="replace")[len(log_before) :]
    assert "Traceback" not in new and " ERROR " not in new, new[-2000:]
    assert new.count("refused a malformed request") == len(cases), new[-2000:]
    assert edges.stack.sidecars[0].running


def test_nginx_keeps_client_headers_from_the_sidecar(edges: Edges) -> None:
    log_before = edges.sidecar_log.read_text(errors="replace")
    headers = {f"X-H{i}": "v" for i in range(200)}
    resp = fetch(f"{edges.stack.public}/img/410x300/recipes/{SMART}.jpg", headers=headers)
    assert resp.status == 200 and resp.header("X-Heatcrop-Served") == "smart"
    new = edges.sidecar_log.read_text(errors="replace")[len(log_before) :]
    assert "malformed" not in new


def test_an_override_beyond_the_image_is_clipped_and_the_crops_hold_it(edges: Edges) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"{edges.stack.admin}/override/photos/rocket.jpg"
    size = pyvips.Image.new_from_file(str(edges.stack.options.images / "photos/rocket.jpg"))
    w, h = size.width, size.height
    put = fetch(
        url, method="PUT", data=b'{"box": [%d, 10, 99999, %d]}' % (w - 60, h - 10), headers=auth
    )
    assert put.status == 200, put.body
    assert b'"box": [%d, 10, %d, %d]' % (w - 60, w, h - 10) in put.body
    outside = fetch(url, method="PUT", data=b'{"box": [%d, 0, 99999, 5]}' % w, headers=auth)
    assert outside.status == 400
    for size_text in ("400x300", "300x300", "160x90"):
        resp = fetch(f"{edges.stack.public}/img/{size_text}/photos/rocket.jpg")
        assert resp.header("X-Heatcrop-Path") == "override", resp.header("X-Heatcrop-Path")
        x0, y0, x1, y1 = (int(v) for v in resp.header("X-Heatcrop-Box").split(","))
        assert x0 <= w - 60 and x1 == w and y0 >= 0 and y1 <= h


def test_a_hung_legacy_server_costs_one_legacy_timeout(edges: Edges) -> None:
    stack = edges.stack
    thumbor = stack.legacy_service
    assert thumbor is not None and thumbor.pid is not None
    timeout_s = 1.5
    stack.restart_edge(legacy_timeout_ms=int(timeout_s * 1000))
    os.kill(thumbor.pid, signal.SIGSTOP)
    try:
        for url, state in (
            (f"{stack.public}/img/420x300/recipes/{SMART}.jpg", "up"),
            (f"{edges.by_state['down']}/img/421x300/recipes/{SMART}.jpg", "down"),
        ):
            t0 = time.monotonic()
            resp = fetch(url)
            elapsed = time.monotonic() - t0
            assert resp.status == 504, (state, resp.status)
            assert resp.body == b"the image server timed out\n"
            # Two hops in a row (smart, then plain) would take two timeouts at least.
            if state == "up":
                assert elapsed < 2 * timeout_s, elapsed
    finally:
        os.kill(thumbor.pid, signal.SIGCONT)
        stack.restart_edge(legacy_timeout_ms=3000)
    assert fetch(f"{stack.public}/img/422x300/recipes/{SMART}.jpg").status == 200
