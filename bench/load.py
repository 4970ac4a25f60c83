"""The edge under load: wrk against nginx + sidecar + legacy, every scenario in one run.

    python -m bench.load [--out bench/results/load.md] [--rate 600] [--seconds 10]

Processes come from ``nginx.stack`` (the code of ``make run`` and the edge tests), on free
loopback ports, stopped by their PIDs at the end. Workload (bench/wrk/load.lua): public URLs
``/img/WxH/<original>``, ranks drawn from a Zipf law over originals × sizes, each of
``--connections`` connections paced so that together they offer ``--rate`` req/s.

With Thumbor 7.8 (file loader, 2 processes) as the legacy server:
  (a) today's edge: nginx → Thumbor's default crop, proxy_cache; originals set O1
  (b) heatcrop cold: sidecar and nginx cache have never seen O1
  (c) heatcrop, warm heatmaps: every O1 heatmap cached, every request a new size (aspect)
  (d) heatcrop, proxy_cache hits: a few URLs, all cached before the run
  (b') heatcrop cold with proxy_cache_lock off (originals O3), against (b) with it on
  (e) heatcrop cold (originals O2), the sidecar SIGKILLed a third into the run and restarted
With a static stand-in legacy server (nginx serving one JPEG for any URL), to isolate
heatcrop's own cost: (b), (c), (d) again on a fresh stack.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyvips

from bench.service import cpu_model
from bench.wrk_summary import WRK_PRIORITY, WrkSummary, parse_summary
from nginx.stack import Stack, StackOptions

WRK_DIR = Path(__file__).parent / "wrk"
DEFAULT_SOURCE = Path("../shared/eval/fcdb_dev/images")
SIZES = ("400x300", "300x300", "640x360", "240x320", "160x90")
# (d)'s URLs: sizes no earlier scenario asks for, so every entry is as fresh as its warm-up.
HOT_SIZES = ("480x360", "360x360")


@dataclass
class Result(WrkSummary):
    name: str = ""
    legacy: str = ""
    setup: str = ""
    sidecar_requests: int | None = None
    nn_runs: int | None = None
    notes: list[str] = field(default_factory=list)

    def share(self, key: str) -> float:
        served = {k: v for k, v in self.counts.items() if k.startswith(("served:", "status:"))}
        return served.get(key, 0) / max(1, sum(served.values()))

    def paths(self) -> dict[str, int]:
        return {k[5:]: v for k, v in self.counts.items() if k.startswith("path:")}


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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = sorted(p.name for p in args.source.glob("*.jpg"))
    n = args.originals
    if len(names) < 3 * n:
        raise SystemExit(f"need {3 * n} photos in {args.source}, found {len(names)}")
    sets = {"O1": names[:n], "O2": names[n : 2 * n], "O3": names[2 * n : 3 * n]}
    load = Load(args.rate, args.connections, args.threads, args.seconds)
    started = datetime.now(UTC)
    loads = [os.getloadavg()[0]]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="heatcrop-load-") as tmp:
        work = Path(tmp)
        results += thumbor_group(work / "thumbor", args, sets, load)
        loads.append(os.getloadavg()[0])
        results += standin_group(work / "standin", args, sets, load)
        loads.append(os.getloadavg()[0])
    text = "\n".join(report(started, args, load, results, loads)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


# -- scenario groups --------------------------------------------------------------------------


def _options(workdir: Path, args: argparse.Namespace, **kw: object) -> StackOptions:
    return StackOptions(
        workdir=workdir,
        images=args.source,
        sidecar_timeout_ms=args.sidecar_timeout_ms,
        workers=2,
        **kw,  # type: ignore[arg-type]
    )


def thumbor_group(
    workdir: Path, args: argparse.Namespace, sets: Mapping[str, list[str]], load: Load
) -> list[Result]:
    legacy = "Thumbor 7.8 (2 processes)"
    out = []
    options = _options(workdir, args, legacy_edge_port=0, thumbor_processes=2)
    with Stack(options) as st:
        lists = workdir / "lists"
        o1 = write_list(lists / "o1.txt", sets["O1"])
        out.append(
            wrk_run(
                "(a) nginx → Thumbor (today)",
                legacy,
                st.legacy_edge_base,
                o1,
                SIZES,
                load,
                setup="O1 × 5 sizes, Zipf s=1, cold nginx cache",
            )
        )
        out += heatcrop_runs(st, legacy, lists, sets, load)
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
        out.append(fault_run(st, legacy, write_list(lists / "o2.txt", sets["O2"]), load, args))
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
        return heatcrop_runs(st, legacy, workdir / "lists", sets, load)


def heatcrop_runs(
    st: Stack, legacy: str, lists: Path, sets: Mapping[str, list[str]], load: Load
) -> list[Result]:
    o1 = write_list(lists / "o1.txt", sets["O1"])
    cold = measured(
        st,
        "(b) heatcrop cold",
        legacy,
        o1,
        SIZES,
        load,
        setup="O1 × 5 sizes, Zipf s=1, cold sidecar and nginx cache",
    )
    for name in sets["O1"]:  # every heatmap of O1 in the sidecar's cache
        get(f"{st.sidecar_base()}/crop/500x500/{name}")
    warm = measured(
        st,
        "(c) heatcrop warm heatmaps, new sizes",
        legacy,
        o1,
        ("unique",),
        load,
        setup="O1, Zipf s=1, every request a new aspect: box and nginx misses",
    )
    hot_names = sets["O1"][:10]
    hot = write_list(lists / "hot.txt", hot_names)
    # Quiet first, then warm and measure at once: a warmed fallback lives 30 s only.
    settle(st.sidecar_base())
    for name in hot_names:
        for size in HOT_SIZES:
            get(f"{st.public}/img/{size}/{name}")
    hits = measured(
        st,
        "(d) heatcrop proxy_cache hits",
        legacy,
        hot,
        HOT_SIZES,
        load,
        setup="20 URLs, all cached before the run (fallbacks among them expire after 30 s)",
        quiet_first=False,
    )
    return [cold, warm, hits]


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
    result = wrk_run(name, legacy, st.public, paths, sizes, load, setup=setup)
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
) -> Result:
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
    return Result(**vars(summary), name=name, legacy=legacy, setup=setup)


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
    by = {(r.name, r.legacy): r for r in results}
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
        "| scenario | legacy | req/s | p50 ms | p95 ms | p99 ms | errors | smart / fallback "
        "/ cache hit | sidecar req / CNN runs | p95 target |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        lines.append(row(r, target(r)))
    lines += ["", "Setups:"]
    for r in results:
        extra = f" {'; '.join(r.notes)}." if r.notes else ""
        lines.append(
            f"- {r.name}, {r.legacy}: {r.setup}; {r.requests} requests, socket errors "
            f"{r.socket_errors} (timeouts {r.timeouts}), non-2xx {r.non_2xx}, mean "
            f"{r.mean_ms:.1f} ms, max {r.max_ms:.0f} ms; sidecar answers "
            f"{fmt_counts(r.paths())}.{extra}"
        )
    lines += ["", "Comparisons (same run):"]
    lines += comparisons(by)
    return lines


def target(r: Result) -> tuple[str, bool]:
    if r.name.startswith("(c)") and "stand-in" in r.legacy:
        return "≤ 20 ms, 0 errors", r.p95_ms <= 20 and r.errors == 0
    return "≤ 200 ms, 0 errors", r.p95_ms <= 200 and r.errors == 0


def row(r: Result, tgt: tuple[str, bool]) -> str:
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
        f"{r.p99_ms:.1f} | {r.errors} | {shares} | {side} | {tgt[0]}: {met} |"
    )


def comparisons(by: Mapping[tuple[str, str], Result]) -> list[str]:
    lines = []
    th = "Thumbor 7.8 (2 processes)"
    a = by.get(("(a) nginx → Thumbor (today)", th))
    b = by.get(("(b) heatcrop cold", th))
    if a and b:
        lines.append(
            f"- chain overhead, (b) vs (a), same URLs and offered load, both cold: p50 "
            f"{pct(b.p50_ms, a.p50_ms)}, p95 {pct(b.p95_ms, a.p95_ms)}, mean "
            f"{pct(b.mean_ms, a.mean_ms)}, req/s {pct(b.rate, a.rate)} (target ≤ +5 %)."
        )
    d = by.get(("(d) heatcrop proxy_cache hits", th))
    if a and d:
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
