"""A real, throwaway Redis Cluster of three masters on free loopback ports, for the cache tests.

Each master is a ``redis-server --cluster-enabled yes`` of its own (no persistence, its own
working directory and nodes file), the slots are assigned by ``redis-cli --cluster create``
(no replicas), and every process is stopped by its own PID. ``kill(i)`` is a master's crash;
``restart(i)`` brings it back on the same port with its nodes file, so it rejoins owning the
same slots (empty: nothing is persisted). The node timeout is short (``NODE_TIMEOUT_MS``) so
that the others mark a killed master failed, and the cluster refuses every key
(``cluster-require-full-coverage``, Redis' default) within a second or two.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.redis_server import INSTALL_HINT, free_port

MASTERS = 3
NODE_TIMEOUT_MS = 1000
START_TIMEOUT_S = 20.0


class RedisCluster:
    def __init__(self, workdir: Path, masters: int = MASTERS) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.server, self.cli = server, cli
        self.workdir = workdir
        self.ports = [free_port() for _ in range(masters)]
        # The cluster bus' own ports: by default port + 10000, past 65535 for half the range
        # free_port() draws from (such a master starts, and never listens).
        self.bus_ports = [free_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * masters

    @property
    def url(self) -> str:
        """The settings' cluster form: every master as a seed node."""
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        for i in range(len(self.ports)):
            self._spawn(i)
        for port in self.ports:
            self._wait_for(lambda port=port: self._ask(port, "PING") == "PONG", f"{port} PING")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            self.stop()
            pytest.fail(f"redis-cli --cluster create failed:\n{done.stdout.decode()}")
        self.wait_state("ok")

    def kill(self, i: int) -> None:
        """SIGKILL master ``i``, as in a crash."""
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
            self.procs[i] = None

    def restart(self, i: int) -> None:
        """Master ``i`` again, same port and nodes file; returns once the cluster is ok."""
        self._spawn(i)
        self.wait_state("ok")

    def wait_state(self, state: str) -> None:
        """Until every running master reports ``cluster_state:<state>``."""
        self._wait_for(lambda: all(s == state for s in self._states()), f"cluster_state {state}")

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            self.procs[i] = None

    def _spawn(self, i: int) -> None:
        if self.procs[i] is not None:
            raise RuntimeError(f"master {i} already running")
        port = self.ports[i]
        work = self.workdir / str(port)
        work.mkdir(parents=True, exist_ok=True)
        with (work / "redis.log").open("ab") as log:
            self.procs[i] = subprocess.Popen(
                [
                    self.server,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-port", str(self.bus_ports[i]),
                    "--cluster-config-file", str(work / "nodes.conf"),
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(work),
                    "--daemonize", "no",
                    "--loglevel", "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _states(self) -> list[str]:
        states = []
        for port, proc in zip(self.ports, self.procs, strict=True):
            if proc is None:
                continue
            if proc.poll() is not None:
                pytest.fail(f"redis-server on {port} exited; see {self.workdir / str(port)}")
            info = self._ask(port, "CLUSTER", "INFO")
            state = next((ln.split(":", 1)[1] for ln in info.splitlines() if ":" in ln), "")
            states.append(state.strip() if info.startswith("cluster_state") else "")
        return states

    def _ask(self, port: int, *command: str) -> str:
        done = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(port), *command],
            capture_output=True,
            timeout=5,
            check=False,
        )
        return done.stdout.decode().strip()

    def _wait_for(self, ok: object, what: str) -> None:
        assert callable(ok)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis cluster: no {what} within {START_TIMEOUT_S} s", pytrace=False)
