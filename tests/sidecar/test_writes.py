"""Services.spawn_write / drain_writes: background cache writes are held and drained."""

from __future__ import annotations

import asyncio
import types

from sidecar.job import Services


async def test_a_background_write_is_held_until_done_and_drained() -> None:
    svc = types.SimpleNamespace(writes=set())
    done: list[str] = []
    stored = asyncio.Event()

    async def write() -> bool:
        await asyncio.sleep(0.02)
        stored.set()
        return True

    Services.spawn_write(svc, write(), lambda task: done.append("called"))  # type: ignore[arg-type]
    assert len(svc.writes) == 1  # a strong reference: the loop keeps only weak ones
    await Services.drain_writes(svc, 5.0)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert stored.is_set() and done == ["called"] and not svc.writes


async def test_a_write_that_hangs_is_cancelled_after_the_drain_timeout() -> None:
    svc = types.SimpleNamespace(writes=set())
    outcomes: list[bool] = []

    async def hang() -> None:
        await asyncio.Event().wait()

    Services.spawn_write(svc, hang(), lambda task: outcomes.append(task.cancelled()))  # type: ignore[arg-type]
    await Services.drain_writes(svc, 0.02)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert outcomes == [True] and not svc.writes
