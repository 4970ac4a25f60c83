"""Step ``infer`` (of ``analyse``): the decoded pixels through the batcher and the engine; the
heatmap stored in the heatmap cache with the faces that step ``faces`` found. Refused or
expired, the pixels go to the background (``OncePerPath``, sidecar/background.py)."""

from __future__ import annotations

from sidecar.core import make_analysis
from sidecar.job import AnalyseJob, Services
from sidecar.step_faces import faces_of


async def step_infer(svc: Services, job: AnalyseJob) -> None:
    decoded = job.decoded
    assert decoded is not None
    heat = await svc.batcher.infer(decoded.pixels, job.deadline)
    faces = await faces_of(job, decoded)  # started by step ``faces``, ran beside the CNN
    analysis = make_analysis(
        decoded, heat.heatmaps, heat.food_mass, svc.engine.version, faces=faces
    )
    await svc.caches.put_analysis(job.heat_key, analysis)
    job.analysis = analysis
