"""TensorRT (GPU) implementation of the Engine protocol, through pycuda.

Loading: only a plan whose manifest matches this GPU + TensorRT + model hash is opened, and its
bytes are checked against the manifest's sha256 before TensorRT deserializes them; a mismatched
plan is refused before ``tensorrt`` is even imported. Both libraries are imported lazily, here
and nowhere at module level, so the CPU product never needs them.

Memory: one optimisation profile per shape bucket (see engines/build_trt.py). For each profile
a page-locked host buffer and a device buffer per I/O tensor are allocated once, at load, for
the profile's largest batch; every call reuses them and copies its outputs out, so nothing
handed out aliases a buffer the next call overwrites. A single execution context serves every
profile (switched with ``set_optimization_profile_async`` when the bucket changes): calls are
serial anyway, and one context per profile would hold one activation workspace per bucket.

Threads: the engine may be created in one thread and used from another (the service loads it
in ``asyncio.to_thread`` and the batcher calls it from its one worker thread), because every
method pushes the GPU's primary CUDA context for the duration of the call and pops it after.
Calls are not concurrent: one stream, one execution context and one set of staging buffers
per bucket. A lock serialises ``infer`` and ``close``; behind the service's batcher, which makes
one engine call at a time from one thread, that lock is never contended.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from engines import buckets, classes
from engines.artifacts import HASH_CHARS
from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES, HeatmapBatch, prepare_batch
from engines.errors import EngineError
from engines.plans import (
    Importer,
    Machine,
    NoMatchingPlan,
    PlanManifest,
    judge,
    read_plan,
)

log = logging.getLogger("heatcrop.engine")

Shape = tuple[int, int]
LOG_LINES = 4000


def output_shapes(n: int, bucket: Shape) -> dict[str, tuple[int, ...]]:
    """The shape of each output tensor for a batch of ``n`` images of one bucket."""
    h, w = buckets.heatmap_shape(bucket)
    heatmaps, food_mass, logits = OUTPUT_NAMES
    return {
        heatmaps: (n, len(PROFILES), h, w),
        food_mass: (n,),
        logits: (n, classes.NUM_CLASSES),
    }


def split_batch(batch: npt.NDArray[np.uint8], max_batch: int) -> list[npt.NDArray[np.uint8]]:
    """Consecutive chunks of at most ``max_batch`` images: a plan's profiles have a largest
    batch, while the Engine protocol (like ONNX Runtime) accepts any N."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [batch[i : i + max_batch] for i in range(0, batch.shape[0], max_batch)]


def stage(chunk: npt.NDArray[np.uint8], host: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Copy a chunk into the front of a (page-locked) staging buffer; the view to send."""
    view = host[: chunk.shape[0]]
    np.copyto(view, chunk)
    return view


def join_outputs(parts: list[tuple[npt.NDArray[np.float32], ...]]) -> HeatmapBatch:
    """One HeatmapBatch from the per-chunk outputs, in order."""
    if len(parts) == 1:
        heatmaps, food_mass, logits = parts[0]
    else:
        heatmaps, food_mass, logits = (
            np.concatenate(arrays) for arrays in zip(*parts, strict=True)
        )
    return HeatmapBatch(heatmaps=heatmaps, food_mass=food_mass, logits=logits)


def make_logger(
    trt: ModuleType, sink: Callable[[str], None], *, verbose: bool = False, keep: int = LOG_LINES
) -> Any:
    """A TensorRT logger that keeps the last ``keep`` messages (for error reports) and passes
    warnings and errors to ``sink`` as they come. VERBOSE messages are kept only if asked for:
    a build emits tens of thousands of them."""
    severity = trt.ILogger.Severity
    echo = int(severity.WARNING)
    capture = int(severity.VERBOSE if verbose else severity.INFO)

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: deque[str] = deque(maxlen=keep)

        def log(self, level: Any, msg: str) -> None:
            if int(level) > capture:
                return
            line = f"[TensorRT {getattr(level, 'name', level)}] {msg}"
            self.lines.append(line)
            if int(level) <= echo:
                sink(line)

        def tail(self, n: int = 20) -> str:
            return "\n".join(list(self.lines)[-n:])

    return CapturingLogger()


def read_profiles(engine: Any) -> list[tuple[Shape, int, int]]:
    """(bucket, min batch, max batch) of each optimisation profile of a deserialized engine."""
    out = []
    for index in range(engine.num_optimization_profiles):
        low, _, high = (
            tuple(int(d) for d in dims)
            for dims in engine.get_tensor_profile_shape(INPUT_NAME, index)
        )
        if len(low) != 4 or low[1:] != high[1:] or low[3] != 3:
            raise EngineError(f"profile {index} is {low}..{high}, not one NHWC shape bucket")
        out.append(((low[1], low[2]), low[0], high[0]))
    return out


def _ok(result: object, what: str) -> None:
    """TensorRT reports most failures as a False return value, not an exception."""
    if result is False:
        raise EngineError(f"TensorRT: {what} failed")


@dataclass
class _Slot:
    """The staging buffers of one profile (shape bucket), allocated once at load."""

    profile: int
    bucket: Shape
    max_batch: int
    host_in: npt.NDArray[np.uint8]
    dev_in: Any
    host_out: dict[str, npt.NDArray[np.float32]]
    dev_out: dict[str, Any]


class TrtEngine:
    """The heatmap model as a TensorRT plan on one CUDA GPU; see the module docstring."""

    name = "trt"

    def __init__(
        self,
        manifest: PlanManifest,
        machine: Machine,
        model_sha256: str,
        *,
        device: int = 0,
        importer: Importer = importlib.import_module,
    ) -> None:
        verdict = judge(manifest, machine, model_sha256)
        if not verdict.ok:
            raise NoMatchingPlan(f"{manifest.plan_file}: {verdict.reason}; not loading it")
        data = read_plan(manifest)
        self._manifest = manifest
        self._digest = model_sha256
        self._lock = threading.Lock()
        self._closed = False
        self._slots: dict[Shape, _Slot] = {}
        self._active_profile = -1
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._ctx: Any = None
        try:
            self._trt = importer("tensorrt")
            self._cuda = importer("pycuda.driver")
        except (ImportError, OSError, RuntimeError) as exc:
            raise EngineError(f"TensorRT runtime not importable: {exc}") from exc
        self._cuda_error: type[BaseException] = getattr(self._cuda, "Error", RuntimeError)
        try:
            self._cuda.init()
            # The primary context is the one TensorRT's CUDA runtime calls use too, so pycuda's
            # buffers and TensorRT's kernels live in the same context.
            self._ctx = self._cuda.Device(device).retain_primary_context()
        except self._cuda_error as exc:
            raise EngineError(f"CUDA: cannot open GPU #{device}: {exc}") from exc
        try:
            self._push()
        except BaseException:
            self._ctx.detach()  # the retained primary context is released on every path
            self._ctx = None
            raise
        try:
            self._load(data)
        except BaseException:
            try:
                self._free()
                self._pop()
            finally:
                self._ctx.detach()
                self._ctx = None
            raise
        try:
            self._pop()
        except BaseException:
            try:
                self._free()  # the context is still current: the pop failed
            finally:
                self._ctx.detach()
                self._ctx = None
            raise

    # -- Engine protocol -------------------------------------------------------------------

    @property
    def version(self) -> str:
        return f"{self._digest[:HASH_CHARS]}-trt-{self._manifest.precision}"

    @property
    def input_shapes(self) -> tuple[Shape, ...]:
        return self._manifest.buckets

    @property
    def max_batch(self) -> int:
        """The largest batch one TensorRT call takes; larger batches are split."""
        return min(slot.max_batch for slot in self._slots.values())

    @property
    def manifest(self) -> PlanManifest:
        return self._manifest

    def warm_up(self) -> None:
        for h, w in self.input_shapes:
            self.infer(np.zeros((1, h, w, 3), dtype=np.uint8))

    def infer(self, batch: npt.NDArray[np.uint8]) -> HeatmapBatch:
        image = prepare_batch(batch, self.input_shapes)
        with self._lock:
            if self._closed:
                raise EngineError("TensorRT engine used after close()")
            slot = self._slots[(int(image.shape[1]), int(image.shape[2]))]
            self._push()
            try:
                parts = [self._run(slot, chunk) for chunk in split_batch(image, slot.max_batch)]
            except self._cuda_error as exc:
                raise EngineError(f"CUDA error during TensorRT inference: {exc}") from exc
            finally:
                self._pop()
        return join_outputs(parts)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._ctx is None:
                return
            try:
                self._push()
                try:
                    self._free()
                finally:
                    self._pop()
            finally:
                self._ctx.detach()
                self._ctx = None

    # -- internals (called with the CUDA context pushed) -----------------------------------

    def _push(self) -> None:
        try:
            self._ctx.push()
        except self._cuda_error as exc:
            raise EngineError(f"CUDA: cannot make the GPU context current: {exc}") from exc

    def _pop(self) -> None:
        try:
            self._cuda.Context.pop()
        except self._cuda_error as exc:
            raise EngineError(f"CUDA: cannot release the GPU context: {exc}") from exc

    def _load(self, data: bytes) -> None:
        trt, cuda = self._trt, self._cuda
        self._logger = make_logger(trt, log.warning)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(
                f"TensorRT could not deserialize {self._manifest.plan_file}:\n"
                + self._logger.tail()
            )
        self._engine = engine
        self._check_io(engine)
        profiles = read_profiles(engine)
        if tuple(bucket for bucket, _, _ in profiles) != self._manifest.buckets:
            raise EngineError(
                f"{self._manifest.plan_file}: its profiles are not the manifest's buckets"
            )
        try:
            self._stream = cuda.Stream()
            for index, (bucket, low, high) in enumerate(profiles):
                if low != 1:
                    raise EngineError(f"profile {index} starts at batch {low}, not 1")
                self._slots[bucket] = self._allocate(index, bucket, high)
        except self._cuda_error as exc:
            raise EngineError(f"CUDA: cannot allocate the engine's buffers: {exc}") from exc
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(
                "TensorRT could not create an execution context:\n" + self._logger.tail()
            )

    def _check_io(self, engine: Any) -> None:
        trt = self._trt
        want = {INPUT_NAME: (trt.TensorIOMode.INPUT, trt.DataType.UINT8)}
        want |= {name: (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT) for name in OUTPUT_NAMES}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(want):
            raise EngineError(f"plan tensors {names}, expected {sorted(want)}")
        for name, (mode, dtype) in want.items():
            got = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
            if got != (mode, dtype):
                raise EngineError(f"plan tensor {name} is {got}, expected {(mode, dtype)}")

    def _allocate(self, profile: int, bucket: Shape, max_batch: int) -> _Slot:
        cuda = self._cuda
        host_in = cuda.pagelocked_empty((max_batch, *bucket, 3), np.uint8)
        host_out = {
            name: cuda.pagelocked_empty(shape, np.float32)
            for name, shape in output_shapes(max_batch, bucket).items()
        }
        return _Slot(
            profile=profile,
            bucket=bucket,
            max_batch=max_batch,
            host_in=host_in,
            dev_in=cuda.mem_alloc(host_in.nbytes),
            host_out=host_out,
            dev_out={name: cuda.mem_alloc(a.nbytes) for name, a in host_out.items()},
        )

    def _run(
        self, slot: _Slot, chunk: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float32], ...]:
        cuda, context, stream = self._cuda, self._context, self._stream
        n = int(chunk.shape[0])
        host_in = stage(chunk, slot.host_in)
        if self._active_profile != slot.profile:
            _ok(
                context.set_optimization_profile_async(slot.profile, stream.handle),
                f"selecting profile {slot.profile}",
            )
            self._active_profile = slot.profile
        _ok(context.set_input_shape(INPUT_NAME, chunk.shape), f"input shape {chunk.shape}")
        # Addresses are set on every call: switching profile unsets them, and it is cheap.
        _ok(context.set_tensor_address(INPUT_NAME, int(slot.dev_in)), "input address")
        for name, shape in output_shapes(n, slot.bucket).items():
            got = tuple(int(d) for d in context.get_tensor_shape(name))
            if got != shape:
                raise EngineError(f"TensorRT output {name} has shape {got}, expected {shape}")
            _ok(context.set_tensor_address(name, int(slot.dev_out[name])), f"{name} address")
        cuda.memcpy_htod_async(slot.dev_in, host_in, stream)
        _ok(context.execute_async_v3(stream.handle), "execute_async_v3")
        for name in OUTPUT_NAMES:
            cuda.memcpy_dtoh_async(slot.host_out[name][:n], slot.dev_out[name], stream)
        stream.synchronize()
        # Own copies: the staging buffers are overwritten by the next call.
        return tuple(np.array(slot.host_out[name][:n], dtype=np.float32) for name in OUTPUT_NAMES)

    def _free(self) -> None:
        """Release everything, in reverse order of creation; the context must be current."""
        try:
            if self._stream is not None:
                self._stream.synchronize()
            for slot in self._slots.values():
                slot.dev_in.free()
                for allocation in slot.dev_out.values():
                    allocation.free()
        except self._cuda_error as exc:
            log.warning("CUDA error while releasing TensorRT buffers: %s", exc)
        # Page-locked host buffers are freed with their arrays, which must go while the
        # context is still current.
        self._slots.clear()
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None
