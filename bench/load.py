"""The edge under load: wrk against nginx + sidecar + legacy, every scenario in one run.

    python -m bench.load [--out bench/results/load.md] [--rate 600] [--seconds 10]

Processes come from ``nginx.stack`` (the code of ``make run`` and the edge tests), on free
loopback ports, stopped by their PIDs at the end. Workload (bench/wrk/load.lua): public URLs
``/img/WxH/<original>``, ranks drawn from a Zipf law over originals × sizes, each of
``--connections`` connections paced so that together they offer ``--rate`` req/s.

With Thumbor 7.8 (file loader, 2 processes) as the legacy server:
  (a) today's edge: nginx → Thumbor's default crop, proxy_cache; originals set O1
  (f) heatcrop cold, latency-first (``server.cold_policy = "legacy"``, workers lowered): a
      first sight answers the legacy crop at once and its heatmap is made in the background
  (b) heatcrop cold: sidecar and nginx cache have never seen O1 (default ``cold_policy``)
      (a), (f) and (b) run ``--rounds`` times on O1, each on empty caches, the order rotated
  (c) heatcrop, warm heatmaps: every O1 heatmap cached, every request a new size (aspect)
  (d) heatcrop, proxy_cache hits: a few URLs, all cached before the run
  (b') heatcrop cold with proxy_cache_lock off (originals O3), against (b) with it on
  (e) heatcrop cold (originals O2), the sidecar SIGKILLed a third into the run and restarted
With a static stand-in legacy server (nginx serving one JPEG for any URL), to isolate
heatcrop's own cost: (f), (b), (c), (d) again on a fresh stack.

Every scenario also reads nginx's access logs of its run (bench/hops.py): per hop, what its
misses waited for (the sidecar, then the legacy server's render). ``--only a,f,b`` runs a
subset (letters; ``b'`` is ``b2``), for trying a change without the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyvips

from bench import hops
from bench.service import cpu_model
from bench.wrk_summary import WRK_PRIORITY, WrkSummary, parse_summary
from nginx.render import HOPS_LOG
from nginx.stack import Stack, StackOptions
from training.data import publish

WRK_DIR = Path(__file__).parent / "wrk"
DEFAULT_SOURCE = Path("../shared/eval/fcdb_dev/images")
SIZES = ("400x300", "300x300", "640x360", "240x320", "160x90")
# (d)'s URLs: sizes no earlier scenario asks for, so every entry is as fresh as its warm-up.
HOT_SIZES = ("480x360", "360x360")
THUMBOR = "Thumbor 7.8 (2 processes)"
TODAY = "(a) nginx → Thumbor (today)"
COLD = "(b) heatcrop cold"
LATENCY_FIRST = "(f) heatcrop cold, latency-first"
# The latency-first configuration: no request waits for a read, a decode or the CNN, and the
# background work they became runs below the sidecar's event loop (sidecar/priority.py; only
# below the loop: each process of the stack is its own session, and Linux's autogroups weigh
# sessions, not threads, against each other), so that the loop answers while it decodes.
LATENCY_FIRST_ENV = {"HEATCROP_SERVER_COLD_POLICY": "legacy", "HEATCROP_SERVER_WORKER_NICE": "10"}
# Run in rounds on the same URLs and load, all cold (cold_rounds), with their letters.
COLD_TRIO = ((TODAY, "a"), (LATENCY_FIRST, "f"), (COLD, "b"))
# The chain-overhead target against today's edge, at p95.
CHAIN_TARGET = 0.05
# Renders asked of the legacy server before (a): with a fresh Thumbor (and a page cache that has
# not read the originals yet) the first scenario, (a), was 1.3-3x slower than the same run
# repeated at once in three of four runs of 2026-12-03, which flattered every row against it.
WARM_RENDERS = 20


_SEQUENCE = itertools.count()


@dataclass
class Result(WrkSummary):
    name: str = ""
    legacy: str = ""
    setup: str = ""
    sidecar_requests: int | None = None
    nn_runs: int | None = None
    notes: list[str] = field(default_factory=list)
    round: int = 0  # of cold_rounds; 0: a scenario run once
    sequence: int = field(default_factory=lambda: next(_SEQUENCE))  # order of the runs
    public_lines: list[hops.LogLine] = field(default_factory=list)
    inner_lines: list[hops.LogLine] = field(default_factory=list)

    @property
    def hops(self) -> hops.HopSummary | None:
        if not self.public_lines:
            return None
        return hops.summarise(self.public_lines, self.inner_lines)

    def share(self, key: str) -> float:
        served = {k: v for k, v in self.counts.items() if k.startswith(("served:", "status:"))}
        return served.get(key, 0) / max(1, sum(served.values()))

    @property
    def smart_share(self) -> float:
        """Answers that carried a smart box (misses and cache hits of one), of all answers."""
        smart = self.counts.get("served:smart", 0) + self.counts.get("hit:smart", 0)
        served = [v for k, v in self.counts.items() if k.startswith(("served:", "status:"))]
        return smart / max(1, sum(served))

    def paths(self) -> dict[str, int]:
        return {k[5:]: v for k, v in self.counts.items() if k.startswith("path:")}


@dataclass(frozen=True)
class EdgeLogs:
    """An edge's access logs (``public``) and, for the heatcrop edge, its per-miss hop log."""

    public: Path
    inner: Path | None = None

    @classmethod
    def of(cls, nginx_dir: Path, *, heatcrop: bool) -> EdgeLogs:
        logs = nginx_dir / "logs"
        return cls(logs / "access.log", logs / HOPS_LOG if heatcrop else None)

    def mark(self) -> tuple[int, int]:
        return hops.size(self.public), hops.size(self.inner) if self.inner else 0

    def since(self, mark: tuple[int, int]) -> tuple[list[hops.LogLine], list[hops.LogLine]]:
        public = hops.read_lines(self.public, mark[0], "public")
        inner = hops.read_lines(self.inner, mark[1], "inner") if self.inner else []
        return public, inner


def edge_logs(st: Stack) -> EdgeLogs:
    assert st.edge_config is not None
    return EdgeLogs.of(st.edge_config.out, heatcrop=True)


def today_logs(st: Stack) -> EdgeLogs:
    return EdgeLogs.of(st.workdir / "nginx-legacy", heatcrop=False)


@dataclass(frozen=True)
class Load:
    rate: float
    connections: int
    threads: int
    seconds: int

    @property
    def delay_ms(self) -> float:
        return 1000.0 * self.connections / self.rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--originals", type=int, default=40, help="per originals set")
    parser.add_argument("--rate", type=float, default=600.0, help="offered req/s")
    parser.add_argument("--connections", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--fault-seconds", type=int, default=15)
    parser.add_argument("--sidecar-timeout-ms", type=int, default=150)
    parser.add_argument(
        "--only", default="", help="scenario letters to run, e.g. a,f,b (b2 for b'); all if empty"
    )
    parser.add_argument(
        "--latency-env",
        action="append",
        default=[],
        metavar="HEATCROP_X=V",
        help="more sidecar settings for (f), e.g. HEATCROP_SERVER_WORKER_NICE=10 (repeatable)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of (a), (f), (b), each on empty caches"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="an empty folder to keep the stacks' files and logs in (default: a temporary one)",
    )
    args = parser.parse_args()
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    args.latency_env = dict(kv.split("=", 1) for kv in args.latency_env)
    names = sorted(p.name for p in args.source.glob("*.jpg"))
    n = args.originals
    if len(names) < 3 * n:
        raise SystemExit(f"need {3 * n} photos in {args.source}, found {len(names)}")
    sets = {"O1": names[:n], "O2": names[n : 2 * n], "O3": names[2 * n : 3 * n]}
    # Photos of no set, for warming the legacy server before the first scenario.
    args.warm_names = names[3 * n : 3 * n + WARM_RENDERS] or names[:WARM_RENDERS]
    load = Load(args.rate, args.connections, args.threads, args.seconds)
    started = datetime.now(UTC)
    loads = [os.getloadavg()[0]]
    results: list[Result] = []
    with contextlib.ExitStack() as cleanup:
        work = args.workdir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="heatcrop-load-"))
        )
        results += thumbor_group(work / "thumbor", args, sets, load)
        loads.append(os.getloadavg()[0])
        if not args.only or args.only & {"b", "c", "d", "f"}:
            results += standin_group(work / "standin", args, sets, load)
        loads.append(os.getloadavg()[0])
    text = "\n".join(report(started, args, load, results, loads)) + "\n"
    publish(text, args.out)


# -- scenario groups --------------------------------------------------------------------------


def _options(workdir: Path, args: argparse.Namespace, **kw: object) -> StackOptions:
    return StackOptions(
        workdir=workdir,
        images=args.source,
        sidecar_timeout_ms=args.sidecar_timeout_ms,
        workers=2,
        access_log=True,  # the per-hop table: a line per request, and one per miss
        **kw,  # type: ignore[arg-type]
    )


def _wants(args: argparse.Namespace, letter: str) -> bool:
    return not args.only or letter in args.only


def thumbor_group(
    workdir: Path, args: argparse.Namespace, sets: Mapping[str, list[str]], load: Load
) -> list[Result]:
    legacy = THUMBOR
    out = []
    options = _options(workdir, args, legacy_edge_port=0, thumbor_processes=2)
    with Stack(options) as st:
        warm_legacy(st, args, sets)
        lists = workdir / "lists"
        o1 = write_list(lists / "o1.txt", sets["O1"])
        out += cold_rounds(st, args, o1, load)
        out += heatcrop_runs(st, legacy, lists, sets, load, args, cold=False)
        if _wants(args, "b2"):
            # proxy_cache_lock: the same cold workload on unseen originals, lock off.
            st.restart_edge(cache_lock=False)
            o3 = write_list(lists / "o3.txt", sets["O3"])
            out.append(
                measured(
                    st,
                    "(b') heatcrop cold, proxy_cache_lock off",
                    legacy,
                    o3,
                    SIZES,
                    load,
                    setup="O3 × 5 sizes, Zipf s=1, cold sidecar and cache, lock **off**",
                )
            )
            st.restart_edge(cache_lock=True)
        if _wants(args, "e"):
            o2 = write_list(lists / "o2.txt", sets["O2"])
            out.append(fault_run(st, legacy, o2, load, args))
    return out


def cold_rounds(st: Stack, args: argparse.Namespace, o1: str, load: Load) -> list[Result]:
    """(a), (f) and (b) on O1, each on empty caches (nginx's, the sidecar's), ``args.rounds``
    times, the order rotated each round: on this shared machine one 10 s run of (a) moves by
    1.5-3x from the next, so the chain overhead is a median over rounds of per-round ratios."""
    base_env = dict(st.options.sidecar_env)
    latency_first = {**LATENCY_FIRST_ENV, **args.latency_env}
    wanted = [name for name, letter in COLD_TRIO if _wants(args, letter)]
    setup = "O1 × 5 sizes, Zipf s=1, cold nginx cache"
    out = []
    for r in range(args.rounds):
        shift = r % max(1, len(wanted))
        for name in wanted[shift:] + wanted[:shift]:
            if name == TODAY:
                st.restart_legacy_edge()
                result = wrk_run(
                    name, THUMBOR, st.legacy_edge_base, o1, SIZES, load,
                    setup=setup, logs=today_logs(st),
                )  # fmt: skip
            else:
                env = {**base_env, **latency_first} if name == LATENCY_FIRST else base_env
                st.restart_sidecars(env)
                st.restart_edge()
                extra = ", ".join(f"`{k}={v}`" for k, v in env.items() if k in latency_first)
                result = measured(
                    st, name, THUMBOR, o1, SIZES, load,
                    setup=f"{setup} and sidecar" + (f", {extra}" if extra else ""),
                )  # fmt: skip
            result.round = r + 1
            out.append(result)
    if LATENCY_FIRST in wanted:  # what follows runs with the default policy
        st.restart_sidecars(base_env)
        st.restart_edge()
    return out


def standin_group(
    workdir: Path, args: argparse.Namespace, sets: Mapping[str, list[str]], load: Load
) -> list[Result]:
    image = workdir / "standin.jpg"
    workdir.mkdir(parents=True, exist_ok=True)
    pyvips.Image.thumbnail(
        str(args.source / sets["O1"][0]), 400, height=300, crop="centre"
    ).jpegsave(str(image), Q=85)
    legacy = "static stand-in (nginx, one JPEG)"
    with Stack(_options(workdir, args, legacy="standin", standin_image=image)) as st:
        out = []
        if _wants(args, "f"):
            # What the latency-first sidecar costs by itself, with no render on its cores.
            base_env = dict(st.options.sidecar_env)
            st.restart_sidecars({**base_env, **LATENCY_FIRST_ENV, **args.latency_env})
            st.restart_edge()
            o1 = write_list(workdir / "lists" / "o1.txt", sets["O1"])
            setup = "O1 × 5 sizes, Zipf s=1, cold sidecar and nginx cache, latency-first"
            out.append(measured(st, LATENCY_FIRST, legacy, o1, SIZES, load, setup=setup))
            st.restart_sidecars(base_env)
            st.restart_edge()
        return out + heatcrop_runs(st, legacy, workdir / "lists", sets, load, args)


def heatcrop_runs(
    st: Stack,
    legacy: str,
    lists: Path,
    sets: Mapping[str, list[str]],
    load: Load,
    args: argparse.Namespace,
    *,
    cold: bool = True,
) -> list[Result]:
    """(b) when ``cold`` (the Thumbor group runs it in ``cold_rounds``), (c), (d)."""
    o1 = write_list(lists / "o1.txt", sets["O1"])
    out = []
    if cold and _wants(args, "b"):
        out.append(
            measured(
                st,
                COLD,
                legacy,
                o1,
                SIZES,
                load,
                setup="O1 × 5 sizes, Zipf s=1, cold sidecar and nginx cache",
            )
        )
    if _wants(args, "c"):
        for name in sets["O1"]:  # every heatmap of O1 in the sidecar's cache
            get(f"{st.sidecar_base()}/crop/500x500/{name}")
        out.append(
            measured(
                st,
                "(c) heatcrop warm heatmaps, new sizes",
                legacy,
                o1,
                ("unique",),
                load,
                setup="O1, Zipf s=1, every request a new aspect: box and nginx misses",
            )
        )
    if _wants(args, "d"):
        out.append(hits_run(st, legacy, lists, sets, load))
    return out


def hits_run(
    st: Stack, legacy: str, lists: Path, sets: Mapping[str, list[str]], load: Load
) -> Result:
    hot_names = sets["O1"][:10]
    hot = write_list(lists / "hot.txt", hot_names)
    # Quiet first, then warm and measure at once: a warmed fallback lives 30 s only.
    settle(st.sidecar_base())
    for name in hot_names:
        for size in HOT_SIZES:
            get(f"{st.public}/img/{size}/{name}")
    return measured(
        st,
        "(d) heatcrop proxy_cache hits",
        legacy,
        hot,
        HOT_SIZES,
        load,
        setup="20 URLs, all cached before the run (fallbacks among them expire after 30 s)",
        quiet_first=False,
    )


def fault_run(st: Stack, legacy: str, paths: str, load: Load, args: argparse.Namespace) -> Result:
    seconds = args.fault_seconds
    events: list[str] = []

    def kill_and_restart() -> None:
        time.sleep(seconds / 3)
        t0 = time.monotonic()
        st.sidecars[0].kill()
        events.append(f"sidecar SIGKILLed at {seconds / 3:.0f} s")
        st.sidecars[0].start()
        events.append(f"back (healthz 200) {time.monotonic() - t0:.1f} s later")

    chaos = threading.Thread(target=kill_and_restart)
    chaos.start()
    try:
        result = wrk_run(
            "(e) heatcrop cold, sidecar killed and restarted",
            legacy,
            st.public,
            paths,
            SIZES,
            Load(load.rate, load.connections, load.threads, seconds),
            setup=f"O2 × 5 sizes, Zipf s=1, {seconds} s",
            logs=edge_logs(st),
        )
    finally:
        chaos.join()
    result.notes += events
    return result


def measured(
    st: Stack,
    name: str,
    legacy: str,
    paths: str,
    sizes: Sequence[str],
    load: Load,
    setup: str,
    *,
    quiet_first: bool = True,
) -> Result:
    if quiet_first:
        settle(st.sidecar_base())
    before = sidecar_counters(st.sidecar_base())
    result = wrk_run(name, legacy, st.public, paths, sizes, load, setup=setup, logs=edge_logs(st))
    after = sidecar_counters(st.sidecar_base())
    result.sidecar_requests = after[0] - before[0]
    result.nn_runs = after[1] - before[1]
    return result


# -- wrk --------------------------------------------------------------------------------------


def wrk_run(
    name: str,
    legacy: str,
    base: str,
    paths: str,
    sizes: Sequence[str],
    load: Load,
    *,
    setup: str,
    logs: EdgeLogs | None = None,
) -> Result:
    mark = logs.mark() if logs else (0, 0)
    env = {
        **os.environ,
        "HEATCROP_BENCH_PATHS": paths,
        "HEATCROP_BENCH_SIZES": ",".join(sizes),
        "HEATCROP_BENCH_DELAY_MS": f"{load.delay_ms:.3f}",
        "HEATCROP_BENCH_THREADS": str(load.threads),
    }
    cmd = [*WRK_PRIORITY, "wrk", f"-t{load.threads}", f"-c{load.connections}", f"-d{load.seconds}s"]
    cmd += ["--timeout", "2s", "-s", str(WRK_DIR / "load.lua"), base + "/"]
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=load.seconds + 60, check=True
    ).stdout
    summary = parse_summary(out, "HEATCROP_LOAD", "counts")
    result = Result(**vars(summary), name=name, legacy=legacy, setup=setup)
    if logs:
        result.public_lines, result.inner_lines = logs.since(mark)
    return result


def warm_legacy(st: Stack, args: argparse.Namespace, sets: Mapping[str, list[str]]) -> None:
    """Every original of the sets read once (page cache) and a few renders of other photos
    asked of the legacy server directly (no nginx cache holds them), before any scenario."""
    for names in sets.values():
        for name in names:
            (args.source / name).read_bytes()
    for i, name in enumerate(args.warm_names):
        get(f"{st.legacy_base}/unsafe/{SIZES[i % len(SIZES)]}/{name}")


def settle(base: str, quiet_s: float = 1.0, limit_s: float = 20.0) -> None:
    """Wait until the sidecar has run no CNN for ``quiet_s``: heatmaps that an earlier
    scenario's give-ups left to finish in the background are not this scenario's cost."""
    deadline = time.monotonic() + limit_s
    last = sidecar_counters(base)[1]
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = sidecar_counters(base)[1]
        if now == last:
            return
        last = now


def get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()


def sidecar_counters(base: str) -> tuple[int, int]:
    """(requests_total, nn_runs_total) of one sidecar."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()

    def total(name: str) -> int:
        pattern = rf"^heatcrop_{name}(?:\{{[^}}]*\}})? (\S+)$"
        return int(sum(float(v) for v in re.findall(pattern, text, re.MULTILINE)))

    return total("requests_total"), total("nn_runs_total")


def write_list(path: Path, names: Sequence[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(names) + "\n")
    return str(path)


# -- report -----------------------------------------------------------------------------------


def report(
    started: datetime,
    args: argparse.Namespace,
    load: Load,
    results: Sequence[Result],
    loads: Sequence[float],
) -> list[str]:
    firsts = [r for r in results if r.round <= 1]  # the main table: each scenario once
    by = {(r.name, r.legacy): r for r in firsts}
    lines = [
        f"# heatcrop edge under load ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        "`python -m bench.load --out bench/results/load.md` (`make bench-load`). "
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), no GPU, **shared with other jobs**: "
        f"1-minute load average {loads[0]:.2f} before, {loads[1]:.2f} after the Thumbor group, "
        f"{loads[2]:.2f} at the end (this benchmark included). wrk, nginx (2 workers), the "
        "sidecar (ONNX Runtime, 2 threads) and the legacy server all share those 2 cores.",
        "",
        f"Load: wrk {load.threads} threads, {load.connections} connections, each pausing "
        f"{load.delay_ms:.0f} ms after every answer, to offer ≈ {load.rate:.0f} req/s; "
        f"{load.seconds} s per scenario ({args.fault_seconds} s for (e)); wrk timeout 2 s"
        f"{', wrk at a higher priority than the servers (nice -10)' if WRK_PRIORITY else ''}. "
        f"{args.originals} originals per set from `{args.source}`; sizes {', '.join(SIZES)}. "
        f"nginx → sidecar timeout {args.sidecar_timeout_ms} ms (sidecar deadline 30 ms less). "
        "Before each heatcrop scenario the benchmark waits until the sidecar has run no CNN "
        "for 1 s (background heatmaps left by an earlier scenario's give-ups).",
        "",
        "(a), (f) and (b) run on the same URLs and load, each on empty caches (nginx's and the "
        f"sidecar's), in {args.rounds} round(s), the order rotated each round; the main table "
        "shows round 1, the rounds table all of them. Before the first scenario every original "
        f"is read once and Thumbor renders {WARM_RENDERS} other photos, so that (a), run first, "
        "does not pay for a cold Thumbor and a cold page cache alone. Smart share: answers that "
        "carried a smart box (a miss answered smart, or a cache hit of a smart crop), of all "
        "answers. p95 vs (a): the chain overhead at p95 against (a) of the same round (target "
        f"≤ +{100 * CHAIN_TARGET:.0f} %).",
        "",
        "| scenario | legacy | req/s | p50 ms | p95 ms | p99 ms | errors | smart / fallback "
        "/ cache hit | smart share | p95 vs (a) | sidecar req / CNN runs | p95 target |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    today = by.get((TODAY, THUMBOR))
    for r in firsts:
        lines.append(row(r, target(r), today))
    rounds = trio_rounds(results)
    lines += rounds_table(rounds)
    lines += hop_table(firsts, rounds)
    lines += ["", "Setups:"]
    for r in firsts:
        extra = f" {'; '.join(r.notes)}." if r.notes else ""
        lines.append(
            f"- {r.name}, {r.legacy}: {r.setup}; {r.requests} requests, socket errors "
            f"{r.socket_errors} (timeouts {r.timeouts}), non-2xx {r.non_2xx}, mean "
            f"{r.mean_ms:.1f} ms, max {r.max_ms:.0f} ms; sidecar answers "
            f"{fmt_counts(r.paths())}.{extra}"
        )
    lines += ["", "Comparisons (same run):"]
    lines += trio_comparisons(rounds)
    lines += comparisons(by)
    return lines


def target(r: Result) -> tuple[str, bool]:
    if r.name.startswith("(c)") and "stand-in" in r.legacy:
        return "≤ 20 ms, 0 errors", r.p95_ms <= 20 and r.errors == 0
    return "≤ 200 ms, 0 errors", r.p95_ms <= 200 and r.errors == 0


def overhead(r: Result, today: Result | None) -> str:
    if today is None or r.round == 0 or r.name == TODAY:
        return ""
    return pct(r.p95_ms, today.p95_ms)


def trio_rounds(results: Sequence[Result]) -> list[dict[str, Result]]:
    """cold_rounds' results, one {name: result} per round."""
    rounds: dict[int, dict[str, Result]] = {}
    for r in results:
        if r.round:
            rounds.setdefault(r.round, {})[r.name] = r
    return [rounds[k] for k in sorted(rounds)]


def ratio(r: Result, today: Result) -> float:
    return r.p95_ms / today.p95_ms - 1 if today.p95_ms > 0 else float("nan")


def rounds_table(rounds: Sequence[Mapping[str, Result]]) -> list[str]:
    names = [name for name, _ in COLD_TRIO if any(name in r for r in rounds)]
    if TODAY not in names or len(names) < 2:
        return []
    others = [n for n in names if n != TODAY]
    head = "| round | order | (a) p95 ms |" + "".join(
        f" {n.split(' ')[0]} p95 ms | vs (a) | smart share |" for n in others
    )
    lines = ["", "Rounds of (a), (f), (b) (same URLs and load, empty caches each time):", ""]
    lines += [head + " errors |", "|---:|---|---:|" + "---:|---:|---:|" * len(others) + "---:|"]
    for i, rnd in enumerate(rounds, 1):
        a = rnd[TODAY]
        order = " ".join(r.name.split(" ")[0] for r in sorted(rnd.values(), key=_order))
        cells = "".join(
            f" {rnd[n].p95_ms:.0f} | {pct(rnd[n].p95_ms, a.p95_ms)} | "
            f"{100 * rnd[n].smart_share:.0f} % |"
            for n in others
        )
        errors = " / ".join(str(rnd[n].errors) for n in names)
        lines.append(f"| {i} | {order} | {a.p95_ms:.0f} |{cells} {errors} |")
    med = "".join(
        f" {median(r[n].p95_ms for r in rounds):.0f} | "
        f"{100 * median(ratio(r[n], r[TODAY]) for r in rounds):+.0f} % | "
        f"{100 * median(r[n].smart_share for r in rounds):.0f} % |"
        for n in others
    )
    lines.append(f"| median | | {median(r[TODAY].p95_ms for r in rounds):.0f} |{med} |")
    return lines


def _order(r: Result) -> int:
    return r.sequence


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def trio_comparisons(rounds: Sequence[Mapping[str, Result]]) -> list[str]:
    if not rounds or any(TODAY not in r for r in rounds):
        return []
    lines = []
    todays = [r[TODAY].p95_ms for r in rounds]
    for name, _ in COLD_TRIO[1:]:
        if not all(name in r for r in rounds):
            continue
        each = [ratio(r[name], r[TODAY]) for r in rounds]
        mid = median(each)
        lines.append(
            f"- chain overhead at p95, {name.split(' ')[0]} vs (a), median over "
            f"{len(rounds)} round(s) of each round's ratio: {100 * mid:+.0f} % (rounds: "
            + ", ".join(f"{100 * e:+.0f} %" for e in each)
            + f"; target ≤ +{100 * CHAIN_TARGET:.0f} %: {'yes' if mid <= CHAIN_TARGET else 'no'})"
            f"; smart share {100 * median(r[name].smart_share for r in rounds):.0f} %; errors "
            f"{sum(r[name].errors for r in rounds)}."
        )
    lines.append(
        f"- (a) itself, the same edge and URLs each round: p95 {min(todays):.0f} to "
        f"{max(todays):.0f} ms: the scale of this machine's noise between 10 s runs."
    )
    return lines


def row(r: Result, tgt: tuple[str, bool], today: Result | None) -> str:
    shares = (
        f"{100 * r.share('served:smart'):.0f} / {100 * r.share('served:fallback'):.0f} / "
        f"{100 * r.share('served:cache-hit'):.0f} %"
    )
    if r.name.startswith("(a)"):
        shares = (
            f"legacy {100 * r.share('served:legacy'):.0f} / cache hit "
            f"{100 * r.share('served:cache-hit'):.0f} %"
        )
    side = "" if r.sidecar_requests is None else f"{r.sidecar_requests} / {r.nn_runs}"
    met = "yes" if tgt[1] else "**no**"
    return (
        f"| {r.name} | {r.legacy} | {r.rate:,.0f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | "
        f"{r.p99_ms:.1f} | {r.errors} | {shares} | {100 * r.smart_share:.0f} % | "
        f"{overhead(r, today)} | {side} | {tgt[0]}: {met} |"
    )


def hop_table(firsts: Sequence[Result], rounds: Sequence[Mapping[str, Result]]) -> list[str]:
    """What the misses waited for, hop by hop, from nginx's access logs (bench/hops.py); the
    rounds' scenarios pooled over their rounds."""
    rows = []
    for r in firsts:
        if r.round and len(rounds) > 1:
            pooled = [rnd[r.name] for rnd in rounds if r.name in rnd]
            r = dataclasses.replace(
                r,
                name=f"{r.name}, {len(pooled)} rounds",
                public_lines=[x for p in pooled for x in p.public_lines],
                inner_lines=[x for p in pooled for x in p.inner_lines],
            )
        if r.hops is not None:
            rows.append(r)
    if not rows:
        return []
    lines = [
        "",
        "What a miss waits for, hop by hop (nginx's access logs of the same runs: "
        "`$request_time` of the public request, `$upstream_response_time` of each hop of the "
        "inner request; p50 / p95 ms, nginx's millisecond resolution). A miss is a public "
        "request that went through to the sidecar (or, for today's edge, to Thumbor); cache "
        "hits include the requests that waited on `proxy_cache_lock` for another's miss.",
        "",
        "| scenario | legacy | misses | miss at the edge | sidecar hop | legacy hop (render) "
        "| cache hits | sidecar hop by its answer: p50 / p95 (count) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        h = r.hops
        assert h is not None
        paths = "; ".join(f"{k} {s.text()} ({s.n})" for k, s in h.by_path.items())
        lines.append(
            f"| {r.name} | {r.legacy} | {h.misses.n} | {h.misses.text()} | {h.sidecar.text()} | "
            f"{h.legacy.text()} | {h.hits.text()} | {paths} |"
        )
    return lines


def comparisons(by: Mapping[tuple[str, str], Result]) -> list[str]:
    lines = []
    th = THUMBOR
    b = by.get((COLD, th))
    d = by.get(("(d) heatcrop proxy_cache hits", th))
    if d:
        lines.append(
            f"- cache hits through the heatcrop edge (d): p50 {d.p50_ms:.2f} ms, p95 "
            f"{d.p95_ms:.2f} ms (a hit never reaches the sidecar nor Thumbor)."
        )
    nolock = by.get(("(b') heatcrop cold, proxy_cache_lock off", th))
    if b and nolock:
        lines.append(
            f"- proxy_cache_lock: on (b) {per(b)} sidecar requests per client request, "
            f"{100 * b.share('served:cache-hit'):.0f} % cache hits, p95 {b.p95_ms:.0f} ms; "
            f"off (b') {per(nolock)} sidecar requests per client request, "
            f"{100 * nolock.share('served:cache-hit'):.0f} % cache hits, p95 "
            f"{nolock.p95_ms:.0f} ms (different originals of the same set size)."
        )
    return lines


def per(r: Result) -> str:
    return f"{(r.sidecar_requests or 0) / max(1, r.requests):.3f}"


def pct(x: float, base: float) -> str:
    return f"{100 * (x / base - 1):+.0f} %" if base > 0 else "n/a"


def fmt_counts(counts: Mapping[str, int]) -> str:
    total = max(1, sum(counts.values()))
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in parts) or "none"


if __name__ == "__main__":
    main()
