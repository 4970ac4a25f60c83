"""Step ``cold`` (of ``analyse``), with ``server.cold_policy = "legacy"``: an original read and
checked, whose heatmap no cache has, is answered with the legacy crop at once (``ColdStart``,
``X-Heatcrop-Path: cold``); its decode and CNN run in the background, so the next request for it,
any size, finds the heatmap (sidecar/background.py).

Why: a miss at the edge waits for the sidecar and then for the legacy server's render. With
``wait`` the sidecar part of a first sight is a decode and a CNN run (tens of ms on a CPU, more
when the cores are shared with the legacy server); with ``legacy`` it is a read and a header
check, and the chain costs about what today's edge costs (README, Benchmarks). The price: each
original's first URLs get the legacy crop, cached as briefly as every fallback.

The header is checked here, in the request, so that an original over the byte or pixel limit,
or not an image, is answered as under ``wait`` (413/415), not as a legacy crop that the legacy
server would refuse. Bounded: a decode starts only while the decode pool and the batcher's
background queue have room for it (else nothing is queued, and a later request tries again);
one decode per original at a time.
"""

from __future__ import annotations

import asyncio
import logging
import math

from sidecar.background import finish_in_background
from sidecar.decode import probe
from sidecar.errors import ColdStart, HeatcropError, Overloaded
from sidecar.job import AnalyseJob, Services

log = logging.getLogger("heatcrop.pipeline")


async def step_cold(svc: Services, job: AnalyseJob) -> None:
    if svc.settings.server.cold_policy != "legacy" or job.analysis is not None:
        return
    limits = svc.settings.source
    probe(job.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    start_cold_heatmap(svc, job.heat_key, job.data)
    raise ColdStart(f"no heatmap of {job.path} cached; legacy crop while it is made")


def start_cold_heatmap(svc: Services, key: str, data: bytes) -> None:
    """Decode ``data`` and queue it for a background heatmap under ``key``, where there is room;
    counted once per call in ``heatcrop_cold_heatmaps_total`` (``COLD_RESULTS``)."""
    if key in svc.cold or key in svc.background:
        svc.metrics.cold.inc(result="already")
        return
    decodes = svc.decodes
    if decodes.queued >= decodes.max_queued or not svc.batcher.takes_background(len(svc.cold)):
        svc.metrics.cold.inc(result="refused")
        return
    task = asyncio.ensure_future(_decode_and_queue(svc, key, data))
    svc.cold[key] = task
    task.add_done_callback(lambda _: svc.cold.pop(key, None))


async def _decode_and_queue(svc: Services, key: str, data: bytes) -> None:
    result = "refused"
    try:
        # No request waits for it: no deadline; the decode pool's own bound refuses it if full.
        decoded = await svc.decodes.decode(data, math.inf, svc.batcher)
        if finish_in_background(svc, decoded, key):
            result = "queued"
    except Overloaded:
        pass
    except HeatcropError as exc:
        log.info("background decode of %s failed: %s", key, exc)
        result = "failed"
    except Exception:  # a bug must not end as "Task exception was never retrieved"
        log.exception("background decode of %s failed unexpectedly", key)
        result = "failed"
    svc.metrics.cold.inc(result=result)
