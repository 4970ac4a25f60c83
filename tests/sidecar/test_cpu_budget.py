"""sidecar.cpu_budget: the background's token bucket of CPU seconds, its meter, its metrics,
and the setting that sizes it. Clocks are injected: nothing here depends on how fast it runs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sidecar import settings as s
from sidecar.cpu_budget import CpuBudget, metered, offloop_cpu
from sidecar.metrics import Metrics
from tests.support.clocks import PausableClock


class Meter:
    """A CPU meter the test moves by hand."""

    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


def test_a_new_budget_is_full_and_refills_at_its_share_up_to_its_capacity() -> None:
    clock = PausableClock()
    budget = CpuBudget(0.25, burst_s=0.4, clock=clock)
    assert budget.capacity == pytest.approx(0.1)
    assert budget.balance() == pytest.approx(0.1)
    budget.charge(0.3)  # one piece may overdraw
    assert budget.balance() == pytest.approx(-0.2)
    assert not budget.ready()
    assert budget.delay() == pytest.approx(0.8)  # 0.2 CPU s at 0.25 CPU s per second
    clock.advance(0.4)
    assert budget.balance() == pytest.approx(-0.1)
    assert not budget.ready()
    clock.advance(0.4)
    assert budget.ready()
    assert budget.delay() == 0.0
    clock.advance(100.0)
    assert budget.balance() == pytest.approx(0.1)  # an idle spell buys no burst beyond it
    assert budget.spent == pytest.approx(0.3)


def test_charges_never_refund_and_bad_parameters_are_refused() -> None:
    budget = CpuBudget(0.5, clock=PausableClock())
    full = budget.balance()
    budget.charge(-1.0)
    assert budget.balance() == full
    for share in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="share"):
            CpuBudget(share)


def test_metered_charges_the_meter_s_difference_even_when_the_work_fails() -> None:
    meter = Meter()
    metrics = Metrics()
    budget = CpuBudget(1.0, burst_s=0.0, clock=PausableClock(), cpu=meter, metrics=metrics)
    meter.value = 5.0  # only the span counts, not what was used before
    with budget.metered():
        meter.value += 0.03
    with pytest.raises(RuntimeError), budget.metered():
        meter.value += 0.02
        raise RuntimeError("decode failed")
    assert budget.spent == pytest.approx(0.05)
    assert budget.balance() == pytest.approx(-0.05)
    assert metrics.background_cpu.value() == pytest.approx(0.05)
    with metered(None):  # no budget: nothing to charge, nothing fails
        meter.value += 1.0
    assert budget.spent == pytest.approx(0.05)


async def test_wait_holds_until_the_refill_and_counts_one_hold() -> None:
    clock = PausableClock()
    metrics = Metrics()
    # A small debt: wait() re-checks every 10 ms of real time while the clock stands still.
    budget = CpuBudget(1.0, burst_s=0.0, clock=clock, metrics=metrics)
    await budget.wait("decode")  # not overdrawn: no hold
    assert metrics.background_held.value(stage="decode") == 0
    budget.charge(0.01)
    waiting = asyncio.create_task(budget.wait("decode"))
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert not waiting.done()  # the clock is stopped: the debt is never repaid
    assert metrics.background_held.value(stage="decode") == 1
    clock.advance(0.01)
    await asyncio.wait_for(waiting, 10.0)
    assert metrics.background_held.value(stage="decode") == 1
    assert metrics.background_held.value(stage="cnn") == 0


def _spin(cpu_s: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < cpu_s:
        pass


def test_offloop_cpu_sees_other_threads_and_not_the_calling_one() -> None:
    before = offloop_cpu()
    worker = threading.Thread(target=_spin, args=(0.05,))
    worker.start()
    worker.join()
    assert offloop_cpu() - before >= 0.045  # clock granularity aside, all of it
    before = offloop_cpu()
    _spin(0.05)
    assert offloop_cpu() - before < 0.025  # the loop's own work is not the background's


def test_the_share_setting_defaults_loads_and_is_validated() -> None:
    assert s.load(environ={}).server.background_cpu_share == 0.25
    var = "HEATCROP_SERVER_BACKGROUND_CPU_SHARE"
    assert s.load(environ={var: "1.5"}).server.background_cpu_share == 1.5
    for bad in ("0", "-0.5", "nan", "inf", "65", "a lot"):
        with pytest.raises(s.SettingsError, match=var):
            s.load(environ={var: bad})
