"""The local stack: Thumbor + sidecar(s) + nginx on loopback, started and stopped as one.

    python -m nginx.stack [--port 8080] [--admin-port 8090] [--images demo/images]

is ``make run``: it writes the demo photos, starts each process, waits until each answers,
prints the URLs to try, starts again whatever exits (``Supervisor``: nginx serves the legacy
crop while a sidecar is down) and, on Ctrl-C or SIGTERM, stops each process by its own PID
(nginx first, so no request reaches a stopped sidecar). The same ``Stack`` (or its parts:
``start_thumbor``, ``start_sidecar``, ``start_nginx``) is what the integration tests and the
load benchmark start, so there is one piece of code that runs the product.

Every child runs in its own session: a Ctrl-C in the terminal reaches this supervisor only,
which stops the children in order instead of all of them racing to exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from nginx import render as render_mod
from nginx.limits import LegacyLimits, edge_limits, legacy_limits
from nginx.thumbor import THUMBOR_VENV, render_thumbor_conf, thumbor_binary
from sidecar import settings as settings_mod

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
# make run's supervisor: a process that exits is started again after this back-off, doubled
# at each exit up to the maximum, and back to the first once it has run RESTART_RESET_S.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
RESTART_RESET_S = 60.0
# A child that exits with this code says it cannot run as configured (sidecar.app's typed
# start-up errors): the supervisor does not start it again.
CONFIG_EXIT = 2
# The sidecar's own deadline leaves this much of nginx's timeout for the hop and the redirect.
DEADLINE_MARGIN_MS = 30


class StartError(RuntimeError):
    """A process of the stack exited or did not become ready; the message has its log tail."""


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``port`` now. With SO_REUSEADDR, as nginx, aiohttp and
    Thumbor bind: a stack stopped a moment ago leaves its ports in TIME_WAIT, which would
    otherwise read as busy and move the next ``make run`` to other ports."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class Service:
    """One child process, started in its own session and stopped by its own PID."""

    name: str
    cmd: list[str]
    log_path: Path
    ready: Callable[[], bool]
    env: Mapping[str, str] | None = None
    cwd: Path = REPO
    stop_signal: int = signal.SIGTERM
    start_timeout_s: float = START_TIMEOUT_S
    address: str = ""  # host:port it serves, where it has one
    # SIGTERM to the child when the process that started it dies, even by SIGKILL: make run's
    # children must not outlive their supervisor (they would hold its ports). Off for the
    # tests' and benchmarks' stacks, which may start services from a short-lived thread.
    die_with_parent: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Service:
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self) -> Service:
        """Start the process without waiting for it to answer."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()) if self.die_with_parent else None,
            )
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc is not None else None
                raise StartError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise StartError(
            f"{self.name} not ready after {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Its stop signal, then SIGKILL after STOP_TIMEOUT_S, to its process group: the
        group is the session this process was started in, so it holds what it forked
        (Thumbor's --processes) and nothing else."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, self.stop_signal)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        # Forked children may outlive their parent for a moment.
        self._signal_group(proc, signal.SIGKILL)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
        self.proc = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)

    def restart(self) -> Service:
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


# -- the parts ------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when ``parent`` dies (Linux prctl)."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def thumbor_service(
    workdir: Path,
    images: Path,
    *,
    port: int | None = None,
    key: str = "",
    limits: LegacyLimits | None = None,
    processes: int = 1,
    venv: Path = THUMBOR_VENV,
) -> Service:
    """Thumbor on ``images`` with heatcrop's loader and limits (nginx/thumbor.py)."""
    port = port or free_port()
    conf = render_thumbor_conf(workdir / "thumbor.conf", images, key=key, limits=limits)
    cmd = [str(thumbor_binary(_absolute(venv)))]
    cmd += ["-i", HOST, "-p", str(port), "-c", str(conf), "-l", "warning"]
    if processes != 1:
        cmd += ["--processes", str(processes)]
    base = f"http://{HOST}:{port}"
    return Service(
        name=f"thumbor:{port}",
        cmd=cmd,
        # The loader (nginx.thumbor_loader) is this repository's; it imports only Thumbor.
        env={**os.environ, "PYTHONPATH": str(REPO)},
        log_path=workdir / "logs" / f"thumbor-{port}.log",
        ready=lambda: http_status(base + "/healthcheck") == 200,
        address=f"{HOST}:{port}",
    )


def sidecar_service(
    workdir: Path,
    *,
    port: int | None = None,
    images: Path,
    legacy_base: str,
    env: Mapping[str, str] | None = None,
    nginx_timeout_ms: int = 150,
) -> Service:
    """``python -m sidecar.app`` configured through HEATCROP_* variables (see sidecar.settings).

    The stack's defaults (the image folder, the deadline) give way to HEATCROP_* variables of
    this process's environment (e.g. an HTTP origin for ``make run``), and those to ``env``;
    the address is always the stack's.
    """
    port = port or free_port()
    full = {
        **sidecar_environ(images, legacy_base, env, nginx_timeout_ms),
        "HEATCROP_SERVER_HOST": HOST,
        "HEATCROP_SERVER_PORT": str(port),
    }
    base = f"http://{HOST}:{port}"
    return Service(
        name=f"sidecar:{port}",
        cmd=[sys.executable, "-m", "sidecar.app"],
        env=full,
        log_path=workdir / "logs" / f"sidecar-{port}.log",
        ready=lambda: http_status(base + "/healthz") == 200,
        address=f"{HOST}:{port}",
    )


def sidecar_environ(
    images: Path,
    legacy_base: str,
    env: Mapping[str, str] | None = None,
    nginx_timeout_ms: int = 150,
) -> dict[str, str]:
    """The environment a stack's sidecar reads its settings from (all but its address)."""
    defaults = {
        "HEATCROP_SOURCE_KIND": "folder",
        "HEATCROP_SOURCE_ROOT": str(images.resolve()),
        "HEATCROP_SERVER_DEADLINE_MS": str(max(10, nginx_timeout_ms - DEADLINE_MARGIN_MS)),
    }
    if legacy_base:
        defaults["HEATCROP_LEGACY_BASE_URL"] = legacy_base
    return {**defaults, **os.environ, **(env or {})}


def nginx_service(cfg: render_mod.NginxConfig) -> Service:
    """An nginx of a rendered config, checked with ``nginx -t`` first; ready when it answers."""
    if os.geteuid() == 0 and cfg.user is None:
        # As root, workers would run as nobody, who cannot enter root's private folders.
        cfg = replace(cfg, user="root")
    render_mod.render(cfg)
    render_mod.check(cfg.out)
    host, _, port = cfg.listen.rpartition(":")
    probe = f"http://{host or HOST}:{port}/"
    return Service(
        name=f"nginx-{cfg.mode}:{port}",
        # Through the launcher: it clears the unix socket a killed nginx leaves, then execs
        # nginx (same PID).
        cmd=[sys.executable, "-m", "nginx.launch", str(cfg.out.resolve())],
        log_path=cfg.out / "logs" / "stdout.log",
        ready=lambda: http_status(probe, timeout=1.0) is not None,
        # QUIT would wait for keep-alive clients; TERM is nginx's fast shutdown.
        stop_signal=signal.SIGTERM,
        start_timeout_s=20.0,
        address=f"{host or HOST}:{port}",
    )


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else REPO / path


# -- the whole stack ------------------------------------------------------------------------


@dataclass(frozen=True)
class StackOptions:
    workdir: Path
    images: Path
    port: int = 0  # 0: a free port
    admin_port: int = 0
    thumbor_port: int = 0
    sidecar_ports: tuple[int, ...] = (0,)  # one sidecar per entry
    # "thumbor" (started here), "standin" (nginx serving one static image, started here) or
    # "host:port" of a legacy server that is already running.
    legacy: str = "thumbor"
    thumbor_key: str = ""
    thumbor_processes: int = 1
    standin_image: Path | None = None
    sidecar_env: Mapping[str, str] = field(default_factory=dict)
    sidecar_timeout_ms: int = 150
    pattern: str = render_mod.DEFAULT_PATTERN
    cache_lock: bool = True
    workers: int = 1
    access_log: bool = False
    # Also start today's edge (nginx straight to the legacy server) on this port; 0: free port.
    legacy_edge_port: int | None = None
    thumbor_venv: Path = THUMBOR_VENV
    # make run: every child gets SIGTERM when the supervisor dies (Service.die_with_parent).
    die_with_parent: bool = False


class Stack:
    """Thumbor (or a stand-in) + sidecars + nginx; a context manager that stops everything."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.workdir = options.workdir.resolve()
        self.legacy_service: Service | None = None
        self.sidecars: list[Service] = []
        self.edge: Service | None = None
        self.legacy_edge: Service | None = None
        self.legacy_addr = ""
        self.public_port = 0
        self.admin_port = 0
        self.legacy_edge_port = 0
        self.sidecar_ports: list[int] = []
        self.edge_config: render_mod.NginxConfig | None = None

    # URLs --------------------------------------------------------------------------------
    @property
    def public(self) -> str:
        return f"http://{HOST}:{self.public_port}"

    @property
    def admin(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def legacy_base(self) -> str:
        return f"http://{self.legacy_addr}"

    def sidecar_base(self, i: int = 0) -> str:
        return f"http://{HOST}:{self.sidecar_ports[i]}"

    @property
    def legacy_edge_base(self) -> str:
        return f"http://{HOST}:{self.legacy_edge_port}"

    # lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sidecar_settings(self) -> settings_mod.Settings:
        """The settings the stack's sidecars run with: their limits are nginx's and the legacy
        server's too (nginx.limits), one source of truth."""
        opts = self.options
        environ = sidecar_environ(
            opts.images, "", self._sidecar_env(), nginx_timeout_ms=opts.sidecar_timeout_ms
        )
        return settings_mod.load(environ=environ)

    def start(self) -> None:
        opts = self.options
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = self.sidecar_settings()
        self._start_legacy(legacy_limits(settings))
        self.sidecar_ports = [p or free_port() for p in opts.sidecar_ports]
        for port in self.sidecar_ports:
            self.sidecars.append(self._run(self._sidecar(port)))
        self.public_port = opts.port or free_port()
        self.admin_port = opts.admin_port or free_port()
        self.edge_config = render_mod.NginxConfig(
            out=self.workdir / "nginx",
            listen=f"{HOST}:{self.public_port}",
            admin_listen=f"{HOST}:{self.admin_port}",
            sidecars=tuple(f"{HOST}:{p}" for p in self.sidecar_ports),
            legacy=self.legacy_addr,
            pattern=opts.pattern,
            sidecar_timeout_ms=opts.sidecar_timeout_ms,
            cache_lock=opts.cache_lock,
            workers=opts.workers,
            access_log=opts.access_log,
            legacy_key=opts.thumbor_key if opts.legacy != "standin" else "",
            limits=edge_limits(settings),
        )
        self.edge = self._run(nginx_service(self.edge_config))
        if opts.legacy_edge_port is not None:
            self.legacy_edge_port = opts.legacy_edge_port or free_port()
            cfg = replace(
                self.edge_config,
                out=self.workdir / "nginx-legacy",
                mode="legacy",
                listen=f"{HOST}:{self.legacy_edge_port}",
            )
            self.legacy_edge = self._run(nginx_service(cfg))

    def stop(self) -> None:
        """nginx first, then the sidecars, then the legacy server; each by its own PID."""
        for svc in (self.edge, self.legacy_edge, *self.sidecars, self.legacy_service):
            if svc is not None:
                svc.stop()

    def services(self) -> list[Service]:
        found = [self.legacy_service, *self.sidecars, self.edge, self.legacy_edge]
        return [s for s in found if s is not None]

    def restart_edge(self, **changes: object) -> None:
        """Render the edge again with ``changes`` (e.g. cache_lock=False) and restart it."""
        assert self.edge is not None and self.edge_config is not None
        self.edge.stop()
        self.edge_config = replace(self.edge_config, **changes)  # type: ignore[arg-type]
        shutil.rmtree(self.edge_config.out / "cache", ignore_errors=True)
        self.edge = self._run(nginx_service(self.edge_config))

    def restart_legacy_edge(self) -> None:
        """Restart today's edge with an empty cache."""
        assert self.legacy_edge is not None and self.edge_config is not None
        self.legacy_edge.stop()
        shutil.rmtree(self.workdir / "nginx-legacy" / "cache", ignore_errors=True)
        self.legacy_edge.start()

    def restart_sidecars(self, env: Mapping[str, str]) -> None:
        """Start every sidecar again (empty in-process caches), on the same ports, with ``env``
        instead of the stack's ``sidecar_env``, e.g. ``{"HEATCROP_SERVER_COLD_POLICY":
        "legacy"}``."""
        self.options = replace(self.options, sidecar_env=dict(env))
        for i, port in enumerate(self.sidecar_ports):
            self.sidecars[i].stop()
            self.sidecars[i] = self._run(self._sidecar(port))

    def _run(self, svc: Service) -> Service:
        svc.die_with_parent = self.options.die_with_parent
        return svc.start()

    def _sidecar(self, port: int) -> Service:
        return sidecar_service(
            self.workdir,
            port=port,
            images=self.options.images,
            legacy_base=self.legacy_base,
            env=self._sidecar_env(),
            nginx_timeout_ms=self.options.sidecar_timeout_ms,
        )

    def _sidecar_env(self) -> dict[str, str]:
        return {**self._sidecar_signing_env(), **self.options.sidecar_env}

    def _sidecar_signing_env(self) -> dict[str, str]:
        if self.options.legacy == "thumbor" and self.options.thumbor_key:
            key = self.options.thumbor_key
            return {"HEATCROP_LEGACY_DIALECT": "thumbor", "HEATCROP_LEGACY_KEY": key}
        return {}

    def _start_legacy(self, limits: LegacyLimits) -> None:
        opts = self.options
        if opts.legacy == "thumbor":
            port = opts.thumbor_port or free_port()
            self.legacy_service = self._run(
                thumbor_service(
                    self.workdir,
                    opts.images,
                    port=port,
                    key=opts.thumbor_key,
                    limits=limits,
                    processes=opts.thumbor_processes,
                    venv=opts.thumbor_venv,
                )
            )
            self.legacy_addr = f"{HOST}:{port}"
        elif opts.legacy == "standin":
            if opts.standin_image is None:
                raise ValueError("the stand-in legacy server needs standin_image")
            port = opts.thumbor_port or free_port()
            cfg = render_mod.NginxConfig(
                out=self.workdir / "nginx-standin",
                mode="standin",
                listen=f"{HOST}:{port}",
                standin_image=opts.standin_image,
                workers=1,
            )
            self.legacy_service = self._run(nginx_service(cfg))
            self.legacy_addr = f"{HOST}:{port}"
        else:
            self.legacy_addr = opts.legacy


# -- make run -------------------------------------------------------------------------------


@dataclass
class _Restart:
    delay_s: float = RESTART_BACKOFF_S
    due: float | None = None  # when an exited process is started again
    started: float = 0.0


class Supervisor:
    """Starts again whatever process of the stack exits, with a doubling back-off, and says so.

    nginx keeps serving meanwhile: a dead sidecar is a refused connection, which nginx answers
    with the legacy crop (``edge-fallback``); a restarted one answers smart crops again once
    its model is warm. Restarts do not wait for readiness, so one slow start delays nothing
    else.
    """

    def __init__(self, services: Sequence[Service], say: Callable[[str], None] = print) -> None:
        self.services = list(services)
        self.say = say
        self._state = {id(svc): _Restart(started=time.monotonic()) for svc in self.services}

    def check(self, now: float) -> None:
        for svc in self.services:
            state = self._state[id(svc)]
            if svc.running:
                if now - state.started > RESTART_RESET_S:
                    state.delay_s = RESTART_BACKOFF_S
                continue
            if state.due is None:
                self._exited(svc, state, now)
            elif now >= state.due:
                self._restart(svc, state, now)

    def _exited(self, svc: Service, state: _Restart, now: float) -> None:
        code = svc.proc.returncode if svc.proc is not None else None
        if code == CONFIG_EXIT:
            # It said why in one line (a missing model, a wrong setting): starting it again
            # would say the same every 30 s forever. nginx serves the legacy crop meanwhile.
            state.due = math.inf
            self.say(
                f"heatcrop: {svc.name} cannot start (exit code {code}): not restarting it; "
                f"fix what its log says and run again; log: {svc.log_path}"
            )
            return
        state.due = now + state.delay_s
        self.say(
            f"heatcrop: {svc.name} exited ({_exit_text(code)}); restarting in "
            f"{state.delay_s:.0f} s; log: {svc.log_path}"
        )
        state.delay_s = min(2 * state.delay_s, RESTART_BACKOFF_MAX_S)

    def _restart(self, svc: Service, state: _Restart, now: float) -> None:
        svc.stop()  # what the dead process forked (nginx's workers) goes with it
        state.due, state.started = None, now
        try:
            svc.spawn()
        except OSError as exc:
            self.say(f"heatcrop: {svc.name} did not start: {exc}")
            return
        self.say(f"heatcrop: {svc.name} restarted (pid {svc.pid})")


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _default_port(wanted: int, name: str) -> int:
    """``wanted`` (0: any free port) or, when something else holds it, a free port, said so."""
    if wanted == 0 or port_free(wanted):
        return wanted
    port = free_port()
    _say(f"heatcrop: port {wanted} ({name}) is busy, using {port}; --{name} PORT sets another")
    return port


def _print_urls(stack: Stack, images: Path) -> None:
    photos = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    first = photos[0] if photos else "recipes/coffee.jpg"
    lines = [
        "",
        "heatcrop is running (Ctrl-C stops everything):",
        f"  public   {stack.public}/img/400x300/{first}",
    ]
    lines += [f"           {stack.public}/img/{s}/{p}" for p in photos[1:3] for s in ("300x300",)]
    lines += [
        f"           {stack.public}/img/1080x1920/{first}   (portrait)",
        f"  headers  curl -sD- -o/dev/null {stack.public}/img/400x300/{first}",
        "           X-Heatcrop-Served: smart|fallback, X-Heatcrop-Cache: MISS|HIT",
        f"  gallery  {stack.admin}/debug/gallery?src={first}",
        f"  debug    {stack.admin}/debug/400x300/{first}   (heatmap overlay PNG)",
        f"  metrics  {stack.admin}/metrics      health: {stack.admin}/healthz",
        f"  legacy   {stack.legacy_base}/unsafe/400x300/{first}   (the legacy server alone)",
        f"  logs     {stack.workdir}/logs, {stack.workdir}/nginx/logs",
        "  pids     " + ", ".join(f"{svc.name} {svc.pid}" for svc in stack.services()),
        "",
    ]
    print("\n".join(lines), flush=True)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nginx.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=Path, default=Path("demo/images"))
    parser.add_argument("--workdir", type=Path, default=Path("build/run"))
    parser.add_argument("--port", type=int, default=8080, help="public port (busy: a free one)")
    parser.add_argument("--admin-port", type=int, default=8090)
    parser.add_argument("--sidecar-port", type=int, default=8081)
    parser.add_argument("--thumbor-port", type=int, default=8888)
    parser.add_argument(
        "--legacy",
        default="thumbor",
        help="thumbor (started here) or host:port of a running legacy server",
    )
    parser.add_argument("--sidecar-timeout-ms", type=int, default=150)
    parser.add_argument("--no-demo", action="store_true", help="do not write the demo photos")
    args = parser.parse_args(argv)
    try:
        # The sidecar signs with HEATCROP_LEGACY_KEY; nginx's own fallback must sign alike.
        key = settings_mod.load().legacy.key
    except settings_mod.SettingsError as exc:
        print(f"heatcrop: {exc}", file=sys.stderr)
        return 2
    if not args.no_demo:
        from sidecar.demo import write_demo_images

        write_demo_images(args.images)
    options = StackOptions(
        workdir=args.workdir,
        images=args.images,
        port=_default_port(args.port, "port"),
        admin_port=_default_port(args.admin_port, "admin-port"),
        sidecar_ports=(_default_port(args.sidecar_port, "sidecar-port"),),
        thumbor_port=_default_port(args.thumbor_port, "thumbor-port")
        if args.legacy == "thumbor"
        else 0,
        legacy=args.legacy,
        thumbor_key=key,
        sidecar_timeout_ms=args.sidecar_timeout_ms,
        die_with_parent=True,
    )
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stack = Stack(options)
    try:
        print(
            "starting the legacy server, the sidecar (loads and warms the model) and nginx…",
            flush=True,
        )
        with stack:
            _print_urls(stack, args.images)
            supervisor = Supervisor(stack.services(), say=_say)
            while True:
                supervisor.check(time.monotonic())
                time.sleep(0.5)
    except _Stop as why:
        print(f"\n{why}: stopping nginx, sidecar, legacy server…", flush=True)
        stack.stop()
        print("stopped.", flush=True)
        return 0
    except (StartError, FileNotFoundError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"heatcrop: {exc}\n{detail}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(_Stop):
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
