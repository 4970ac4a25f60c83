"""The one small interface every runtime (ONNX Runtime, TensorRT) implements.

Input is what pyvips hands us: uint8 RGB, NHWC, one of the model's shape buckets. The
(x - 127) / 128 normalisation lives inside the ONNX graph, so every runtime sees identical
bytes and preprocessing parity between runtimes holds by construction; uint8 is also a
quarter of the host-to-device traffic of float32 on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

PROFILES: tuple[str, ...] = ("food", "generic", "readout")

# Graph tensor names, shared by the exporter and every runtime.
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("heatmaps", "food_mass", "logits")


@dataclass(frozen=True)
class HeatmapBatch:
    """What one inference returns, copied out of any runtime-owned buffer.

    heatmaps: float32 [N, len(PROFILES), h, w], non-negative, one channel per profile,
        h = H/32 and w = W/32 of the input bucket.
    food_mass: float32 [N], softmax probability mass on food and dish classes (confidence).
    logits: float32 [N, 1000], ImageNet logits (checks against the reference model).
    faces: per image, float32 [k, 5] x0, y0, x1, y1 as shares of the image's width and height
        (the bucket is a squash of the whole original, so they hold for the original too) and
        the detector's score; () when no face detector ran (engines/face_engine.py).
    """

    heatmaps: npt.NDArray[np.float32]
    food_mass: npt.NDArray[np.float32]
    logits: npt.NDArray[np.float32]
    faces: tuple[npt.NDArray[np.float32], ...] = ()

    def __len__(self) -> int:
        return int(self.heatmaps.shape[0])

    def profile(self, index: int, name: str) -> npt.NDArray[np.float32]:
        """The [h, w] heatmap of one image for one profile."""
        return self.heatmaps[index, PROFILES.index(name)]


class Engine(Protocol):
    """A loaded heatmap model. ``infer`` may be called from a worker thread.

    Implementations document whether concurrent ``infer`` calls are safe; the batcher never
    runs two ``infer`` calls at once, so none needs to be (``LaneEngine`` is how an engine
    offers calls side by side).
    """

    name: str  # "ort" or "trt"

    @property
    def version(self) -> str:
        """Model content hash (+ runtime detail): part of every heatmap cache key."""
        ...

    @property
    def input_shapes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) buckets this engine accepts, multiples of 32."""
        ...

    def warm_up(self) -> None:
        """Run every shape bucket once so the first real request pays no set-up cost."""
        ...

    def infer(self, batch: npt.NDArray[np.uint8]) -> HeatmapBatch:
        """Run a [N, H, W, 3] uint8 batch of one shape bucket."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LaneEngine(Engine, Protocol):
    """An engine that can run ``lanes`` calls side by side, each on its own lane.

    ``infer_lane(batch, i)`` runs the whole batch on lane ``i`` alone (0 <= i < ``lanes``) and
    returns what ``infer`` would, bit for bit. Calls on different lanes may run at the same
    time; a lane takes one call at a time, and ``infer`` (which may use every lane) runs alone.
    The batcher keeps to that (sidecar/batcher.py); ONNX Runtime's lanes are its single-thread
    sessions, one per core (engines/ort.py). An engine with one lane (TensorRT: one GPU
    stream, one call at a time) is used through ``infer`` only.
    """

    @property
    def lanes(self) -> int: ...

    def infer_lane(self, batch: npt.NDArray[np.uint8], lane: int) -> HeatmapBatch: ...


def prepare_batch(batch: object, shapes: Sequence[tuple[int, int]]) -> npt.NDArray[np.uint8]:
    """The one host-side preprocessing step of every runtime: validate, make C-contiguous.

    Everything else ((x - 127) / 128, NHWC -> NCHW) is inside the graph, so the bytes a
    runtime hands its library are exactly these, whichever runtime it is. ``ValueError`` for
    anything that is not a [N>=1, H, W, 3] uint8 array of one of ``shapes``.
    """
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"batch must be a numpy array, got {type(batch).__name__}")
    if batch.dtype != np.uint8:
        raise ValueError(f"batch must be uint8 RGB, got dtype {batch.dtype}")
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[0] < 1:
        raise ValueError(f"batch must be [N>=1, H, W, 3], got shape {batch.shape}")
    hw = (int(batch.shape[1]), int(batch.shape[2]))
    if hw not in shapes:
        raise ValueError(f"{hw[0]}x{hw[1]} is not one of this engine's shape buckets")
    return np.ascontiguousarray(batch)
