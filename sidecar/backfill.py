"""The work of ``heatcrop backfill`` on one batch of originals, without Ray.

sidecar/backfill_ray.py runs these on Ray Data; here they are plain functions on column
batches (``dict[str, numpy array]``, Ray Data's numpy batch format), so the sidecar's own code
does the work and the tests can call them directly:

- ``Prepare``: each path fetched through the sidecar's source (identity and header
  size as the sidecar sees them), its heatmap key (``heatmap_key`` with the version the engine
  of the actors keys with), the keys of a batch looked up in the shared cache in one round trip
  (``Caches.get_analyses``: a record there is used only if it is what a sidecar would use,
  sidecar/records.py), and what is not cached decoded (``decode``) to its model bucket.
- ``Analyse``: the engine loaded once per actor as the sidecar loads it (``service_engine``),
  a batch of pixels per shape bucket through it, ``make_analysis`` and ``put_analysis`` under
  the key a sidecar reads.
- ``Backfill`` (the actor pool's callable): both in one process, on one row of Ray Data's
  listing (one batch of paths); it returns the batch's outcome counts, not its rows. Both
  stages share one ``Session`` for the actor's life: one event loop, one source, one
  ``Caches``, so one breaker: once the shared tier fails, the next batches' lookups wait out
  its retry time (``CacheUnavailable``, nothing computed) instead of each trying it again.

Each row carries its ``outcome``: ``done``, ``skipped`` (already cached), or the type of what
went wrong (``SourceNotFound``, ``NotAnImage``, ``InputTooLarge``, ``TooManyPixels``,
``CacheWriteFailed``, ``CacheUnavailable`` ...): a failure is counted, never raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from engines.base import Engine
from engines.loader import load_engine
from sidecar.caches import Caches, heatmap_key, make_caches
from sidecar.core import make_analysis
from sidecar.decode import Decoded, configure_vips, decode
from sidecar.errors import HeatcropError
from sidecar.faces import with_faces
from sidecar.records import AnalysisExpect
from sidecar.settings import Settings, SettingsError, env_name
from sidecar.sources import Original, Source, make_source

log = logging.getLogger("heatcrop.backfill")

Batch = dict[str, npt.NDArray[Any]]
T = TypeVar("T")

TODO = "todo"  # decoded, waiting for the engine
DONE = "done"
SKIPPED = "skipped"
# The shared cache could not be asked whether an original is there (down, or kept out by its
# breaker): nothing is computed, since nothing could be stored; a later run does it.
CACHE_UNAVAILABLE = "CacheUnavailable"
# Computed, but the shared cache did not take it.
CACHE_WRITE_FAILED = "CacheWriteFailed"

# No request waits on a backfill: Redis may take its time rather than trip the breaker.
L2_TIMEOUT_S = 2.0
# Heatmaps a worker keeps in memory (a sidecar's in-process tier; the backfill writes through
# it): a backfill reads each original once, so a small tier bounds the worker's memory.
L1_ENTRIES = 256
# Originals read at once by one task (the folder source reads in 4 threads).
FETCHES = 4
# Bytes of fetched originals a task holds before it looks them up and decodes them, whatever
# its batch size: with FETCHES reads in flight, a task holds at most this plus FETCHES
# originals (each within source.max_bytes) and its batch of decoded pixels.
PENDING_BYTES = 64 * 1024 * 1024

COLUMNS = ("path", "key", "outcome", "width", "height", "format", "pixels", "ph", "pw")


@dataclass
class BackfillSummary:
    """What a run did, original by original: computed and stored, skipped, failed by type."""

    done: int = 0
    skipped: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    # When the first results came (the workers' start-up, engines loaded, is before), and how
    # many were computed by then: the rate after it is what a long run keeps up.
    first_s: float = 0.0
    first_done: int = 0
    # CPU seconds the actors spent, Prepare's included (not Ray's own processes).
    cpu_s: float = 0.0
    # Per worker: its first batch's start, its last batch's end (its own wall clock) and what
    # it computed. The driver sees results late and in bursts (Ray Data's output queue), and
    # with several workers a run's first and last seconds have some of them idle; each
    # worker's rate over its own busy span, summed, is what a long run keeps up.
    spans: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def count(self, outcome: str, n: int = 1) -> None:
        if outcome == DONE:
            self.done += n
        elif outcome == SKIPPED:
            self.skipped += n
        else:
            self.failed[outcome] += n

    def as_dict(self) -> dict[str, object]:
        handled = self.done + self.skipped + self.failures
        per_s = (lambda n: round(n / self.seconds, 2)) if self.seconds > 0 else (lambda n: 0.0)
        return {
            "done": self.done,
            "skipped_cached": self.skipped,
            "failed": self.failures,
            "failed_by_type": dict(sorted(self.failed.items())),
            "seconds": round(self.seconds, 3),
            "rate_per_s": per_s(handled),
            "computed_per_s": per_s(self.done),
            "steady_computed_per_s": self.steady_per_s(),
            "busy_computed_per_s": self.busy_per_s(),
            "actor_cpu_ms_per_original": round(self.cpu_s / handled * 1e3, 1) if handled else 0.0,
        }

    def steady_per_s(self) -> float:
        after = self.seconds - self.first_s
        return round((self.done - self.first_done) / after, 2) if after > 0 else 0.0

    def add_span(self, worker: str, start: float, end: float, done: int) -> None:
        first, last, n = self.spans.get(worker, (start, end, 0))
        self.spans[worker] = (min(first, start), max(last, end), n + done)

    def busy_per_s(self) -> float:
        """Originals computed per second with every worker busy (see ``spans``)."""
        return round(
            sum(n / (end - start) for start, end, n in self.spans.values() if end > start), 2
        )

    def line(self) -> str:
        d = self.as_dict()
        return (
            f"backfill: {d['done']} done, {d['skipped_cached']} skipped, {d['failed']} failed "
            f"{d['failed_by_type']}, {d['computed_per_s']} img/s computed, {d['seconds']:.0f} s"
        )


def require_shared_cache(settings: Settings) -> None:
    """SettingsError unless the heatmaps go where sidecars read them: a backfill into this
    process's memory would be lost with it."""
    if settings.cache.backend != "redis":
        var = env_name("cache", "backend")
        raise SettingsError(
            f"{var}={settings.cache.backend!r}: a backfill writes to the shared cache; set redis "
            f"and {env_name('cache', 'redis_url')} (a Redis or a Redis Cluster)"
        )


def service_engine(settings: Settings, *, warm: bool = True) -> Engine:
    """The engine as the sidecar loads it (with the face detector joined when it runs with
    faces), so its version, which every heatmap key names, is the sidecar's."""
    return with_faces(load_engine(settings.engine, warm=warm), settings, warm=warm)


def service_version(settings: Settings) -> str:
    """The version the sidecar's engine keys heatmaps with, on this machine."""
    engine = service_engine(settings, warm=False)
    try:
        return engine.version
    finally:
        engine.close()


def backfill_caches(settings: Settings) -> Caches:
    """The sidecar's caches, with a small memory tier and a patient Redis budget."""
    cache = dataclasses.replace(settings.cache, heatmap_entries=L1_ENTRIES, box_entries=16)
    return make_caches(cache, l2_timeout_s=L2_TIMEOUT_S)


@dataclass
class _Row:
    path: str
    outcome: str
    key: str = ""
    decoded: Decoded | None = None

    def columns(self) -> tuple[Any, ...]:
        d = self.decoded
        if d is None:
            return (self.path, self.key, self.outcome, 0, 0, "", b"", 0, 0)
        ph, pw = d.pixels.shape[:2]
        return (self.path, self.key, self.outcome, d.width, d.height, d.format,
                d.pixels.tobytes(), ph, pw)  # fmt: skip


def _batch(rows: Iterable[_Row]) -> Batch:
    cols = list(zip(*(r.columns() for r in rows), strict=True)) or [()] * len(COLUMNS)
    out: Batch = {}
    for name, values in zip(COLUMNS, cols, strict=True):
        if name == "pixels":
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
        else:
            out[name] = np.asarray(values, dtype=np.int64 if name in ("width", "height",
                                   "ph", "pw") else object)  # fmt: skip
    return out


class Session:
    """One event loop, one source (its read threads, or its HTTP keep-alive pool) and one
    ``Caches`` (its Redis connections and breaker) for every batch a worker runs: made per
    batch, they were set up and torn down every few dozen originals."""

    def __init__(self, settings: Settings) -> None:
        self.source = make_source(settings.source)
        self.caches = backfill_caches(settings)
        self.loop = asyncio.new_event_loop()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def close(self) -> None:
        try:
            self.run(self.source.close())
            self.run(self.caches.close())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()


class Prepare:
    """Fetch, key, look up and decode one batch of paths. On a worker's ``Session`` when given
    one (Backfill's); on its own, each call opens and closes one."""

    def __init__(self, settings: Settings, version: str, session: Session | None = None) -> None:
        self.settings = settings
        self.version = version
        self.session = session
        configure_vips()  # once in the worker's process: one libvips thread, no operation cache

    def __call__(self, batch: Batch) -> Batch:
        paths = [str(p) for p in batch["path"]]
        own: Session | None = None
        try:
            session = self.session or (own := Session(self.settings))
            return _batch(session.run(self._prepare(session, paths)))
        except Exception as exc:  # a batch lost is counted, not the run's end
            log.warning("backfill: a batch of %d failed: %r", len(paths), exc)
            return _batch(_Row(path, type(exc).__name__) for path in paths)
        finally:
            if own is not None:
                own.close()

    async def _prepare(self, session: Session, paths: list[str]) -> list[_Row]:
        rows: list[_Row] = []
        pending: list[tuple[str, Original]] = []
        held = 0
        async for path, got in _fetched(session.source, paths):
            if isinstance(got, str):
                rows.append(_Row(path, got))
                continue
            pending.append((path, got))
            held += len(got.data)
            if held >= PENDING_BYTES:
                rows += await self._looked_up(session.caches, pending)
                pending, held = [], 0
        rows += await self._looked_up(session.caches, pending)
        return rows

    async def _looked_up(self, caches: Caches, fetched: list[tuple[str, Original]]) -> list[_Row]:
        """Skipped when cached, decoded when not; an original whose header did not pass is
        decoded at once, which says what it is (its heatmap cannot exist)."""
        keys = [heatmap_key(o.identity, self.version) for _, o in fetched]
        sized = [i for i, (_, o) in enumerate(fetched) if o.size is not None]
        max_pixels = self.settings.source.max_pixels
        expects = [AnalysisExpect(fetched[i][1].size, max_pixels) for i in sized]
        found = await caches.get_analyses([keys[i] for i in sized], expects) if sized else []
        cached = {i for i, a in zip(sized, found or [], strict=False) if a is not None}
        rows = []
        for i, (path, original) in enumerate(fetched):
            if found is None and original.size is not None:
                rows.append(_Row(path, CACHE_UNAVAILABLE, keys[i]))
            elif i in cached:
                rows.append(_Row(path, SKIPPED, keys[i]))
            else:
                rows.append(self._decoded(path, keys[i], original))
        return rows

    def _decoded(self, path: str, key: str, original: Original) -> _Row:
        src = self.settings.source
        try:
            # The fetch's checked header: the decode does not parse it again.
            decoded = decode(
                original.data,
                max_bytes=src.max_bytes,
                max_pixels=src.max_pixels,
                header=original.header,
            )
        except HeatcropError as exc:
            return _Row(path, type(exc).__name__, key)
        except Exception as exc:  # counted and logged: the run goes on
            log.warning("backfill %s: unexpected %r", path, exc)
            return _Row(path, type(exc).__name__, key)
        return _Row(path, TODO, key, decoded)


async def _fetched(source: Source, paths: list[str]) -> AsyncIterator[tuple[str, Original | str]]:
    """(path, its original or the type of why not), ``FETCHES`` at a time, in order."""
    for start in range(0, len(paths), FETCHES):
        chunk = paths[start : start + FETCHES]
        got = await asyncio.gather(*(_fetch(source, p) for p in chunk))
        for path, result in zip(chunk, got, strict=True):
            yield path, result


async def _fetch(source: Source, path: str) -> Original | str:
    try:
        return await source.fetch(path)
    except HeatcropError as exc:
        return type(exc).__name__
    except Exception as exc:  # counted and logged: the run goes on
        log.warning("backfill %s: unexpected %r", path, exc)
        return type(exc).__name__


class Analyse:
    """The engine over a batch of decoded originals, the analyses into the shared cache (one
    per actor of Ray Data's pool: the engine is loaded once, in ``__init__``)."""

    def __init__(self, settings: Settings, version: str, session: Session | None = None) -> None:
        self.settings = settings
        self.engine = service_engine(settings)
        if self.engine.version != version:
            # Heatmaps keyed by another model or runtime than the lookups: a sidecar would
            # never read them. Refused before any is computed.
            raise RuntimeError(
                f"this worker's engine is {self.engine.version}, the run keys with {version}: "
                "every worker needs the same model files, engine kind and face settings"
            )
        self.own_session = session is None
        self.session = session or Session(settings)
        self.cpu_s = time.process_time()

    def __call__(self, batch: Batch) -> Batch:
        outcomes = list(batch["outcome"])
        todo: dict[tuple[int, int], list[int]] = {}
        for i, outcome in enumerate(outcomes):
            if outcome == TODO:
                todo.setdefault((int(batch["ph"][i]), int(batch["pw"][i])), []).append(i)
        for rows in todo.values():
            chunk = self.settings.server.max_batch
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                for i, outcome in zip(part, self._run(batch, part), strict=True):
                    outcomes[i] = outcome
        out = np.empty(len(outcomes), dtype=object)
        out[:] = outcomes
        # This worker's CPU since its last batch (Backfill runs Prepare in this process), spread
        # over the rows: their sum is what the workers spent.
        now = time.process_time()
        cpu = np.full(len(outcomes), (now - self.cpu_s) / max(len(outcomes), 1))
        self.cpu_s = now
        return {"path": batch["path"], "outcome": out, "cpu_s": cpu}

    def _run(self, batch: Batch, rows: list[int]) -> list[str]:
        decoded = [_decoded_row(batch, i) for i in rows]
        try:
            heat = self.engine.infer(np.stack([d.pixels for d in decoded]))
        except Exception as exc:  # counted per original and logged: the run goes on
            log.warning("backfill: the engine failed on %d originals: %r", len(rows), exc)
            return [type(exc).__name__] * len(rows)
        analyses = [
            make_analysis(
                d,
                heat.heatmaps[j],
                heat.food_mass[j],
                self.engine.version,
                faces=heat.faces[j] if heat.faces else None,
            )
            for j, d in enumerate(decoded)
        ]
        keys = [str(batch["key"][i]) for i in rows]
        try:
            stored = self.session.run(self._store(keys, analyses))
        except Exception as exc:  # whatever the cache client raised: not stored, counted
            log.warning("backfill: %d heatmaps not stored: %r", len(rows), exc)
            stored = [False] * len(rows)
        return [DONE if ok else CACHE_WRITE_FAILED for ok in stored]

    async def _store(self, keys: list[str], analyses: list[Any]) -> list[bool]:
        caches = self.session.caches
        puts = (caches.put_analysis(k, a) for k, a in zip(keys, analyses, strict=True))
        stored = list(await asyncio.gather(*puts))
        for key, ok in zip(keys, stored, strict=True):
            if not ok:
                # The memory tier took it, the shared one did not: Prepare's lookups go through
                # the same caches, and must not find it there and call it skipped.
                caches.heatmaps.restore_local(key, None)
        return stored

    def close(self) -> None:
        try:
            if self.own_session:
                self.session.close()
        finally:
            self.engine.close()


class Backfill:
    """Prepare and Analyse in one actor, one batch of paths per call (Ray Data's actor pool
    calls it with one listing row: a list of paths). Both stages in the process that loads
    the engine: the decoded pixels never leave it, and a batch costs Ray one task, one input
    block and one output row, whatever its size."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.session = Session(settings)
        try:
            self.analyse = Analyse(settings, version, self.session)
        except BaseException:
            self.session.close()
            raise
        self.prepare = Prepare(settings, version, self.session)
        self.closed = False
        self.worker = uuid.uuid4().hex[:12]

    def __call__(self, batch: Batch) -> Batch:
        start = time.time()
        paths = np.asarray([str(p) for row in batch["paths"] for p in row], dtype=object)
        analysed = self.analyse(self.prepare({"path": paths}))
        # Counts, not rows: the driver only sums them, and rows would cost the object store
        # and the driver a string per original.
        counts = Counter(str(o) for o in analysed["outcome"])
        out = np.empty(2, dtype=object)
        out[:] = json.dumps(counts, sort_keys=True), self.worker
        return {
            "counts": out[:1],
            "worker": out[1:],
            "cpu_s": np.asarray([analysed["cpu_s"].sum()]),
            "start_s": np.asarray([start]),
            "end_s": np.asarray([time.time()]),
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.analyse.close()
        finally:
            self.session.close()

    def __del__(self) -> None:
        # Ray Data deletes the callable when it shuts an actor down gracefully; it never calls
        # close(). The Redis connections are then closed, not dropped with the process.
        if not getattr(self, "closed", True):
            try:
                self.close()
            except Exception as exc:  # the process is ending: say so, nothing more
                log.warning("backfill: closing a worker: %r", exc)


def _decoded_row(batch: Batch, i: int) -> Decoded:
    shape = (int(batch["ph"][i]), int(batch["pw"][i]), 3)
    pixels = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(shape)
    return Decoded(pixels, int(batch["width"][i]), int(batch["height"][i]), str(batch["format"][i]))
