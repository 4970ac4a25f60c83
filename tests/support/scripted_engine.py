"""ScriptedEngine: an Engine whose calls block on a gate, sleep or raise on demand.

For the batcher's and the service's timing cases only (the main paths run on the real
OrtEngine): each heatmap carries its image's marker pixel, so results can be traced back to
their request, and every call is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from engines import buckets
from engines.base import PROFILES, HeatmapBatch

SQUARE = (224, 224)
WIDE = (224, 256)
TALL = (256, 224)
GUARD = 10.0  # only against hangs: a broken batcher fails the test instead of blocking it


class ScriptedEngine:
    """Records every call; optionally blocks on a gate, sleeps, or raises for a marker."""

    name = "scripted"
    version = "scripted-1"

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]] = (SQUARE, WIDE, TALL),
        *,
        delay: float = 0.0,
        gated: bool = False,
        fail_marker: int | None = None,
    ) -> None:
        self._shapes = tuple(shapes)
        self.delay = delay
        self.fail_marker = fail_marker
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.calls: list[tuple[tuple[int, int], list[int]]] = []  # (shape, markers)

    @property
    def input_shapes(self) -> tuple[tuple[int, int], ...]:
        return self._shapes

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass

    def infer(self, batch: np.ndarray) -> HeatmapBatch:
        markers = [int(m) for m in batch[:, 0, 0, 0]]
        self.calls.append(((batch.shape[1], batch.shape[2]), markers))
        if not self.gate.wait(GUARD):
            raise RuntimeError("gate never opened")
        time.sleep(self.delay)
        if self.fail_marker in markers:
            raise RuntimeError(f"engine failed on marker {self.fail_marker}")
        n, (h, w) = batch.shape[0], buckets.heatmap_shape(batch.shape[1:3])
        values = np.array(markers, dtype=np.float32)
        heatmaps = np.broadcast_to(values[:, None, None, None], (n, len(PROFILES), h, w))
        return HeatmapBatch(
            heatmaps=np.array(heatmaps),
            food_mass=values / 255,
            logits=np.zeros((n, 1000), np.float32),
        )

    @property
    def batches(self) -> list[list[int]]:
        return [markers for _, markers in self.calls]
