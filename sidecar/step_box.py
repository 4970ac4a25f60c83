"""Step ``box``: the box cache, under a box key it was not asked for yet (a hit decides).

No key before the original's identity is known; a new key once the fetch (step ``analyse``)
tells an identity that is new to this sidecar, or changed. What the key carries:
``CropJob.set_identity``.
"""

from __future__ import annotations

from kernels.window import CropBox
from sidecar.job import CropJob, Services


async def step_box_cache(svc: Services, job: CropJob) -> None:
    if not job.box_key or job.box_key == job.box_looked_up:
        return
    job.box_looked_up = job.box_key
    record = await svc.caches.get_box(job.box_key)
    svc.metrics.cache_requests.inc(cache="box", result="miss" if record is None else "hit")
    if record is not None:
        x0, y0, x1, y1 = record.box
        job.box = CropBox(x0, y0, x1, y1, confidence=record.confidence)
        job.cached = True
