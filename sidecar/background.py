"""A give-up's heatmap, finished in the background: the next request for the original finds it.

When the work for an original stops for time or load once its pixels are decoded (late before
the engine, or refused or expired by the batcher), the pixels go to the batcher's background
queue, which runs them when the foreground is idle; the heatmap lands in the heatmap cache.
Until then ``Services.background`` remembers them by heatmap key, so that a later miss of the
same original takes them back (step ``take-back``) rather than decoding it again.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import numpy.typing as npt

from sidecar.batcher import ImageHeat
from sidecar.core import Analysis, make_analysis
from sidecar.decode import Decoded
from sidecar.errors import Overloaded
from sidecar.job import Pending, Services

log = logging.getLogger("heatcrop.pipeline")

# Background heatmaps remembered for reuse; the batcher holds far fewer (max_background).
MAX_PENDING = 1024


def finish_in_background(svc: Services, decoded: Decoded, key: str) -> bool:
    """Queue ``decoded`` for a background heatmap, stored under ``key``; False if refused."""
    pixels: npt.NDArray[np.uint8] = decoded.pixels
    pending = Pending(decoded, asyncio.get_running_loop().create_future())

    def store(heat: ImageHeat) -> None:
        analysis = make_analysis(
            decoded, heat.heatmaps, heat.food_mass, svc.engine.version, faces=heat.faces
        )
        settle(analysis)
        svc.spawn_write(svc.caches.put_analysis(key, analysis), _log_failure)

    def settle(result: Analysis | None = None) -> None:
        if svc.background.get(key) is pending:
            del svc.background[key]
        if pending.analysis.done():
            return
        if result is None:
            pending.analysis.set_exception(Overloaded("background heatmap not computed"))
            pending.analysis.exception()  # retrieved: nobody may be waiting
        else:
            pending.analysis.set_result(result)

    if not svc.batcher.submit_background(pixels, store, settle):
        log.debug("background heatmap refused for %s", key)
        return False
    svc.background[key] = pending
    while len(svc.background) > MAX_PENDING:  # a bound, should failures go unreported
        svc.background.pop(next(iter(svc.background)))
    return True


def _log_failure(task: asyncio.Future[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("storing a background heatmap failed: %r", task.exception())
