"""Step ``fetch`` (of ``analyse``): the original from the source, bounded by the deadline; its
identity gives the heatmap key and is remembered for the next requests (``IdentityMemo``), with
its size from the header, which cached records of it must match (sidecar/records.py). The
header, checked against the limits, goes on to the decode, which need not parse it again."""

from __future__ import annotations

import asyncio

from sidecar.caches import heatmap_key
from sidecar.errors import DeadlineExceeded, Overloaded
from sidecar.job import AnalyseJob, Services


async def step_fetch(svc: Services, job: AnalyseJob) -> None:
    loop = asyncio.get_running_loop()
    try:
        with svc.metrics.stage_seconds.time(stage="fetch"):
            original = await svc.source.fetch(job.path, budget_s=job.deadline - loop.time())
    except Overloaded:
        svc.metrics.giveups.inc(reason="queue-full")
        raise
    except DeadlineExceeded:
        svc.metrics.giveups.inc(reason="deadline")
        raise
    svc.identities.put(job.path, original.identity, loop.time(), original.size)
    job.identity = original.identity
    job.original_size = original.size
    job.heat_key = heatmap_key(original.identity, svc.heat_version)
    job.data = original.data
    job.header = original.header
