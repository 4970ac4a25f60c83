"""Micro-batcher in front of the engine, with deadline-aware admission.

Requests are grouped per shape bucket (an engine call takes one shape). A bucket's batch goes
to the engine when it holds ``max_batch`` images or its oldest image has waited ``max_wait_ms``,
whichever comes first; while the engine is busy, waiting requests simply pile up and leave as
soon as it is free, so under load batches fill by themselves and nobody waits twice.

Engine calls and lanes. An engine with one lane (TensorRT, any plain ``Engine``) gets one call
at a time, in one worker thread: a second concurrent call would only fight the first for the
GPU or the same cores, and the engine need not be thread-safe. An engine with several lanes
(``LaneEngine``, engines/base.py: ONNX Runtime's single-thread sessions, one per core) gets up
to that many calls at once, one per lane, each in its own worker thread, whenever more than one
request is ready, a call is already running, or either happened in the last ``LANE_HOLD_S``
(the engine is busy): at saturation requests reach the engine staggered (one decodes while the
other infers), and one single-thread session per core answers more photos per second than the
shared multi-thread session (bench/results/cost.md). A lone request on an idle engine gets the
whole engine (``infer``: the multi-thread session, the lowest latency), and nothing starts
beside a whole-engine call. ``close`` is the owner's, after the batcher is closed. The event
loop neither stacks nor copies pixels: stacking the batch and splitting the results run in the
worker threads too.

Admission: a request the batcher expects to finish after its deadline is refused at once with
``Overloaded`` (serve the legacy crop now rather than a timeout later). The expectation is the
time left of the running batch plus the queued work plus its own, from measured service times
(an EWMA of seconds per image for each batch size, per 224x224-equivalent of pixels since a
224x448 image costs twice a 224x224 one; whole-engine calls and lane calls have an EWMA each,
and lane calls are timed as they run, beside each other; queued work is laid on the lanes as
they come free, earliest first), times ``1 + headroom``: estimates are noisy, and a
request admitted with no margin is about as likely to miss as to make it, only later. (Measured
on the 2-core box, ORT 2 threads, 4 buckets, 120 ms budget, Poisson load at 300 and 600 req/s:
headroom 0.3 instead of 0 cut the admitted-then-dropped requests from ~200 to ~50-70 per 4 s
for the same number of answers in time.)

Scheduling: the ready bucket whose oldest request has the earliest deadline goes first. A batch
takes later arrivals of its bucket along only while that keeps the other buckets' oldest
requests in time, since the admission estimate promised them their place. A request whose
deadline passes while queued fails with ``DeadlineExceeded`` at that moment, and one that its
batch would finish too late for fails at dispatch: neither is computed for nobody. A request
whose batch has started gets its result even if late (the caller may still cache it).

Background work (``submit_background``): when the foreground queue is idle, a give-up's image
can be queued to finish its heatmap for the next request. Background batches run only when no
foreground request is queued and no call is running, and hold at most ``background_batch``
images, so a foreground request waits at most one small background batch (on an engine with
lanes, only one that holds the whole engine; one on a lane leaves the others free). With a
``budget`` (sidecar/cpu_budget.py) they also wait while the background's CPU budget is
overdrawn, and each is charged with the CPU it used: a lowered priority does not keep them off
the cores of other processes (autogroups).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import numpy.typing as npt

from engines.base import Engine, HeatmapBatch, LaneEngine
from sidecar.cpu_budget import CpuBudget, metered
from sidecar.errors import DeadlineExceeded, EngineError, Overloaded
from sidecar.metrics import Metrics
from sidecar.priority import lowered_pool

log = logging.getLogger(__name__)

Shape = tuple[int, int]
# Cost unit: a 224x224 image. Service time grows about linearly with pixels.
UNIT_PIXELS = 224 * 224
# How long the engine counts as busy (calls go to lanes) after a request last found it busy.
# Clients at saturation find it busy several times a second (2 in flight on the 2-core box: a
# call running at most arrivals); a lone client never does, and keeps the whole engine.
LANE_HOLD_S = 1.0
# What ``stats`` counts since start (``lane_calls``: engine calls run on a single-thread lane).
_COUNTS = (
    "batches",
    "images",
    "background",
    "lane_calls",
    "errors",
    "admission",
    "full",
    "expired",
)


@dataclass(frozen=True)
class ImageHeat:
    """One image's share of an engine call, copied out of the batch arrays.

    heatmaps: float32 [len(PROFILES), h, w]; food_mass: probability mass on food classes;
    faces: [k, 5] as shares of the image's sides (``HeatmapBatch.faces``), None when the engine
    has no face detector.
    """

    heatmaps: npt.NDArray[np.float32]
    food_mass: float
    faces: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class BatcherStats:
    """Counters since start and the current service-time estimates."""

    batches: int
    images: int
    background_images: int
    batch_sizes: dict[int, int]  # size -> number of engine calls of that size
    lane_calls: int  # of ``batches``, those run on one single-thread lane (the rest: whole engine)
    engine_errors: int
    refused_admission: int
    refused_queue_full: int
    expired: int
    seconds_per_image: float  # EWMA at the most used batch size, per 224x224 image
    seconds_per_batch: float  # EWMA of engine-call seconds, any size


@dataclass(eq=False)
class _Request:
    pixels: npt.NDArray[np.uint8]
    shape: Shape
    deadline: float  # loop.time(); inf for background
    enqueued: float
    future: asyncio.Future[ImageHeat]
    on_result: Callable[[ImageHeat], object] | None = None  # background only
    on_failure: Callable[[], object] | None = None  # background only
    queued: bool = True
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def background(self) -> bool:
        return self.on_result is not None


@dataclass(eq=False)
class _Call:
    batch: list[_Request]
    lane: int | None  # None: the whole engine (``infer``), which runs alone
    until: float  # predicted end, loop time


class ServiceModel:
    """Seconds an engine call takes, learnt per batch size as an EWMA of seconds per unit.

    A batch size never observed borrows the nearest observed size (the larger on a tie): no
    extrapolation of a fitted line, which noise can send anywhere. Until the first
    measurement, ``prior_s`` per unit stands for every size.
    """

    def __init__(self, max_batch: int, prior_s: float, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.prior_s = prior_s
        self._measured: list[float | None] = [None] * (max_batch + 1)
        self._calls = [0] * (max_batch + 1)
        # Per-unit seconds for every size, rebuilt on each observation (once per engine call)
        # so that the estimates made for every admission are a lookup.
        self._table = [prior_s] * (max_batch + 1)
        self.batch_s = math.nan  # EWMA over all calls, for stats only

    def observe(self, size: int, units: float, seconds: float) -> None:
        if not 1 <= size < len(self._measured) or units <= 0:
            return
        rate = seconds / units
        old = self._measured[size]
        self._measured[size] = rate if old is None else old + self.alpha * (rate - old)
        self._calls[size] += 1
        if math.isnan(self.batch_s):
            self.batch_s = seconds
        else:
            self.batch_s += self.alpha * (seconds - self.batch_s)
        seen = [(s, r) for s, r in enumerate(self._measured) if r is not None]
        for size_ in range(1, len(self._table)):
            self._table[size_] = min(seen, key=lambda sr: (abs(sr[0] - size_), -sr[0]))[1]

    def per_unit(self, size: int) -> float:
        return self._table[min(max(size, 1), len(self._table) - 1)]

    def batch_seconds(self, size: int, unit: float) -> float:
        """Predicted seconds of one call of ``size`` images of ``unit`` cost units each."""
        return 0.0 if size <= 0 else self.per_unit(size) * size * unit

    def queue_seconds(self, count: int, unit: float, max_batch: int) -> float:
        """Predicted seconds to run ``count`` queued images of one bucket, in full batches."""
        full, rest = divmod(count, max_batch)
        return full * self.batch_seconds(max_batch, unit) + self.batch_seconds(rest, unit)

    @property
    def calls(self) -> int:
        return sum(self._calls)

    def typical_per_unit(self) -> float:
        """Per-unit seconds at the most frequent batch size so far."""
        most = max(range(len(self._calls)), key=lambda s: (self._calls[s], s))
        return self.per_unit(most)


def _units(shape: Shape) -> float:
    return shape[0] * shape[1] / UNIT_PIXELS


def _run_engine(
    infer: Callable[[npt.NDArray[np.uint8]], HeatmapBatch], images: list[npt.NDArray[np.uint8]]
) -> tuple[list[ImageHeat], float]:
    """Worker-thread side of one call: stack, ``infer`` (a lane's or the whole engine's), split;
    returns results and seconds."""
    start = time.perf_counter()
    out = infer(np.stack(images))
    if len(out) != len(images) or out.food_mass.shape[0] != len(images):
        raise EngineError(f"engine returned {len(out)} results for {len(images)} images")
    # Own copies: a per-image view would keep the whole batch array alive in the caches.
    heats = [
        ImageHeat(
            heatmaps=np.array(out.heatmaps[i], dtype=np.float32),
            food_mass=float(fm),
            faces=out.faces[i] if out.faces else None,
        )
        for i, fm in enumerate(out.food_mass)
    ]
    return heats, time.perf_counter() - start


def _even(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one, larger first."""
    size, extra = divmod(total, parts)
    return [size + (i < extra) for i in range(parts)]


def _engine_error(exc: Exception) -> EngineError:
    """A fresh error per request: one shared instance would collect every waiter's traceback."""
    detail = str(exc) if isinstance(exc, EngineError) else f"engine failed: {exc}"
    error = EngineError(detail)
    error.__cause__ = exc
    return error


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Batcher:
    """Groups same-shape images into engine calls; see the module docstring.

    All methods except the worker's engine call run on the event loop that called ``start``.
    The engine stays owned by the caller: ``close`` does not close it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics | None = None,
        background_batch: int = 1,
        max_background: int | None = None,
        service_prior_s: float = 0.010,
        headroom: float = 0.3,
        worker_nice: int = 0,
        budget: CpuBudget | None = None,
        lanes: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or background_batch < 1:
            raise ValueError("max_batch, max_queue and background_batch must be >= 1")
        if max_wait_ms < 0 or service_prior_s < 0 or headroom < 0:
            raise ValueError("max_wait_ms, service_prior_s and headroom must be >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.background_batch = min(background_batch, max_batch)
        self.max_background = max_batch if max_background is None else max_background
        self.headroom = headroom
        self.worker_nice = worker_nice
        self.metrics = metrics
        self.budget = budget  # None: background work runs whenever the foreground is idle
        self._held = False  # background waiting for the budget (counted once per hold)
        # False: one call at a time whatever the engine offers (the behaviour before lanes).
        lane_engine = engine if lanes and isinstance(engine, LaneEngine) else None
        self.lanes = lane_engine.lanes if lane_engine is not None else 1
        # Each lane's call, bound once: the engine's kind is not asked again per call.
        self._lane_infer = (
            [partial(lane_engine.infer_lane, lane=i) for i in range(self.lanes)]
            if lane_engine is not None
            else []
        )
        self.model = ServiceModel(max_batch, service_prior_s)  # whole-engine calls
        self.lane_model = ServiceModel(max_batch, service_prior_s)  # calls on one lane
        self._shapes = frozenset(engine.input_shapes)
        self._cheapest = min(self._shapes, key=_units)
        self._queues: dict[Shape, deque[_Request]] = {}
        self._background: deque[_Request] = deque()
        self._depth = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._calls: list[_Call] = []  # running
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy_at = -math.inf  # when a request last found the engine busy, loop time
        self._active = self.model  # the model of the next call's kind (``_take``)
        self._closed = False
        self._batch_sizes: dict[int, int] = {}
        self._counts = dict.fromkeys(_COUNTS, 0)
        # Engine calls failed since the last one that worked: a GPU in a sticky error state
        # fails every call, and /healthz must say so (each request alone only falls back).
        self.failing_calls = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is not None or self._closed:
            raise RuntimeError("Batcher.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._executor = lowered_pool(self.lanes, self.worker_nice, "heatcrop-engine")
        self._worker = asyncio.create_task(self._work(), name="heatcrop-batcher")
        if self.metrics is not None:
            self.metrics.queue_depth.set_function(lambda: self._depth)

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, fail queued requests (Overloaded), let the running call finish.

        If the running engine call has not finished within ``timeout`` seconds its requests
        fail with EngineError and the call is abandoned in its thread: it may still be running
        when the owner closes the engine.
        """
        if self._closed:
            return
        self._closed = True
        for queue in self._queues.values():
            while queue:
                self._fail(queue[0], Overloaded("batcher closed"), "shutdown")
        while self._background:
            request = self._background[0]
            self._unqueue(request)
            request.future.cancel()
        self._wake()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except TimeoutError:
                for request in self._running:
                    if not request.future.done():
                        request.future.set_exception(EngineError("engine call outlived close()"))
                self._worker.cancel()
                for task in self._tasks:
                    task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.queue_depth.set_function(None)
            self.metrics.queue_depth.set(0)

    # -- public API ------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Foreground images queued (not counting the running batch)."""
        return self._depth

    @property
    def background_depth(self) -> int:
        return len(self._background)

    @property
    def stats(self) -> BatcherStats:
        c = self._counts
        return BatcherStats(
            batches=c["batches"],
            images=c["images"],
            background_images=c["background"],
            batch_sizes=dict(sorted(self._batch_sizes.items())),
            lane_calls=c["lane_calls"],
            engine_errors=c["errors"],
            refused_admission=c["admission"],
            refused_queue_full=c["full"],
            expired=c["expired"],
            seconds_per_image=self._used_model().typical_per_unit(),
            seconds_per_batch=self._used_model().batch_s,
        )

    @property
    def _running(self) -> list[_Request]:
        return [r for call in self._calls for r in call.batch]

    def _used_model(self) -> ServiceModel:
        return self.lane_model if self.lane_model.calls > self.model.calls else self.model

    def estimated_wait(self) -> float:
        """Seconds until the engine is through the running calls and all queued foreground
        work."""
        now = self._require_loop().time()
        if self.lanes > 1:
            work = [(len(q), _units(s)) for s, q in self._queues.items() if q]
            return max(self._lane_schedule(now, work), default=now) - now
        wait = max((max(0.0, c.until - now) for c in self._calls), default=0.0)
        for shape, queue in self._queues.items():
            wait += self.model.queue_seconds(len(queue), _units(shape), self.max_batch)
        return wait

    def estimated_finish(self, shape: Shape) -> float:
        """Seconds from now until a new image of ``shape`` would have its result."""
        queued = len(self._queues.get(shape, ()))
        unit = _units(shape)
        # An idle engine still holds a partial batch for max_wait to gather company.
        hold = self.max_wait if not self._calls and (queued + 1) % self.max_batch else 0.0
        now = self._require_loop().time()
        if self._lane_mode(now, self._depth + 1):
            work = [(len(q), _units(s)) for s, q in self._queues.items() if q and s != shape]
            ends = self._lane_schedule(now, [*work, (queued + 1, unit)])
            return max(ends[-1] - now, 0.0) + hold
        mine = self.model.queue_seconds(queued + 1, unit, self.max_batch)
        mine -= self.model.queue_seconds(queued, unit, self.max_batch)
        return self.estimated_wait() + mine + hold

    def _lane_mode(self, now: float, ready: int) -> bool:
        """Whether calls go to lanes now, with ``ready`` foreground images queued: the engine
        has lanes and is busy (see the module docstring)."""
        if self.lanes == 1:
            return False
        return bool(self._calls) or ready > 1 or now - self._busy_at < LANE_HOLD_S

    def _lane_schedule(self, now: float, work: Sequence[tuple[int, float]]) -> list[float]:
        """When each (images, unit) group of ``work``, in this order, is done if laid on the
        lanes as they come free (a whole-engine call holds every lane), as the worker splits
        a batch over the free lanes: the end of each group's last call, loop time."""
        free = [now] * self.lanes
        for call in self._calls:
            end = max(now, call.until)
            if call.lane is None:
                free = [max(f, end) for f in free]
            else:
                free[call.lane] = max(free[call.lane], end)
        heapq.heapify(free)
        ends = []
        for count, unit in work:
            calls = max(-(-count // self.max_batch), min(count, self.lanes))
            last = now
            for size in _even(count, calls):
                end = heapq.heappop(free) + self.lane_model.batch_seconds(size, unit)
                heapq.heappush(free, end)
                last = max(last, end)
            ends.append(last)
        return ends

    def worth_preparing(self, deadline: float, before_s: float = 0.0) -> bool:
        """Whether an image ready in ``before_s`` would be used: admitted if of the cheapest
        shape, or taken for the background by an idle engine.

        For refusing before the work that precedes admission (a decode, milliseconds of CPU
        that overloaded cores lack) when even the best case would be refused after it.
        """
        if self._closed or self._depth >= self.max_queue:
            return False
        if not self._depth and not self._calls and len(self._background) < self.max_background:
            return True
        # The headroom covers the preparation's estimate too: it is as noisy as the engine's.
        finish = (before_s + self.estimated_finish(self._cheapest)) * (1.0 + self.headroom)
        return self._require_loop().time() + finish <= deadline

    async def infer(self, pixels: npt.NDArray[np.uint8], deadline: float) -> ImageHeat:
        """The heatmaps of one [H, W, 3] uint8 image of a shape bucket, by ``deadline``.

        Raises Overloaded at once when the queue is full or the estimate misses the deadline,
        DeadlineExceeded when the deadline passes while queued, EngineError when the call
        fails. ``pixels`` is not copied: do not modify it until this returns.
        """
        loop = self._require_loop()
        shape = self._check_pixels(pixels)
        self._admit(shape, deadline)
        now = loop.time()
        request = _Request(pixels, shape, deadline, now, loop.create_future())
        request.timer = loop.call_at(deadline, self._expire, request)
        self._enqueue(request)
        return await request.future

    def submit_background(
        self,
        pixels: npt.NDArray[np.uint8],
        on_result: Callable[[ImageHeat], object],
        on_failure: Callable[[], object] | None = None,
    ) -> bool:
        """Queue a low-priority image if the foreground is idle; False when refused.

        ``on_result(heat)`` is called on the event loop once computed; ``on_failure()`` instead
        when the call fails (logged) or the image is withdrawn or dropped at close. Refused when
        closed, when foreground images are queued, or when ``max_background`` background images
        are already waiting.
        """
        loop = self._require_loop()
        shape = self._check_pixels(pixels)
        if self._closed or self._depth > 0 or len(self._background) >= self.max_background:
            return False
        request = _Request(
            pixels,
            shape,
            math.inf,
            loop.time(),
            loop.create_future(),
            on_result=on_result,
            on_failure=on_failure,
        )
        request.future.add_done_callback(lambda f: self._background_done(request, f))
        self._background.append(request)
        self._wake()
        return True

    def takes_background(self, coming: int = 0) -> bool:
        """Whether ``submit_background`` would take an image now with ``coming`` more on their
        way: for not preparing (decoding) one that would be refused."""
        if self._closed or self._depth > 0:
            return False
        return len(self._background) + coming < self.max_background

    def withdraw_background(self, pixels: npt.NDArray[np.uint8]) -> bool | None:
        """Take back the queued background image ``pixels`` (the same array object).

        True: it was still queued and is withdrawn (its ``on_failure`` runs); the caller can now
        ask for it in the foreground. False: its engine call is running; its result comes as
        submitted. None: no such background image (done, failed, or never queued).
        """
        for request in self._background:
            if request.pixels is pixels:
                self._unqueue(request)  # now, before the worker can pick it
                request.future.cancel()
                return True
        if any(r.pixels is pixels for r in self._running):
            return False
        return None

    # -- admission and queues --------------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("Batcher used before start()")
        return self._loop

    def _check_pixels(self, pixels: object) -> Shape:
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError("pixels must be a uint8 numpy array")
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be [H, W, 3], got shape {pixels.shape}")
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        # Refused here, not in the engine: a bad image would fail its whole batch.
        if shape not in self._shapes:
            raise ValueError(f"{shape[0]}x{shape[1]} is not one of the engine's shape buckets")
        return shape

    def _admit(self, shape: Shape, deadline: float) -> None:
        if self._closed:
            self._giveup("shutdown")
            raise Overloaded("batcher closed")
        if self._depth >= self.max_queue:
            self._counts["full"] += 1
            self._giveup("queue-full")
            raise Overloaded(f"engine queue full ({self._depth} images)")
        now = self._require_loop().time()
        finish = self.estimated_finish(shape)
        if now + finish * (1.0 + self.headroom) > deadline:
            self._counts["admission"] += 1
            self._giveup("admission")
            raise Overloaded(
                f"expected in {finish * 1000:.1f} ms, {(deadline - now) * 1000:.1f} ms left"
            )

    def _giveup(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.giveups.inc(reason=reason)

    def _enqueue(self, request: _Request) -> None:
        queue = self._queues.setdefault(request.shape, deque())
        queue.append(request)
        self._depth += 1
        if self._calls:
            self._busy_at = request.enqueued
        # Whatever ends the request while queued (result, error, caller cancelled) unqueues it.
        request.future.add_done_callback(lambda _: self._unqueue(request))
        self._wake()

    def _unqueue(self, request: _Request) -> None:
        if not request.queued:
            return
        request.queued = False
        if request.timer is not None:
            request.timer.cancel()
        if request.background:
            self._background.remove(request)
            return
        self._queues[request.shape].remove(request)
        self._depth -= 1

    def _expire(self, request: _Request) -> None:
        if request.queued and not request.future.done():
            self._fail(request, DeadlineExceeded("deadline passed in the engine queue"), "expired")

    def _fail(self, request: _Request, error: Exception, reason: str) -> None:
        if reason == "expired":
            self._counts["expired"] += 1
        self._giveup(reason)
        self._unqueue(request)
        if not request.future.done():
            request.future.set_exception(error)

    def _background_done(self, request: _Request, future: asyncio.Future[ImageHeat]) -> None:
        self._unqueue(request)
        if future.cancelled() or future.exception() is not None:
            if not future.cancelled():
                log.warning("background inference failed: %s", future.exception())
            if request.on_failure is not None:
                try:
                    request.on_failure()
                except Exception:
                    log.exception("background failure callback failed")
            return
        assert request.on_result is not None
        try:
            request.on_result(future.result())
        except Exception:
            log.exception("background result callback failed")

    # -- worker ----------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None:
            _set_done(self._waiter)

    async def _sleep_until(self, when: float | None) -> None:
        loop = self._require_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        handle = loop.call_at(when, _set_done, waiter) if when is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def _work(self) -> None:
        while not self._closed:
            now = self._require_loop().time()
            free = self._free_lanes()
            batch, wake_at = self._take(now) if free else ([], None)
            if not batch:
                await self._sleep_until(wake_at)  # a call's end wakes it too
                continue
            calls = self._calls_for(batch, free, now)
            for request in batch:  # now, before the next look at the queues
                self._unqueue(request)
            for call in calls:
                self._calls.append(call)
                task = asyncio.create_task(self._guarded_run(call), name="heatcrop-engine-call")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if self._tasks:  # closing: the running calls finish (close() bounds the wait)
            await asyncio.wait(list(self._tasks))

    def _free_lanes(self) -> list[int]:
        """Lanes no call holds (a whole-engine call holds them all)."""
        if any(call.lane is None for call in self._calls):
            return []
        busy = {call.lane for call in self._calls}
        return [lane for lane in range(self.lanes) if lane not in busy]

    def _calls_for(self, batch: list[_Request], free: list[int], now: float) -> list[_Call]:
        """``batch`` as the calls to start now: the whole engine for a lone request on an idle
        engine, else split evenly over the free lanes."""
        unit = _units(batch[0].shape)
        # The batch is still queued (foreground) or apart from the count (background).
        ready = self._depth + (len(batch) if batch[0].background else 0)
        if self._calls or ready > 1:
            self._busy_at = now
        if not self._lane_mode(now, ready):
            return [_Call(batch, None, now + self.model.batch_seconds(len(batch), unit))]
        calls, rest = [], iter(batch)
        for lane, size in zip(free, _even(len(batch), min(len(free), len(batch))), strict=False):
            part = list(itertools.islice(rest, size))
            calls.append(_Call(part, lane, now + self.lane_model.batch_seconds(size, unit)))
        return calls

    def _infer_for(self, call: _Call) -> Callable[[npt.NDArray[np.uint8]], HeatmapBatch]:
        return self.engine.infer if call.lane is None else self._lane_infer[call.lane]

    async def _guarded_run(self, call: _Call) -> None:
        try:
            await self._run(call)
        except Exception:  # a bug here must not leave every later request hanging
            log.exception("batcher worker failed on a batch of %d", len(call.batch))
            self._settle(call.batch, [EngineError("batcher failure") for _ in call.batch])
        finally:
            if call in self._calls:
                self._calls.remove(call)
            self._wake()

    def _take(self, now: float) -> tuple[list[_Request], float | None]:
        """The next batch to run, or none and when to look again (None: on the next wake)."""
        # What a request run now would cost: on a lane when the engine is busy.
        self._active = self.lane_model if self._lane_mode(now, self._depth) else self.model
        shape, wake_at = self._pick(now)
        if shape is not None:
            return self._form(shape, now), None
        if wake_at is None and self._background and not self._calls:
            hold = self._budget_hold(now)
            if hold is not None:
                return [], hold
            # Only when no foreground request waits at all, and only a small batch.
            first = self._background[0].shape
            same = (r for r in self._background if r.shape == first)
            return list(itertools.islice(same, self.background_batch)), None
        return [], wake_at

    def _budget_hold(self, now: float) -> float | None:
        """When background work may run, if not now (its CPU budget is overdrawn)."""
        if self.budget is None or self.budget.ready():
            self._held = False
            return None
        if not self._held:
            self._held = True
            self.budget.held("cnn")
        return now + self.budget.delay()

    def _pick(self, now: float) -> tuple[Shape | None, float | None]:
        """The ready bucket whose oldest request has the earliest deadline, else when one is."""
        best: tuple[float, float, Shape] | None = None
        wake_at: float | None = None
        for shape, queue in self._queues.items():
            self._purge(queue, now + self._cost(shape, 1))
            if not queue:
                continue
            head = queue[0]
            due = head.enqueued + self.max_wait
            if len(queue) >= self.max_batch or due <= now:
                key = (head.deadline, head.enqueued, shape)
                best = key if best is None or key < best else best
            elif wake_at is None or due < wake_at:
                wake_at = due
        return (best[2] if best else None), wake_at

    def _purge(self, queue: deque[_Request], cutoff: float) -> None:
        """Unqueue requests already ended, or due before ``cutoff``: even run alone right now
        they would finish too late, so nobody would use their result.

        Done-callbacks and expiry timers normally got to most of them first, but they run on a
        later loop iteration: a caller cancelled just now is still in the queue.
        """
        for request in [r for r in queue if r.future.done() or r.deadline < cutoff]:
            if request.future.done():
                self._unqueue(request)
            else:
                error = DeadlineExceeded("cannot finish by its deadline any more")
                self._fail(request, error, "expired")

    def _form(self, shape: Shape, now: float) -> list[_Request]:
        """The batch of ``shape`` to run now: as large as the deadlines allow.

        Later arrivals riding along with the oldest request cost little throughput, but each
        one makes the call longer for its own members and delays the other buckets' oldest
        requests, whose deadlines come first and whose place the admission estimate promised.
        So: the largest batch whose members all finish in time and that keeps every other
        bucket's first batch in time (one already beyond saving does not count); never fewer
        than the requests older than all other heads unless their own deadlines ask for it.
        """
        queue = self._queues[shape]
        candidates = list(itertools.islice(queue, self.max_batch))
        others = sorted(
            (q[0].deadline, s, min(len(q), self.max_batch))
            for s, q in self._queues.items()
            if q and s != shape
        )
        floor = len(candidates)
        savable: list[tuple[float, Shape, int]] = []
        if others:
            first_other = min(self._queues[s][0].enqueued for _, s, _ in others)
            floor = max(1, sum(r.enqueued <= first_other for r in candidates))
            mask = self._in_time(others, now + self._cost(shape, floor))
            savable = [other for other, ok in zip(others, mask, strict=True) if ok]
        due = list(itertools.accumulate((r.deadline for r in candidates), min))
        for n in range(len(candidates), 1, -1):
            finish = now + self._cost(shape, n)
            if due[n - 1] >= finish and (n <= floor or all(self._in_time(savable, finish))):
                return candidates[:n]
        return candidates[:1]  # _purge made sure the oldest alone is in time

    def _cost(self, shape: Shape, n: int) -> float:
        return self._active.batch_seconds(n, _units(shape))

    def _in_time(self, others: list[tuple[float, Shape, int]], start: float) -> list[bool]:
        """Whether each (deadline, shape, size) batch, run in this order from start, is in time.

        A late one is assumed dropped (see _purge): its cost does not push back the rest.
        """
        flags = []
        for when, shape, size in others:
            finish = start + self._cost(shape, size)
            flags.append(finish <= when)
            if finish <= when:
                start = finish
        return flags

    async def _run(self, call: _Call) -> None:
        loop = self._require_loop()
        batch = call.batch
        start = loop.time()
        unit = _units(batch[0].shape)
        images = [r.pixels for r in batch]
        try:
            # Foreground work is never charged; a batch is all background or none.
            with metered(self.budget if batch[0].background else None):
                heats, seconds = await loop.run_in_executor(
                    self._executor, _run_engine, self._infer_for(call), images
                )
        except Exception as exc:
            self._counts["errors"] += 1
            self.failing_calls += 1
            log.warning("engine call of %d images failed: %s", len(batch), exc)
            self._settle(batch, [_engine_error(exc) for _ in batch])
            return
        self.failing_calls = 0
        model = self.model if call.lane is None else self.lane_model
        model.observe(len(batch), len(batch) * unit, seconds)
        self._record(batch, start, loop.time(), seconds, lane=call.lane is not None)
        self._settle(batch, heats)

    def _settle(self, batch: Sequence[_Request], outcomes: Sequence[ImageHeat | Exception]) -> None:
        for request, outcome in zip(batch, outcomes, strict=True):
            self._unqueue(request)
            if request.future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    def _record(
        self, batch: Sequence[_Request], start: float, end: float, seconds: float, *, lane: bool
    ) -> None:
        n = len(batch)
        self._counts["batches"] += 1
        self._counts["lane_calls"] += lane
        self._counts["images"] += n
        self._counts["background"] += sum(r.background for r in batch)
        self._batch_sizes[n] = self._batch_sizes.get(n, 0) + 1
        m = self.metrics
        if m is None:
            return
        m.batch_size.observe(n)
        m.batch_seconds.observe(seconds)
        m.nn_runs.inc(n)
        m.engine_calls.inc(on="lane" if lane else "engine")
        for request in batch:
            if not request.background:
                m.stage_seconds.observe(start - request.enqueued, stage="queue")
                m.stage_seconds.observe(end - start, stage="infer")
