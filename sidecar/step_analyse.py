"""Step ``analyse``: the heatmap of an original that no cache has, by its own steps, run once
per path across concurrent requests (single-flight).

``OncePerPath(*steps)`` is the step: the first request for a path starts the steps on one
``AnalyseJob`` with its own deadline; requests for the path that come while they run wait for
the same result (``Services.flights``). The work runs as its own task: a waiter that gives up
stops waiting, while the work goes on for the others and its heatmap still lands in the cache.
So a step only stops at that deadline where it says so (``SharedStep.after_deadline``): the
fetch and the cache lookup that follows go on, the decode and the engine do not start late.
Whatever stops the work for time or load once the pixels are decoded hands them to the
background (sidecar/background.py). Then the request has the original's identity (a new one
when the fetch tells it changed) and its heatmap.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from sidecar.background import finish_in_background
from sidecar.core import Analysis
from sidecar.errors import DeadlineExceeded, Overloaded
from sidecar.job import AnalyseJob, AnalyseStep, CropJob, Services, check_deadline


class SharedStep(NamedTuple):
    name: str
    step: AnalyseStep
    # Run even past the first request's deadline, for the requests still waiting.
    after_deadline: bool = False


class OncePerPath:
    """The /crop step that runs ``steps`` once per path; see the module docstring."""

    def __init__(self, *steps: SharedStep) -> None:
        self.steps = steps

    async def __call__(self, svc: Services, job: CropJob) -> None:
        if job.analysis is not None:
            return
        identity, job.analysis = await svc.flights.run(
            job.path, partial(self.analyse, svc, job.path, job.deadline)
        )
        job.set_identity(identity, svc.heat_version, svc.core.search_version)
        # Checked against the header's size, or made from this original's own pixels.
        job.original_size = (job.analysis.width, job.analysis.height)

    async def analyse(self, svc: Services, path: str, deadline: float) -> tuple[str, Analysis]:
        """(identity, analysis) of the original at ``path``: the steps until one finds it."""
        job = AnalyseJob(path, deadline)
        try:
            for name, step, after_deadline in self.steps:
                if job.analysis is not None:
                    break
                if not after_deadline:
                    check_deadline(svc, deadline, name)
                await step(svc, job)
        except (Overloaded, DeadlineExceeded):
            if job.decoded is not None:
                finish_in_background(svc, job.decoded, job.heat_key)
            raise
        assert job.analysis is not None
        return job.identity, job.analysis
