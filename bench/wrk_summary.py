"""What the benchmarks share about wrk: the JSON line that bench/wrk/common.lua's
summary_writer prints at the end of a run, and the priority wrk runs at.

One parser for every wrk script of the benchmarks (wrk's own text report is meant for people).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

# The load generator shares the cores with what it measures; a wrk that waits for a core
# reads answers late and reports the wait as the server's latency. Where allowed (root), wrk
# runs at a higher priority than the servers so that what it reports is theirs.
WRK_PRIORITY: tuple[str, ...] = ("nice", "-n", "-10") if os.geteuid() == 0 else ()


@dataclass
class WrkSummary:
    duration_s: float
    requests: int
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int
    timeouts: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    counts: dict[str, int]  # what the script counted per response (paths, statuses, ...)

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def parse_summary(out: str, tag: str, key: str) -> WrkSummary:
    """The summary line ``<tag> {...}`` of wrk's output, its counts under ``key``."""
    match = re.search(rf"^{re.escape(tag)} (\{{.*\}})$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {tag} line in wrk output:\n{out}")
    d = json.loads(match.group(1))
    return WrkSummary(
        duration_s=d["duration_us"] / 1e6,
        requests=d["requests"],
        socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
        non_2xx=d["status"],
        timeouts=d["timeout"],
        mean_ms=d["mean_us"] / 1e3,
        p50_ms=d["p50_us"] / 1e3,
        p90_ms=d["p90_us"] / 1e3,
        p95_ms=d["p95_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        max_ms=d["max_us"] / 1e3,
        counts=dict(d[key]),
    )
