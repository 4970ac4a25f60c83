"""DecodeAdmission: the decode pool's counter and running estimate, and what it refuses."""

from __future__ import annotations

import asyncio
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


def test_a_full_pool_or_a_hopeless_engine_is_refused_and_counted() -> None:
    metrics = Metrics()
    decodes = DecodeAdmission(ThreadPoolExecutor(1), 2, SourceSettings(), metrics)
    decodes.queued = decodes.max_queued
    with pytest.raises(Overloaded, match="decodes already queued"):
        decodes.refuse_if_hopeless(1e9, _batcher(worth=True))  # type: ignore[arg-type]
    assert _giveups(metrics, "queue-full") == 1
    decodes.queued = 0
    with pytest.raises(Overloaded, match="cannot finish in time"):
        decodes.refuse_if_hopeless(1e9, _batcher(worth=False))  # type: ignore[arg-type]
    assert _giveups(metrics, "admission") == 1
