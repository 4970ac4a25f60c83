"""A tiny Prometheus registry (text exposition format 0.0.4), without dependencies.

Every label has a fixed set of allowed values declared with the metric: a value outside it is a
programming error (``ValueError``), so no request data (paths, hosts, sizes) can ever become a
label and blow up the series count. Because the sets are known, every series is exported from
the start with a zero value: a rate over a counter that appears only after its first event
would miss that event.

Updates take a lock, so the decode and engine threads may record too; rendering takes the same
lock per metric and is deterministic: metrics in registration order, series in the order of
their declared label values.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelKey = tuple[str, ...]
M = TypeVar("M", bound="_Metric")


def format_value(value: float) -> str:
    """A sample value or ``le`` bound as Prometheus writes it (Go float syntax)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Metric:
    """Name, help, label schema and the series keys; subclasses hold the values."""

    kind = ""

    def __init__(self, name: str, help: str, labels: Mapping[str, Sequence[str]]) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.label_names: tuple[str, ...] = tuple(labels)
        self.label_values: tuple[tuple[str, ...], ...] = tuple(tuple(v) for v in labels.values())
        for label, values in zip(self.label_names, self.label_values, strict=True):
            self._check_label_schema(label, values)
        self._valid = frozenset(self._keys())
        self._lock = threading.Lock()

    def _check_label_schema(self, label: str, values: tuple[str, ...]) -> None:
        if not _LABEL_NAME.match(label) or label.startswith("__"):
            raise ValueError(f"{self.name}: invalid label name {label!r}")
        if not values:
            raise ValueError(f"{self.name}: label {label!r} needs at least one allowed value")
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{self.name}: label {label!r} values must be strings")
        if len(set(values)) != len(values):
            raise ValueError(f"{self.name}: label {label!r} has duplicate values")

    def _keys(self) -> Iterator[LabelKey]:
        return itertools.product(*self.label_values)

    def _key(self, labels: Mapping[str, str]) -> LabelKey:
        # Every request records a few samples: the common case is one tuple and one set lookup;
        # anything else goes through the checks below, which name what is wrong.
        if len(labels) == len(self.label_names):
            found = tuple(labels.get(n) for n in self.label_names)
            if found in self._valid:
                return found  # type: ignore[return-value]  # in _valid: every value a str
        if set(labels) != set(self.label_names):
            raise ValueError(
                f"{self.name}: labels {sorted(labels)} != declared {sorted(self.label_names)}"
            )
        key = tuple(labels[n] for n in self.label_names)
        for label, value, allowed in zip(self.label_names, key, self.label_values, strict=True):
            if value not in allowed:
                raise ValueError(f"{self.name}: {label}={value!r} is not one of {allowed}")
        return key

    def _selector(self, key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = (*zip(self.label_names, key, strict=True), *extra)
        if not pairs:
            return ""
        inner = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in pairs)
        return "{" + inner + "}"

    def render(self) -> list[str]:
        head = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            return head + self._samples()

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label combination."""

    kind = "counter"

    def __init__(
        self, name: str, help: str, labels: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        super().__init__(name, help, labels or {})
        self._values: dict[LabelKey, float] = dict.fromkeys(self._keys(), 0.0)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"{self.name}: a counter only goes up, got {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] += amount

    def value(self, **labels: str) -> float:
        return self._values[self._key(labels)]

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{self._selector(k)} {format_value(v)}" for k, v in self._values.items()
        ]


class Gauge(_Metric):
    """A value that goes up and down, set directly or read from a callback at render time."""

    kind = "gauge"

    def __init__(
        self, name: str, help: str, labels: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        super().__init__(name, help, labels or {})
        self._values: dict[LabelKey, float] = dict.fromkeys(self._keys(), 0.0)
        self._function: Callable[[], float] | None = None

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] += amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Read the value from ``function`` at each render (unlabelled gauges only).

        ``None`` goes back to the last set value. A callback that raises renders NaN: a
        scrape must not fail because one reading did.
        """
        if self.label_names:
            raise ValueError(f"{self.name}: a callback gauge cannot have labels")
        self._function = function

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        if self._function is not None:
            return self._read_function(self._function)
        return self._values[key]

    @staticmethod
    def _read_function(function: Callable[[], float]) -> float:
        try:
            return float(function())
        except Exception:
            return math.nan

    def _samples(self) -> list[str]:
        if self._function is not None:
            return [f"{self.name} {format_value(self._read_function(self._function))}"]
        return [
            f"{self.name}{self._selector(k)} {format_value(v)}" for k, v in self._values.items()
        ]


class Histogram(_Metric):
    """Observations counted into fixed cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Sequence[float],
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(name, help, labels or {})
        if "le" in self.label_names:
            raise ValueError(f"{self.name}: 'le' is reserved for histogram buckets")
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()  # +Inf is always added; accept it written out
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError(f"{self.name}: buckets must be finite and non-empty")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"{self.name}: buckets must be strictly increasing")
        self.bounds: tuple[float, ...] = tuple(bounds)
        # Per series: counts per bucket (not cumulative; the last one is +Inf), sum.
        self._counts: dict[LabelKey, list[int]] = {k: [0] * (len(bounds) + 1) for k in self._keys()}
        self._sums: dict[LabelKey, float] = dict.fromkeys(self._counts, 0.0)

    def observe(self, value: float, **labels: str) -> None:
        if math.isnan(value):
            raise ValueError(f"{self.name}: cannot observe NaN")
        key = self._key(labels)
        index = _bucket_index(self.bounds, value)
        with self._lock:
            self._counts[key][index] += 1
            self._sums[key] += value

    @contextmanager
    def time(self, **labels: str) -> Iterator[None]:
        """Observe the seconds the ``with`` body took (awaits inside included)."""
        self._key(labels)  # fail before the work, not after it
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start, **labels)

    def count(self, **labels: str) -> int:
        return sum(self._counts[self._key(labels)])

    def sum(self, **labels: str) -> float:
        return self._sums[self._key(labels)]

    def cumulative(self, **labels: str) -> list[tuple[float, int]]:
        """(le, cumulative count) pairs, ending with (+Inf, count)."""
        counts = itertools.accumulate(self._counts[self._key(labels)])
        return list(zip((*self.bounds, math.inf), counts, strict=True))

    def _samples(self) -> list[str]:
        lines = []
        for key, counts in self._counts.items():
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                running += n
                le = (("le", format_value(bound)),)
                lines.append(f"{self.name}_bucket{self._selector(key, le)} {running}")
            lines.append(f"{self.name}_sum{self._selector(key)} {format_value(self._sums[key])}")
            lines.append(f"{self.name}_count{self._selector(key)} {running}")
        return lines


def _bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """Index of the first bound >= value (``le`` is inclusive); len(bounds) means +Inf."""
    lo, hi = 0, len(bounds)
    while lo < hi:
        mid = (lo + hi) // 2
        if bounds[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Registry:
    """Metrics by name, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> None:
        for name in _exposed_names(metric):
            if name in self._metrics or any(name in _exposed_names(m) for m in self):
                raise ValueError(f"metric name {name!r} is already registered")
        self._metrics[metric.name] = metric

    def __iter__(self) -> Iterator[_Metric]:
        return iter(self._metrics.values())

    def render(self) -> str:
        lines: list[str] = []
        for metric in self:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


def _exposed_names(metric: _Metric) -> tuple[str, ...]:
    if isinstance(metric, Histogram):
        return tuple(metric.name + s for s in ("", "_bucket", "_sum", "_count"))
    return (metric.name,)


# Label value sets of the service's metrics.
OUTCOMES = (
    "smart",
    "override",
    "cached",
    "low-confidence",
    "giveup",
    "error",
    "no-crop",
    "cold",
)
STAGES = ("fetch", "decode", "queue", "infer", "search", "total")
CACHES = ("heatmap", "box")
CACHE_RESULTS = ("hit", "miss")
# admission: the batcher's estimate said the deadline cannot be met; queue-full: max_queue;
# expired: the deadline passed while queued; shutdown: refused or dropped by close();
# deadline: the request's budget ran out elsewhere (fetch, decode), recorded by the pipeline.
GIVEUP_REASONS = ("admission", "queue-full", "expired", "shutdown", "deadline")
# cold_policy = "legacy" (sidecar/step_cold.py). Each cold answer: its path queued for a
# background heatmap, already queued, or refused (queue full: a later request tries again).
COLD_RESULTS = ("queued", "already", "refused")
# Each queued path: heatmap computed, found (cached meanwhile, or by another sidecar), dropped
# (the batcher or the source was too busy to take it), failed (not an image, over the limits).
COLD_HEATMAP_RESULTS = ("computed", "found", "dropped", "failed")
# Background work held back by the CPU budget (sidecar/cpu_budget.py): a cold path's read and
# decode, or a background image's CNN run.
BACKGROUND_STAGES = ("decode", "cnn")
# 0.1 ms (a cache hit) up to 2 s (a slow source); denser where the 200 ms p95 budget is decided,
# and 10 ms apart around the sidecar's own default budget (120 ms) to tell whether p99 meets it.
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.11,
    0.12,
    0.13,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Whole engine: a lone request on an idle engine (all of ONNX Runtime's threads, or a GPU);
# lane: one of the single-thread sessions the batcher runs side by side while busy.
ENGINE_CALL_KINDS = ("engine", "lane")
# Faces per photo: the detector keeps at most kernel.max_faces (64 by default).
FACES_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 63, 64)


class Metrics:
    """The sidecar's metrics, named ``<namespace>_<metric>``.

    Who records what: the batcher records ``queue`` and ``infer`` stages (per request),
    ``batch_size``, ``batch_seconds``, ``nn_runs_total``, ``engine_calls_total``, ``queue_depth``
    and its own give-up
    reasons (admission, queue-full, expired, shutdown); the request pipeline records every other
    stage, ``requests_total``, cache lookups and ``giveups_total{reason="deadline"}``; the
    background CPU budget (sidecar/cpu_budget.py) ``background_cpu_seconds_total`` and
    ``background_held_total``; the face detector, inside the engine call (sidecar/faces.py),
    ``face_seconds`` and ``faces_per_photo``.
    """

    def __init__(self, namespace: str = "heatcrop") -> None:
        self.registry = Registry()
        p = f"{namespace}_"
        self.requests = self._add(
            Counter(p + "requests_total", "Crop requests by outcome.", {"outcome": OUTCOMES})
        )
        self.stage_seconds = self._add(
            Histogram(
                p + "stage_seconds",
                "Seconds per request spent in each pipeline stage.",
                STAGE_BUCKETS,
                {"stage": STAGES},
            )
        )
        self.queue_depth = self._add(
            Gauge(p + "queue_depth", "Images waiting in the batcher for the engine.")
        )
        self.batch_size = self._add(
            Histogram(p + "batch_size", "Images per engine call.", BATCH_SIZE_BUCKETS)
        )
        self.batch_seconds = self._add(
            Histogram(p + "batch_seconds", "Seconds per engine call.", STAGE_BUCKETS)
        )
        self.cache_requests = self._add(
            Counter(
                p + "cache_requests_total",
                "Cache lookups by cache and result.",
                {"cache": CACHES, "result": CACHE_RESULTS},
            )
        )
        self.giveups = self._add(
            Counter(
                p + "giveups_total",
                "Requests answered with the legacy crop to stay in time, by reason.",
                {"reason": GIVEUP_REASONS},
            )
        )
        self.nn_runs = self._add(Counter(p + "nn_runs_total", "Images run through the CNN."))
        self.engine_calls = self._add(
            Counter(
                p + "engine_calls_total",
                "Engine calls by what ran them: the whole engine, or one single-thread lane.",
                {"on": ENGINE_CALL_KINDS},
            )
        )
        self.cold = self._add(
            Counter(
                p + "cold_total",
                "Cold answers (cold_policy legacy): their background heatmap queued or not.",
                {"result": COLD_RESULTS},
            )
        )
        self.cold_heatmaps = self._add(
            Counter(
                p + "cold_heatmaps_total",
                "Background heatmaps of cold answers, by what became of them.",
                {"result": COLD_HEATMAP_RESULTS},
            )
        )
        self.background_cpu = self._add(
            Counter(
                p + "background_cpu_seconds_total",
                "CPU seconds charged to background work (server.background_cpu_share).",
            )
        )
        self.background_held = self._add(
            Counter(
                p + "background_held_total",
                "Background work held back until the CPU budget refilled, by stage.",
                {"stage": BACKGROUND_STAGES},
            )
        )

        self.face_seconds = self._add(
            Histogram(
                p + "face_seconds",
                "Seconds of the face detector per engine call (part of batch_seconds).",
                STAGE_BUCKETS,
            )
        )
        self.faces_found = self._add(
            Histogram(
                p + "faces_per_photo",
                "Faces the detector kept per photo (at most kernel.max_faces).",
                FACES_BUCKETS,
            )
        )

    def _add(self, metric: M) -> M:
        self.registry.register(metric)
        return metric

    def render(self) -> str:
        return self.registry.render()
