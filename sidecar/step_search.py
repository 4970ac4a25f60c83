"""Step ``search``: the window search on the heatmap, stored in the box cache."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import numpy as np

from engines.base import PROFILES
from sidecar.core import Analysis, CropCore
from sidecar.job import Box, CropJob, Services

# A window search quicker than this runs on the event loop (see search_is_quick).
INLINE_SEARCH_S = 0.0003


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
