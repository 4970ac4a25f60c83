"""Latency-first against no sidecar, on never-seen originals: issue 21, item 3.

    python -m bench.latency_first [--out bench/results/latency_first.md] [--pairs 3]

One stack (nginx.stack: Thumbor 7.8 with 2 processes, the heatcrop edge, today's edge), and
rounds of ``--originals`` distinct originals, each requested once (one size each, the sizes of
bench/load.py in turn), offered open-loop at ``--rate`` req/s by a Python client in this
process: request i leaves at t0 + i / rate whatever the earlier ones are doing, and its latency
counts from that moment, so a slow answer never postpones the next request. Rounds alternate:

  A  legacy only: today's edge (nginx → Thumbor, empty proxy_cache) with the sidecar down;
  B  latency-first: the heatcrop edge (empty proxy_cache) and a fresh sidecar (empty caches)
     with ``HEATCROP_SERVER_COLD_POLICY=legacy`` and ``HEATCROP_SERVER_WORKER_NICE=10``, as the
     README recommends: every request is answered cold and queues a background heatmap.

in pairs A B, B A, A B, ... so that a drift of the shared machine's load weighs on both.
``--kinds`` adds others to the rotation (``--kinds ABC``: A B C, B C A, C A B, ...):

  C  latency-first with the background all but off (``HEATCROP_SERVER_BACKGROUND_CPU_SHARE``
     0.001): what the heatcrop edge's extra hops cost by themselves, so that B - C is what
     the background heatmaps cost the answers;
  D  the alternative to a budget: latency-first with no budget to speak of (share 64) and the
     whole sidecar's autogroup lowered (``/proc/<pid>/autogroup`` nice 10, foreground included);
  E  latency-first with no budget to speak of (share 64): the code before the budget, near
     enough (a bucket of 6.4 CPU s refilled at 3.2 cores when busy never holds anything back).

Thumbor stores nothing (no storage, no result storage), and every original is read once before
the first round, so an original is as new to the stack in each round as in the first. The
report gives each round, the medians of A and of B, and B's median over A's median for p50 and
p95 (target: within +20 %).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bench import hops
from bench.load import LATENCY_FIRST_ENV, SIZES, WARM_RENDERS, edge_logs, get, today_logs
from bench.service import cpu_model
from nginx.stack import Stack, StackOptions
from training.data import publish

DEFAULT_SOURCE = Path("../shared/eval/fcdb_train/images")
TARGET = 0.20  # latency-first p50 and p95 at most this much above legacy only
TIMEOUT_S = 10.0  # per request: a late answer is measured, not dropped
# The requests come from this many clients, each from its own loopback address, in turn: 60
# new originals a second are many people's first views, and the heatcrop edge limits the misses
# one address has in flight (nginx.render legacy_per_client), where today's edge does not.
CLIENTS = 60
NAMES = {
    "A": "A: legacy only",
    "B": "B: latency-first",
    "C": "C: latency-first, no background",
    "D": "D: latency-first, no budget, autogroup nice 10",
    "E": "E: latency-first, no budget (as before it)",
}
# On top of B's settings. C's background: a thousandth of a core, a heatmap every ~25 s.
KIND_ENV = {
    "C": {"HEATCROP_SERVER_BACKGROUND_CPU_SHARE": "0.001"},
    "D": {"HEATCROP_SERVER_BACKGROUND_CPU_SHARE": "64"},
    "E": {"HEATCROP_SERVER_BACKGROUND_CPU_SHARE": "64"},
}
AUTOGROUP_NICE = 10  # D's
KIND_TEXT = {
    "C": "C: as B with `HEATCROP_SERVER_BACKGROUND_CPU_SHARE=0.001` (the edge's extra hops "
    "without the background's CPU). ",
    "D": "D: as B with `HEATCROP_SERVER_BACKGROUND_CPU_SHARE=64` (no budget to speak of) and "
    f"the sidecar's autogroup at nice {AUTOGROUP_NICE} (/proc/PID/autogroup). ",
    "E": "E: as B with `HEATCROP_SERVER_BACKGROUND_CPU_SHARE=64`: no budget to speak of, as "
    "before it. ",
}
# Sidecar counters read after each B round.
COUNTERS = (
    "cold_total",
    "cold_heatmaps_total",
    "background_cpu_seconds_total",
    "background_held_total",
)


@dataclass
class Round:
    kind: str  # A or B
    index: int
    latencies_ms: list[float]
    statuses: dict[str, int]
    lag_ms: float  # the client's worst lateness in sending (its own noise)
    load_before: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # process CPU seconds in the round
    counters: dict[str, float] = field(default_factory=dict)
    thumbor_split: list[float] = field(default_factory=list)  # CPU s of each Thumbor process
    hops: hops.HopSummary | None = None

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def errors(self) -> int:
        return sum(v for k, v in self.statuses.items() if k != "200")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--originals", type=int, default=600)
    parser.add_argument("--rate", type=float, default=60.0)
    parser.add_argument("--pairs", type=int, default=3, help="rounds of each kind")
    parser.add_argument("--kinds", default="AB", help="kinds of rounds, rotated (see above)")
    parser.add_argument(
        "--latency-env",
        action="append",
        default=[],
        metavar="HEATCROP_X=V",
        help="more sidecar settings for B (repeatable)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    names = sorted(p.name for p in args.source.glob("*.jpg"))
    if len(names) < args.originals + WARM_RENDERS:
        raise SystemExit(f"need {args.originals + WARM_RENDERS} photos in {args.source}")
    env = {**LATENCY_FIRST_ENV, **dict(kv.split("=", 1) for kv in args.latency_env)}
    started = datetime.now(UTC)
    with contextlib.ExitStack() as cleanup:
        work = args.workdir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="heatcrop-lf-"))
        )
        rounds = run(work, args, names, env)
    publish("\n".join(report(started, args, env, rounds)) + "\n", args.out)


def run(
    work: Path, args: argparse.Namespace, names: list[str], env: Mapping[str, str]
) -> list[Round]:
    originals = names[: args.originals]
    options = StackOptions(
        workdir=work,
        images=args.source,
        workers=2,
        thumbor_processes=2,
        legacy_edge_port=0,
        access_log=True,  # each hop's time: what the answers waited for
    )
    rounds: list[Round] = []
    with Stack(options) as st:
        base_env = dict(st.options.sidecar_env)
        warm(st, args.source, names[args.originals : args.originals + WARM_RENDERS], originals)
        kinds = args.kinds
        for pair in range(args.pairs):
            shift = pair % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                rounds.append(one_round(st, kind, len(rounds) + 1, originals, args, base_env, env))
                print(summary_line(rounds[-1]), flush=True)
    return rounds


def warm(st: Stack, source: Path, others: Sequence[str], originals: Sequence[str]) -> None:
    """Every original in the page cache, and Thumbor's first renders behind it (of others)."""
    for name in originals:
        (source / name).read_bytes()
    for i, name in enumerate(others):
        get(f"{st.legacy_base}/unsafe/{SIZES[i % len(SIZES)]}/{name}")


def one_round(
    st: Stack,
    kind: str,
    index: int,
    originals: Sequence[str],
    args: argparse.Namespace,
    base_env: Mapping[str, str],
    env: Mapping[str, str],
) -> Round:
    if kind == "A":
        for sidecar in st.sidecars:
            sidecar.stop()
        st.restart_legacy_edge()
        base, logs = st.legacy_edge_base, today_logs(st)
    else:
        st.restart_sidecars({**base_env, **env, **KIND_ENV.get(kind, {})})
        if kind == "D":
            for sidecar in st.sidecars:
                Path(f"/proc/{sidecar.pid}/autogroup").write_text(f"{AUTOGROUP_NICE}\n")
        st.restart_edge()
        base, logs = st.public, edge_logs(st)
    time.sleep(2.0)  # start-up's own CPU (model load, warm-up) out of the way
    pids = process_pids(st, kind)
    urls = [f"{base}/img/{SIZES[i % len(SIZES)]}/{n}" for i, n in enumerate(originals)]
    load = os.getloadavg()[0]
    mark = logs.mark()
    before = {pid: cpu_seconds([pid]) for p in pids.values() for pid in p}
    latencies, statuses, lag = asyncio.run(open_loop(urls, args.rate))
    each = {pid: cpu_seconds([pid]) - cpu for pid, cpu in before.items()}
    cpu = {name: sum(each[pid] for pid in p) for name, p in pids.items()}
    result = Round(kind, index, latencies, statuses, lag, load, cpu)
    # Thumbor's processes each: nginx keeps its connections to Thumbor alive, and a connection
    # stays with the process that accepted it.
    result.thumbor_split = sorted((each[pid] for pid in pids.get("thumbor", ())), reverse=True)
    result.hops = hops.summarise(*logs.since(mark))
    if kind != "A":
        result.counters = sidecar_counters(st.sidecar_base())
    return result


def process_pids(st: Stack, kind: str) -> dict[str, list[int]]:
    """The processes whose CPU a round reports: Thumbor's (with its forks), the sidecar's."""
    out: dict[str, list[int]] = {}
    if st.legacy_service is not None and st.legacy_service.pid is not None:
        out["thumbor"] = group_pids(st.legacy_service.pid)
    if kind != "A" and st.sidecars and st.sidecars[0].pid is not None:
        out["sidecar"] = [st.sidecars[0].pid]
    return out


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` (all their threads), from /proc."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def open_loop(urls: Sequence[str], rate: float) -> tuple[list[float], dict[str, int], float]:
    """Each URL once, request i sent at t0 + i / rate from client i mod CLIENTS; latency from
    that scheduled moment."""
    loop = asyncio.get_running_loop()
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    lag = 0.0
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=timeout,
                    connector=aiohttp.TCPConnector(limit=0, local_addr=(client_address(c), 0)),
                )
            )
            for c in range(CLIENTS)
        ]

        async def one(session: aiohttp.ClientSession, url: str, due: float) -> None:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    key = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            latencies.append(1000.0 * (loop.time() - due))
            statuses[key] = statuses.get(key, 0) + 1

        t0 = loop.time() + 0.1
        tasks = []
        for i, url in enumerate(urls):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            lag = max(lag, loop.time() - due)
            tasks.append(asyncio.ensure_future(one(sessions[i % CLIENTS], url, due)))
        await asyncio.gather(*tasks)
    return latencies, statuses, 1000.0 * lag


def client_address(c: int) -> str:
    """Client ``c``'s own loopback address (Linux routes all of 127/8 to lo)."""
    return f"127.0.{1 + c // 250}.{1 + c % 250}"


def sidecar_counters(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for name in COUNTERS:
        pattern = rf"^heatcrop_{name}(\{{[^}}]*\}})? (\S+)$"
        for labels, value in re.findall(pattern, text, re.MULTILINE):
            out[f"{name}{labels}"] = float(value)
    return out


# -- report -----------------------------------------------------------------------------------


def summary_line(r: Round) -> str:
    cpu = ", ".join(f"{k} {v:.1f} s" for k, v in r.cpu_s.items())
    cpu += " (Thumbor's processes " + " / ".join(f"{v:.1f}" for v in r.thumbor_split) + ")"
    if r.hops is not None:
        cpu += f"; hops p50/p95 ms: legacy {r.hops.legacy.text()}, sidecar {r.hops.sidecar.text()}"
    return (
        f"round {r.index} {r.kind}: p50 {r.pct(0.5):.1f} ms, p95 {r.pct(0.95):.1f} ms, "
        f"p99 {r.pct(0.99):.1f} ms, statuses {r.statuses}, load {r.load_before:.2f}, CPU {cpu}"
    )


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(
    started: datetime, args: argparse.Namespace, env: Mapping[str, str], rounds: list[Round]
) -> list[str]:
    settings = ", ".join(f"`{k}={v}`" for k, v in env.items())
    lines = [
        f"# Latency-first against legacy only, never-seen originals ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python -m bench.latency_first --out {args.out or '…'}` "
        f"(`--pairs {args.pairs} --kinds {args.kinds}`, rounds of each kind). "
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), no GPU, **shared with other jobs** "
        "(1-minute load average before each round in the table). Thumbor 7.8 (2 processes), "
        "nginx (2 workers), the sidecar and this client share the cores.",
        "",
        f"Each round: {args.originals} distinct originals of `{args.source}`, each requested "
        f"once (sizes {', '.join(SIZES)} in turn), open-loop at {args.rate:.0f} req/s, latency "
        "from each request's scheduled send time. A: today's edge (nginx → Thumbor) with the "
        f"sidecar down; B: the heatcrop edge and a fresh sidecar with {settings}. "
        + "".join(KIND_TEXT[k] for k in args.kinds if k in KIND_TEXT)
        + f"The kinds rotate ({' '.join(args.kinds)}, then shifted by one each set)."
        + " Every round on empty caches (nginx's, the sidecar's; Thumbor stores nothing).",
        "",
        "| round | kind | load avg | p50 ms | p95 ms | p99 ms | errors | client lag ms "
        "| legacy hop p50 / p95 ms | sidecar hop p50 / p95 ms | Thumbor CPU s (each process) "
        "| sidecar CPU s | background heatmaps | background CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rounds:
        lines.append(row(r))
    lines += verdict(rounds, args.kinds)
    return lines


def row(r: Round) -> str:
    heat = ", ".join(
        f"{label} {v:.0f}"
        for k, v in r.counters.items()
        if k.startswith("cold_heatmaps_total") and v
        for label in re.findall(r'result="([^"]+)"', k)
    )
    spent = r.counters.get("background_cpu_seconds_total")
    sidecar = r.cpu_s.get("sidecar")
    split = " / ".join(f"{v:.1f}" for v in r.thumbor_split if v >= 0.05)
    return (
        f"| {r.index} | {r.kind} | {r.load_before:.2f} | {r.pct(0.5):.1f} | "
        f"{r.pct(0.95):.1f} | {r.pct(0.99):.1f} | {r.errors} | {r.lag_ms:.1f} | "
        f"{r.hops.legacy.text() if r.hops else '–'} | {r.hops.sidecar.text() if r.hops else '–'} | "
        f"{r.cpu_s.get('thumbor', 0.0):.1f} ({split}) | "
        f"{'–' if sidecar is None else f'{sidecar:.1f}'} | "
        f"{heat or '–'} | {'–' if spent is None else f'{spent:.2f}'} |"
    )


def verdict(rounds: list[Round], kinds: str) -> list[str]:
    by = {k: [r for r in rounds if r.kind == k] for k in kinds}
    if not by["A"] or not by["B"]:
        return []
    head = "| | " + " | ".join(NAMES[k] for k in kinds) + " | B vs A | within +20 % |"
    lines = ["", head, "|---|" + "---:|" * len(kinds) + "---:|---|"]
    ok = True
    for q, label in ((0.5, "p50"), (0.95, "p95")):
        meds = {k: med([r.pct(q) for r in by[k]]) for k in kinds}
        cells = " | ".join(
            f"{meds[k]:.1f} ({min(r.pct(q) for r in by[k]):.1f}-{max(r.pct(q) for r in by[k]):.1f})"
            for k in kinds
        )
        ratio = meds["B"] / meds["A"] - 1
        ok &= ratio <= TARGET
        # Each set of consecutive rounds (one of each kind) on its own: the same minute's load.
        sets = [rounds[i : i + len(kinds)] for i in range(0, len(rounds), len(kinds))]
        each = [_of(g, "B").pct(q) / _of(g, "A").pct(q) - 1 for g in sets if len(g) == len(kinds)]
        within = ", ".join(f"{100 * e:+.0f}" for e in each)
        met = "yes" if ratio <= TARGET else "**no**"
        lines.append(
            f"| {label} ms, median (spread) | {cells} | {100 * ratio:+.0f} % "
            f"(within each set: {within}) | {met} |"
        )
    errors = {k: med([r.errors for r in by[k]]) for k in kinds}
    ok &= errors["B"] <= errors["A"]
    cells = " | ".join(f"{errors[k]:.0f}" for k in kinds)
    met = "yes" if errors["B"] <= errors["A"] else "**no**"
    lines.append(f"| errors (non-200 or none), median | {cells} | | {met} |")
    if all(r.hops for r in rounds):
        cells = " | ".join(
            f"{med([r.hops.legacy.p50_ms for r in by[k] if r.hops]):.0f} / "
            f"{med([r.hops.legacy.p95_ms for r in by[k] if r.hops]):.0f}"
            for k in kinds
        )
        lines.append(f"| legacy hop (Thumbor's render) p50 / p95 ms, medians | {cells} | | |")
        cells = " | ".join(
            "–"
            if k == "A"
            else f"{med([r.hops.sidecar.p50_ms for r in by[k] if r.hops]):.0f} / "
            f"{med([r.hops.sidecar.p95_ms for r in by[k] if r.hops]):.0f}"
            for k in kinds
        )
        lines.append(f"| sidecar hop p50 / p95 ms, medians | {cells} | | |")
    outcome = "**met**" if ok else "**not met**"
    if errors["A"] > 0:  # the legacy server alone failed: the machine, not heatcrop, decided
        outcome = "**no verdict**: A itself had errors (the machine was overloaded)"
    lines += [
        "",
        f"Target (B's p50 and p95 medians within +{100 * TARGET:.0f} % of A's, and no more "
        f"errors): {outcome}.",
    ]
    return lines


def _of(group: Sequence[Round], kind: str) -> Round:
    return next(r for r in group if r.kind == kind)


if __name__ == "__main__":
    main()
