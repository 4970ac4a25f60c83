"""The /crop pipeline as a plain list of named steps, with a deadline check between them.

Modelled on imgproxy's processing/pipeline.go: each step reads and fills one ``CropJob``; the
runner checks the deadline before every step and stops as soon as a step has decided the
answer (``job.box`` set). Steps, in order:

  override  the path's override record (box + version; the version is part of the box key)
            and the original's identity as last seen (``IdentityMemo``, trusted 30 s), which
            gives the heatmap and box keys without asking the source
  box       box cache lookup (hit: done)
  heatmap   heatmap cache lookup
  analyse   on a miss, or when the identity is not known: fetch, then the heatmap cache again
            (now that the key is known), else decode (in the pool) + batcher, stored in the
            heatmap cache; once per path across concurrent requests (single-flight); then the
            box cache if the identity was not known before. Work that could not finish in time
            is refused before it starts: before the fetch when the identity is known, before
            the decode otherwise (decode queue full, or the engine could not take the image)
  search    window search (in the pool), stored in the box cache

Failures are typed errors (sidecar.errors); the routes turn them into answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import numpy.typing as npt

from engines.base import PROFILES, Engine
from kernels.window import CropBox
from sidecar.batcher import Batcher, ImageHeat
from sidecar.caches import Caches, box_key, heatmap_key, override_key
from sidecar.core import Analysis, CropCore
from sidecar.decode import Decoded, decode
from sidecar.errors import DeadlineExceeded, Overloaded
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.singleflight import SingleFlight
from sidecar.sizes import Size
from sidecar.sources import Source

log = logging.getLogger("heatcrop.pipeline")

# How long a fetched original's identity is trusted without asking the source again.
IDENTITY_TTL_S = 30.0
IDENTITY_ENTRIES = 100_000
DECODE_EWMA_ALPHA = 0.1
# Background heatmaps remembered for reuse; the batcher holds far fewer (max_background).
MAX_PENDING = 1024
# A window search quicker than this runs on the event loop (see search_is_quick).
INLINE_SEARCH_S = 0.0003

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Override:
    """An editor's must-keep box for one path; ``box`` None is a cleared override."""

    box: Box | None
    version: int

    def encode(self) -> bytes:
        return json.dumps({"box": self.box, "version": self.version}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Override | None:
        """The stored record, or None when there is none or it does not parse."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            box = data["box"]
            version = int(data["version"])
        except (ValueError, KeyError, TypeError):
            log.warning("override record does not parse; ignored")
            return None
        if box is not None and not (isinstance(box, list) and len(box) == 4):
            return None
        return cls(None if box is None else (box[0], box[1], box[2], box[3]), version)


class IdentityMemo:
    """path → the original's last seen identity, trusted for ``ttl_s``; a bounded LRU.

    The heatmap and box keys name the original's identity (path + validators), which only a
    fetch tells. Remembering it lets box and heatmap cache hits answer without touching the
    source at all (for an HTTP origin a full GET per request); the price is that a changed
    original is noticed up to ``ttl_s`` late.
    """

    def __init__(self, ttl_s: float = IDENTITY_TTL_S, max_entries: int = IDENTITY_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, path: str, now: float) -> str | None:
        entry = self._entries.get(path)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[path]
            return None
        self._entries.move_to_end(path)
        return entry[0]

    def put(self, path: str, identity: str, now: float) -> None:
        self._entries[path] = (identity, now + self.ttl_s)
        self._entries.move_to_end(path)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class Pending:
    """A give-up's decoded original queued for a background heatmap, and that heatmap."""

    decoded: Decoded
    analysis: asyncio.Future[Analysis]


@dataclass
class Services:
    """What the steps use; built once per app."""

    settings: Settings
    engine: Engine
    core: CropCore
    batcher: Batcher
    caches: Caches
    source: Source
    pool: Executor  # decodes
    search_pool: Executor  # window searches, unless quick enough to run on the loop
    metrics: Metrics
    search_inline: bool = False
    flights: SingleFlight[tuple[str, Analysis]] = field(default_factory=SingleFlight)
    identities: IdentityMemo = field(default_factory=IdentityMemo)
    background: dict[str, Pending] = field(default_factory=dict)  # by heatmap key
    decoding: int = 0  # decodes queued or running in the pool
    decode_s: float = 0.010  # EWMA of one decode's own seconds (not its wait for a thread)

    @property
    def max_decoding(self) -> int:
        # A few decodes per thread keep the pool busy; more only wait, past the deadline.
        return 2 * self.settings.server.decode_threads

    def decode_ready_in(self) -> float:
        """Expected seconds until a decode submitted now is done, queueing included."""
        ahead = self.decoding // self.settings.server.decode_threads
        return self.decode_s * (ahead + 1)

    def observe_decode(self, seconds: float) -> None:
        self.decode_s += DECODE_EWMA_ALPHA * (seconds - self.decode_s)


@dataclass
class CropJob:
    path: str
    size: Size
    deadline: float  # loop.time()
    identity: str | None = None
    override: Override | None = None
    heat_key: str = ""
    box_key: str = ""
    analysis: Analysis | None = None
    box: CropBox | None = None
    cached: bool = False

    def set_identity(self, identity: str, model_version: str) -> None:
        self.identity = identity
        self.heat_key = heatmap_key(identity, model_version)
        version = self.override.version if self.override else 0
        self.box_key = box_key(self.heat_key, self.size.width, self.size.height, version)


Step = Callable[[Services, CropJob], Awaitable[None]]


async def step_override(svc: Services, job: CropJob) -> None:
    job.override = Override.decode(await svc.caches.overrides.get(override_key(job.path)))
    identity = svc.identities.get(job.path, asyncio.get_running_loop().time())
    if identity is not None:
        job.set_identity(identity, svc.engine.version)


async def step_box_cache(svc: Services, job: CropJob) -> None:
    if job.identity is not None:
        await _box_lookup(svc, job)


async def step_heatmap_cache(svc: Services, job: CropJob) -> None:
    if job.identity is None:
        return
    job.analysis = await svc.caches.get_analysis(job.heat_key)
    result = "miss" if job.analysis is None else "hit"
    svc.metrics.cache_requests.inc(cache="heatmap", result=result)


async def step_analyse(svc: Services, job: CropJob) -> None:
    """Fetch, decode, infer: once per path across concurrent requests (single-flight)."""
    if job.analysis is not None:
        return
    known = job.identity
    if known is not None and job.path not in svc.flights:
        # Known original, heatmap not cached: it will need a decode and the engine. When neither
        # could take it, give up now rather than after reading the original (under overload
        # those reads queue up and delay every other answer).
        _refuse_if_hopeless(svc, job.deadline)
    identity, job.analysis = await svc.flights.run(
        job.path, partial(_fetch_and_analyse, svc, job.path, job.deadline)
    )
    job.set_identity(identity, svc.engine.version)
    if identity != known:  # first sight of this original here (or it changed): maybe cached
        await _box_lookup(svc, job)


async def step_search(svc: Services, job: CropJob) -> None:
    analysis = job.analysis
    assert analysis is not None
    keep = None
    if job.override is not None and job.override.box is not None:
        keep = clamp_box(job.override.box, analysis.width, analysis.height)
    search = partial(svc.core.box, analysis, job.size.aspect, None, keep)
    with svc.metrics.stage_seconds.time(stage="search"):
        if svc.search_inline:
            job.box = search()
        else:
            job.box = await asyncio.get_running_loop().run_in_executor(svc.search_pool, search)
    await svc.caches.put_box(job.box_key, job.box.as_tuple(), job.box.confidence, job.path)


STEPS: tuple[tuple[str, Step], ...] = (
    ("override", step_override),
    ("box", step_box_cache),
    ("heatmap", step_heatmap_cache),
    ("analyse", step_analyse),
    ("search", step_search),
)


async def run_crop(svc: Services, job: CropJob) -> CropJob:
    """Run the steps until one decides the box; DeadlineExceeded when time runs out between."""
    loop = asyncio.get_running_loop()
    current = STEPS[0][0]
    try:
        # No step may hold a request past its deadline: a slow origin, a long decode queue or a
        # full batcher must turn into a prompt fallback, not a late one. The shared single-flight
        # work is shielded and goes on for the other waiters. One timeout for all the steps:
        # one per step cost a tenth of the event loop's time on box-cache hits.
        async with asyncio.timeout_at(job.deadline):
            for name, step in STEPS:
                if job.box is not None:
                    break
                current = name
                if loop.time() >= job.deadline:
                    svc.metrics.giveups.inc(reason="deadline")
                    raise DeadlineExceeded(f"deadline passed before step {name}")
                await step(svc, job)
    except TimeoutError:
        svc.metrics.giveups.inc(reason="deadline")
        raise DeadlineExceeded(f"deadline passed during step {current}") from None
    return job


async def _box_lookup(svc: Services, job: CropJob) -> None:
    record = await svc.caches.get_box(job.box_key)
    svc.metrics.cache_requests.inc(cache="box", result="miss" if record is None else "hit")
    if record is not None:
        x0, y0, x1, y1 = record.box
        job.box = CropBox(x0, y0, x1, y1, confidence=record.confidence)
        job.cached = True


async def _fetch_and_analyse(svc: Services, path: str, deadline: float) -> tuple[str, Analysis]:
    """(identity, analysis) of the original at ``path``: from the heatmap cache if it is there."""
    loop = asyncio.get_running_loop()
    try:
        with svc.metrics.stage_seconds.time(stage="fetch"):
            original = await svc.source.fetch(path, budget_s=deadline - loop.time())
    except Overloaded:
        svc.metrics.giveups.inc(reason="queue-full")
        raise
    except DeadlineExceeded:
        svc.metrics.giveups.inc(reason="deadline")
        raise
    svc.identities.put(path, original.identity, loop.time())
    key = heatmap_key(original.identity, svc.engine.version)
    analysis = await svc.caches.get_analysis(key)
    svc.metrics.cache_requests.inc(cache="heatmap", result="miss" if analysis is None else "hit")
    if analysis is None:
        if loop.time() >= deadline:
            svc.metrics.giveups.inc(reason="deadline")
            raise DeadlineExceeded("deadline passed after fetch")
        analysis = await _analyse(svc, original.data, key, deadline)
    return original.identity, analysis


async def _analyse(svc: Services, data: bytes, key: str, deadline: float) -> Analysis:
    """Decode in the pool, infer through the batcher, cache the heatmap.

    When the batcher gives up (admission, expiry), the decoded pixels go to its background queue
    so that the next request for this original finds the heatmap cached.
    """
    loop = asyncio.get_running_loop()
    pending = svc.background.pop(key, None)
    if pending is not None:
        # An earlier give-up's pixels wait in the background queue (or run): take them back
        # into the foreground, or wait for the running call, rather than a second decode and
        # CNN run of the same original.
        withdrawn = svc.batcher.withdraw_background(pending.decoded.pixels)
        if withdrawn is False:
            return await asyncio.shield(pending.analysis)
        if withdrawn:
            return await _infer(svc, pending.decoded, key, deadline)
    decoded = await _decode(svc, data, deadline)
    if loop.time() >= deadline:
        _finish_in_background(svc, decoded, key)
        svc.metrics.giveups.inc(reason="deadline")
        raise DeadlineExceeded("deadline passed after decode")
    return await _infer(svc, decoded, key, deadline)


async def _decode(svc: Services, data: bytes, deadline: float) -> Decoded:
    loop = asyncio.get_running_loop()
    src = svc.settings.source
    _refuse_if_hopeless(svc, deadline)
    t0 = time.perf_counter()
    svc.decoding += 1
    try:
        decoded, seconds = await loop.run_in_executor(
            svc.pool, partial(_timed_decode, data, src.max_bytes, src.max_pixels)
        )
    finally:
        svc.decoding -= 1
    svc.observe_decode(seconds)
    svc.metrics.stage_seconds.observe(time.perf_counter() - t0, stage="decode")
    return decoded


async def _infer(svc: Services, decoded: Decoded, key: str, deadline: float) -> Analysis:
    try:
        heat = await svc.batcher.infer(decoded.pixels, deadline)
    except (Overloaded, DeadlineExceeded):
        _finish_in_background(svc, decoded, key)
        raise
    analysis = make_analysis(decoded, heat, svc.engine.version)
    await svc.caches.put_analysis(key, analysis)
    return analysis


def _refuse_if_hopeless(svc: Services, deadline: float) -> None:
    """Overloaded when the decode queue is full or the engine could not use the image in time.

    Under overload most requests are refused by the batcher's admission anyway; refusing them
    before the decode saves its CPU (and its GIL time), which the event loop and the requests
    that can still make it need. The batcher decides again after the decode, on the real shape;
    with an idle engine the decode is kept, to finish in the background if it is late.
    """
    if svc.decoding >= svc.max_decoding:
        svc.metrics.giveups.inc(reason="queue-full")
        raise Overloaded(f"{svc.decoding} decodes already queued")
    if not svc.batcher.worth_preparing(deadline, svc.decode_ready_in()):
        svc.metrics.giveups.inc(reason="admission")
        raise Overloaded("the engine cannot finish in time even after the decode")


def _timed_decode(data: bytes, max_bytes: int, max_pixels: int) -> tuple[Decoded, float]:
    start = time.perf_counter()
    decoded = decode(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return decoded, time.perf_counter() - start


def make_analysis(decoded: Decoded, heat: ImageHeat, model_version: str) -> Analysis:
    return Analysis(
        width=decoded.width,
        height=decoded.height,
        heatmaps=heat.heatmaps.astype(np.float16),
        food_mass=float(heat.food_mass),
        model_version=model_version,
    )


def _finish_in_background(svc: Services, decoded: Decoded, key: str) -> None:
    pixels: npt.NDArray[np.uint8] = decoded.pixels
    pending = Pending(decoded, asyncio.get_running_loop().create_future())

    def store(heat: ImageHeat) -> None:
        analysis = make_analysis(decoded, heat, svc.engine.version)
        settle(analysis)
        task = asyncio.ensure_future(svc.caches.put_analysis(key, analysis))
        task.add_done_callback(_log_failure)

    def settle(result: Analysis | None = None) -> None:
        if svc.background.get(key) is pending:
            del svc.background[key]
        if pending.analysis.done():
            return
        if result is None:
            pending.analysis.set_exception(Overloaded("background heatmap not computed"))
            pending.analysis.exception()  # retrieved: nobody may be waiting
        else:
            pending.analysis.set_result(result)

    if not svc.batcher.submit_background(pixels, store, settle):
        log.debug("background heatmap refused for %s", key)
        return
    svc.background[key] = pending
    while len(svc.background) > MAX_PENDING:  # a bound, should failures go unreported
        svc.background.pop(next(iter(svc.background)))


def _log_failure(task: asyncio.Future[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("storing a background heatmap failed: %r", task.exception())


def search_is_quick(core: CropCore, limit_s: float = INLINE_SEARCH_S) -> bool:
    """Whether a window search with these settings takes less than ``limit_s`` (median).

    A search with the default settings costs ~0.07 ms, far less than handing it to a thread:
    under load the thread then waits for the GIL held by the busy event loop, up to the 5 ms
    switch interval at a time (measured: 2.3 ms a search at 570 req/s of heatmap hits through
    nginx). So a quick search runs on the loop; settings that make it slow (many scales and
    steps) send it to its thread.
    """
    flat = np.ones((len(PROFILES), 14, 7), np.float16)
    analysis = Analysis(1600, 800, flat, 0.5, "probe")
    times = []
    for aspect in (0.5, 1.0, 1.5, 2.0, 0.75):
        t0 = time.perf_counter()
        core.box(analysis, aspect)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] < limit_s


def clamp_box(box: Box, width: int, height: int) -> Box:
    """``box`` inside a width x height image, at least one pixel wide and high."""
    x0 = min(max(box[0], 0), width - 1)
    y0 = min(max(box[1], 0), height - 1)
    x1 = min(max(box[2], x0 + 1), width)
    y1 = min(max(box[3], y0 + 1), height)
    return x0, y0, x1, y1
