"""Step ``heatmap``: the heatmap cache, once the original's heatmap key is known.

The same step twice: in /crop with the identity as last seen, and in ``analyse`` after the fetch
(by then another request or sidecar may have stored it, or the identity may have changed).
A cached heatmap is used only when it fits the original's size from its header (the cache is
shared and not trusted: sidecar/records.py); with no size known (not an image), none is read.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.core import Analysis
from sidecar.job import Services
from sidecar.records import AnalysisExpect


class WantsHeatmap(Protocol):
    heat_key: str  # "" while not known
    analysis: Analysis | None
    original_size: tuple[int, int] | None


async def step_heatmap_cache(svc: Services, job: WantsHeatmap) -> None:
    if not job.heat_key or job.original_size is None:
        return
    expect = AnalysisExpect(job.original_size, svc.settings.source.max_pixels)
    job.analysis = await svc.caches.get_analysis(job.heat_key, expect)
    result = "miss" if job.analysis is None else "hit"
    svc.metrics.cache_requests.inc(cache="heatmap", result=result)
