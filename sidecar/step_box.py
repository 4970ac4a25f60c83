"""Step ``box``: the box cache, under a box key it was not asked for yet (a hit decides).

No key before the original's identity is known; a new key once the fetch (step ``analyse``)
tells an identity that is new to this sidecar, or changed. What the key carries:
``CropJob.set_identity``. A cached box is used only when the search could have made it for this
path, original size and aspect (sidecar/records.py); with no size known, none is read.
"""

from __future__ import annotations

from kernels.window import CropBox
from sidecar.job import CropJob, Services
from sidecar.records import BoxExpect


async def step_box_cache(svc: Services, job: CropJob) -> None:
    if not job.box_key or job.box_key == job.box_looked_up or job.original_size is None:
        return
    job.box_looked_up = job.box_key
    width, height = job.original_size
    windows = svc.core.window_sizes(width, height, job.size.aspect)
    record = await svc.caches.get_box(job.box_key, BoxExpect(job.path, job.original_size, windows))
    svc.metrics.cache_requests.inc(cache="box", result="miss" if record is None else "hit")
    if record is not None:
        x0, y0, x1, y1 = record.box
        job.box = CropBox(x0, y0, x1, y1, confidence=record.confidence)
        job.cached = True
