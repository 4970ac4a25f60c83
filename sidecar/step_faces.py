"""Step ``faces`` (of ``analyse``): the original's faces, found beside its decode and CNN run.

The face detector (engines/faces.py) needs its own decode (the photo at up to 768 px, where the
heatmap model sees 224), so it starts from the fetched bytes in its own thread as soon as they
are here, and runs while the decode pool and the engine make the heatmap; ``infer`` waits for
it (``faces_of``) and stores the boxes with the heatmap, under a heatmap key that names the
detector (``Services.heat_version``). Off (``kernel.faces = false``) or without a built face
model, nothing runs and analyses carry no faces.

A failure to find faces is never the request's failure: it logs one line and the original is
cropped without faces (its decode fails on its own, with its own typed error, if the bytes are
bad).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import numpy as np
import numpy.typing as npt

from engines.faces import FaceDetector, scale_boxes
from sidecar.core import no_faces
from sidecar.decode import Decoded
from sidecar.job import AnalyseJob, Services

log = logging.getLogger("heatcrop.faces")

Found = tuple[npt.NDArray[np.float32], tuple[int, int]]


async def step_faces(svc: Services, job: AnalyseJob) -> None:
    if svc.faces is None or job.faces is not None or not job.data:
        return
    job.faces = asyncio.get_running_loop().run_in_executor(
        svc.face_pool, partial(find_faces, svc.faces, job.data, job.path)
    )


def find_faces(detector: FaceDetector, data: bytes, path: str) -> Found | None:
    """Boxes in the detector's decode and its (width, height); None when it failed."""
    try:
        return detector.detect_bytes(data)
    except Exception as exc:  # any failure: crop without faces rather than fail the request
        log.warning("faces not found for %s: %s", path, exc)
        return None


async def faces_of(job: AnalyseJob, decoded: Decoded) -> npt.NDArray[np.float32]:
    """The faces of ``job``'s original in its display pixels (none when the step did not run)."""
    if job.faces is None:
        return no_faces()
    found = await job.faces
    if found is None:
        return no_faces()
    boxes, size = found
    return scale_boxes(boxes, size, (decoded.width, decoded.height))
