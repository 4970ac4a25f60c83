"""Decode admission: the decode pool, the decodes it holds, and how long one takes.

A decode is milliseconds of CPU (and GIL time) that an overloaded machine lacks; one whose
heatmap the engine could not deliver in time is thrown away. ``DecodeAdmission`` refuses those
before they start, from what it alone keeps: how many decodes are queued or running in its
pool, and a running estimate of one decode's own seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from functools import partial

from sidecar.batcher import Batcher
from sidecar.decode import Decoded, Header, decode
from sidecar.errors import Overloaded
from sidecar.metrics import Metrics
from sidecar.settings import SourceSettings

# Weight of the newest decode in the running estimate of one decode's seconds.
DECODE_EWMA_ALPHA = 0.1
# Starting estimate, before any decode was timed.
DECODE_S = 0.010
# The pool's queue, in decodes per thread: at least MIN (what keeps the pool busy), at most MAX
# (the bound), in between as many as take QUEUE_SHARE of the request's remaining time. With the
# default deadline and 6 ms decodes (this 2-core box) that is MIN: a longer queue there only
# added work that ran past the deadline under overload (bench.service (c) at 10x capacity: 587
# deadline give-ups against 238). With a long deadline a fixed 2 a thread refused work that had
# time: 8 requests in flight under 60 s gave up on 54 % of new photos as queue-full (bench.cost).
MIN_QUEUED_PER_THREAD = 2
MAX_QUEUED_PER_THREAD = 16
QUEUE_SHARE = 0.1


class DecodeAdmission:
    """Decodes in ``pool`` (``threads`` threads), refused when they could not be used in time.

    ``queued`` counts the decodes queued or running in the pool; ``decode_s`` is an EWMA of one
    decode's own seconds (not its wait for a thread). Both change only inside ``decode``.
    Other work may run in ``pool`` too (the debug pages render there); it is not counted.
    """

    def __init__(
        self, pool: Executor, threads: int, limits: SourceSettings, metrics: Metrics
    ) -> None:
        self.pool = pool
        self.threads = threads
        self.limits = limits
        self.metrics = metrics
        self.queued = 0
        self.decode_s = DECODE_S

    def max_queued(self, remaining_s: float) -> int:
        """Decodes queued or running at most, for a request with ``remaining_s`` left."""
        fits = QUEUE_SHARE * remaining_s / self.decode_s if remaining_s > 0 else 0.0
        per_thread = math.floor(min(MAX_QUEUED_PER_THREAD, max(MIN_QUEUED_PER_THREAD, fits)))
        return per_thread * self.threads

    def ready_in(self) -> float:
        """Expected seconds until a decode submitted now is done, queueing included."""
        ahead = self.queued // self.threads
        return self.decode_s * (ahead + 1)

    def refuse_if_hopeless(self, deadline: float, batcher: Batcher) -> None:
        """Overloaded when the pool is full or ``batcher`` could not use the image in time.

        Under overload most requests are refused by the batcher's admission anyway; refusing
        them before the decode saves its CPU (and its GIL time), which the event loop and the
        requests that can still make it need. The batcher decides again after the decode, on
        the real shape; with an idle engine the decode is kept, to finish in the background if
        it is late.
        """
        remaining = deadline - asyncio.get_running_loop().time()
        if self.queued >= self.max_queued(remaining):
            self.metrics.giveups.inc(reason="queue-full")
            raise Overloaded(f"{self.queued} decodes already queued")
        if not batcher.worth_preparing(deadline, self.ready_in()):
            self.metrics.giveups.inc(reason="admission")
            raise Overloaded("the engine cannot finish in time even after the decode")

    async def decode(
        self, data: bytes, deadline: float, batcher: Batcher, header: Header | None = None
    ) -> Decoded:
        """``data`` decoded in the pool, unless ``refuse_if_hopeless`` refuses it first;
        ``header``: the fetch's (``sidecar.decode.decode``)."""
        self.refuse_if_hopeless(deadline, batcher)
        loop = asyncio.get_running_loop()
        limits = self.limits
        t0 = time.perf_counter()
        self.queued += 1
        try:
            decoded, seconds = await loop.run_in_executor(
                self.pool,
                partial(_timed_decode, data, limits.max_bytes, limits.max_pixels, header),
            )
        finally:
            self.queued -= 1
        self.decode_s += DECODE_EWMA_ALPHA * (seconds - self.decode_s)
        self.metrics.stage_seconds.observe(time.perf_counter() - t0, stage="decode")
        return decoded


def _timed_decode(
    data: bytes, max_bytes: int, max_pixels: int, header: Header | None
) -> tuple[Decoded, float]:
    start = time.perf_counter()
    decoded = decode(data, max_bytes=max_bytes, max_pixels=max_pixels, header=header)
    return decoded, time.perf_counter() - start
