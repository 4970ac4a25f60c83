"""The /crop pipeline as a plain list of named steps, with a deadline check between them.

Modelled on imgproxy's processing/pipeline.go: each step reads and fills one ``CropJob``; the
runner checks the deadline before every step and stops as soon as a step has decided the
answer (``job.box`` set). Steps, in order:

  fetch     source fetch; the original's identity (path + validators) names its heatmap, so
            this comes before any cache lookup
  override  the path's override record (box + version); the version is part of the box key
  box       box cache lookup (hit: done)
  heatmap   heatmap cache lookup, or decode (in the pool) + batcher, once per heatmap key
            across concurrent requests (single-flight), stored in the heatmap cache
  search    window search (in the pool), stored in the box cache

Failures are typed errors (sidecar.errors); the routes turn them into answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import numpy.typing as npt

from engines.base import Engine
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
from sidecar.sources import Original, Source

log = logging.getLogger("heatcrop.pipeline")

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


@dataclass
class Services:
    """What the steps use; built once per app."""

    settings: Settings
    engine: Engine
    core: CropCore
    batcher: Batcher
    caches: Caches
    source: Source
    pool: Executor
    metrics: Metrics
    flights: SingleFlight[Analysis] = field(default_factory=SingleFlight)


@dataclass
class CropJob:
    path: str
    size: Size
    deadline: float  # loop.time()
    original: Original | None = None
    override: Override | None = None
    heat_key: str = ""
    box_key: str = ""
    analysis: Analysis | None = None
    box: CropBox | None = None
    cached: bool = False


Step = Callable[[Services, CropJob], Awaitable[None]]


async def step_fetch(svc: Services, job: CropJob) -> None:
    with svc.metrics.stage_seconds.time(stage="fetch"):
        job.original = await svc.source.fetch(job.path)
    job.heat_key = heatmap_key(job.original.identity, svc.engine.version)


async def step_override(svc: Services, job: CropJob) -> None:
    job.override = Override.decode(await svc.caches.overrides.get(override_key(job.path)))
    version = job.override.version if job.override else 0
    job.box_key = box_key(job.heat_key, job.size.width, job.size.height, version)


async def step_box_cache(svc: Services, job: CropJob) -> None:
    record = await svc.caches.get_box(job.box_key)
    svc.metrics.cache_requests.inc(cache="box", result="miss" if record is None else "hit")
    if record is not None:
        x0, y0, x1, y1 = record.box
        job.box = CropBox(x0, y0, x1, y1, confidence=record.confidence)
        job.cached = True


async def step_heatmap(svc: Services, job: CropJob) -> None:
    analysis = await svc.caches.get_analysis(job.heat_key)
    svc.metrics.cache_requests.inc(cache="heatmap", result="miss" if analysis is None else "hit")
    if analysis is None:
        original = job.original
        assert original is not None
        analysis = await svc.flights.run(
            job.heat_key, partial(_analyse, svc, original.data, job.heat_key, job.deadline)
        )
    job.analysis = analysis


async def step_search(svc: Services, job: CropJob) -> None:
    analysis = job.analysis
    assert analysis is not None
    keep = None
    if job.override is not None and job.override.box is not None:
        keep = clamp_box(job.override.box, analysis.width, analysis.height)
    loop = asyncio.get_running_loop()
    with svc.metrics.stage_seconds.time(stage="search"):
        job.box = await loop.run_in_executor(
            svc.pool, partial(svc.core.box, analysis, job.size.aspect, None, keep)
        )
    await svc.caches.put_box(job.box_key, job.box.as_tuple(), job.box.confidence, job.path)


STEPS: tuple[tuple[str, Step], ...] = (
    ("fetch", step_fetch),
    ("override", step_override),
    ("box", step_box_cache),
    ("heatmap", step_heatmap),
    ("search", step_search),
)


async def run_crop(svc: Services, job: CropJob) -> CropJob:
    """Run the steps until one decides the box; DeadlineExceeded when time runs out between."""
    loop = asyncio.get_running_loop()
    for name, step in STEPS:
        if job.box is not None:
            break
        if loop.time() >= job.deadline:
            svc.metrics.giveups.inc(reason="deadline")
            raise DeadlineExceeded(f"deadline passed before step {name}")
        await step(svc, job)
    return job


async def _analyse(svc: Services, data: bytes, key: str, deadline: float) -> Analysis:
    """Decode in the pool, infer through the batcher, cache the heatmap.

    When the batcher gives up (admission, expiry), the decoded pixels go to its background queue
    so that the next request for this original finds the heatmap cached.
    """
    loop = asyncio.get_running_loop()
    src = svc.settings.source
    t0 = time.perf_counter()
    decoded = await loop.run_in_executor(
        svc.pool, partial(decode, data, max_bytes=src.max_bytes, max_pixels=src.max_pixels)
    )
    svc.metrics.stage_seconds.observe(time.perf_counter() - t0, stage="decode")
    if loop.time() >= deadline:
        _finish_in_background(svc, decoded, key)
        svc.metrics.giveups.inc(reason="deadline")
        raise DeadlineExceeded("deadline passed after decode")
    try:
        heat = await svc.batcher.infer(decoded.pixels, deadline)
    except (Overloaded, DeadlineExceeded):
        _finish_in_background(svc, decoded, key)
        raise
    analysis = make_analysis(decoded, heat, svc.engine.version)
    await svc.caches.put_analysis(key, analysis)
    return analysis


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

    def store(heat: ImageHeat) -> None:
        analysis = make_analysis(decoded, heat, svc.engine.version)
        task = asyncio.ensure_future(svc.caches.put_analysis(key, analysis))
        task.add_done_callback(_log_failure)

    if not svc.batcher.submit_background(pixels, store):
        log.debug("background heatmap refused for %s", key)


def _log_failure(task: asyncio.Future[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("storing a background heatmap failed: %r", task.exception())


def clamp_box(box: Box, width: int, height: int) -> Box:
    """``box`` inside a width x height image, at least one pixel wide and high."""
    x0 = min(max(box[0], 0), width - 1)
    y0 = min(max(box[1], 0), height - 1)
    x1 = min(max(box[2], x0 + 1), width)
    y1 = min(max(box[3], y0 + 1), height)
    return x0, y0, x1, y1
