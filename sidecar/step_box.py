"""Step ``box``: the box cache, when the original's identity is known (a hit decides)."""

from __future__ import annotations

from kernels.window import CropBox
from sidecar.job import CropJob, Services


async def step_box_cache(svc: Services, job: CropJob) -> None:
    if job.identity is not None:
        await box_lookup(svc, job)


async def box_lookup(svc: Services, job: CropJob) -> None:
    record = await svc.caches.get_box(job.box_key)
    svc.metrics.cache_requests.inc(cache="box", result="miss" if record is None else "hit")
    if record is not None:
        x0, y0, x1, y1 = record.box
        job.box = CropBox(x0, y0, x1, y1, confidence=record.confidence)
        job.cached = True
