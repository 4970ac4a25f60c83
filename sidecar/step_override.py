"""Step ``override``: the path's override record (its box is part of the box key:
``CropJob.set_identity``) and the original's identity as last seen (``IdentityMemo``), which
gives the heatmap and box keys without asking the source."""

from __future__ import annotations

import asyncio

from sidecar.caches import override_key
from sidecar.job import CropJob, Override, Services


async def step_override(svc: Services, job: CropJob) -> None:
    job.override = Override.decode(await svc.caches.overrides.get(override_key(job.path)))
    identity = svc.identities.get(job.path, asyncio.get_running_loop().time())
    if identity is not None:
        job.set_identity(identity, svc.heat_version, svc.core.search_version)
        job.original_size = svc.identities.size(job.path)
