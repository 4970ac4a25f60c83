"""Step ``take-back`` (of ``analyse``): an earlier give-up's pixels of this original, left for a
background heatmap (sidecar/background.py), instead of a second decode and CNN run.

Still queued: taken back into the foreground (step ``infer`` runs them now). Their engine call
already running: its heatmap is waited for. Neither (done, failed, or dropped): nothing; the
original is decoded.
"""

from __future__ import annotations

import asyncio

from sidecar.job import AnalyseJob, Services


async def step_take_back(svc: Services, job: AnalyseJob) -> None:
    pending = svc.background.pop(job.heat_key, None)
    if pending is None:
        return
    withdrawn = svc.batcher.withdraw_background(pending.decoded.pixels)
    if withdrawn is False:
        job.analysis = await asyncio.shield(pending.analysis)
    elif withdrawn:
        job.decoded = pending.decoded
