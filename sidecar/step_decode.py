"""Step ``decode`` (of ``analyse``): the original decoded to its model bucket in the decode pool,
unless refused first because the engine could not use it in time (``DecodeAdmission``)."""

from __future__ import annotations

from sidecar.job import AnalyseJob, Services


async def step_decode(svc: Services, job: AnalyseJob) -> None:
    if job.decoded is None:  # else taken back from the background queue
        job.decoded = await svc.decodes.decode(job.data, job.deadline, svc.batcher, job.header)
