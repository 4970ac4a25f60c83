"""Cold cost of a crop against libvips attention as an image server runs it (issue 25).

    python -m bench.cost [--dir ../shared/eval/fcdb_dev/images] [--rounds 3]
        [--in-flight 2 4] [--out bench/results/cost.md]

In ONE run, round after round on the same photos, every request cold (a fresh sidecar for each
part of a round, so no photo was seen before by the process that answers it):

1. one cold request at a time, photo by photo, the methods' order rotating per photo: libvips
   attention in its own process with libvips' defaults (bench/cost_workers.py: threads,
   operation cache; ``configure_vips()`` is never called there); heatcrop's CropCore in its
   own process as the sidecar runs it (``configure_vips()``, the settings' engine and face
   detector), faces on and off; the real sidecar (``python -m sidecar.app`` on a free loopback
   port, started and stopped by its PID) over HTTP, faces on and off;
2. cost at saturation: every photo at 2 and 4 in flight, nothing given up (deadline 60 s;
   X-Heatcrop-Path and the sidecar's own counters say whether anything was): the sidecar with
   faces on and off, attention in a pool of as many threads in its own process. Images per
   second and the serving process's CPU per photo (/proc: a figure other jobs on a shared
   machine disturb less than a rate);
3. ratios against attention measured in the same round, summed up over the rounds as the
   median and the lowest and highest, beside the machine's load in each round.

``--baseline HEATCROP_X=v[,HEATCROP_Y=w]`` adds the sidecar with those settings as more methods
(over HTTP one at a time and at saturation, faces on and off, named "..., baseline"), run in
the same rounds on the same photos: the before of a change whose after is the defaults, e.g.
``--baseline HEATCROP_ENGINE_SESSION_PER_CORE=false``.

HEATCROP_* variables of this process reach the sidecars and CropCore (e.g.
HEATCROP_ENGINE_ORT_PRECISION=int8); faces and the deadline are set here.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bench.cost_stats import (
    Latency,
    Saturation,
    answer_kind,
    cost_ratio,
    count_kinds,
    fmt_kinds,
    merge_kinds,
    quantile,
    ratio,
    rotated,
    spread,
)
from bench.cost_workers import ATTENTION_CALL
from bench.service import Sidecar, _label, cpu_model, scrape, sidecar
from training.data import publish

DEFAULT_PHOTOS = Path("../shared/eval/fcdb_dev/images")
SIZE = "400x300"
DEADLINE_MS = 60_000
HTTP_TIMEOUT_S = 120.0
WORKER_STOP_S = 10.0

ATT = "libvips attention"
CORE_ON = "heatcrop in-process, faces on"
CORE_OFF = "heatcrop in-process, faces off"
HTTP_ON = "heatcrop sidecar over HTTP, faces on"
HTTP_OFF = "heatcrop sidecar over HTTP, faces off"
LATENCY_METHODS = (ATT, CORE_ON, CORE_OFF, HTTP_ON, HTTP_OFF)
SAT_ON = "heatcrop sidecar, faces on"
SAT_OFF = "heatcrop sidecar, faces off"
SAT_METHODS = (ATT, SAT_ON, SAT_OFF)
FACES = {CORE_ON: True, CORE_OFF: False, HTTP_ON: True, HTTP_OFF: False}
FACES |= {SAT_ON: True, SAT_OFF: False}
BASELINE = ", baseline"


@dataclass(frozen=True)
class Methods:
    """What a run measures: the methods of each phase, and the sidecar settings of each."""

    latency: tuple[str, ...] = LATENCY_METHODS
    http: tuple[str, ...] = (HTTP_ON, HTTP_OFF)
    sat: tuple[str, ...] = SAT_METHODS
    env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    baseline: str = ""

    def faces(self, method: str) -> bool:
        return FACES[method.removesuffix(BASELINE)]


def plan(baseline: str) -> Methods:
    """The default methods, and with ``baseline`` (HEATCROP_* assignments) the sidecar's with
    those settings beside them."""
    if not baseline:
        return Methods()
    extra = dict(kv.split("=", 1) for kv in baseline.split(",") if kv)
    if not extra or not all(k.startswith("HEATCROP_") for k in extra):
        raise SystemExit(f"--baseline takes HEATCROP_*=value assignments, not {baseline!r}")
    http = (HTTP_ON, HTTP_OFF, HTTP_ON + BASELINE, HTTP_OFF + BASELINE)
    sat = (*SAT_METHODS, SAT_ON + BASELINE, SAT_OFF + BASELINE)
    env = {m: extra for m in (*http, *sat) if m.endswith(BASELINE)}
    return Methods((*LATENCY_METHODS, *http[2:]), http, sat, env, baseline)


Reply = dict[str, Any]


# -- processes ------------------------------------------------------------------------------


class Worker:
    """A ``bench.cost_workers`` process: one JSON request a line in, one reply a line out."""

    def __init__(self, kind: str, env: Mapping[str, str], log: IO[bytes]) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cost_workers", kind],
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self._read()  # {"ready": true}, after the engine is loaded and warm

    def ask(self, **request: object) -> Reply:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> Reply:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(WORKER_STOP_S)
            self.log.seek(0)
            tail = self.log.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{tail}")
        reply: Reply = json.loads(line)
        return reply

    def close(self) -> None:
        """End of input, then its own PID if it does not exit."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(WORKER_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WORKER_STOP_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def worker(kind: str, env: Mapping[str, str] | None = None) -> Iterator[Worker]:
    with tempfile.TemporaryFile() as log:
        w = Worker(kind, env or {}, log)
        try:
            yield w
        finally:
            w.close()


def sidecar_env(root: Path, faces: bool) -> dict[str, str]:
    return {
        "HEATCROP_SOURCE_KIND": "folder",
        "HEATCROP_SOURCE_ROOT": str(root.resolve()),
        "HEATCROP_SERVER_DEADLINE_MS": str(DEADLINE_MS),
        "HEATCROP_KERNEL_FACES": "true" if faces else "false",
    }


def core_env(faces: bool) -> dict[str, str]:
    return {"HEATCROP_KERNEL_FACES": "true" if faces else "false"}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """One kept-alive HTTP connection to a sidecar."""

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT_S)

    def crop(self, name: str) -> tuple[str, float]:
        """(answer kind, ms) of /crop/400x300/<name>."""
        target = f"/crop/{SIZE}/{urllib.parse.quote(name)}"
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", target)
            resp = self.conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return "error", (time.perf_counter() - t0) * 1e3
        ms = (time.perf_counter() - t0) * 1e3
        return answer_kind(resp.status, resp.getheader("X-Heatcrop-Path")), ms

    def close(self) -> None:
        self.conn.close()


def metric_sum(samples: Mapping[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


# -- one request at a time ------------------------------------------------------------------


@dataclass
class LatencyRound:
    load: float
    by_method: dict[str, Latency]
    # In-process methods: median ms of their stages and CPU per photo (STAGES); the sidecars:
    # the mean ms of their own stages (SIDECAR_STAGES, from their histograms), their CPU per
    # photo and the client's mean ms
    stages: dict[str, dict[str, float]]


# What the in-process workers say of each photo beside its time (bench/cost_workers.py).
STAGES = {ATT: ("cpu_ms",), CORE_ON: ("decode", "infer", "cpu_ms")}
STAGES[CORE_OFF] = STAGES[CORE_ON]
# The sidecar's heatcrop_stage_seconds, in the order a cold request passes them; total is the
# handler's whole time.
SIDECAR_STAGES = ("fetch", "decode", "queue", "infer", "search", "total")


def stage_means(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Mean ms of each of the sidecar's stages between two scrapes of its /metrics."""
    out = {}
    for stage in SIDECAR_STAGES:
        key = f'heatcrop_stage_seconds_%s{{stage="{stage}"}}'
        count = after.get(key % "count", 0.0) - before.get(key % "count", 0.0)
        total = after.get(key % "sum", 0.0) - before.get(key % "sum", 0.0)
        out[stage] = 1e3 * total / count if count else math.nan
    return out


def latency_round(
    r: int,
    names: Sequence[str],
    warm: Sequence[str],
    root: Path,
    cores: Mapping[str, Worker],
    methods: Methods,
) -> LatencyRound:
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        att = stack.enter_context(worker("attention"))
        clients, services = {}, {}
        for method in methods.http:
            env = sidecar_env(root, methods.faces(method)) | dict(methods.env.get(method, {}))
            svc = stack.enter_context(sidecar(env, cores=None))
            services[method] = svc
            clients[method] = Client(svc.base)
            stack.callback(clients[method].close)
        samples: dict[str, list[float]] = {m: [] for m in methods.latency}
        kinds: dict[str, list[str]] = {m: [] for m in methods.latency}
        stages = {m: {k: list[float]() for k in keys} for m, keys in STAGES.items()}

        def run(method: str, name: str) -> tuple[str, float]:
            if method in clients:
                return clients[method].crop(name)
            reply = (cores.get(method) or att).ask(op="one", path=str(root / name))
            for key, values in stages[method].items():
                values.append(float(reply[key]))
            return "cold", float(reply["ms"])

        for name in warm:
            for method in methods.latency:
                run(method, name)
        for values in stages.values():
            for v in values.values():
                v.clear()
        before = {m: (scrape(svc), process_cpu_s(svc.pid)) for m, svc in services.items()}
        for i, name in enumerate(names):
            for method in rotated(methods.latency, r + i):
                kind, ms = run(method, name)
                samples[method].append(ms)
                kinds[method].append(kind)
        medians = {m: {k: quantile(v, 0.5) for k, v in s.items()} for m, s in stages.items()}
        for m, svc in services.items():
            metrics, cpu = before[m]
            medians[m] = stage_means(metrics, scrape(svc))
            medians[m]["cpu_ms"] = 1e3 * (process_cpu_s(svc.pid) - cpu) / len(names)
            medians[m]["client"] = statistics.mean(samples[m])
    return LatencyRound(
        load=load,
        by_method={m: Latency(tuple(samples[m]), count_kinds(kinds[m])) for m in methods.latency},
        stages=medians,
    )


# -- saturation -----------------------------------------------------------------------------


def http_saturation(svc: Sidecar, names: Sequence[str], n: int) -> Saturation:
    """Every photo through the sidecar, ``n`` requests in flight (one connection each)."""
    before = scrape(svc)
    pending = iter(names)
    lock = threading.Lock()
    kinds: list[str] = []
    clients = [Client(svc.base) for _ in range(n)]
    for c in clients:
        c.conn.connect()
    start = threading.Barrier(n + 1)

    def work(client: Client) -> None:
        start.wait()
        while True:
            with lock:
                name = next(pending, None)
            if name is None:
                return
            kinds.append(client.crop(name)[0])

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    cpu0, client0 = process_cpu_s(svc.pid), time.process_time()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1, client1 = process_cpu_s(svc.pid), time.process_time()
    for c in clients:
        c.close()
    after = scrape(svc)
    name = "heatcrop_giveups_total"
    reasons = {
        reason: round(after[key] - before.get(key, 0.0))
        for key in after
        if (reason := _label(key, name, "reason")) is not None
    }
    return Saturation(
        photos=len(names),
        kinds=count_kinds(kinds),
        wall_s=wall,
        server_cpu_s=cpu1 - cpu0,
        client_cpu_s=client1 - client0,
        metric_giveups=round(metric_sum(after, name) - metric_sum(before, name)),
        giveup_reasons={k: v for k, v in reasons.items() if v},
        cnn_runs=round(
            metric_sum(after, "heatcrop_nn_runs_total")
            - metric_sum(before, "heatcrop_nn_runs_total")
        ),
    )


def saturation_run(
    method: str, n: int, names: Sequence[str], warm: Sequence[str], root: Path, methods: Methods
) -> Saturation:
    """A fresh process for ``method``, warmed on ``warm``, then ``names`` at ``n`` in flight."""
    if method == ATT:
        with worker("attention") as att:
            for name in warm:
                att.ask(op="one", path=str(root / name))
            reply = att.ask(op="pool", n=n, paths=[str(root / name) for name in names])
        return Saturation(
            photos=len(names),
            kinds={"cold": int(reply["done"])},
            wall_s=float(reply["wall_s"]),
            server_cpu_s=float(reply["cpu_s"]),
        )
    env = sidecar_env(root, methods.faces(method)) | dict(methods.env.get(method, {}))
    with sidecar(env, cores=None) as svc:
        client = Client(svc.base)
        for name in warm:
            client.crop(name)
        client.close()
        return http_saturation(svc, names, n)


@dataclass
class SaturationRound:
    load: float
    runs: dict[tuple[int, str], Saturation] = field(default_factory=dict)


def saturation_round(
    r: int,
    names: Sequence[str],
    warm: Sequence[str],
    root: Path,
    in_flight: Sequence[int],
    methods: Methods,
) -> SaturationRound:
    out = SaturationRound(load=os.getloadavg()[0])
    for k, n in enumerate(in_flight):
        for method in rotated(methods.sat, r + k):
            out.runs[(n, method)] = saturation_run(method, n, names, warm, root, methods)
    return out


# -- main -----------------------------------------------------------------------------------


@dataclass
class Results:
    latency: list[LatencyRound] = field(default_factory=list)
    saturation: list[SaturationRound] = field(default_factory=list)
    info: dict[str, Reply] = field(default_factory=dict)
    uptime: list[str] = field(default_factory=list)
    methods: Methods = field(default_factory=Methods)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--photos", type=int, default=0, help="at most this many (0: all)")
    parser.add_argument("--warmup", type=int, default=2, help="photos that warm, not measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--phases", choices=("all", "latency", "saturation"), default="all")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--baseline",
        default="",
        help="HEATCROP_*=value assignments, comma-separated: the sidecar with them as more "
        "methods (the before of a change)",
    )
    args = parser.parse_args(argv)
    methods = plan(args.baseline)
    names = sorted(p.name for p in args.dir.glob("*.jpg"))
    if args.photos:
        names = names[: args.photos + args.warmup]
    warm, names = names[: args.warmup], names[args.warmup :]
    if not names:
        sys.exit(f"no photos in {args.dir} beyond the {args.warmup} warm-up ones")
    started = datetime.now(UTC)
    res = Results(uptime=[uptime()], methods=methods)
    with contextlib.ExitStack() as stack:
        latency = args.phases in ("all", "latency")
        cores = {
            m: stack.enter_context(worker("core", core_env(FACES[m])))
            for m in (CORE_ON, CORE_OFF) if latency
        }  # fmt: skip
        res.info = {m: w.ask(op="info") for m, w in cores.items()}
        with worker("attention") as att:
            res.info[ATT] = att.ask(op="info")
        for r in range(args.rounds):
            if latency:
                res.latency.append(latency_round(r, names, warm, args.dir, cores, methods))
                print(f"round {r + 1}: latency done ({uptime()})", file=sys.stderr)
            if args.phases in ("all", "saturation"):
                res.saturation.append(
                    saturation_round(r, names, warm, args.dir, args.in_flight, methods)
                )
                print(f"round {r + 1}: saturation done ({uptime()})", file=sys.stderr)
    res.uptime.append(uptime())
    lines = report(started, args, len(names), res)
    publish("\n".join(lines) + "\n", args.out)
    return 0


# -- report ---------------------------------------------------------------------------------


def report(started: datetime, args: argparse.Namespace, n: int, res: Results) -> list[str]:
    info_on, att = res.info.get(CORE_ON, {}), res.info.get(ATT, {})
    lines = [
        f"# heatcrop's cold cost against libvips attention ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python -m bench.cost` ({len(res.latency) or len(res.saturation)} rounds, "
        f"{n} photos of `{args.dir}` each round, {args.warmup} more to warm each process; "
        "every request cold: a fresh sidecar and attention process for each part of a round).",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), shared with other jobs; "
        f"`uptime` before: {res.uptime[0]}; after: {res.uptime[-1]}.",
        f"heatcrop: engine `{info_on.get('engine')}` (ort_precision={info_on.get('precision')}, "
        f"{info_on.get('threads')} threads), face detector `{info_on.get('detector')}` when "
        f"faces are on; libvips concurrency {info_on.get('vips_concurrency')} "
        f"(`configure_vips()`, as the sidecar). Attention: `{ATTENTION_CALL}` in its own "
        f"process, libvips {att.get('libvips')} with its defaults (concurrency "
        f"{att.get('vips_concurrency')}, operation cache {att.get('vips_cache_max')}).",
        "",
    ]
    if res.methods.baseline:
        lines += [
            f'Methods named "{BASELINE.removeprefix(", ")}" are the sidecar with '
            f"`{res.methods.baseline}`, in the same rounds on the same photos.",
            "",
        ]
    if res.latency:
        lines += latency_table(res.latency, res.methods)
    if res.saturation:
        lines += saturation_table(res.saturation, res.methods)
    lines += [
        "Medians over the rounds, lowest–highest in brackets; a ratio is taken within each round",
        "(both figures measured minutes apart on the same photos) and then summed up the same way.",
        "",
    ]
    lines += per_round(res)
    return lines


def latency_table(rounds: Sequence[LatencyRound], methods: Methods) -> list[str]:
    rows = []
    for m in methods.latency:
        med = spread(r.by_method[m].median for r in rounds)
        p90 = spread(r.by_method[m].p90 for r in rounds)
        rel = spread(ratio(r.by_method[m].median, r.by_method[ATT].median) for r in rounds)
        kinds = merge_kinds(r.by_method[m].kinds for r in rounds)
        rows.append(f"| {m} | {med.fmt()} | {p90.fmt()} | {rel.fmt(2, '×')} | {fmt_kinds(kinds)} |")
    stage_rows = []
    for m, keys in STAGES.items():
        cells = [spread(r.stages[m][k] for r in rounds).fmt() if k in keys else "—"
                 for k in ("decode", "infer", "cpu_ms")]  # fmt: skip
        stage_rows.append(f"| {m} | {' | '.join(cells)} |")
    sidecar_rows = []
    for m in methods.http:
        keys = (*SIDECAR_STAGES, "client", "cpu_ms")
        cells = [spread(r.stages[m][k] for r in rounds).fmt() for k in keys]
        sidecar_rows.append(f"| {m} | {' | '.join(cells)} |")
    return [
        "## One cold request at a time",
        "",
        "| method | median ms | p90 ms | median against attention | answers |",
        "|---|---:|---:|---:|---|",
        *rows,
        "",
        "In-process stages, median ms per photo: the decode is shrink-on-load to the CNN's",
        "bucket; the engine call is the CNN and, with faces on, the face detector on the same",
        "pixels; CPU is the process's user + system time over the photo, all threads.",
        "",
        "| method | decode | engine call | CPU |",
        "|---|---:|---:|---:|",
        *stage_rows,
        "",
        "The sidecar's own stages, mean ms per cold request (its `heatcrop_stage_seconds`,",
        "thread hops included: fetch = the read in the source's pool and the header; decode = in",
        "the decode pool; queue = waiting for the engine; infer = the engine call; total = the",
        "handler's whole time), the client's mean time, and the sidecar's CPU per photo:",
        "",
        "| method | " + " | ".join(SIDECAR_STAGES) + " | client | CPU |",
        "|---|" + "---:|" * (len(SIDECAR_STAGES) + 2),
        *sidecar_rows,
        "",
    ]


def saturation_table(rounds: Sequence[SaturationRound], methods: Methods) -> list[str]:
    in_flight = sorted({n for r in rounds for n, _ in r.runs})
    rows = []
    for n in in_flight:
        for m in methods.sat:
            runs = [r.runs[(n, m)] for r in rounds if (n, m) in r.runs]
            atts = [r.runs[(n, ATT)] for r in rounds if (n, m) in r.runs]
            rate = spread(s.rate for s in runs)
            cpu = spread(s.cpu_ms for s in runs)
            client = spread(s.client_cpu_ms for s in runs) if m != ATT else None
            cost = spread(cost_ratio(s, a) for s, a in zip(runs, atts, strict=True))
            cpu_rel = spread(
                ratio(s.cpu_ms, a.cpu_ms) if s.clean and a.clean else math.nan
                for s, a in zip(runs, atts, strict=True)
            )
            gave_up = sum(s.given_up for s in runs)
            dirty = sum(not s.clean for s in runs)
            verdict = "none" if not dirty else f"**{gave_up} in {dirty} of {len(runs)} runs**"
            rows.append(
                f"| {n} | {m} | {rate.fmt(0)} | {cpu.fmt()} | "
                f"{client.fmt(2) if client else '—'} | {verdict} | "
                f"{'1' if m == ATT else cost.fmt(2, '×')} | "
                f"{'1' if m == ATT else cpu_rel.fmt(2, '×')} |"
            )
    return [
        "## Cost at saturation (every core busy, nothing given up)",
        "",
        "| in flight | method | images/s | CPU ms/photo (server) | client CPU ms/photo "
        "| given up | cost against attention | CPU against attention |",
        "|---:|---|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
        "Cost against attention: attention's images per second over heatcrop's, in the same",
        "round (a run that gave anything up has none). CPU: the serving process's user + system",
        "CPU over the run per photo (the sidecar's from /proc, attention's process time); the",
        "client's CPU (bench.cost's own threads, HTTP on loopback) is apart and counts for",
        "neither. Attention runs in a thread pool of as many threads as requests in flight,",
        "without HTTP and without encoding its output: its figures are a lower bound of what",
        "an image server spends on it.",
        "",
        *against_baseline(rounds, methods),
    ]


def against_baseline(rounds: Sequence[SaturationRound], methods: Methods) -> list[str]:
    """The defaults' images per second and CPU per photo over the baseline's, round by round."""
    if not methods.baseline:
        return []
    rows = []
    for n in sorted({n for r in rounds for n, _ in r.runs}):
        for m in (SAT_ON, SAT_OFF):
            pairs = [(r.runs[(n, m)], r.runs[(n, m + BASELINE)]) for r in rounds
                     if (n, m) in r.runs and (n, m + BASELINE) in r.runs]  # fmt: skip
            rate = spread(ratio(a.rate, b.rate) if a.clean and b.clean else math.nan
                          for a, b in pairs)  # fmt: skip
            cpu = spread(ratio(a.cpu_ms, b.cpu_ms) if a.clean and b.clean else math.nan
                         for a, b in pairs)  # fmt: skip
            rows.append(f"| {n} | {m} | {rate.fmt(2, '×')} | {cpu.fmt(2, '×')} |")
    return [
        f"Against the baseline (`{methods.baseline}`), in the same round:",
        "",
        "| in flight | method | images/s against baseline | CPU ms/photo against baseline |",
        "|---:|---|---:|---:|",
        *rows,
        "",
    ]


def why(s: Saturation) -> str:
    """The sidecar's own count of give-ups over the run, by reason, when there were any."""
    if not s.giveup_reasons:
        return ""
    return "; give-ups by reason: " + fmt_kinds(s.giveup_reasons)


def per_round(res: Results) -> list[str]:
    lines = ["## Round by round", ""]
    if res.latency:
        lines += [
            "| round | load (1 min) | "
            + " | ".join(f"{m} median ms" for m in res.methods.latency)
            + " |",
            "|---:|---:|" + "---:|" * len(res.methods.latency),
        ]
        for i, r in enumerate(res.latency):
            cells = " | ".join(f"{r.by_method[m].median:.1f}" for m in res.methods.latency)
            lines.append(f"| {i + 1} | {r.load:.2f} | {cells} |")
        lines.append("")
    if res.saturation:
        lines += [
            "| round | load (1 min) | in flight | method | images/s | CPU ms/photo | answers "
            "| CNN runs |",
            "|---:|---:|---:|---|---:|---:|---|---:|",
        ]
        for i, r in enumerate(res.saturation):
            for (n, m), s in sorted(r.runs.items()):
                runs = "—" if s.cnn_runs is None else str(s.cnn_runs)
                lines.append(
                    f"| {i + 1} | {r.load:.2f} | {n} | {m} | {s.rate:.0f} | {s.cpu_ms:.1f} | "
                    f"{fmt_kinds(s.kinds)}{why(s)} "
                    f"| {runs} |"
                )
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
