"""What a miss waits for, hop by hop: nginx's access logs of a load run, summarised.

The edge renders (``nginx.render``, ``access_log=True``) write one line per public request to
``logs/access.log`` (format ``heatcrop``: cache status, total time) and one line per inner
request, that is per miss, to ``logs/hops.log`` (format ``heatcrop_hops``): every upstream hop
the miss made, the sidecar's first and the legacy server's after it, as nginx's
``$upstream_addr`` / ``$upstream_status`` / ``$upstream_response_time`` tell them (groups
separated by " : " after an X-Accel-Redirect or an error_page, tries within a group by ", ").
Today's edge (``legacy`` mode, format ``heatcrop_legacy``) has one hop, the legacy server's.

nginx's times have millisecond resolution; a hop without an answer (refused, timed out before
the header) counts the time nginx spent on it, or nothing when it says ``-``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_REQUEST = re.compile(r'^(?P<head>[^"]*)"(?P<request>[^"]*)" (?P<rest>.*)$')
_FIELD = re.compile(r'(\w+)=("[^"]*"|\S*)')
# Public requests that went through to the inner server (a HIT, STALE or UPDATING answer was
# served from the cache; HIT includes requests that waited on proxy_cache_lock for a miss).
MISS_STATES = frozenset({"MISS", "EXPIRED", "BYPASS", "REVALIDATED"})


@dataclass(frozen=True)
class Hop:
    """One upstream group of a request: the sum of its tries' seconds, the last status."""

    addr: str
    status: str
    seconds: float


@dataclass(frozen=True)
class LogLine:
    kind: str  # "public" (edge, access.log), "inner" (edge, hops.log), "legacy" (today's edge)
    request: str
    status: int
    fields: dict[str, str]
    hops: tuple[Hop, ...]

    @property
    def seconds(self) -> float:
        return _seconds(self.fields.get("rt", "-"))

    @property
    def cache(self) -> str:
        return self.fields.get("cache", "-")

    @property
    def path(self) -> str:
        return self.fields.get("path", "") or "-"


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def parse_line(text: str, kind: str) -> LogLine | None:
    """One access-log line of the formats above; None for anything else."""
    match = _REQUEST.match(text.strip())
    if match is None:
        return None
    rest = match.group("rest")
    status_text = rest.split(" ", 1)[0]
    if not status_text.isdigit():
        return None
    fields = {k: v.strip('"') for k, v in _FIELD.findall(match.group("head") + " " + rest)}
    return LogLine(kind, match.group("request"), int(status_text), fields, _hops(fields))


def _hops(fields: dict[str, str]) -> tuple[Hop, ...]:
    addrs = fields.get("addr", "").split(" : ")
    statuses = fields.get("ustatus", "").split(" : ")
    times = fields.get("urt", "").split(" : ")
    if not fields.get("addr") or len(addrs) != len(times):
        return ()
    hops = []
    for i, (addr, urt) in enumerate(zip(addrs, times, strict=True)):
        tries = [t.strip() for t in urt.split(",")]
        status = statuses[i].split(",")[-1].strip() if i < len(statuses) else "-"
        hops.append(Hop(addr.strip(), status, sum(_seconds(t) for t in tries)))
    return tuple(hops)


def read_lines(path: Path, offset: int, kind: str) -> list[LogLine]:
    """The parsed lines written to ``path`` after byte ``offset``."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.decode(errors="replace").splitlines():
        line = parse_line(raw, kind)
        if line is not None:
            out.append(line)
    return out


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass(frozen=True)
class Spread:
    """p50 and p95 of a set of latencies, in ms."""

    n: int
    p50_ms: float
    p95_ms: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Spread:
        values = [1000.0 * s for s in seconds]
        return cls(len(values), percentile(values, 50), percentile(values, 95))

    def text(self) -> str:
        if not self.n:
            return "–"
        return f"{self.p50_ms:.0f} / {self.p95_ms:.0f}"


@dataclass(frozen=True)
class HopSummary:
    """Per-hop latencies of one scenario's misses."""

    misses: Spread  # at the edge: the public request that went through
    hits: Spread  # served from the cache, lock waiters included
    sidecar: Spread  # the sidecar hop of each miss (edge only)
    legacy: Spread  # the legacy server's render of each miss
    by_path: dict[str, Spread] = field(default_factory=dict)  # sidecar hop by its answer


def summarise(public: Sequence[LogLine], inner: Sequence[LogLine]) -> HopSummary:
    """Today's edge: ``public`` alone (kind "legacy", its one hop is the legacy server's).
    The heatcrop edge: ``public`` (access.log) and ``inner`` (hops.log)."""
    misses = [line for line in public if line.cache in MISS_STATES]
    hits = [line for line in public if line.cache not in MISS_STATES]
    if not inner:  # today's edge: the miss's hop is the legacy server
        legacy = [line.hops[-1].seconds for line in misses if line.hops]
        return HopSummary(
            Spread.of(m.seconds for m in misses),
            Spread.of(h.seconds for h in hits),
            Spread.of(()),
            Spread.of(legacy),
        )
    sidecar = [line for line in inner if line.hops]
    by_path: dict[str, list[float]] = {}
    for line in sidecar:
        by_path.setdefault(line.path, []).append(line.hops[0].seconds)
    return HopSummary(
        Spread.of(m.seconds for m in misses),
        Spread.of(h.seconds for h in hits),
        Spread.of(line.hops[0].seconds for line in sidecar),
        # After the sidecar: the legacy server's hop (a refused smart URL retried as the plain
        # crop counts both renders).
        Spread.of(sum(h.seconds for h in line.hops[1:]) for line in sidecar if len(line.hops) > 1),
        {path: Spread.of(v) for path, v in sorted(by_path.items(), key=lambda kv: -len(kv[1]))},
    )
