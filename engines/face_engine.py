"""An engine that finds faces in every image it makes a heatmap of, on the same pixels.

``FaceEngine(engine, detector)`` is an ``Engine`` (engines/base.py): ``infer`` runs the heatmap
model, then the face detector (engines/faces.py) on the very batch the model read, and returns
the model's ``HeatmapBatch`` with ``faces`` filled in, as shares of each image's width and height.
So wherever a heatmap is made (a request's cold path, a give-up finished in the background,
``heatcrop warm``, the command line and the debug pages) its faces are made with it, in the
same engine call: the batcher's bounded queue, deadlines and admission (sidecar/batcher.py)
bound the detector's work as they bound the CNN's, and its measured service time includes the
detector's. Its ``version`` names both, so heatmap cache keys never mix analyses made with and
without faces, or with another detector.

The detector runs after the model, in the same thread: on the CPU the model's ONNX Runtime
threads already hold the cores. A ``FaceEngine`` has the lanes of its engine (``LaneEngine``,
engines/base.py): a lane's call runs the model on that lane and then the detector, whose
single-thread session runs concurrent calls side by side on their callers' threads. On a GPU
(TensorRT) the detector runs on the CPU the same way, through ONNX Runtime, after the plan's
call (docs/faces.md, "GPU").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from engines.base import Engine, HeatmapBatch, LaneEngine
from engines.faces import FaceDetector

F32 = npt.NDArray[np.float32]
# Seconds of one detector call and the faces found per image: what the service's metrics take.
Observer = Callable[[float, list[int]], None]


class FaceEngine:
    """``engine`` with ``detector`` on every batch; see the module docstring."""

    def __init__(
        self, engine: Engine, detector: FaceDetector, observe: Observer | None = None
    ) -> None:
        self.engine = engine
        self.detector = detector
        self.observe = observe
        self.name = engine.name

    @property
    def version(self) -> str:
        return f"{self.engine.version}+{self.detector.version}"

    @property
    def input_shapes(self) -> tuple[tuple[int, int], ...]:
        return self.engine.input_shapes

    def warm_up(self) -> None:
        self.engine.warm_up()
        for h, w in self.input_shapes:
            self.detector.detect_batch(np.zeros((1, h, w, 3), dtype=np.uint8))

    @property
    def lanes(self) -> int:
        return self.engine.lanes if isinstance(self.engine, LaneEngine) else 1

    def infer(self, batch: npt.NDArray[np.uint8]) -> HeatmapBatch:
        return self._with_faces(batch, self.engine.infer(batch))  # validates the batch first

    def infer_lane(self, batch: npt.NDArray[np.uint8], lane: int) -> HeatmapBatch:
        if not isinstance(self.engine, LaneEngine):
            raise ValueError(f"{self.engine.name} has no lanes")
        return self._with_faces(batch, self.engine.infer_lane(batch, lane))

    def _with_faces(self, batch: npt.NDArray[np.uint8], out: HeatmapBatch) -> HeatmapBatch:
        start = time.perf_counter()
        found = self.detector.detect_batch(batch)
        seconds = time.perf_counter() - start
        if self.observe is not None:
            self.observe(seconds, [len(f) for f in found])
        height, width = batch.shape[1:3]
        return dataclasses.replace(out, faces=tuple(shares(f, width, height) for f in found))

    def close(self) -> None:
        self.engine.close()
        self.detector.close()


def shares(faces: F32, width: int, height: int) -> F32:
    """Boxes in the pixels of a width x height image -> shares of its sides, inside [0, 1]."""
    out = np.array(faces, dtype=np.float32).reshape(-1, 5)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]] / width, 0.0, 1.0)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]] / height, 0.0, 1.0)
    return out


def in_pixels(faces: F32, width: int, height: int) -> F32:
    """Shares of an image's sides (``shares``) -> pixels of a width x height original."""
    out = np.array(faces, dtype=np.float32).reshape(-1, 5)
    out[:, [0, 2]] *= width
    out[:, [1, 3]] *= height
    return out
