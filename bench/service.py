"""Speed of the sidecar service over HTTP, measured with wrk against real sidecar processes.

    python -m bench.service [--out bench/results/service.md]

(a) box-cache hit: sidecar pinned to core 0, wrk to core 1, one warmed URL, 10 s:
    req/s and p50/p99 (targets ≥ 5,000 req/s, p99 ≤ 5 ms);
(b) heatmap-cache hit: originals analysed once, then every request a new aspect ratio, one
    connection: time per answer (target ≤ 1 ms), and the CNN-run counter must not move;
(c0) cold capacity: a sidecar whose heatmap cache holds a single entry, so every request
    decodes and runs the CNN, under a deadline of 60 s, so that nothing gives up for time: 4
    connections unpaced, cold answers per second, and how many gave up all the same;
(c) cold path under overload: such a sidecar with the default deadline; wrk offers 10× the
    capacity (or ``--offered``) for 30 s, paced per connection; p50/p99, errors and the share
    of each X-Heatcrop-Path (target: p99 under the deadline, no errors).

Servers listen on free loopback ports and are stopped by their own PID in ``finally``.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from bench.wrk_summary import WRK_PRIORITY, WrkSummary, parse_summary
from sidecar import settings as settings_mod
from training.data import publish

WRK_DIR = Path(__file__).parent / "wrk"
DEFAULT_SOURCE = Path("../shared/eval/fcdb_dev/images")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
# Heights of the generated sizes: primes in 1000..2000, a different one per run, so that with
# widths 100..2000 (p itself skipped) no two requests of the whole benchmark share a reduced
# aspect on one original (see bench/wrk/common.lua); the warm-up sizes (1x1, 4x3) need W = p.
HEIGHTS = {"heatmap": 1009, "capacity": 1013, "overload": 1019, "overload_cached": 1021}
HEATMAP_ORIGINALS = 20
# (c0)'s deadline: long enough that no request gives up for time, so what it measures is the
# cold path's throughput. Under the default deadline 4 unpaced connections are a give-up storm
# once the engine runs late: every refusal comes back at once and asks again (3-13 cold
# answers/s with 99.5 % given up, FP32 and faces, 2026-12-06), a figure of the loop, not of
# the cold path.
CAPACITY_DEADLINE_MS = 60_000
PROBE_INTERVAL_S = 0.05


class WrkResult(WrkSummary):
    def share(self, *names: str) -> float:
        """Share of the answers whose X-Heatcrop-Path is one of ``names``."""
        return sum(self.counts.get(n, 0) for n in names) / max(1, sum(self.counts.values()))


@dataclass(frozen=True)
class ProbeSummary:
    count: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class Overload:
    wrk: WrkResult
    delay_ms: float
    probe: ProbeSummary
    giveups: dict[str, int]  # by reason, during the run (sidecar /metrics)
    own_p99_ms: float  # the sidecar's own answer time, p99 bucket bound (sidecar /metrics)


@dataclass(frozen=True)
class Runs:
    hit: WrkResult
    heat: WrkResult
    nn_runs_heat: int
    capacity: WrkResult
    answered: float  # capacity: answers per second that did not give up
    overload: Overload
    overload_cached: Overload


@dataclass(frozen=True)
class Sidecar:
    base: str
    pid: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hit-seconds", type=int, default=10)
    parser.add_argument("--hit-connections", type=int, default=16)
    parser.add_argument("--heatmap-seconds", type=int, default=5)
    parser.add_argument("--capacity-seconds", type=int, default=8)
    parser.add_argument("--overload-seconds", type=int, default=30)
    parser.add_argument("--overload-factor", type=float, default=10.0)
    parser.add_argument(
        "--offered", type=float, help="req/s offered in (c), (c') (default: factor × capacity)"
    )
    parser.add_argument("--overload-connections", type=int, default=500)
    parser.add_argument(
        "--only",
        choices=("all", "overload"),
        default="all",
        help="overload: only (c0), (c), (c') (for iterating on the cold path; no report file)",
    )
    args = parser.parse_args()
    originals = sorted(p.name for p in args.source.glob("*.jpg"))
    if not originals:
        sys.exit(f"no photos in {args.source}")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores: one for the sidecar, one for wrk")
    root = str(args.source.resolve())
    settings = settings_mod.load()
    started = datetime.now(UTC)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="heatcrop-bench-") as tmp:
        lists = Path(tmp)
        if args.only == "all":
            with sidecar({"HEATCROP_SOURCE_ROOT": root}, cores="0") as warm:
                hit = bench_hit(warm, originals[0], args)
                heat, nn_runs_heat = bench_heatmap(warm, originals[:HEATMAP_ORIGINALS], lists, args)
        # Heatmap cache of one entry: every request decodes its original and runs the CNN.
        cold_env = {"HEATCROP_SOURCE_ROOT": root, "HEATCROP_CACHE_HEATMAP_ENTRIES": "1"}
        capacity_env = {**cold_env, "HEATCROP_SERVER_DEADLINE_MS": str(CAPACITY_DEADLINE_MS)}
        with sidecar(capacity_env, cores=None) as cold:
            capacity, answered = bench_capacity(cold, originals, lists, args)
        offered = args.offered or args.overload_factor * max(answered, 1.0)
        with sidecar(cold_env, cores=None) as cold:
            over = bench_overload(cold, originals, lists, args, offered, HEIGHTS["overload"])
        # Default caches, fresh process: each original is analysed once, then served as a
        # heatmap-cache hit, which is what a real overload of few originals looks like.
        with sidecar({"HEATCROP_SOURCE_ROOT": root}, cores=None) as fresh:
            over_cached = bench_overload(
                fresh, originals, lists, args, offered, HEIGHTS["overload_cached"]
            )
    if args.only == "overload":
        print(f"(c0) capacity {answered:.0f} answers/s ({fmt_paths(capacity)})")
        for name, o in (("(c)", over), ("(c')", over_cached)):
            print(overload_detail(name, o, answered))
        return
    runs = Runs(hit, heat, nn_runs_heat, capacity, answered, over, over_cached)
    loads = (load_before, os.getloadavg()[0])
    lines = report(started, settings, args, len(originals), runs, loads)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


# -- scenarios ------------------------------------------------------------------------------


def bench_hit(svc: Sidecar, original: str, args: argparse.Namespace) -> WrkResult:
    url = f"{svc.base}/crop/400x300/{original}"
    for _ in range(3):  # the first computes the box, the rest must be box-cache hits
        get(url)
    if get(url).get("X-Heatcrop-Path") not in ("cached", "low-confidence"):
        sys.exit(f"{url} is not a box-cache hit after warming")
    return wrk(url, "hit.lua", seconds=args.hit_seconds, connections=args.hit_connections)


def bench_heatmap(
    svc: Sidecar, originals: Sequence[str], lists: Path, args: argparse.Namespace
) -> tuple[WrkResult, int]:
    for name in originals:  # one analysis per original; 1x1 is never asked by the Lua script
        get(f"{svc.base}/crop/500x500/{name}")
    runs_before = nn_runs(svc)
    env = {"HEATCROP_BENCH_PATHS": write_list(lists / "heatmap.txt", originals)}
    env["HEATCROP_BENCH_HEIGHT"] = str(HEIGHTS["heatmap"])
    result = wrk(svc.base + "/", "sizes.lua", seconds=args.heatmap_seconds, connections=1, env=env)
    return result, nn_runs(svc) - runs_before


def bench_capacity(
    svc: Sidecar, originals: Sequence[str], lists: Path, args: argparse.Namespace
) -> tuple[WrkResult, float]:
    """A few connections, no pacing: the run, and what was answered without giving up, per s."""
    env = {
        "HEATCROP_BENCH_PATHS": write_list(lists / "cold.txt", originals),
        "HEATCROP_BENCH_HEIGHT": str(HEIGHTS["capacity"]),
    }
    result = wrk(svc.base + "/", "sizes.lua", seconds=args.capacity_seconds, connections=4, env=env)
    return result, result.rate * (1.0 - result.share("giveup"))


def bench_overload(
    svc: Sidecar,
    originals: Sequence[str],
    lists: Path,
    args: argparse.Namespace,
    offered: float,
    height: int,
) -> Overload:
    """``offered`` req/s for the run, with /healthz probed meanwhile."""
    # Each connection waits delay() after each answer; answers within the deadline are short
    # against the pause at this rate, so connections / pause ≈ the offered rate. Slow answers
    # lower the rate actually offered, which the report shows.
    delay_ms = 1000.0 * args.overload_connections / offered
    env = {
        "HEATCROP_BENCH_PATHS": write_list(lists / "cold.txt", originals),
        "HEATCROP_BENCH_HEIGHT": str(height),
        "HEATCROP_BENCH_DELAY_MS": f"{delay_ms:.3f}",
    }
    before = scrape(svc)
    with HealthProbe(svc.base) as probe:
        result = wrk(
            svc.base + "/",
            "sizes.lua",
            seconds=args.overload_seconds,
            connections=args.overload_connections,
            env=env,
        )
    after = scrape(svc)
    giveups = {
        reason: int(after.get(key, 0) - before.get(key, 0))
        for key in after
        if (reason := _label(key, "heatcrop_giveups_total", "reason")) is not None
    }
    own_p99 = histogram_quantile(before, after, "heatcrop_stage_seconds", 'stage="total"', 0.99)
    return Overload(result, delay_ms, probe.summary(), giveups, own_p99 * 1000.0)


class HealthProbe:
    """GET /healthz every ``PROBE_INTERVAL_S`` on one kept-alive connection, timing each answer.

    /healthz does no work beyond the event loop, so its latency under load is how long any
    request waits for the loop: the share of the overload p99 that is queueing for the
    sidecar's own CPU rather than for the engine.
    """

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.samples: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-probe", daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        while not self._stop.wait(PROBE_INTERVAL_S):
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                continue
            self.samples.append(time.perf_counter() - t0)
        conn.close()

    def summary(self) -> ProbeSummary:
        ms = sorted(1000.0 * s for s in self.samples) or [math.nan]
        return ProbeSummary(
            count=len(self.samples),
            failures=self.failures,
            p50_ms=ms[len(ms) // 2],
            p99_ms=ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            max_ms=ms[-1],
        )


# -- processes ------------------------------------------------------------------------------


@contextmanager
def sidecar(env: Mapping[str, str], cores: str | None) -> Iterator[Sidecar]:
    with tempfile.TemporaryFile() as log:
        proc, svc = _started(env, cores, log)
        try:
            yield svc
        finally:
            stop(proc)


# Starts tried before giving up: the free port found may be taken by another process (on a
# shared machine, e.g. Ray's workers) before the sidecar binds it, and the sidecar then exits.
START_ATTEMPTS = 3


class SidecarExited(RuntimeError):
    pass


def _started(
    env: Mapping[str, str], cores: str | None, log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], Sidecar]:
    cmd = [sys.executable, "-m", "sidecar.app"]
    if cores is not None:
        cmd = ["taskset", "-c", cores, *cmd]
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        full_env = {**os.environ, **env, "HEATCROP_SERVER_PORT": str(port)}
        full_env["HEATCROP_SERVER_HOST"] = "127.0.0.1"
        log.seek(0)
        log.truncate()
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        svc = Sidecar(f"http://127.0.0.1:{port}", proc.pid)
        try:
            wait_ready(svc, proc, log)
        except SidecarExited:
            if attempt + 1 == START_ATTEMPTS:
                raise
            continue
        except BaseException:
            stop(proc)
            raise
        return proc, svc
    raise AssertionError("unreachable")


def wait_ready(svc: Sidecar, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            raise SidecarExited(f"sidecar exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(svc.base + "/healthz", timeout=1) as resp:
                if resp.status == 200 and proc.poll() is None:
                    return
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass  # not up yet, or another process's port (it exits: tried again)
        time.sleep(0.2)
    raise RuntimeError(f"sidecar not ready after {START_TIMEOUT_S:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # by PID: only the process this script started
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrk(
    url: str,
    script: str,
    *,
    seconds: int,
    connections: int,
    env: Mapping[str, str] | None = None,
) -> WrkResult:
    cmd = [*WRK_PRIORITY, "taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    cmd += ["--latency", "--timeout", "2s", "-s", str(WRK_DIR / script), url]
    out = subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    return WrkResult(**vars(parse_summary(out, "HEATCROP_WRK", "paths")))


def get(url: str) -> Mapping[str, str]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return dict(resp.headers)


def nn_runs(svc: Sidecar) -> int:
    with urllib.request.urlopen(svc.base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^\S*nn_runs_total\S* (\d+(?:\.\d+)?)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("no nn_runs_total in /metrics")
    return int(float(match.group(1)))


def scrape(svc: Sidecar) -> dict[str, float]:
    """Every sample of /metrics, keyed by its name with labels as written."""
    with urllib.request.urlopen(svc.base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _label(key: str, name: str, label: str) -> str | None:
    match = re.fullmatch(re.escape(name) + r"\{(.*)\}", key)
    if match is None:
        return None
    found = re.search(label + r'="([^"]*)"', match.group(1))
    return found.group(1) if found else None


def histogram_quantile(
    before: Mapping[str, float], after: Mapping[str, float], name: str, match: str, q: float
) -> float:
    """Upper bound of the bucket holding quantile ``q`` of what was observed between scrapes."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{") and match in key:
            le = _label(key, name + "_bucket", "le")
            if le is not None:
                buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return math.inf


def write_list(path: Path, names: Sequence[str]) -> str:
    path.write_text("\n".join(names) + "\n")
    return str(path)


# -- report ---------------------------------------------------------------------------------


def report(
    started: datetime,
    settings: settings_mod.Settings,
    args: argparse.Namespace,
    n_originals: int,
    runs: Runs,
    loads: tuple[float, float],
) -> list[str]:
    deadline = settings.server.deadline_ms
    hit, heat, cap = runs.hit, runs.heat, runs.capacity
    over_setup = (
        f"{args.overload_factor:.0f}× capacity asked, {args.overload_connections} conns "
        f"paced {runs.overload.delay_ms:.0f} ms, {args.overload_seconds} s"
    )
    lines = [
        f"# heatcrop sidecar service speed ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), no GPU; wrk 4.1, one thread, "
        "pinned to core 1. `python -m bench.service --out bench/results/service.md`.",
        f"1-minute load average {loads[0]:.2f} before the run and {loads[1]:.2f} after it "
        "(the benchmark itself included); other work may share the machine.",
        "",
        f"Settings: defaults (deadline_ms={deadline}, engine {settings.engine.kind}, "
        f"threads={settings.engine.threads}, profile={settings.engine.profile}, "
        f"max_batch={settings.server.max_batch}, max_wait_ms={settings.server.max_wait_ms}, "
        f"max_queue={settings.server.max_queue}, decode_threads={settings.server.decode_threads}, "
        f"memory caches), source = folder `{args.source}` ({n_originals} photos), "
        "except where the setup says otherwise.",
        "",
        "| scenario | setup | req/s | p50 ms | p99 ms | target | met |",
        "|---|---|---:|---:|---:|---|---|",
        row(
            "(a) box-cache hit",
            f"sidecar on core 0, {args.hit_connections} conns, {args.hit_seconds} s",
            hit,
            "≥ 5,000 req/s, p99 ≤ 5 ms",
            hit.rate >= 5000 and hit.p99_ms <= 5.0,
        ),
        row(
            "(b) heatmap-cache hit",
            f"sidecar on core 0, 1 conn, {args.heatmap_seconds} s, "
            f"{HEATMAP_ORIGINALS} originals, new aspect each request",
            heat,
            "≤ 1 ms per answer (mean)",
            heat.mean_ms <= 1.0,
        ),
        row(
            "(c0) cold capacity",
            f"heatmap cache of 1 entry, deadline {CAPACITY_DEADLINE_MS // 1000} s, 4 conns "
            f"unpaced, {args.capacity_seconds} s",
            cap,
            "(measures capacity)",
            None,
        ),
        overload_row(
            "(c) cold overload", f"heatmap cache of 1 entry, {over_setup}", runs.overload, deadline
        ),
        overload_row(
            "(c') overload, default caches",
            f"fresh sidecar, {over_setup}",
            runs.overload_cached,
            deadline,
        ),
        "",
        "Details:",
        f"- (a) {hit.requests} requests, mean {hit.mean_ms:.2f} ms, max {hit.max_ms:.1f} ms, "
        f"socket errors {hit.socket_errors}, non-2xx {hit.non_2xx}.",
        f"- (b) mean {heat.mean_ms:.3f} ms per answer (wrk's response time over loopback, so an "
        f"upper bound of the sidecar's own time), p90 {heat.p90_ms:.2f} ms; CNN runs during "
        f"the run: {runs.nn_runs_heat} (must be 0); paths {fmt_paths(heat)}.",
        f"- (c0) capacity without giving up ≈ {runs.answered:.0f} answers/s "
        f"({cap.rate:.0f} req/s answered, paths {fmt_paths(cap)}).",
        overload_detail("(c)", runs.overload, runs.answered),
        overload_detail("(c')", runs.overload_cached, runs.answered),
        "",
        "Notes:",
        "- (c0), (c), (c') run sidecars that are not pinned (ONNX Runtime uses both cores); wrk",
        "  stays on core 1, so it shares that core with the sidecar"
        + (
            ", at a higher priority (nice -10) so that it reads answers when they come."
            if WRK_PRIORITY
            else "."
        ),
        f"- (c0) runs under a {CAPACITY_DEADLINE_MS // 1000} s deadline, so that nothing gives up "
        "for time: under the",
        "  default one, 4 unpaced connections turn into a give-up storm once the engine runs late",
        "  (each refusal asks again at once): a figure of the event loop, not of the cold path.",
        "- (c0) and (c) set `HEATCROP_CACHE_HEATMAP_ENTRIES=1`, so every request decodes its",
        "  original and runs the CNN; with the default cache each of the originals is analysed",
        "  once (or in the background after a give-up) and later requests are heatmap hits: (c').",
        "- Sizes are W×H with W in 100..2000 and H a prime in 1000..2000 that differs per run,",
        "  so no request in any run is a box-cache hit (bench/wrk/common.lua).",
        "- wrk paces each connection (delay() after each answer): slow answers lower the rate",
        "  actually offered, which is the `req/s` column; latency counts from the request's send.",
    ]
    return lines


def overload_row(name: str, setup: str, o: Overload, deadline: int) -> str:
    r = o.wrk
    errors = r.socket_errors + r.non_2xx
    return row(
        name, setup, r, f"p99 < {deadline} ms, 0 errors", r.p99_ms < deadline and errors == 0
    )


def overload_detail(name: str, o: Overload, answered: float) -> str:
    r, p = o.wrk, o.probe
    return (
        f"- {name} offered {r.rate:.0f} req/s = {r.rate / max(answered, 1.0):.1f}× capacity; "
        f"errors: socket {r.socket_errors}, non-2xx {r.non_2xx}; mean {r.mean_ms:.1f} ms, "
        f"p50 {r.p50_ms:.1f} ms, p90 {r.p90_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
        f"max {r.max_ms:.1f} ms; paths {fmt_paths(r)}; "
        f"/healthz meanwhile ({p.count} probes, {p.failures} failed): p50 {p.p50_ms:.1f} ms, "
        f"p99 {p.p99_ms:.1f} ms, max {p.max_ms:.1f} ms; the sidecar's own answer time "
        f"(stage total) p99 ≤ {o.own_p99_ms:.0f} ms; give-ups by reason "
        f"{', '.join(f'{k} {v}' for k, v in sorted(o.giveups.items()) if v) or 'none'}."
    )


def row(name: str, setup: str, r: WrkResult, target: str, met: bool | None) -> str:
    mark = "" if met is None else ("yes" if met else "**no**")
    figures = f"{r.rate:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f}"
    return f"| {name} | {setup} | {figures} | {target} | {mark} |"


def fmt_paths(r: WrkResult) -> str:
    total = max(1, sum(r.counts.values()))
    return ", ".join(
        f"{k} {100 * v / total:.1f}%" for k, v in sorted(r.counts.items(), key=lambda kv: -kv[1])
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
