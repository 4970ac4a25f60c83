"""sidecar.batcher on an engine with lanes: calls side by side while the engine is busy.

The main cases run on the real OrtEngine (two single-thread sessions beside its 2-thread one),
wrapped to record which session each call took and to prove that two calls were inside the
engine at the same time (threading events, no wall-clock asserts). Estimates use a scripted
engine whose calls block on a gate.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.base import HeatmapBatch, LaneEngine
from engines.model import find_model
from engines.ort import OrtEngine
from sidecar.batcher import LANE_HOLD_S
from sidecar.metrics import Metrics
from tests.sidecar.test_batcher import (
    RecordingEngine,
    assert_marker,
    deadline,
    image,
    noise,
    running,
    until,
)
from tests.support.scripted_engine import GUARD, SQUARE, ScriptedEngine


@pytest.fixture(scope="module")
def ort2(model_dir: Path) -> Iterator[OrtEngine]:
    engine = OrtEngine(find_model(model_dir), threads=2, shapes=[SQUARE])
    yield engine
    engine.close()


class Overlap(RecordingEngine):
    """``inner`` with every call recorded as ("whole" | lane); ``meet`` lane calls wait (up to
    GUARD) until that many are inside at once, so a test can tell side by side from in turn."""

    def __init__(self, inner: OrtEngine, meet: int = 1) -> None:
        super().__init__(inner)
        self.lane_inner = inner
        self.calls: list[str | int] = []
        self.meet = meet
        self.inside = 0
        self.most_inside = 0
        self._cond = threading.Condition()

    @property
    def lanes(self) -> int:
        return self.lane_inner.lanes

    def infer(self, batch: np.ndarray) -> HeatmapBatch:
        with self._cond:
            self.calls.append("whole")
        return super().infer(batch)

    def infer_lane(self, batch: np.ndarray, lane: int) -> HeatmapBatch:
        with self._cond:
            self.calls.append(lane)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.most_inside >= self.meet, GUARD)
        try:
            return self.lane_inner.infer_lane(batch, lane)
        finally:
            with self._cond:
                self.inside -= 1


def test_ort_engine_offers_one_lane_per_thread(ort2: OrtEngine, model_dir: Path) -> None:
    assert isinstance(ort2, LaneEngine) and ort2.lanes == 2
    one = OrtEngine(find_model(model_dir), threads=1, shapes=[SQUARE])
    try:
        assert one.lanes == 1
    finally:
        one.close()
    with pytest.raises(ValueError, match="lane 2"):
        ort2.infer_lane(noise(0, SQUARE)[None], 2)


def test_lanes_give_the_bits_of_the_shared_session(ort2: OrtEngine) -> None:
    """Side by side on two threads, each lane's heatmaps are the 2-thread session's, bit for
    bit: a cached heatmap must not depend on which session made it."""
    images = [noise(seed, SQUARE)[None] for seed in (1, 2)]
    expected = [ort2.infer(px) for px in images]
    out: dict[int, HeatmapBatch] = {}
    start = threading.Barrier(2)

    def run(lane: int) -> None:
        start.wait(GUARD)
        out[lane] = ort2.infer_lane(images[lane], lane)

    threads = [threading.Thread(target=run, args=(lane,)) for lane in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    for lane in (0, 1):
        for field in ("heatmaps", "food_mass", "logits"):
            assert np.array_equal(getattr(out[lane], field), getattr(expected[lane], field))


async def test_two_ready_requests_run_side_by_side_on_two_lanes(ort2: OrtEngine) -> None:
    engine = Overlap(ort2, meet=2)
    images = [noise(seed, SQUARE) for seed in (3, 4)]
    async with running(engine, max_batch=8, max_wait_ms=0) as b:
        heats = await asyncio.wait_for(
            asyncio.gather(*(b.infer(px, deadline()) for px in images)), GUARD
        )
    assert sorted(engine.calls) == [0, 1]  # two calls of one image, not one of two
    assert engine.most_inside == 2  # both inside the engine at once
    for px, heat in zip(images, heats, strict=True):
        assert np.array_equal(heat.heatmaps, ort2.infer(px[None]).heatmaps[0])


async def test_a_request_arriving_while_a_call_runs_starts_on_the_free_lane(
    ort2: OrtEngine,
) -> None:
    """The staggered arrivals of saturation: the second request does not wait for the first
    call (the first call waits, up to GUARD, until the second is inside too)."""
    engine = Overlap(ort2, meet=2)
    async with running(engine, max_batch=8, max_wait_ms=0) as b:
        b._busy_at = asyncio.get_running_loop().time()  # the engine has been busy just now
        first = asyncio.create_task(b.infer(noise(5, SQUARE), deadline()))
        await until(lambda: engine.inside == 1)
        second = asyncio.create_task(b.infer(noise(6, SQUARE), deadline()))
        await asyncio.wait_for(asyncio.gather(first, second), GUARD)
    assert engine.calls == [0, 1] and engine.most_inside == 2


async def test_a_lone_request_on_an_idle_engine_gets_the_whole_engine(ort2: OrtEngine) -> None:
    engine = Overlap(ort2)
    async with running(engine, max_batch=8, max_wait_ms=0) as b:
        for seed in (7, 8):  # one after the other: the engine never busy
            await asyncio.wait_for(b.infer(noise(seed, SQUARE), deadline()), GUARD)
    assert engine.calls == ["whole", "whole"]
    assert b.lane_model.calls == 0 and b.model.calls == 2


async def test_metrics_count_lane_and_whole_engine_calls(ort2: OrtEngine) -> None:
    """An operator reads from /metrics how often the lanes ran: a lone request is one
    whole-engine call, two ready at once are two lane calls."""
    engine, metrics = Overlap(ort2, meet=2), Metrics()
    async with running(engine, max_batch=8, max_wait_ms=0, metrics=metrics) as b:
        await asyncio.wait_for(b.infer(noise(11, SQUARE), deadline()), GUARD)
        await asyncio.wait_for(
            asyncio.gather(*(b.infer(noise(s, SQUARE), deadline()) for s in (12, 13))), GUARD
        )
    assert engine.calls[0] == "whole" and sorted(engine.calls[1:]) == [0, 1]
    assert metrics.engine_calls.value(on="engine") == 1
    assert metrics.engine_calls.value(on="lane") == 2
    assert b.stats.batches == 3 and b.stats.lane_calls == 2


async def test_lanes_off_is_one_call_at_a_time(ort2: OrtEngine) -> None:
    engine = Overlap(ort2)
    async with running(engine, max_batch=8, max_wait_ms=5, lanes=False) as b:
        assert b.lanes == 1
        await asyncio.wait_for(
            asyncio.gather(*(b.infer(noise(s, SQUARE), deadline()) for s in (9, 10))), GUARD
        )
    assert engine.calls == ["whole"]  # the two as one batch of the shared session


# Seconds an engine call is expected to take: long enough that no delay of a loaded machine
# between a call's start and a test's look at the estimates matters.
PRIOR = 5.0


class ScriptedLanes(ScriptedEngine):
    """A scripted engine with two lanes; lane calls are recorded like ``infer``'s."""

    lanes = 2

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.lane_of: list[int | None] = []

    def infer(self, batch: np.ndarray) -> HeatmapBatch:
        self.lane_of.append(None)
        return super().infer(batch)

    def infer_lane(self, batch: np.ndarray, lane: int) -> HeatmapBatch:
        self.lane_of.append(lane)
        return super().infer(batch)


async def test_estimates_on_an_idle_engine_and_beside_a_whole_engine_call() -> None:
    engine = ScriptedLanes(gated=True)
    async with running(engine, max_batch=8, max_wait_ms=0, service_prior_s=PRIOR) as b:
        # Idle, never busy: the whole engine's estimate.
        assert b.estimated_finish(SQUARE) == pytest.approx(PRIOR)
        a = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        # The whole engine runs (started idle): nothing starts beside it, a new request waits
        # for its end, then runs on a lane (the engine was found busy).
        assert engine.lane_of == [None]
        assert PRIOR < b.estimated_finish(SQUARE) <= 2 * PRIOR
        second = asyncio.create_task(b.infer(image(2), deadline()))
        await until(lambda: b.depth == 1)
        await asyncio.sleep(0.02)
        assert len(engine.calls) == 1
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(a, second), GUARD)
    assert engine.lane_of == [None, 0]
    assert b.lane_model.calls == 1 and b.model.calls == 1


async def test_estimates_lay_queued_work_on_the_lanes() -> None:
    engine = ScriptedLanes(gated=True)
    async with running(engine, max_batch=8, max_wait_ms=0, service_prior_s=PRIOR) as b:
        calls = [asyncio.create_task(b.infer(image(m), deadline())) for m in (3, 4)]
        await until(lambda: len(engine.calls) == 2)
        assert sorted(engine.lane_of) == [0, 1]  # two ready: one lane each
        # Both lanes busy for PRIOR s: a new image starts when the first of them ends.
        assert PRIOR < b.estimated_finish(SQUARE) <= 2 * PRIOR
        queued = asyncio.create_task(b.infer(image(5), deadline()))
        await until(lambda: b.depth == 1)
        # The queued image takes the first lane to free up, the new one the second: both end
        # PRIOR after the running calls, not 2 PRIOR after as in one line.
        assert PRIOR < b.estimated_finish(SQUARE) <= 2 * PRIOR
        assert PRIOR < b.estimated_wait() <= 2 * PRIOR
        engine.gate.set()
        for m, task in zip((3, 4, 5), [*calls, queued], strict=True):
            assert_marker(await asyncio.wait_for(task, GUARD), m)
    assert b.lane_model.calls == 3 and b.model.calls == 0


async def test_the_whole_engine_again_once_the_load_is_gone() -> None:
    engine = ScriptedLanes()
    async with running(engine, max_batch=8, max_wait_ms=0) as b:
        await asyncio.wait_for(
            asyncio.gather(*(b.infer(image(m), deadline()) for m in (1, 2))), GUARD
        )
        assert sorted(engine.lane_of) == [0, 1]
        b._busy_at -= LANE_HOLD_S  # as if the last contention were LANE_HOLD_S ago
        assert_marker(await asyncio.wait_for(b.infer(image(3), deadline()), GUARD), 3)
    assert engine.lane_of[-1] is None


async def test_background_waits_for_running_calls_and_leaves_a_lane_free() -> None:
    engine = ScriptedLanes(gated=True)
    done: list[int] = []
    async with running(engine, max_batch=8, max_wait_ms=0, max_background=4) as b:
        b._busy_at = asyncio.get_running_loop().time()
        fg = asyncio.create_task(b.infer(image(1), deadline()))
        await until(lambda: len(engine.calls) == 1)
        assert b.submit_background(image(60), lambda heat: done.append(60))
        await asyncio.sleep(0.05)
        assert len(engine.calls) == 1  # no background beside a foreground call
        engine.gate.set()
        await asyncio.wait_for(fg, GUARD)
        await until(lambda: done == [60])
        engine.gate.clear()
        b._busy_at = asyncio.get_running_loop().time()
        assert b.submit_background(image(61), lambda heat: done.append(61))
        await until(lambda: len(engine.calls) == 3)  # background 61 on a lane, blocked
        fg2 = asyncio.create_task(b.infer(image(2), deadline()))
        await until(lambda: len(engine.calls) == 4)  # the foreground beside it, not after
        engine.gate.set()
        assert_marker(await asyncio.wait_for(fg2, GUARD), 2)
        await until(lambda: done == [60, 61])
    assert engine.lane_of[2] != engine.lane_of[3]
    assert None not in engine.lane_of[2:]
