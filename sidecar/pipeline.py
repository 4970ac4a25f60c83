"""The /crop pipeline as a plain list of named steps, with a deadline check between them.

Modelled on imgproxy's processing/pipeline.go: each step reads and fills one ``CropJob``
(sidecar/job.py); the runner checks the deadline before every step and stops as soon as a step
has decided the answer (``job.box`` set). Each step is one module, sidecar/step_<name>.py,
and none calls another. In order:

  override   the path's override record and the original's identity as last seen
             (``IdentityMemo``, trusted 30 s), which gives the heatmap and box keys without
             asking the source
  box        box cache lookup (hit: done)
  heatmap    heatmap cache lookup
  cold       with ``server.cold_policy = "legacy"``, no heatmap cached: the legacy crop now
             (``ColdStart``), the heatmap made in the background (sidecar/step_cold.py); an
             original whose heatmap may be cached but whose identity has expired goes on, to be
             read first
  admit      a known original with no heatmap cached: refused now, before it is read, when no
             decode could make it (decode pool full, or the engine could not take it in time);
             not with ``server.cold_policy = "legacy"``, where the request decodes nothing
  analyse    no heatmap yet: once per path across concurrent requests (single-flight), under
             the first request's deadline, its own steps on one ``AnalyseJob``:
    fetch      the original, whose identity gives the heatmap key
    heatmap    heatmap cache lookup under that key
    cold-read  with ``server.cold_policy = "legacy"``: not cached after all, so as step cold
    take-back  an earlier give-up's pixels of this original, left for the background
    decode     in the decode pool, unless refused first (``DecodeAdmission``)
    infer      the batcher and the engine (with ``kernel.faces``, the face detector in the same
               engine call, on the same pixels: sidecar/faces.py); the heatmap and its faces
               stored in the heatmap cache
             Fetch and lookup go on for the other waiters past that deadline; the decode and
             the engine do not start late. Pixels decoded for a request that then gives up go
             to the background (sidecar/background.py)
  box-again  box cache lookup, when the fetch told a new identity (hit: done)
  search     window search (on the loop when quick, else in its thread), stored in the box cache

Failures are typed errors (sidecar.errors); the routes turn them into answers.
"""

from __future__ import annotations

import asyncio

from sidecar.errors import DeadlineExceeded
from sidecar.job import CropJob, Services, Step, check_deadline
from sidecar.step_admit import step_admit
from sidecar.step_analyse import OncePerPath, SharedStep
from sidecar.step_box import step_box_cache
from sidecar.step_cold import step_cold, step_cold_read
from sidecar.step_decode import step_decode
from sidecar.step_fetch import step_fetch
from sidecar.step_heatmap import step_heatmap_cache
from sidecar.step_infer import step_infer
from sidecar.step_override import step_override
from sidecar.step_search import step_search
from sidecar.step_take_back import step_take_back

STEPS: tuple[tuple[str, Step], ...] = (
    ("override", step_override),
    ("box", step_box_cache),
    ("heatmap", step_heatmap_cache),
    ("cold", step_cold),
    ("admit", step_admit),
    (
        "analyse",
        OncePerPath(
            SharedStep("fetch", step_fetch, after_deadline=True),
            SharedStep("heatmap", step_heatmap_cache, after_deadline=True),
            # It only hands work to the background: a late answer still starts the heatmap.
            SharedStep("cold-read", step_cold_read, after_deadline=True),
            SharedStep("take-back", step_take_back),
            SharedStep("decode", step_decode),
            SharedStep("infer", step_infer),
        ),
    ),
    ("box-again", step_box_cache),
    ("search", step_search),
)


async def run_crop(svc: Services, job: CropJob) -> CropJob:
    """Run the steps until one decides the box; DeadlineExceeded when time runs out between."""
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
                check_deadline(svc, job.deadline, name)
                await step(svc, job)
    except TimeoutError:
        svc.metrics.giveups.inc(reason="deadline")
        raise DeadlineExceeded(f"deadline passed during step {current}") from None
    return job
