"""The default batching wait: an idle engine runs a lone image at once (issue 25).

A wait for company held every cold request that came alone, the engine idle, for
``server.max_wait_ms`` (the sidecar's queue stage 3.0-3.2 ms against 0.05-0.08 without), and
the admission counted the wait in every estimate.
"""

from __future__ import annotations

import pytest

from sidecar.batcher import Batcher
from sidecar.settings import ServerSettings
from tests.support.scripted_engine import SQUARE, ScriptedEngine


def _batcher(server: ServerSettings, max_wait_ms: float) -> Batcher:
    return Batcher(
        ScriptedEngine(),
        max_batch=server.max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=server.max_queue,
        service_prior_s=0.02,
    )


async def test_by_default_an_idle_engine_does_not_hold_a_lone_image_for_company() -> None:
    server = ServerSettings()
    default, no_wait = _batcher(server, server.max_wait_ms), _batcher(server, 0.0)
    for b in (default, no_wait):
        await b.start()
    try:
        # What the admission expects for a new image: the engine's own time, nothing held.
        assert default.estimated_finish(SQUARE) == pytest.approx(no_wait.estimated_finish(SQUARE))
    finally:
        for b in (default, no_wait):
            await b.close()
