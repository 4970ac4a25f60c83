"""Single-flight: one execution per key in flight, shared results and errors, bounded."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from sidecar.errors import Overloaded
from sidecar.singleflight import SingleFlight


class Work:
    """A controllable piece of work that counts its runs and waits for a gate."""

    def __init__(self, result: object = "heatmap", error: Exception | None = None) -> None:
        self.runs = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.finished = False
        self.result = result
        self.error = error

    async def __call__(self) -> object:
        self.runs += 1
        self.started.set()
        await self.gate.wait()
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_share_one_run():
    flight: SingleFlight[object] = SingleFlight()
    work = Work(result=object())
    callers = [asyncio.create_task(flight.run("a.jpg", work)) for _ in range(20)]
    await work.started.wait()
    assert "a.jpg" in flight
    assert len(flight) == 1
    work.gate.set()
    results = await asyncio.gather(*callers)
    assert work.runs == 1
    assert all(r is work.result for r in results)
    assert len(flight) == 0  # removed when done: nothing is cached here


async def test_a_later_call_runs_again():
    flight: SingleFlight[object] = SingleFlight()
    work = Work()
    work.gate.set()
    assert await flight.run("k", work) == "heatmap"
    assert await flight.run("k", work) == "heatmap"
    assert work.runs == 2


async def test_different_keys_run_separately():
    flight: SingleFlight[object] = SingleFlight()
    a, b = Work("A"), Work("B")
    ta = asyncio.create_task(flight.run("a", a))
    tb = asyncio.create_task(flight.run("b", b))
    await a.started.wait()
    await b.started.wait()
    assert len(flight) == 2
    a.gate.set()
    b.gate.set()
    assert await asyncio.gather(ta, tb) == ["A", "B"]


async def test_exception_is_shared_and_the_key_freed():
    flight: SingleFlight[object] = SingleFlight()
    work = Work(error=RuntimeError("engine failed"))
    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(20)]
    await work.started.wait()
    work.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert work.runs == 1
    assert all(r is work.error for r in results)
    assert len(flight) == 0
    retry = Work()
    retry.gate.set()
    assert await flight.run("k", retry) == "heatmap"  # a failure is not remembered


async def test_cancelled_waiter_does_not_cancel_the_work():
    flight: SingleFlight[object] = SingleFlight()
    work = Work()
    first = asyncio.create_task(flight.run("k", work))  # the caller that started the work
    others = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await work.started.wait()
    first.cancel()
    others[0].cancel()
    await asyncio.sleep(0)
    work.gate.set()
    assert await asyncio.gather(*others[1:]) == ["heatmap", "heatmap"]
    assert first.cancelled()
    assert others[0].cancelled()
    assert work.finished
    assert work.runs == 1


async def test_work_finishes_when_every_waiter_is_gone(caplog):
    flight: SingleFlight[object] = SingleFlight()
    work = Work(error=RuntimeError("nobody listens"))
    caller = asyncio.create_task(flight.run("k", work))
    await work.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert len(flight) == 1  # still running for nobody: its result may still fill a cache
    work.gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert work.finished
    assert len(flight) == 0
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_max_keys_refuses_new_keys_but_joins_running_ones():
    flight: SingleFlight[object] = SingleFlight(max_keys=2)
    a, b = Work("A"), Work("B")
    ta = asyncio.create_task(flight.run("a", a))
    tb = asyncio.create_task(flight.run("b", b))
    await a.started.wait()
    await b.started.wait()
    c = Work("C")
    with pytest.raises(Overloaded):
        await flight.run("c", c)
    assert c.runs == 0
    joined = asyncio.create_task(flight.run("a", a))  # same key: joins, no new slot needed
    a.gate.set()
    b.gate.set()
    assert await asyncio.gather(ta, tb, joined) == ["A", "B", "A"]
    c.gate.set()
    assert await flight.run("c", c) == "C"  # room again once they are done


def test_max_keys_must_be_positive():
    with pytest.raises(ValueError, match="max_keys"):
        SingleFlight(max_keys=0)
