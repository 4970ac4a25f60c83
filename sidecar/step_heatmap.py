"""Step ``heatmap``: the heatmap cache, when the original's identity is known."""

from __future__ import annotations

from sidecar.job import CropJob, Services


async def step_heatmap_cache(svc: Services, job: CropJob) -> None:
    if job.identity is None:
        return
    job.analysis = await svc.caches.get_analysis(job.heat_key)
    result = "miss" if job.analysis is None else "hit"
    svc.metrics.cache_requests.inc(cache="heatmap", result=result)
