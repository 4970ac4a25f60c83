"""DecodeAdmission: the decode pool's counter and running estimate, and what it refuses."""

from __future__ import annotations

import asyncio
import math
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
from skimage import data as skdata

from sidecar.admission import DECODE_S, DecodeAdmission
from sidecar.errors import Overloaded
from sidecar.metrics import Metrics
from sidecar.settings import SourceSettings
from tests.support.images import jpeg


def _batcher(worth: bool) -> types.SimpleNamespace:
    asked: list[float] = []

    def worth_preparing(deadline: float, before_s: float) -> bool:
        asked.append(before_s)
        return worth

    return types.SimpleNamespace(worth_preparing=worth_preparing, asked=asked)


def _giveups(metrics: Metrics, reason: str) -> float:
    series = f'heatcrop_giveups_total{{reason="{reason}"}} '
    line = next(line for line in metrics.render().splitlines() if line.startswith(series))
    return float(line.split()[-1])


async def test_a_decode_counts_while_it_runs_and_updates_the_estimate() -> None:
    with ThreadPoolExecutor(2) as pool:
        decodes = DecodeAdmission(pool, 2, SourceSettings(), Metrics())
        batcher = _batcher(worth=True)
        data = jpeg(skdata.coffee())
        task = asyncio.ensure_future(decodes.decode(data, 1e9, batcher))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert decodes.queued == 1
        decoded = await task
    assert (decoded.width, decoded.height) == (600, 400)
    assert decodes.queued == 0 and decodes.decode_s != DECODE_S
    assert batcher.asked == [DECODE_S]  # one decode's estimate with nothing ahead


def test_the_estimate_counts_the_decodes_ahead_per_thread() -> None:
    decodes = DecodeAdmission(ThreadPoolExecutor(1), 2, SourceSettings(), Metrics())
    decodes.queued = 3
    assert decodes.ready_in() == pytest.approx(2 * DECODE_S)


async def test_a_full_pool_or_a_hopeless_engine_is_refused_and_counted() -> None:
    metrics = Metrics()
    decodes = DecodeAdmission(ThreadPoolExecutor(1), 2, SourceSettings(), metrics)
    deadline = asyncio.get_running_loop().time() + 0.1
    decodes.queued = decodes.max_queued(0.1)
    with pytest.raises(Overloaded, match="decodes already queued"):
        decodes.refuse_if_hopeless(deadline, _batcher(worth=True))  # type: ignore[arg-type]
    assert _giveups(metrics, "queue-full") == 1
    decodes.queued = 0
    with pytest.raises(Overloaded, match="cannot finish in time"):
        decodes.refuse_if_hopeless(deadline, _batcher(worth=False))  # type: ignore[arg-type]
    assert _giveups(metrics, "admission") == 1


def test_under_the_default_deadline_the_pool_holds_two_decodes_a_thread() -> None:
    decodes = DecodeAdmission(ThreadPoolExecutor(1), 2, SourceSettings(), Metrics())
    decodes.decode_s = 0.006
    assert decodes.max_queued(0.100) == 4  # 120 ms less the 20 ms answer margin
    assert decodes.max_queued(0.0) == 4
    assert decodes.max_queued(-1.0) == 4


async def test_a_long_deadline_admits_more_decodes_a_thread_up_to_the_bound() -> None:
    # 8 requests in flight on 2 decode threads under a 60 s deadline: a cap of 2 decodes a
    # thread refused half of them as queue-full though the engine had time (bench.cost).
    metrics = Metrics()
    decodes = DecodeAdmission(ThreadPoolExecutor(1), 2, SourceSettings(), metrics)
    decodes.decode_s = 0.006
    batcher = _batcher(worth=True)
    decodes.queued = 8
    decodes.refuse_if_hopeless(asyncio.get_running_loop().time() + 60.0, batcher)  # type: ignore[arg-type]
    assert _giveups(metrics, "queue-full") == 0
    assert batcher.asked == [pytest.approx(5 * 0.006)]  # 4 rounds ahead, then its own
    assert decodes.max_queued(0.3) == 2 * 5  # a tenth of 300 ms in 6 ms decodes, a thread
    assert decodes.max_queued(60.0) == decodes.max_queued(math.inf) == 2 * 16  # the bound
