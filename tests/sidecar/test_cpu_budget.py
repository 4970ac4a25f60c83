"""sidecar.cpu_budget: the background's token bucket of CPU seconds, its meter, its metrics,
and the setting that sizes it. Clocks are injected: nothing here depends on how fast it runs."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from sidecar import settings as s
from sidecar.cpu_budget import (
    BUSY_TRICKLE,
    IDLE_RESERVE_CORES,
    IDLE_WINDOW_S,
    CpuBudget,
    MachineIdle,
    cpu_ticks,
    metered,
    offloop_cpu,
)
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


def test_a_busy_machine_refills_the_budget_at_a_trickle() -> None:
    clock = PausableClock()
    idle = [None]  # cores the machine left idle lately; None: not known (yet)
    budget = CpuBudget(0.5, burst_s=0.0, clock=clock, idle=lambda: idle[0])
    budget.charge(0.5)
    clock.advance(0.5)  # not known: the rate alone, 0.25 CPU s repaid
    assert budget.balance() == pytest.approx(-0.25)
    idle[0] = 0.5 + IDLE_RESERVE_CORES - 0.01  # not the share and the reserve: busy
    assert budget.busy()
    clock.advance(0.5)
    assert budget.balance() == pytest.approx(-0.25 + 0.25 * BUSY_TRICKLE)
    assert budget.delay() == IDLE_WINDOW_S  # looked at again after the next window
    idle[0] = 0.5 + IDLE_RESERVE_CORES
    assert not budget.busy()
    clock.advance(0.5 - 0.5 * BUSY_TRICKLE)
    assert budget.ready()


def _stat(user: int, idle: int, cores: int = 2) -> str:
    lines = [f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0"]
    lines += [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cores)]
    return "\n".join([*lines, "intr 12345 0 0", "ctxt 999", ""])


def test_cpu_ticks_reads_proc_stat() -> None:
    text = "cpu  10 1 2 30 4 0 5 6 7 0\ncpu0 1 1 1 1 1 1 1 1 0 0\ncpu1 1 1 1 1 1 1 1 1 0 0\n"
    assert cpu_ticks(text) == (10 + 1 + 2 + 30 + 4 + 5 + 6, 34, 2)  # guest (7) is in user
    with open("/proc/stat") as f:
        total, idle, cores = cpu_ticks(f.read())
    assert 0 <= idle <= total and cores >= 1
    for bad in ("", "intr 1 2 3", "cpu 1 2"):
        with pytest.raises(ValueError):
            cpu_ticks(bad)


def test_machine_idle_over_each_window_of_ticks(caplog: pytest.LogCaptureFixture) -> None:
    reads = iter([_stat(0, 0), _stat(10, 10), _stat(30, 40), _stat(30, 40), "garbage", ""])
    # 2 cores, a window of 0.25 s: 50 ticks of the machine (CLK_TCK 100)
    machine = MachineIdle(read=lambda: next(reads), window_s=0.25 * 100 / os.sysconf("SC_CLK_TCK"))
    assert machine.cores() is None  # a first sample, no window yet
    assert machine.cores() is None  # 20 ticks: not a window yet
    assert machine.cores() == pytest.approx(2 * 40 / 70)
    assert machine.cores() == pytest.approx(2 * 40 / 70)  # no new window: the last one's
    assert machine.cores() is None  # unreadable: not known, logged, never read again
    assert machine.cores() is None
    assert sum("unreadable" in r.message for r in caplog.records) == 1


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
