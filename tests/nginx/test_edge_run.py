"""`make run`'s supervisor as a user runs it: `python -m nginx.stack`, URLs printed, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nginx.stack import REPO, http_status
from tests.support.edge_stack import fetch, pixels, require_tools, sidecar_env

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 180.0


def _read_until(proc: subprocess.Popen[str], lines: list[str], marker: str) -> str:
    """The output so far, once a line starts with ``marker`` (read by a thread: a buffered
    pipe and select() do not mix)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not any(line.startswith(marker) for line in lines):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"no {marker!r} from nginx.stack:\n{''.join(lines)}")
        time.sleep(0.2)
    return "".join(lines)


def _pump(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)


def _start_stack(
    tmp_path: Path, model_dir: Path
) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """`python -m nginx.stack` on free ports, its output collected by a thread."""
    require_tools()
    env = {**os.environ, **sidecar_env(model_dir)}
    cmd = [sys.executable, "-m", "nginx.stack", "--images", str(tmp_path / "images")]
    cmd += ["--workdir", str(tmp_path / "run"), "--port", "0", "--admin-port", "0"]
    cmd += ["--sidecar-port", "0", "--thumbor-port", "0", "--sidecar-timeout-ms", "3000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
    reader.start()
    return proc, lines, reader


def test_stack_prints_urls_serves_them_and_stops_on_sigterm(
    tmp_path: Path, model_dir: Path
) -> None:
    proc, lines, reader = _start_stack(tmp_path, model_dir)
    try:
        text = _read_until(proc, lines, "  logs")
        public = re.search(r"public\s+(http://\S+)", text)
        gallery = re.search(r"gallery\s+(http://\S+)", text)
        legacy = re.search(r"legacy\s+(http://\S+)", text)
        assert public and gallery and legacy, text
        resp = fetch(public.group(1))
        assert resp.status == 200 and pixels(resp.body).shape == (300, 400, 3)
        assert fetch(gallery.group(1)).status == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
        out = "".join(lines)
        assert proc.returncode == 0, out
        assert "stopped." in out
        # Nothing answers any more: nginx, sidecar and Thumbor are gone.
        for url in (public.group(1), gallery.group(1), legacy.group(1)):
            assert http_status(url, timeout=1.0) is None
    finally:
        if proc.poll() is None:
            # SIGTERM: the supervisor stops its children; a SIGKILL would orphan them.
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_killed_sidecar_is_restarted_while_nginx_serves_the_legacy_crop(
    tmp_path: Path, model_dir: Path
) -> None:
    proc, lines, reader = _start_stack(tmp_path, model_dir)
    try:
        text = _read_until(proc, lines, "  pids")
        public = re.search(r"public\s+(http://\S+)", text)
        pids = dict(re.findall(r"(\w+(?:-\w+)?):\d+ (\d+)", text.split("  pids", 1)[1]))
        assert public and "sidecar" in pids, text
        base = public.group(1).split("/img/")[0]
        os.kill(int(pids["sidecar"]), signal.SIGKILL)
        # nginx and Thumbor stay up and answer every request with the legacy crop meanwhile.
        served = []
        deadline = time.monotonic() + READY_TIMEOUT_S
        n = 0
        while time.monotonic() < deadline:
            n += 1
            resp = fetch(f"{base}/img/{300 + n}x200/photos/rocket.jpg")
            assert resp.status == 200 and pixels(resp.body).shape == (200, 300 + n, 3)
            served.append(resp.header("X-Heatcrop-Served"))
            if served[-1] == "smart":
                break
            time.sleep(0.2)
        assert "fallback" in served and served[-1] == "smart", served
        out = "".join(lines)
        assert re.search(r"sidecar:\d+ exited \(killed by SIGKILL\); restarting in 1 s", out), out
        assert re.search(r"sidecar:\d+ restarted \(pid \d+\)", out), out
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert proc.returncode == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
