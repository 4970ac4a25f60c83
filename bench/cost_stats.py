"""bench.cost's arithmetic: summaries over photos and rounds, answers sorted by what they were,
saturation runs and their ratios against attention. No clocks, no processes: tested alone."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# X-Heatcrop-Path of an answer the sidecar computed now (decode, CNN, search) ...
COLD_PATHS = frozenset({"smart", "low-confidence"})
# ... of one it gave up on (the legacy crop) ...
GIVEN_UP_PATHS = frozenset({"giveup", "cold"})
# ... and of one from a cache or an override: not a cold answer, so the run measured the
# wrong thing (a photo seen before), which the report must say.
NOT_COLD_PATHS = frozenset({"cached", "override"})


def answer_kind(status: int, path: str | None) -> str:
    """``cold``, ``given-up``, ``not-cold`` or ``error`` for one /crop answer."""
    if status != 200 or path is None:
        return "error"
    if path in COLD_PATHS:
        return "cold"
    if path in GIVEN_UP_PATHS:
        return "given-up"
    if path in NOT_COLD_PATHS:
        return "not-cold"
    return "error"


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile, linear between order statistics (numpy's default); nan if empty."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


@dataclass(frozen=True)
class Spread:
    """A figure over rounds: the median of the rounds' values and the lowest and highest."""

    median: float
    low: float
    high: float
    rounds: int

    def fmt(self, digits: int = 1, suffix: str = "") -> str:
        if not self.rounds:
            return "—"
        mid = f"{self.median:.{digits}f}{suffix}"
        if self.rounds == 1:
            return mid
        return f"{mid} ({self.low:.{digits}f}–{self.high:.{digits}f})"


def spread(values: Iterable[float]) -> Spread:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(finite), min(finite), max(finite), len(finite))


@dataclass(frozen=True)
class Latency:
    """One method's one-at-a-time times of one round, ms per photo."""

    ms: tuple[float, ...]
    kinds: Mapping[str, int]  # answer kinds (HTTP methods); {"cold": n} for the others

    @property
    def median(self) -> float:
        return quantile(self.ms, 0.5)

    @property
    def p90(self) -> float:
        return quantile(self.ms, 0.9)

    @property
    def clean(self) -> bool:
        """Every answer was computed now: nothing given up, cached or failed."""
        return set(self.kinds) <= {"cold"}


@dataclass(frozen=True)
class Saturation:
    """One run of every photo at a fixed number in flight."""

    photos: int  # asked
    kinds: Mapping[str, int]  # answer kinds ({"cold": photos} for attention)
    wall_s: float
    server_cpu_s: float  # the serving process's CPU over the run
    client_cpu_s: float = 0.0  # the HTTP client's (bench.cost's own threads); 0 in-process
    metric_giveups: int = 0  # the sidecar's heatcrop_giveups_total over the run
    cnn_runs: int | None = None  # the sidecar's heatcrop_nn_runs_total over the run
    giveup_reasons: Mapping[str, int] = field(default_factory=dict)  # the sidecar's, by reason

    @property
    def cold(self) -> int:
        return self.kinds.get("cold", 0)

    @property
    def given_up(self) -> int:
        return max(self.photos - self.cold, self.metric_giveups)

    @property
    def clean(self) -> bool:
        """Nothing given up or failed, and (where counted) one CNN run per photo."""
        runs_ok = self.cnn_runs is None or self.cnn_runs == self.photos
        return self.given_up == 0 and runs_ok

    @property
    def rate(self) -> float:
        """Cold answers per second (only those: a give-up is no image)."""
        return self.cold / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def cpu_ms(self) -> float:
        """The serving process's CPU per photo asked, ms."""
        return 1e3 * self.server_cpu_s / self.photos if self.photos else math.nan

    @property
    def client_cpu_ms(self) -> float:
        return 1e3 * self.client_cpu_s / self.photos if self.photos else math.nan


def cost_ratio(heatcrop: Saturation, attention: Saturation) -> float:
    """How many times attention's cost one heatcrop image costs at saturation: attention's
    images per second over heatcrop's (nan when either run gave up or failed)."""
    if not (heatcrop.clean and attention.clean) or not heatcrop.rate > 0:
        return math.nan
    return attention.rate / heatcrop.rate


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline > 0 else math.nan


def count_kinds(kinds: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def merge_kinds(many: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for kinds in many:
        for kind, n in kinds.items():
            total[kind] = total.get(kind, 0) + n
    return total


def fmt_kinds(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def rotated(names: Sequence[str], shift: int) -> list[str]:
    """``names`` started at ``shift`` (mod their count): the order of one photo or run."""
    if not names:
        return []
    k = shift % len(names)
    return [*names[k:], *names[:k]]
