"""The /crop pipeline as a plain list of named steps, with a deadline check between them.

Modelled on imgproxy's processing/pipeline.go: each step reads and fills one ``CropJob``
(sidecar/job.py); the runner checks the deadline before every step and stops as soon as a step
has decided the answer (``job.box`` set). Steps, in order, one module each (sidecar/step_*.py):

  override  the path's override record (box + version; the version is part of the box key)
            and the original's identity as last seen (``IdentityMemo``, trusted 30 s), which
            gives the heatmap and box keys without asking the source
  box       box cache lookup (hit: done)
  heatmap   heatmap cache lookup
  analyse   on a miss, or when the identity is not known: fetch, then the heatmap cache again
            (now that the key is known), else decode (in the pool) + batcher, stored in the
            heatmap cache; once per path across concurrent requests (single-flight); then the
            box cache if the identity was not known before. Work that could not finish in time
            is refused before it starts: before the fetch when the identity is known, before
            the decode otherwise (decode queue full, or the engine could not take the image)
  search    window search (on the loop when quick, else in its thread), stored in the box cache

Failures are typed errors (sidecar.errors); the routes turn them into answers.
"""

from __future__ import annotations

import asyncio

from sidecar.errors import DeadlineExceeded
from sidecar.job import CropJob, Services, Step
from sidecar.step_analyse import step_analyse
from sidecar.step_box import step_box_cache
from sidecar.step_heatmap import step_heatmap_cache
from sidecar.step_override import step_override
from sidecar.step_search import step_search

STEPS: tuple[tuple[str, Step], ...] = (
    ("override", step_override),
    ("box", step_box_cache),
    ("heatmap", step_heatmap_cache),
    ("analyse", step_analyse),
    ("search", step_search),
)


async def run_crop(svc: Services, job: CropJob) -> CropJob:
    """Run the steps until one decides the box; DeadlineExceeded when time runs out between."""
    loop = asyncio.get_running_loop()
    current = STEPS[0][0]
    try:
        # No step may hold a request past its deadline: a slow origin, a long decode queue or a
        # full batcher must turn into a prompt fallback, not a late one. The shared single-flight
        # work is shielded and goes on for the other waiters. One timeout for all the steps:
        # one per step cost a tenth of the event loop's time on box-cache hits.
        async with asyncio.timeout_at(job.deadline):
            for name, step in STEPS:
                if job.box is not None:
                    break
                current = name
                if loop.time() >= job.deadline:
                    svc.metrics.giveups.inc(reason="deadline")
                    raise DeadlineExceeded(f"deadline passed before step {name}")
                await step(svc, job)
    except TimeoutError:
        svc.metrics.giveups.inc(reason="deadline")
        raise DeadlineExceeded(f"deadline passed during step {current}") from None
    return job
