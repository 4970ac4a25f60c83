"""ONNX Runtime (CPU) implementation of the Engine protocol.

Which calls may run at once: ONNX Runtime sessions are thread-safe, so nothing here breaks
under concurrent calls, but calls on one session share its threads. The engine is a
``LaneEngine`` (engines/base.py): ``infer_lane(batch, i)`` runs on the i-th single-thread
session (one per core of ``threads``) and calls on different lanes run side by side on their
callers' threads; ``infer`` may use every session, so the batcher (sidecar/batcher.py) runs it
alone.

Worker spinning is off by default. Measured on the 2-core target at 224², batch 1, 2 threads:
on an idle machine spinning gains little (5.3 vs 6.0 ms/image), but with one core busy
elsewhere (decoding, the event loop) a spinning worker fights it for the core and inference
slows to ~17 ms/image against ~10 ms without spinning. ``spin=True`` is for a box that does
nothing but inference.

A single image runs on one session of ``threads`` intra-op threads (the lowest latency); a
batch of several is split over ``threads`` sessions of one thread each, run side by side.
ONNX Runtime spreads one small image poorly over threads: two 1-thread sessions in parallel
answer 254 INT8 (126 FP32) photos/s on the 2-core box against 153 (88) for one 2-thread
session (bench/results/cold_path.md). So at saturation, where requests reach the engine
staggered (one decodes while the other infers) and a call of one image would otherwise run on
the ``threads``-thread session, the batcher sends it to a free lane instead. The outputs are
the same bits whatever the session and thread count (checked in tests/engines/test_ort_engine.py
and tests/engines/test_ort_lanes.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from engines import buckets
from engines.artifacts import HASH_CHARS
from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES, HeatmapBatch, prepare_batch
from engines.errors import EngineError, first_line


def _session_options(threads: int, spin: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same bytes in, same heatmap out, run after run: cached heatmaps must not depend on
    # which run produced them.
    options.use_deterministic_compute = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    # Fatal only: every error ONNX Runtime would print (coloured, on stderr, outside logging)
    # is also raised, and reaches our log as one line through EngineError.
    options.log_severity_level = 4
    return options


# Sessions a batch is split over at most: past a few, the parts get too small to pay.
MAX_PARTS = 4


def _open(data: bytes, threads: int, spin: bool) -> ort.InferenceSession:
    return ort.InferenceSession(
        data, sess_options=_session_options(threads, spin), providers=["CPUExecutionProvider"]
    )


class GraphNotLoadable(EngineError):
    """ONNX Runtime refused a graph's bytes (half-written, another onnxruntime's, unknown op);
    ``reason`` is the first line of its message."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"ONNX Runtime cannot load {path}: {reason}")
        self.reason = reason


def _run(
    session: ort.InferenceSession, image: npt.NDArray[np.uint8]
) -> tuple[npt.NDArray[np.float32], ...]:
    try:
        return tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: image}))
    except Exception as exc:  # ORT raises its own exception types for any failure
        raise EngineError(f"ONNX Runtime inference failed: {exc}") from exc


class OrtEngine:
    """The heatmap model on ONNX Runtime's CPU provider."""

    name = "ort"

    def __init__(
        self,
        model_path: str | Path,
        threads: int = 2,
        shapes: Sequence[tuple[int, int]] | None = None,
        *,
        spin: bool = False,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._shapes = tuple(shapes) if shapes is not None else buckets.all_buckets()
        for h, w in self._shapes:
            if h % buckets.STRIDE or w % buckets.STRIDE or h <= 0 or w <= 0:
                raise ValueError(f"shape bucket {h}x{w} is not a positive multiple of 32")
        self.threads = threads
        # Sessions for the parts of a batch; the first part runs on the calling thread.
        parts = min(threads, MAX_PARTS) if threads > 1 else 0
        data = Path(model_path).read_bytes()
        self._digest = hashlib.sha256(data).hexdigest()
        try:
            self._session: ort.InferenceSession | None = _open(data, threads, spin)
            self._parts = [_open(data, 1, spin) for _ in range(parts)]
        except Exception as exc:  # ORT raises its own exception types for any failure
            # Its messages can span lines and never name the file (it is given bytes).
            raise GraphNotLoadable(model_path, first_line(exc)) from exc
        self._pool = (
            ThreadPoolExecutor(parts - 1, thread_name_prefix="heatcrop-ort") if parts else None
        )

    @property
    def version(self) -> str:
        return f"{self._digest[:HASH_CHARS]}-ort"

    @property
    def input_shapes(self) -> tuple[tuple[int, int], ...]:
        return self._shapes

    def warm_up(self) -> None:
        sizes = (1, len(self._parts)) if self._parts else (1,)
        for h, w in self._shapes:
            for n in sizes:
                self.infer(np.zeros((n, h, w, 3), dtype=np.uint8))

    @property
    def lanes(self) -> int:
        """Calls that may run side by side, one per single-thread session (1: no such
        sessions, ``threads`` is 1 and the one session is the lane)."""
        return len(self._parts) or 1

    def infer(self, batch: npt.NDArray[np.uint8]) -> HeatmapBatch:
        image = prepare_batch(batch, self._shapes)
        session, pool = self._session, self._pool
        if session is None:
            raise EngineError("ONNX Runtime engine used after close()")
        if image.shape[0] == 1 or pool is None:
            heatmaps, food_mass, logits = _run(session, image)
        else:
            parts = np.array_split(image, min(len(self._parts), image.shape[0]))
            rest = [
                pool.submit(_run, s, part)
                for s, part in zip(self._parts[1:], parts[1:], strict=False)
            ]
            first = _run(self._parts[0], parts[0])
            outs = [first, *(f.result() for f in rest)]
            heatmaps, food_mass, logits = (np.concatenate(o) for o in zip(*outs, strict=True))
        return self._checked(image, heatmaps, food_mass, logits)

    def infer_lane(self, batch: npt.NDArray[np.uint8], lane: int) -> HeatmapBatch:
        """The whole batch on lane ``lane``'s single-thread session, on the calling thread."""
        image = prepare_batch(batch, self._shapes)
        session, parts = self._session, self._parts
        if session is None:
            raise EngineError("ONNX Runtime engine used after close()")
        if not 0 <= lane < (len(parts) or 1):
            raise ValueError(f"lane {lane} is not in [0, {len(parts) or 1})")
        return self._checked(image, *_run(parts[lane] if parts else session, image))

    @staticmethod
    def _checked(
        image: npt.NDArray[np.uint8],
        heatmaps: npt.NDArray[np.float32],
        food_mass: npt.NDArray[np.float32],
        logits: npt.NDArray[np.float32],
    ) -> HeatmapBatch:
        n, (h, w) = image.shape[0], buckets.heatmap_shape(image.shape[1:3])
        if heatmaps.shape != (n, len(PROFILES), h, w) or logits.shape[0] != n:
            raise EngineError(f"unexpected output shapes {heatmaps.shape}, {logits.shape}")
        # Own copies: nothing handed out may alias a runtime buffer.
        return HeatmapBatch(
            heatmaps=np.array(heatmaps, dtype=np.float32),
            food_mass=np.array(food_mass, dtype=np.float32),
            logits=np.array(logits, dtype=np.float32),
        )

    def close(self) -> None:
        self._session = None
        self._parts = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
