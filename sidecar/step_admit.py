"""Step ``admit``: a known original whose heatmap no cache has is refused before it is read
when no decode could make it (``DecodeAdmission.refuse_if_hopeless``).

It will need a decode and the engine; when neither could take it in time, giving up now beats
giving up after reading the original: under overload those reads queue up and delay every other
answer. A path already in flight is let through: its request only waits for the work under way.
An original not known yet is admitted at its decode (step ``decode``), once fetched. With
``server.cold_policy = "legacy"`` no request decodes (step ``cold``): nothing to refuse.
"""

from __future__ import annotations

from sidecar.job import CropJob, Services


async def step_admit(svc: Services, job: CropJob) -> None:
    if svc.settings.server.cold_policy == "legacy":
        return
    if job.analysis is None and job.identity is not None and job.path not in svc.flights:
        svc.decodes.refuse_if_hopeless(job.deadline, svc.batcher)
