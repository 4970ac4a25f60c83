"""``heatcrop warm``: precompute heatmaps for a backlog of originals into the shared cache.

Each path goes through the same functions as the service's pipeline (source fetch, the
original's identity, ``heatmap_key``, ``decode``, the batcher, ``make_analysis``,
``put_analysis``), with the same engine (the face detector joined to it: sidecar/faces.py), so
a sidecar asking for a warmed original finds its heatmap and faces under the very same key and
runs no CNN. Originals whose heatmap is already cached are skipped. Every failure
(bad path, missing or broken original, cache write refused) is counted by error type, never
raised: one bad line must not stop a backlog of millions.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TextIO

from tqdm import tqdm

from engines.base import Engine
from engines.loader import load_engine
from sidecar.batcher import Batcher
from sidecar.caches import Caches, heatmap_key, make_caches
from sidecar.core import make_analysis
from sidecar.decode import decode
from sidecar.errors import HeatcropError
from sidecar.faces import with_faces
from sidecar.records import AnalysisExpect
from sidecar.settings import Settings
from sidecar.sources import Source, make_source

log = logging.getLogger("heatcrop.warm")

# No request is waiting on a warm run: Redis may take its time rather than trip the breaker
# (the service's 50 ms budget per operation is for answering within a request deadline).
WARM_L2_TIMEOUT_S = 2.0
# The batcher refuses work it expects to finish late; a warm run only needs a bound that
# catches a stuck engine.
WARM_DEADLINE_S = 600.0


class CacheWriteFailed(Exception):
    """The heatmap was computed but the cache did not take it (Redis down or refusing)."""


@dataclass
class WarmSummary:
    done: int = 0
    skipped_cached: int = 0
    duplicates: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def as_dict(self) -> dict[str, object]:
        handled = self.done + self.skipped_cached + self.failures
        return {
            "done": self.done,
            "skipped_cached": self.skipped_cached,
            "duplicates": self.duplicates,
            "failed": self.failures,
            "failed_by_type": dict(sorted(self.failed.items())),
            "seconds": round(self.seconds, 3),
            "rate_per_s": round(handled / self.seconds, 2) if self.seconds > 0 else 0.0,
            "computed_per_s": round(self.done / self.seconds, 2) if self.seconds > 0 else 0.0,
        }


@dataclass
class _Warmer:
    settings: Settings
    engine: Engine
    batcher: Batcher
    caches: Caches
    source: Source
    pool: ThreadPoolExecutor
    summary: WarmSummary

    async def one(self, path: str) -> str:
        """'done', 'skipped' or the failure's type name; never raises (but cancellation)."""
        try:
            return await self._warm(path)
        except HeatcropError as exc:
            log.info("warm %s: %s", path, exc)
            return type(exc).__name__
        except Exception as exc:  # counted and logged: the run goes on
            log.warning("warm %s: unexpected %r", path, exc)
            return type(exc).__name__

    async def _warm(self, path: str) -> str:
        original = await self.source.fetch(path)
        key = heatmap_key(original.identity, self.engine.version)
        src = self.settings.source
        if original.size is not None:  # else not an image: the decode says how
            expect = AnalysisExpect(original.size, src.max_pixels)
            if await self.caches.get_analysis(key, expect) is not None:
                return "skipped"
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(
            self.pool,
            partial(decode, original.data, max_bytes=src.max_bytes, max_pixels=src.max_pixels),
        )
        heat = await self.batcher.infer(decoded.pixels, loop.time() + WARM_DEADLINE_S)
        analysis = make_analysis(
            decoded, heat.heatmaps, heat.food_mass, self.engine.version, faces=heat.faces
        )
        if not await self.caches.put_analysis(key, analysis):
            raise CacheWriteFailed(key)
        return "done"

    def record(self, outcome: str) -> None:
        if outcome == "done":
            self.summary.done += 1
        elif outcome == "skipped":
            self.summary.skipped_cached += 1
        else:
            self.summary.failed[outcome] += 1


def read_paths(lines: Iterable[str]) -> list[str]:
    """Paths one a line; blank lines and ``#`` comments skipped, surrounding blanks stripped."""
    out = []
    for line in lines:
        path = line.strip()
        if path and not path.startswith("#"):
            out.append(path)
    return out


async def warm(
    settings: Settings,
    paths: list[str],
    *,
    concurrency: int = 4,
    progress: TextIO | None = sys.stderr,
) -> WarmSummary:
    """Compute and cache the heatmap of every path not cached yet; see the module docstring."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if settings.cache.backend == "memory":
        log.warning(
            "cache backend is memory: the heatmaps die with this process (a dry run only); "
            "set HEATCROP_CACHE_BACKEND=redis to warm the shared cache"
        )
    unique = list(dict.fromkeys(paths))
    summary = WarmSummary(duplicates=len(paths) - len(unique))
    start = time.perf_counter()
    engine = await asyncio.to_thread(_load_engine, settings)
    try:
        await _warm_all(settings, engine, unique, concurrency, progress, summary)
    finally:
        engine.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _load_engine(settings: Settings) -> Engine:
    return with_faces(load_engine(settings.engine, warm=True), settings)


async def _warm_all(
    settings: Settings,
    engine: Engine,
    paths: list[str],
    concurrency: int,
    progress: TextIO | None,
    summary: WarmSummary,
) -> None:
    server = settings.server
    batcher = Batcher(
        engine,
        max_batch=server.max_batch,
        max_wait_ms=server.max_wait_ms,
        max_queue=concurrency,
        lanes=settings.engine.session_per_core,
    )
    caches = make_caches(settings.cache, l2_timeout_s=WARM_L2_TIMEOUT_S)
    source = make_source(settings.source)
    pool = ThreadPoolExecutor(server.decode_threads, thread_name_prefix="heatcrop-warm")
    await batcher.start()
    warmer = _Warmer(settings, engine, batcher, caches, source, pool, summary)
    bar = tqdm(total=len(paths), file=progress, disable=progress is None, unit="img")
    try:
        await _bounded(warmer, paths, concurrency, bar)
    finally:
        bar.close()
        await batcher.close()
        await source.close()
        await caches.close()
        pool.shutdown(wait=True, cancel_futures=True)


async def _bounded(warmer: _Warmer, paths: list[str], concurrency: int, bar: tqdm) -> None:
    # Tasks are created only as slots free up, so a huge backlog never sits in memory as tasks.
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[str]] = set()

    def finished(task: asyncio.Task[str]) -> None:
        running.discard(task)
        slots.release()
        if not task.cancelled():
            warmer.record(task.result())
            bar.update(1)

    for path in paths:
        await slots.acquire()
        task = asyncio.create_task(warmer.one(path))
        running.add(task)
        task.add_done_callback(finished)
    if running:
        await asyncio.gather(*running)
