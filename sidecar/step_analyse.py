"""Step ``analyse``: on a heatmap miss, or when the original's identity is not known.

Fetch, then the heatmap cache again (now that the key is known), else decode (in the pool) and
the batcher, the heatmap stored in the cache; once per path across concurrent requests
(single-flight); then the box cache if the identity was not known before. Work that could not
finish in time is refused before it starts: before the fetch when the identity is known, before
the decode otherwise (decode queue full, or the engine could not take the image). A give-up's
decoded pixels go to the batcher's background queue, and a later miss of the same original takes
them back rather than decoding it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import numpy as np
import numpy.typing as npt

from sidecar.batcher import ImageHeat
from sidecar.caches import heatmap_key
from sidecar.core import Analysis
from sidecar.decode import Decoded, decode
from sidecar.errors import DeadlineExceeded, Overloaded
from sidecar.job import CropJob, Pending, Services
from sidecar.step_box import box_lookup

log = logging.getLogger("heatcrop.pipeline")

# Background heatmaps remembered for reuse; the batcher holds far fewer (max_background).
MAX_PENDING = 1024


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
    job.set_identity(identity, svc.engine.version, svc.core.search_version)
    if identity != known:  # first sight of this original here (or it changed): maybe cached
        await box_lookup(svc, job)


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
        analysis = await analyse(svc, original.data, key, deadline)
    return original.identity, analysis


async def analyse(svc: Services, data: bytes, key: str, deadline: float) -> Analysis:
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
        finish_in_background(svc, decoded, key)
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
        finish_in_background(svc, decoded, key)
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


def finish_in_background(svc: Services, decoded: Decoded, key: str) -> None:
    pixels: npt.NDArray[np.uint8] = decoded.pixels
    pending = Pending(decoded, asyncio.get_running_loop().create_future())

    def store(heat: ImageHeat) -> None:
        analysis = make_analysis(decoded, heat, svc.engine.version)
        settle(analysis)
        svc.spawn_write(svc.caches.put_analysis(key, analysis), _log_failure)

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
