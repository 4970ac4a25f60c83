"""A crash of any process of the stack heals itself: nginx killed (its unix socket left behind),
the supervisor killed (its children go with it), `make run` started again at once (same ports).
Real nginx, sidecar and Thumbor, as `python -m nginx.stack` runs them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nginx.launch import SocketInUse, clear_stale_sockets
from nginx.render import NginxConfig
from nginx.stack import (
    HOST,
    REPO,
    Service,
    Supervisor,
    free_port,
    http_status,
    nginx_service,
)
from tests.support.edge_stack import fetch, pixels, require_tools, sidecar_env

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 180.0


def _conf_with_socket(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sock = out / "inner.sock"
    (out / "nginx.conf").write_text(f"http {{ server {{ listen unix:{sock}; }} }}\n")
    return sock


def _left_behind(path: Path) -> None:
    """A unix socket file with no listener, as a killed nginx leaves it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.close()  # closing does not remove the file


def test_the_launcher_removes_a_socket_nobody_listens_on(tmp_path: Path) -> None:
    sock = _conf_with_socket(tmp_path)
    _left_behind(sock)
    assert sock.exists()
    assert clear_stale_sockets(tmp_path) == [sock]
    assert not sock.exists()
    assert clear_stale_sockets(tmp_path) == []


def test_the_launcher_never_removes_a_live_socket(tmp_path: Path) -> None:
    sock = _conf_with_socket(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(8)
        with pytest.raises(SocketInUse, match="another nginx"):
            clear_stale_sockets(tmp_path)
        assert sock.exists()


def test_a_killed_nginx_starts_again_on_its_own_folder(tmp_path: Path) -> None:
    require_tools()
    cfg = NginxConfig(
        out=tmp_path / "nginx",
        listen=f"{HOST}:{free_port()}",
        admin_listen=f"{HOST}:{free_port()}",
        sidecars=(f"{HOST}:{free_port()}",),
        legacy=f"{HOST}:{free_port()}",
    )
    first = nginx_service(cfg).start()
    try:
        first.kill()  # SIGKILL to the master and its workers, as the OOM killer would
        assert (cfg.out / "inner.sock").exists()
        second = nginx_service(cfg).start()  # raised StartError (bind ... in use) before
        try:
            assert fetch(f"http://{cfg.listen}/img/400x300/a.jpg").status in (200, 502, 504)
        finally:
            second.stop()
    finally:
        first.stop()
    assert not (cfg.out / "inner.sock").exists()  # a clean stop leaves nothing behind


# -- make run -------------------------------------------------------------------------------


def _pump(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)


def _wait_for(lines: list[str], proc: subprocess.Popen[str], pattern: str, after: int = 0) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        text = "".join(lines[after:])
        if re.search(pattern, text, re.MULTILINE):
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} from nginx.stack:\n{''.join(lines)}")


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that is gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class MakeRun:
    """`python -m nginx.stack` on fixed ports and a fixed workdir, its output collected."""

    def __init__(self, tmp_path: Path, model_dir: Path, ports: dict[str, int]) -> None:
        env = {**os.environ, **sidecar_env(model_dir)}
        cmd = [sys.executable, "-m", "nginx.stack", "--images", str(tmp_path / "images")]
        cmd += ["--workdir", str(tmp_path / "run"), "--sidecar-timeout-ms", "3000"]
        for name, port in ports.items():
            cmd += [f"--{name}", str(port)]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=_pump, args=(self.proc, self.lines), daemon=True)
        self.reader.start()

    def ready(self) -> tuple[str, dict[str, int]]:
        text = _wait_for(self.lines, self.proc, r"^  pids")
        public = re.search(r"public\s+(http://\S+)", text)
        assert public, text
        pids = re.findall(r"([\w-]+):\d+ (\d+)", text.split("  pids", 1)[1])
        return public.group(1), {name: int(pid) for name, pid in pids}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_make_run_heals_an_nginx_crash_and_its_own(tmp_path: Path, model_dir: Path) -> None:
    require_tools()
    ports = {p: free_port() for p in ("port", "admin-port", "sidecar-port", "thumbor-port")}
    run = MakeRun(tmp_path, model_dir, ports)
    try:
        url, pids = run.ready()
        assert f":{ports['port']}/" in url
        # 1. nginx killed as the OOM killer would: its socket stays, the supervisor's restart
        # must still bind (it backed off to 30 s forever before).
        after = len(run.lines)
        os.kill(pids["nginx-edge"], signal.SIGKILL)
        _wait_for(run.lines, run.proc, r"nginx-edge:\d+ restarted \(pid \d+\)", after)
        deadline = time.monotonic() + 30
        while http_status(url) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        resp = fetch(url)
        assert resp.status == 200 and pixels(resp.body).shape == (300, 400, 3), run.lines
        log = (tmp_path / "run" / "nginx" / "logs" / "error.log").read_text()
        assert "Address already in use" not in log
        # 2. The supervisor killed: every child goes with it, none keeps a port.
        children = [pid for name, pid in pids.items() if name != "nginx-edge"]
        children += [
            int(p)
            for p in re.findall(r"nginx-edge:\d+ restarted \(pid (\d+)\)", "".join(run.lines))
        ]
        run.proc.kill()
        run.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "children outlived the supervisor"
    finally:
        run.close()
    # 3. make run again at once, on the same folder: the same ports (not moved in silence).
    again = MakeRun(tmp_path, model_dir, ports)
    try:
        url2, _ = again.ready()
        assert url2 == url, "".join(again.lines)
        assert "is busy" not in "".join(again.lines)
        assert fetch(url2).status == 200
    finally:
        again.close()


def test_the_supervisor_does_not_restart_a_process_that_cannot_start(tmp_path: Path) -> None:
    said: list[str] = []
    cannot = Service(
        name="sidecar:1",
        cmd=[sys.executable, "-c", "import sys; print('heatcrop: model not built'); sys.exit(2)"],
        log_path=tmp_path / "cannot.log",
        ready=lambda: True,
    ).spawn()
    crashes = Service(
        name="thumbor:2",
        cmd=[sys.executable, "-c", "import sys; sys.exit(1)"],
        log_path=tmp_path / "crashes.log",
        ready=lambda: True,
    ).spawn()
    supervisor = Supervisor([cannot, crashes], say=said.append)
    for svc in (cannot, crashes):
        assert svc.proc is not None
        svc.proc.wait(30)
    now = time.monotonic()
    for step in range(4):
        supervisor.check(now + step * 40.0)
    try:
        assert any("sidecar:1 cannot start (exit code 2): not restarting" in s for s in said), said
        assert not any("sidecar:1 restarted" in s for s in said), said
        assert any("thumbor:2 restarted" in s for s in said), said  # a crash is restarted
    finally:
        cannot.stop()
        crashes.stop()
