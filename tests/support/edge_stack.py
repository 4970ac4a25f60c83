"""Helpers of the edge tests: the demo images, HTTP without exceptions, pixels, metrics.

The processes themselves are started by ``nginx.stack`` (the same code as ``make run`` and
the load benchmark), from fixtures in each test module, on free loopback ports.
"""

from __future__ import annotations

import re
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
import pyvips

from nginx.limits import edge_limits
from nginx.render import NginxConfig
from nginx.stack import HOST, REPO, Service, Stack, free_port, http_status, nginx_service
from nginx.thumbor import THUMBOR_VENV
from sidecar.demo import write_demo_images

THUMBOR_HINT = (
    "Thumbor is not installed: the edge tests need the real one. `make thumbor` creates "
    ".venv-thumbor from the pins in pyproject.toml's `legacy` extra."
)
NGINX_HINT = "nginx is not installed: `apt-get install nginx` (or `make apt-deps`)."
SMART = "coffee-wide"  # the demo photo whose subject is off centre: smart crops differ


def sidecar_env(model_dir: Path, redis_url: str = "", **extra: str) -> dict[str, str]:
    """A test sidecar's settings: the session's model, one engine thread, Redis if given."""
    env = {"HEATCROP_ENGINE_MODEL_DIR": str(model_dir), "HEATCROP_ENGINE_THREADS": "1"}
    if redis_url:
        env |= {"HEATCROP_CACHE_BACKEND": "redis", "HEATCROP_CACHE_REDIS_URL": redis_url}
    return env | extra


def require_tools() -> None:
    if not (REPO / THUMBOR_VENV / "bin" / "thumbor").exists():
        pytest.fail(THUMBOR_HINT, pytrace=False)
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail(NGINX_HINT, pytrace=False)


def make_images(root: Path) -> Path:
    """The demo photos, plus files that are not images, under ``root``."""
    write_demo_images(root)
    (root / "recipes" / "notes.jpg").write_text("not a JPEG at all\n")
    (root / "recipes" / "empty.jpg").write_bytes(b"")
    return root


@dataclass(frozen=True)
class Resp:
    status: int
    headers: Message
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    @property
    def max_age(self) -> int | None:
        match = re.search(r"max-age=(\d+)", self.header("Cache-Control"))
        return int(match.group(1)) if match else None


def fetch(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Resp:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Resp(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return Resp(exc.code, exc.headers, exc.read())


def pixels(data: bytes | pyvips.Image) -> np.ndarray:
    image = data if isinstance(data, pyvips.Image) else pyvips.Image.new_from_buffer(data, "")
    if image.bands > 3:
        image = image[:3]
    return np.asarray(image.numpy(), dtype=np.float32)


def crop_resized(original: Path, box: tuple[int, int, int, int], w: int, h: int) -> np.ndarray:
    """What a crop of ``box`` resized to w×h should look like, made by libvips."""
    x0, y0, x1, y1 = box
    image = pyvips.Image.new_from_file(str(original)).crop(x0, y0, x1 - x0, y1 - y0)
    return pixels(image.resize(w / image.width, vscale=h / image.height))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.mean(np.abs(a - b)))


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def nn_runs(base: str) -> int:
    return int(metric(fetch(base + "/metrics").body.decode(), "heatcrop_nn_runs_total"))


def crop_requests(base: str) -> int:
    return int(metric(fetch(base + "/metrics").body.decode(), "heatcrop_requests_total"))


def fake_sidecar(workdir: Path, mode: str, port: int) -> Service:
    """A real process on ``port`` that hangs or answers 500 (tests.support.edge_servers)."""
    return Service(
        name=f"fake-sidecar-{mode}:{port}",
        cmd=[sys.executable, "-m", "tests.support.edge_servers", mode, str(port)],
        log_path=workdir / "logs" / f"fake-{mode}-{port}.log",
        ready=lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200,
    )


def side_edge(
    services: list[Service], workdir: Path, sidecar: str, stack: Stack, timeout_ms: int = 3000
) -> str:
    """Another nginx in front of ``sidecar`` (a dead address, a fake) with ``stack``'s legacy
    server and limits, appended to ``services``; its public base URL."""
    cfg = NginxConfig(
        out=workdir / "nginx",
        listen=f"{HOST}:{free_port()}",
        admin_listen=f"{HOST}:{free_port()}",
        sidecars=(sidecar,),
        legacy=stack.legacy_addr,
        sidecar_timeout_ms=timeout_ms,
        limits=edge_limits(stack.sidecar_settings()),
    )
    services.append(nginx_service(cfg).start())
    return f"http://{cfg.listen}"
