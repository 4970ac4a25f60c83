"""Picks and loads the runtime named by settings (``auto`` | ``ort`` | ``trt``).

The TensorRT runtime arrives with the GPU issue; until then ``auto`` resolves to ONNX Runtime
and ``trt`` is refused with a clear message rather than silently running on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engines.base import Engine
from sidecar.errors import ModelNotBuilt
from sidecar.settings import EngineSettings

log = logging.getLogger("heatcrop.engine")


def load_engine(settings: EngineSettings, *, warm: bool = True) -> Engine:
    from engines.model import find_model
    from engines.ort import OrtEngine

    if settings.kind == "trt":
        raise ModelNotBuilt(
            "HEATCROP_ENGINE_KIND=trt: no TensorRT runtime in this build",
            public_message="TensorRT runtime not available",
        )
    model = find_model(Path(settings.model_dir))
    engine: Engine = OrtEngine(model, threads=settings.threads)
    log.info(
        "engine: ONNX Runtime (%s threads), model %s (kind=%s)",
        settings.threads,
        model.name,
        settings.kind,
    )
    if warm:
        engine.warm_up()
    return engine
