"""The CPU budget at work: the batcher's background CNN runs and the cold policy's background
reads and decodes stop while it is overdrawn and go on as it refills; foreground work never
waits for it. The clock of each budget is a test's: stopped, an overdrawn budget stays so."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from sidecar.app import make_app
from sidecar.batcher import Batcher, ImageHeat
from sidecar.cpu_budget import CpuBudget
from sidecar.metrics import Metrics
from sidecar.routes import SERVICES
from sidecar.settings import EngineSettings, ServerSettings, Settings, SourceSettings
from tests.support.clocks import PausableClock
from tests.support.images import jpeg
from tests.support.scripted_engine import GUARD, SQUARE, ScriptedEngine
from tests.support.sidecar_metrics import scraped

CALL_CPU_S = 0.01  # what the scripted meter charges per engine call
DECODE_CPU_S = 0.01  # and per decode
DEBT_S = 0.05


def image(marker: int) -> np.ndarray:
    px = np.full((*SQUARE, 3), 7, dtype=np.uint8)
    px[0, 0, 0] = marker
    return px


async def until(condition: Callable[[], bool]) -> None:
    end = time.monotonic() + GUARD
    while not condition():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.001)


async def test_background_cnn_runs_stop_when_the_budget_is_spent_and_resume_as_it_refills():
    engine = ScriptedEngine()
    clock = PausableClock()
    metrics = Metrics()
    # Each engine call costs CALL_CPU_S by this meter; share 1 with no burst: after one call
    # the budget owes CALL_CPU_S and the batcher looks again every CALL_CPU_S of real time.
    budget = CpuBudget(
        1.0, burst_s=0.0, clock=clock, cpu=lambda: CALL_CPU_S * len(engine.calls), metrics=metrics
    )
    batcher = Batcher(
        engine, max_batch=8, max_wait_ms=0, max_queue=64, metrics=metrics, budget=budget
    )
    await batcher.start()
    done: list[int] = []
    try:
        for m in (60, 61, 62):
            assert batcher.submit_background(
                image(m), lambda heat: done.append(int(heat.food_mass * 255))
            )
        await until(lambda: done == [60])
        await until(lambda: metrics.background_held.value(stage="cnn") == 1)
        for _ in range(20):  # held however long: the clock stands still
            await asyncio.sleep(0.005)
        assert engine.batches == [[60]]
        # Foreground work does not wait for the budget, and is not charged to it.
        heat: ImageHeat = await asyncio.wait_for(
            batcher.infer(image(1), asyncio.get_running_loop().time() + 3600), GUARD
        )
        assert heat.food_mass == pytest.approx(1 / 255)
        assert engine.batches == [[60], [1]]
        assert budget.spent == pytest.approx(CALL_CPU_S)
        clock.advance(CALL_CPU_S)  # repaid: one more background call, then held again
        await until(lambda: done == [60, 61])
        await until(lambda: metrics.background_held.value(stage="cnn") == 2)
        assert engine.batches == [[60], [1], [61]]
        clock.resume()  # the budget refills as time goes by: the rest runs
        await until(lambda: done == [60, 61, 62])
    finally:
        await batcher.close()
    assert metrics.background_cpu.value() == pytest.approx(3 * CALL_CPU_S)


# -- the cold policy's background reads and decodes, in the real app -------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    for name in ("one", "two"):
        (root / f"{name}.jpg").write_bytes(jpeg(skdata.coffee()))
    return root


@pytest.fixture
async def client(aiohttp_client, model_dir: Path, photos: Path):
    settings = Settings(
        server=ServerSettings(deadline_ms=10_000, cold_policy="legacy"),
        source=dataclasses.replace(SourceSettings(), root=str(photos)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
    )
    return await aiohttp_client(make_app(settings))


async def _poll(condition, polls: int = 2000) -> None:
    for _ in range(polls):
        if await condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def test_cold_heatmaps_wait_for_the_budget_and_are_made_once_it_refills(client):
    svc = client.app[SERVICES]
    clock = PausableClock()

    def meter() -> float:  # DECODE_CPU_S per decode: the charge tells what was metered
        return DECODE_CPU_S * svc.metrics.stage_seconds.count(stage="decode")

    budget = CpuBudget(0.25, clock=clock, cpu=meter, metrics=svc.metrics)
    svc.batcher.budget = budget  # in place of the app's own: a clock and a meter the test holds
    # Overdrawn: 0.2 s of refill, which never comes while the clock stands still (the worker
    # looks again every 0.2 s of real time).
    budget.charge(DEBT_S)
    resp = await client.get("/crop/400x300/one.jpg")
    assert resp.status == 200
    assert resp.headers["X-Heatcrop-Path"] == "cold"  # the answer does not wait for the budget

    async def held() -> bool:
        return await scraped(client, "heatcrop_background_held_total", stage="decode") == 1

    await _poll(held)
    for _ in range(20):
        await asyncio.sleep(0.005)
    # Held before its read: nothing decoded, no CNN run, the path still queued.
    assert "one.jpg" in svc.cold
    assert await scraped(client, "heatcrop_stage_seconds_count", stage="decode") == 0
    assert await scraped(client, "heatcrop_nn_runs_total") == 0
    assert budget.spent == pytest.approx(DEBT_S)
    clock.resume()
    clock.advance(DEBT_S / 0.25)  # repaid; from now on it refills with time

    async def computed() -> bool:
        return await scraped(client, "heatcrop_cold_heatmaps_total", result="computed") == 1

    await _poll(computed)
    assert await scraped(client, "heatcrop_nn_runs_total") == 1
    # The decode was charged (the CNN run too, by the batcher, though this meter sees no CPU in
    # it); the metric says what the budget was charged.
    assert budget.spent == pytest.approx(DEBT_S + DECODE_CPU_S)
    charged = await scraped(client, "heatcrop_background_cpu_seconds_total")
    assert charged == pytest.approx(DEBT_S + DECODE_CPU_S)
    resp = await client.get("/crop/400x300/one.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
