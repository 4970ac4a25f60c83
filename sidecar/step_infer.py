"""Step ``infer`` (of ``analyse``): the decoded pixels through the batcher and the engine (with
its face detector, when joined: sidecar/faces.py); the heatmap and its faces stored in the
heatmap cache. Refused or expired, the pixels go to the background (``OncePerPath``,
sidecar/background.py)."""

from __future__ import annotations

from sidecar.core import make_analysis
from sidecar.job import AnalyseJob, Services


async def step_infer(svc: Services, job: AnalyseJob) -> None:
    decoded = job.decoded
    assert decoded is not None
    heat = await svc.batcher.infer(decoded.pixels, job.deadline)
    analysis = make_analysis(
        decoded, heat.heatmaps, heat.food_mass, svc.engine.version, faces=heat.faces
    )
    await svc.caches.put_analysis(job.heat_key, analysis)
    job.analysis = analysis
