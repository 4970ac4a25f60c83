"""Step ``heatmap``: the heatmap cache, once the original's heatmap key is known.

The same step twice: in /crop with the identity as last seen, and in ``analyse`` after the fetch
(by then another request or sidecar may have stored it, or the identity may have changed).
"""

from __future__ import annotations

from typing import Protocol

from sidecar.core import Analysis
from sidecar.job import Services


class WantsHeatmap(Protocol):
    heat_key: str  # "" while not known
    analysis: Analysis | None


async def step_heatmap_cache(svc: Services, job: WantsHeatmap) -> None:
    if not job.heat_key:
        return
    job.analysis = await svc.caches.get_analysis(job.heat_key)
    result = "miss" if job.analysis is None else "hit"
    svc.metrics.cache_requests.inc(cache="heatmap", result=result)
