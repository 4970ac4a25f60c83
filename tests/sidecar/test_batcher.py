"""sidecar.batcher: batching per bucket, admission, deadlines, isolation, shutdown, background.

The main paths run on the real OrtEngine; timing-controlled cases use ScriptedEngine, a small
Engine implementation whose calls block on a gate, sleep or raise on demand, and whose
heatmaps carry each image's marker pixel so results can be traced back to their request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from engines import buckets
from engines.base import PROFILES, Engine, HeatmapBatch
from sidecar.batcher import Batcher, ImageHeat, ServiceModel
from sidecar.errors import DeadlineExceeded, EngineError, Overloaded
from sidecar.metrics import Metrics
from tests.support.scripted_engine import GUARD, SQUARE, TALL, WIDE, ScriptedEngine

FAR = 3600.0  # a deadline that never matters, in seconds from now


class RecordingEngine:
    """The real engine, with the batches it was given recorded."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.inputs: list[np.ndarray] = []

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def input_shapes(self) -> tuple[tuple[int, int], ...]:
        return self.inner.input_shapes

    def warm_up(self) -> None:
        self.inner.warm_up()

    def infer(self, batch: np.ndarray) -> HeatmapBatch:
        self.inputs.append(batch.copy())
        return self.inner.infer(batch)

    def close(self) -> None:
        pass


def image(marker: int, shape: tuple[int, int] = SQUARE) -> np.ndarray:
    px = np.full((*shape, 3), 7, dtype=np.uint8)
    px[0, 0, 0] = marker
    return px


def noise(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def deadline(seconds: float = FAR) -> float:
    return asyncio.get_running_loop().time() + seconds


async def until(condition: Callable[[], bool]) -> None:
    end = time.monotonic() + GUARD
    while not condition():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def running(engine: Engine, **options: object) -> AsyncIterator[Batcher]:
    settings: dict = {"max_batch": 8, "max_wait_ms": 2.0, "max_queue": 64} | options
    batcher = Batcher(engine, **settings)
    await batcher.start()
    try:
        yield batcher
    finally:
        if isinstance(engine, ScriptedEngine):
            engine.gate.set()
        await batcher.close()


def assert_marker(heat: ImageHeat, marker: int) -> None:
    assert isinstance(heat, ImageHeat)
    assert (heat.heatmaps == marker).all()
    assert heat.food_mass == pytest.approx(marker / 255)


# -- batching --------------------------------------------------------------------------------


async def test_concurrent_requests_share_engine_calls():
    engine = ScriptedEngine()
    metrics = Metrics()
    # max_wait is huge: only filling a batch can dispatch it.
    async with running(engine, max_batch=4, max_wait_ms=60_000, metrics=metrics) as b:
        heats = await asyncio.wait_for(
            asyncio.gather(*(b.infer(image(i), deadline()) for i in range(8))), GUARD
        )
        for i, heat in enumerate(heats):
            assert_marker(heat, i)
        assert engine.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
        stats = b.stats
        assert stats.batches == 2 and stats.images == 8 and stats.batch_sizes == {4: 2}
    assert metrics.batch_size.count() == 2 and metrics.batch_size.sum() == 8
    assert metrics.nn_runs.value() == 8
    assert metrics.stage_seconds.count(stage="queue") == 8
    assert metrics.stage_seconds.count(stage="infer") == 8


async def test_mixed_buckets_never_share_a_batch():
    engine = ScriptedEngine()
    shapes = [SQUARE, WIDE, TALL]
    async with running(engine, max_batch=8, max_wait_ms=5) as b:
        jobs = [b.infer(image(i, shapes[i % 3]), deadline()) for i in range(12)]
        heats = await asyncio.wait_for(asyncio.gather(*jobs), GUARD)
    for i, heat in enumerate(heats):
        assert_marker(heat, i)
        assert heat.heatmaps.shape == (len(PROFILES), *buckets.heatmap_shape(shapes[i % 3]))
    assert len(engine.calls) == 3
    for shape, markers in engine.calls:
        assert {shapes[m % 3] for m in markers} == {shape}
        assert len(markers) == 4


async def test_a_partial_batch_leaves_after_max_wait():
    engine = ScriptedEngine()
    metrics = Metrics()
    async with running(engine, max_batch=8, max_wait_ms=30, metrics=metrics) as b:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert_marker(await asyncio.wait_for(b.infer(image(5), deadline()), GUARD), 5)
        waited = loop.time() - start
    assert engine.batches == [[5]]  # dispatched without reaching max_batch
    # Lower bounds only: an incomplete batch must have held for max_wait to gather company.
    assert waited >= 0.03 - 0.002
    assert metrics.stage_seconds.sum(stage="queue") >= 0.03 - 0.002


async def test_a_batch_leaves_as_soon_as_it_is_full():
    engine = ScriptedEngine()
    async with running(engine, max_batch=4, max_wait_ms=60_000) as b:
        first = asyncio.create_task(b.infer(image(0), deadline()))
        await until(lambda: b.depth == 1)
        await asyncio.sleep(0.01)  # the worker is now asleep until the first one's max_wait
        assert not first.done() and engine.calls == []
        rest = [b.infer(image(i), deadline()) for i in (1, 2, 3)]
        await asyncio.wait_for(asyncio.gather(first, *rest), GUARD)
    assert engine.batches == [[0, 1, 2, 3]]


async def test_real_engine_batches_and_matches_single_inference(session_engine):
    engine = RecordingEngine(session_engine)
    images = [noise(i, SQUARE) for i in range(6)] + [noise(10 + i, (224, 320)) for i in range(3)]
    async with running(engine, max_batch=4, max_wait_ms=20) as b:
        heats = await asyncio.wait_for(
            asyncio.gather(*(b.infer(px, deadline()) for px in images)), GUARD * 3
        )
        assert sum(b.stats.batch_sizes.values()) == 3
    assert sorted(len(x) for x in engine.inputs) == [2, 3, 4]
    assert all(len({x.shape for x in batch}) == 1 for batch in engine.inputs)
    for px, heat in zip(images, heats, strict=True):
        single = session_engine.infer(px[None])
        assert heat.heatmaps.dtype == np.float32 and heat.heatmaps.flags.owndata
        # ONNX Runtime takes another kernel path at batch 1: equal to float32 rounding only.
        np.testing.assert_allclose(heat.heatmaps, single.heatmaps[0], rtol=1e-5, atol=1e-6)
        assert heat.food_mass == pytest.approx(float(single.food_mass[0]), rel=1e-5, abs=1e-7)
    # Against the very batches it ran, the results are bit-identical (no mix-up, no loss).
    by_input = {px.tobytes(): heat for px, heat in zip(images, heats, strict=True)}
    for batch in engine.inputs:
        again = session_engine.infer(batch)
        for i, px in enumerate(batch):
            heat = by_input[px.tobytes()]
            assert np.array_equal(heat.heatmaps, again.heatmaps[i])
            assert heat.food_mass == float(again.food_mass[i])
    # Different images really give different heatmaps, so the mapping check means something.
    assert not np.allclose(heats[0].heatmaps, heats[1].heatmaps)


# -- admission, queue bound, deadlines ----------------------------------------------------


async def test_admission_gives_up_at_once_when_the_wait_exceeds_the_deadline():
    engine = ScriptedEngine(gated=True)
    metrics = Metrics()
    # Until a call is measured the prior stands: 50 ms per 224x224 image.
    options = {"max_wait_ms": 0, "service_prior_s": 0.05, "metrics": metrics}
    async with running(engine, **options) as b:
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)  # running, blocked on the gate
        queued = [asyncio.create_task(b.infer(image(m), deadline())) for m in (2, 3)]
        await until(lambda: b.depth == 2)
        assert b.estimated_wait() >= 2 * 0.05  # two queued images, whatever is left of a
        # Raised on the very first step of the coroutine: nothing was awaited.
        late = b.infer(image(4), deadline(0.12))
        with pytest.raises(Overloaded, match="expected in"):
            late.send(None)
        tight = b.infer(image(5), deadline(0.02))  # not even its own 50 ms fit
        with pytest.raises(Overloaded):
            tight.send(None)
        ok = asyncio.create_task(b.infer(image(6), deadline()))
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(a, *queued, ok), GUARD)
    assert sorted(m for batch in engine.batches for m in batch) == [1, 2, 3, 6]
    assert b.stats.refused_admission == 2
    assert metrics.giveups.value(reason="admission") == 2


async def test_service_time_is_learnt_from_measured_calls():
    engine = ScriptedEngine(delay=0.03)
    async with running(engine, max_wait_ms=0, service_prior_s=0.001) as b:
        for i in range(3):
            await asyncio.wait_for(b.infer(image(i), deadline()), GUARD)
        stats = b.stats
        # Lower bounds: every call slept 30 ms, so the estimates cannot be below that.
        assert stats.seconds_per_image >= 0.03 and stats.seconds_per_batch >= 0.03
        assert b.estimated_finish(SQUARE) >= 0.03
        # A 224x448 image is estimated at twice the pixels, twice the time.
        ratio = b.model.batch_seconds(1, 2.0) / b.model.batch_seconds(1, 1.0)
        assert ratio == pytest.approx(2.0)


def test_service_model_per_batch_size():
    model = ServiceModel(max_batch=8, prior_s=0.01, alpha=0.5)
    assert model.batch_seconds(4, 1.0) == pytest.approx(0.04)  # prior
    model.observe(1, 1.0, 0.006)
    model.observe(8, 8.0, 0.040)
    assert model.per_unit(1) == pytest.approx(0.006)
    assert model.per_unit(8) == pytest.approx(0.005)
    assert model.per_unit(2) == pytest.approx(0.006)  # nearest observed size
    assert model.per_unit(6) == pytest.approx(0.005)
    model.observe(1, 1.0, 0.010)  # EWMA with alpha 0.5
    assert model.per_unit(1) == pytest.approx(0.008)
    # 20 images in batches of 8: 8 + 8 + 4 (size 4 borrows size 1's rate: nearer than 8).
    expected = 2 * 8 * 0.005 + 4 * 0.008
    assert model.queue_seconds(20, 1.0, 8) == pytest.approx(expected)
    assert model.queue_seconds(0, 1.0, 8) == 0.0


async def test_queue_bound_refuses_at_once():
    engine = ScriptedEngine(gated=True)
    async with running(engine, max_queue=3, max_wait_ms=0, service_prior_s=0.0) as b:
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        queued = [asyncio.create_task(b.infer(image(m), deadline())) for m in (2, 3, 4)]
        await until(lambda: b.depth == 3)
        full = b.infer(image(5), deadline())
        with pytest.raises(Overloaded, match="queue full"):
            full.send(None)
        assert b.depth == 3 and b.stats.refused_queue_full == 1
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(a, *queued), GUARD)
    assert 5 not in [m for batch in engine.batches for m in batch]


async def test_expired_and_cancelled_requests_are_dropped_before_inference():
    engine = ScriptedEngine(gated=True)
    metrics = Metrics()
    options = {"max_wait_ms": 0, "service_prior_s": 0.0, "metrics": metrics}
    async with running(engine, **options) as b:
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        soon = asyncio.create_task(b.infer(image(2), deadline(0.05)))
        abandoned = asyncio.create_task(b.infer(image(3), deadline()))
        await until(lambda: b.depth == 2)
        # Failed at its deadline although the engine is still busy with a.
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(soon, GUARD)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert len(engine.calls) == 1 and not a.done()
        await until(lambda: b.depth == 0)
        engine.gate.set()
        assert_marker(await asyncio.wait_for(a, GUARD), 1)
        assert_marker(await asyncio.wait_for(b.infer(image(4), deadline()), GUARD), 4)
    assert engine.batches == [[1], [4]]  # 2 and 3 were computed for nobody: never
    assert b.stats.expired == 1
    assert metrics.giveups.value(reason="expired") == 1


async def test_an_engine_exception_fails_only_its_batch():
    engine = ScriptedEngine(fail_marker=13)
    async with running(engine, max_batch=2, max_wait_ms=60_000) as b:
        results = await asyncio.wait_for(
            asyncio.gather(
                b.infer(image(13), deadline()),
                b.infer(image(1), deadline()),
                b.infer(image(2, WIDE), deadline()),
                b.infer(image(3, WIDE), deadline()),
                return_exceptions=True,
            ),
            GUARD,
        )
        assert all(isinstance(r, EngineError) for r in results[:2])
        assert "marker 13" in str(results[0])
        assert_marker(results[2], 2)
        assert_marker(results[3], 3)
        # The batcher keeps running.
        pair = [b.infer(image(m), deadline()) for m in (4, 5)]
        for m, heat in zip(
            (4, 5), await asyncio.wait_for(asyncio.gather(*pair), GUARD), strict=True
        ):
            assert_marker(heat, m)
        assert b.stats.engine_errors == 1


async def test_invalid_input_is_refused_before_it_can_fail_a_batch(session_engine):
    batcher = Batcher(session_engine, max_batch=4, max_wait_ms=1, max_queue=8)
    with pytest.raises(RuntimeError, match="before start"):
        await batcher.infer(noise(0, SQUARE), 0.0)
    async with running(session_engine) as b:
        for bad in (
            noise(0, SQUARE).astype(np.float32),
            noise(0, SQUARE)[None],
            noise(0, (224, 230)),
            [[0, 0, 0]],
        ):
            with pytest.raises(ValueError):
                await b.infer(bad, deadline())
        with pytest.raises(RuntimeError, match="twice"):
            await b.start()


# -- shutdown --------------------------------------------------------------------------------


async def test_close_fails_queued_work_and_lets_the_running_call_finish():
    engine = ScriptedEngine(gated=True)
    metrics = Metrics()
    b = Batcher(engine, max_batch=8, max_wait_ms=0, max_queue=8, metrics=metrics)
    await b.start()
    a = asyncio.create_task(b.infer(image(1), deadline()))
    await until(lambda: len(engine.calls) == 1)
    queued = [asyncio.create_task(b.infer(image(m), deadline())) for m in (2, 3)]
    await until(lambda: b.depth == 2)
    assert metrics.queue_depth.value() == 2
    closing = asyncio.create_task(b.close())
    for task in queued:
        with pytest.raises(Overloaded, match="closed"):
            await asyncio.wait_for(task, GUARD)
    with pytest.raises(Overloaded, match="closed"):
        await b.infer(image(4), deadline())
    assert b.submit_background(image(5), lambda heat: None) is False
    assert not closing.done()  # waits for the running call
    engine.gate.set()
    assert_marker(await asyncio.wait_for(a, GUARD), 1)
    await asyncio.wait_for(closing, GUARD)
    await b.close()  # idempotent
    assert engine.batches == [[1]]
    assert metrics.giveups.value(reason="shutdown") == 3
    assert metrics.queue_depth.value() == 0


async def test_close_gives_up_on_a_stuck_engine_call():
    engine = ScriptedEngine(gated=True)
    b = Batcher(engine, max_batch=8, max_wait_ms=0, max_queue=8)
    await b.start()
    a = asyncio.create_task(b.infer(image(1), deadline()))
    await until(lambda: len(engine.calls) == 1)
    await b.close(timeout=0.05)
    with pytest.raises(EngineError, match="outlived"):
        await asyncio.wait_for(a, GUARD)
    engine.gate.set()  # let the abandoned thread finish


# -- the event loop stays free -----------------------------------------------------------


class LoopProbe:
    """Wraps an engine: during each call, asks the event loop to run a callback and waits for
    it. Only a loop that is free while the engine computes can answer, so a call made on the
    loop thread (or one that holds it) times out at GUARD instead of passing by luck."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.answered: list[bool] = []
        self.threads: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def infer(self, batch):
        self.threads.append(threading.get_ident())
        pong = threading.Event()
        self.loop.call_soon_threadsafe(pong.set)
        self.answered.append(pong.wait(GUARD))
        return self.engine.infer(batch)


async def test_the_event_loop_runs_while_a_slow_engine_call_runs():
    probe = LoopProbe(ScriptedEngine(delay=0.05))
    async with running(probe, max_wait_ms=0) as b:
        await asyncio.wait_for(b.infer(image(1), deadline()), GUARD * 2)
    assert probe.answered == [True]
    assert probe.threads and probe.loop_thread not in probe.threads


async def test_the_event_loop_runs_while_the_real_engine_runs(session_engine):
    probe = LoopProbe(session_engine)
    images = [noise(i, (224, 448)) for i in range(16)]
    async with running(probe, max_batch=16, max_wait_ms=60_000) as b:
        await asyncio.gather(*(b.infer(px, deadline()) for px in images))
        assert b.stats.batch_sizes == {16: 1}
    assert probe.answered == [True]
    assert probe.loop_thread not in probe.threads


# -- background completion ---------------------------------------------------------------


async def test_background_result_reaches_its_callback(session_engine):
    metrics = Metrics()
    px = noise(3, WIDE)
    async with running(session_engine, metrics=metrics) as b:
        got: asyncio.Future[ImageHeat] = asyncio.get_running_loop().create_future()
        assert b.submit_background(px, got.set_result)
        heat = await asyncio.wait_for(got, GUARD * 3)
        assert b.stats.background_images == 1
    single = session_engine.infer(px[None])
    np.testing.assert_allclose(heat.heatmaps, single.heatmaps[0], rtol=1e-5, atol=1e-6)
    assert metrics.nn_runs.value() == 1
    assert metrics.stage_seconds.count(stage="queue") == 0  # not a request's stage


async def test_background_is_refused_when_busy_and_bounded():
    engine = ScriptedEngine(gated=True)
    async with running(engine, max_wait_ms=0, service_prior_s=0.0, max_background=2) as b:
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        queued = asyncio.create_task(b.infer(image(2), deadline()))
        await until(lambda: b.depth == 1)
        assert b.submit_background(image(50), lambda heat: None) is False  # foreground waits
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(a, queued), GUARD)
        engine.gate.clear()
        b3 = asyncio.create_task(b.infer(image(3), deadline()))
        await until(lambda: len(engine.calls) == 3)  # running; nothing queued: idle enough
        assert b.submit_background(image(51), lambda heat: None)
        assert b.submit_background(image(52), lambda heat: None)
        assert b.submit_background(image(53), lambda heat: None) is False  # bound reached
        assert b.background_depth == 2
        engine.gate.set()
        await asyncio.wait_for(b3, GUARD)
        await until(lambda: b.background_depth == 0 and len(engine.calls) == 5)
    assert engine.batches == [[1], [2], [3], [51], [52]]


async def test_background_never_starves_the_foreground():
    engine = ScriptedEngine(gated=True)
    done: list[int] = []
    options = {"max_wait_ms": 0, "service_prior_s": 0.01, "max_background": 4}
    async with running(engine, **options) as b:
        for m in (60, 61, 62):
            assert b.submit_background(
                image(m), lambda heat: done.append(int(heat.food_mass * 255))
            )
        await until(lambda: len(engine.calls) == 1)  # background 60 runs, blocked
        assert b.estimated_wait() > 0  # a running background call delays the next request
        fg = [asyncio.create_task(b.infer(image(m), deadline())) for m in (1, 2)]
        await until(lambda: b.depth == 2)
        engine.gate.set()
        for m, task in zip((1, 2), fg, strict=True):
            assert_marker(await asyncio.wait_for(task, GUARD), m)
        await until(lambda: len(done) == 3)
    # The foreground waited for the one running background call, no more.
    assert engine.batches == [[60], [1, 2], [61], [62]]
    assert sorted(done) == [60, 61, 62]
    assert b.stats.background_images == 3


async def test_a_failing_background_call_or_callback_does_not_hurt(caplog):
    engine = ScriptedEngine(fail_marker=70)

    def explode(heat: ImageHeat) -> None:
        raise RuntimeError("callback bug")

    async with running(engine) as b:
        assert b.submit_background(image(70), explode)
        await until(lambda: len(engine.calls) == 1 and b.background_depth == 0)
        assert b.submit_background(image(71), explode)
        await until(lambda: len(engine.calls) == 2 and b.background_depth == 0)
        assert_marker(await asyncio.wait_for(b.infer(image(72), deadline()), GUARD), 72)
    await asyncio.sleep(0)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "background inference failed" in messages
    assert "background result callback failed" in messages


def test_image_heat_is_frozen():
    heat = ImageHeat(heatmaps=np.zeros((2, 7, 7), np.float32), food_mass=0.5)
    with pytest.raises(AttributeError):
        heat.food_mass = 1.0  # type: ignore[misc]
    assert heat.food_mass == 0.5


async def test_background_waits_while_a_foreground_batch_gathers():
    engine = ScriptedEngine(gated=True)
    done: list[int] = []
    options = {"max_batch": 2, "max_wait_ms": 60_000, "service_prior_s": 0.0}
    async with running(engine, **options) as b:
        record = lambda heat: done.append(int(heat.food_mass * 255))  # noqa: E731
        assert b.submit_background(image(60), record)
        await until(lambda: len(engine.calls) == 1)
        assert b.submit_background(image(61), record)
        first = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: b.depth == 1)
        engine.gate.set()
        await until(lambda: done == [60])
        await asyncio.sleep(0.02)  # the engine is idle, 1 gathers company: 61 must not start
        assert engine.batches == [[60]]
        second = asyncio.create_task(b.infer(image(2), deadline()))
        await asyncio.wait_for(asyncio.gather(first, second), GUARD)
        await until(lambda: len(done) == 2)
    assert engine.batches == [[60], [1, 2], [61]]


async def test_a_caller_cancelled_during_its_call_does_not_hurt_the_batcher():
    engine = ScriptedEngine(gated=True)
    async with running(engine, max_wait_ms=0) as b:
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        a.cancel()  # the client went away while its image is in the engine
        with pytest.raises(asyncio.CancelledError):
            await a
        engine.gate.set()
        assert_marker(await asyncio.wait_for(b.infer(image(2), deadline()), GUARD), 2)
    assert engine.batches == [[1], [2]]


async def test_estimate_of_an_idle_batcher_is_own_call_plus_the_gathering_wait():
    engine = ScriptedEngine()
    async with running(engine, max_batch=4, max_wait_ms=30, service_prior_s=0.01) as b:
        assert b.estimated_wait() == 0
        assert b.estimated_finish(SQUARE) == pytest.approx(0.01 + 0.03)
        assert b.estimated_finish(WIDE) == pytest.approx(0.01 * 256 / 224 + 0.03)
        # No gathering wait for the image that fills a batch.
        tasks = [asyncio.create_task(b.infer(image(i), deadline())) for i in range(3)]
        await until(lambda: b.depth == 3)
        assert b.estimated_wait() == pytest.approx(3 * 0.01)
        assert b.estimated_finish(SQUARE) == pytest.approx(4 * 0.01)
        await asyncio.wait_for(asyncio.gather(*tasks, b.infer(image(3), deadline())), GUARD)


# -- scheduling by deadline ----------------------------------------------------------------


async def test_the_earliest_deadline_goes_first():
    engine = ScriptedEngine(gated=True)
    async with running(engine, max_batch=2, max_wait_ms=0, service_prior_s=0.001) as b:
        x = asyncio.create_task(b.infer(image(1, TALL), deadline()))
        await until(lambda: len(engine.calls) == 1)
        early = asyncio.create_task(b.infer(image(2), deadline(FAR)))
        urgent = asyncio.create_task(b.infer(image(3, WIDE), deadline(50)))  # queued later
        await until(lambda: b.depth == 2)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(x, early, urgent), GUARD)
    assert engine.batches == [[1], [3], [2]]


async def test_a_batch_takes_later_arrivals_only_while_other_buckets_stay_in_time():
    engine = ScriptedEngine()
    # 1 s per image as far as the batcher knows (nothing is measured before the first call).
    options = {"max_batch": 8, "max_wait_ms": 3000, "service_prior_s": 1.0, "headroom": 0.0}
    async with running(engine, **options) as b:
        first = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: b.depth == 1)
        # Admitted: 1 s queued + its own 1.14 s + 3 s of gathering fit in 8 s.
        other = asyncio.create_task(b.infer(image(100, WIDE), deadline(8.0)))
        await until(lambda: b.depth == 2)
        rest = [asyncio.create_task(b.infer(image(m), deadline())) for m in range(2, 9)]
        await until(lambda: len(engine.calls) == 1)  # the square bucket filled up
        # 6 squares (6 s) + the wide one (1.14 s) end before its 8 s deadline; 7 would not.
        assert engine.batches == [[1, 2, 3, 4, 5, 6]]
        await b.close()
        results = await asyncio.gather(first, other, *rest, return_exceptions=True)
    assert sum(isinstance(r, ImageHeat) for r in results) == 6
    assert all(isinstance(r, Overloaded) for r in results if not isinstance(r, ImageHeat))


async def test_a_batch_stays_small_enough_for_its_own_oldest_deadline():
    engine = ScriptedEngine()
    options = {"max_batch": 4, "max_wait_ms": 300, "service_prior_s": 1.0, "headroom": 0.0}
    async with running(engine, **options) as b:
        tight = asyncio.create_task(b.infer(image(1), deadline(2.0)))
        await until(lambda: b.depth == 1)
        rest = [asyncio.create_task(b.infer(image(m), deadline())) for m in (2, 3, 4)]
        # The bucket is full, but 4 images (4 s) would end after the first one's 2 s.
        await asyncio.wait_for(asyncio.gather(tight, *rest), GUARD)
    assert engine.batches == [[1], [2, 3, 4]]


async def test_a_request_that_cannot_finish_in_time_is_dropped_at_dispatch():
    engine = ScriptedEngine(gated=True)
    metrics = Metrics()
    options = {"max_wait_ms": 0, "service_prior_s": 0.001, "metrics": metrics}
    async with running(engine, **options) as b:
        x = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        doomed = asyncio.create_task(b.infer(image(2), deadline(0.5)))  # admitted: 1 ms each
        await until(lambda: b.depth == 1)
        b.model.observe(1, 1.0, 1.0)  # then the engine turns out to need a second per image
        engine.gate.set()
        with pytest.raises(DeadlineExceeded, match="cannot finish"):
            await asyncio.wait_for(doomed, GUARD)
        await x
    assert engine.batches == [[1]]
    assert metrics.giveups.value(reason="expired") == 1


async def test_worth_preparing_refuses_only_what_the_engine_could_not_use():
    engine = ScriptedEngine(gated=True)
    # 50 ms per 224x224 image until measured; the cheapest shape is SQUARE.
    async with running(engine, max_wait_ms=0, service_prior_s=0.05) as b:
        # An idle engine takes anything: what misses its deadline finishes in the background.
        assert b.worth_preparing(deadline(0.001), before_s=1.0)
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)  # running, blocked on the gate
        queued = [asyncio.create_task(b.infer(image(m), deadline())) for m in (2, 3)]
        await until(lambda: b.depth == 2)
        # Busy: the running call, two queued images and its own 50 ms, times the headroom.
        assert b.worth_preparing(deadline(FAR), before_s=0.01)
        assert not b.worth_preparing(deadline(0.12), before_s=0.0)
        # The time to get the image ready counts too.
        assert b.worth_preparing(deadline(0.5), before_s=0.0)
        assert not b.worth_preparing(deadline(0.5), before_s=0.4)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(a, *queued), GUARD)
    assert not b.worth_preparing(deadline(FAR))  # closed


async def test_a_queued_background_image_can_be_withdrawn_and_a_running_one_cannot():
    engine = ScriptedEngine(gated=True)
    failures: list[int] = []
    async with running(engine, max_wait_ms=0) as b:
        first, second = image(80), image(81)
        assert b.submit_background(first, lambda heat: None, lambda: failures.append(80))
        await until(lambda: len(engine.calls) == 1)  # the first one runs, blocked on the gate
        assert b.submit_background(second, lambda heat: None, lambda: failures.append(81))
        assert b.withdraw_background(second) is True  # still queued: taken back
        assert b.background_depth == 0
        await until(lambda: failures == [81])  # its owner hears it will not be computed
        assert b.withdraw_background(first) is False  # running: its result comes as submitted
        assert b.withdraw_background(image(82)) is None  # never queued
        engine.gate.set()
        await until(lambda: not b._running)
    assert engine.batches == [[80]]


async def test_a_failed_background_call_tells_its_owner():
    engine = ScriptedEngine(fail_marker=90)
    failed = asyncio.Event()
    async with running(engine, max_wait_ms=0) as b:
        assert b.submit_background(image(90), lambda heat: None, failed.set)
        await asyncio.wait_for(failed.wait(), GUARD)
