"""The face detector joined to the service's engine: ``with_faces(engine, settings)``.

With ``kernel.faces`` (the default) every engine the service, ``heatcrop warm`` and the command
line load is a ``FaceEngine`` (engines/face_engine.py): faces are found in the same engine call
as the heatmap, on the same pixels, and cached with it. A detector that cannot be loaded (its
graph missing, tampered with, or refused by ONNX Runtime) is no reason not to serve: the engine
runs alone, heatmaps are keyed by the model alone, and ONE warning line says why.
"""

from __future__ import annotations

import logging

from engines.base import Engine
from engines.errors import HeatcropError
from engines.face_engine import FaceEngine, Observer
from engines.faces import FaceDetector, FaceParams
from sidecar.metrics import Metrics
from sidecar.settings import Settings

log = logging.getLogger("heatcrop.faces")


def with_faces(
    engine: Engine, settings: Settings, metrics: Metrics | None = None, *, warm: bool = True
) -> Engine:
    """``engine`` with the face detector when ``kernel.faces`` and the detector loads; else
    ``engine`` itself (with one warning when faces were asked for)."""
    if not settings.kernel.faces:
        return engine
    try:
        detector = FaceDetector(settings.engine.model_dir, face_params(settings))
    except HeatcropError as exc:
        log.warning("faces: off, %s", exc)
        return engine
    joined = FaceEngine(engine, detector, None if metrics is None else _observer(metrics))
    if warm:
        for h, w in engine.input_shapes:
            detector.detect_batch(_blank(h, w))
    log.info("faces: %s", detector.version)
    return joined


def face_params(settings: Settings) -> FaceParams:
    return FaceParams(score=settings.kernel.face_score, max_faces=settings.kernel.max_faces)


def _observer(metrics: Metrics) -> Observer:
    def observe(seconds: float, counts: list[int]) -> None:
        metrics.face_seconds.observe(seconds)
        for n in counts:
            metrics.faces_found.observe(float(n))

    return observe


def _blank(height: int, width: int):  # noqa: ANN202 - a numpy array
    import numpy as np

    return np.zeros((1, height, width, 3), dtype=np.uint8)
