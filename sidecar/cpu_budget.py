"""A CPU budget for background work: the heatmaps that no request waits for.

Why a budget and not a priority: every process of the stack runs in its own session, and with
``kernel.sched_autogroup_enabled=1`` Linux first shares the CPU between sessions (autogroups)
and only then between the threads of one session by their nice values. A lowered background
thread (``server.worker_nice``) therefore yields to the sidecar's own event loop but not to the
legacy server: measured with ``python -m bench.latency_first`` on the shared 2-core machine,
600 never-seen originals at 60 req/s answered latency-first took the sidecar 7.3 s of CPU in
10 s, Thumbor's renders queued past nginx's 3 s legacy timeout and 370 requests failed, where
the same load with the sidecar down had p50 20 ms. Lowering the whole sidecar's autogroup
(``/proc/self/autogroup``) would lower its foreground answers with it, so it is not done.

So background work gets a rate, not a rank: a token bucket of CPU seconds that refills at
``share`` CPU seconds per second of wall time and holds at most ``share * BURST_S``. A piece of
background work starts only while the balance is not negative and is charged afterwards with
what it used, so one piece may overdraw and the next waits until the debt is repaid: whatever a
piece costs, the background uses ``share`` of a core in the long run. Work that waits stays in
its bounded queue (the cold paths, the batcher's background images) or is refused when that is
full, as before; foreground work never waits for the budget.

What is charged (``offloop_cpu``): the process's CPU time outside the event loop's thread over
the work's span, read on the loop thread (``CLOCK_PROCESS_CPUTIME_ID`` minus the calling thread's
clock). That sees the decode pool, libvips' threads, the engine's worker and ONNX Runtime's own
intra-op threads (spinning off, engines/ort.py), which no clock of a thread of ours would.
Foreground work off the loop during the span (a window search, a wait-policy decode) is charged
too: the background then gets a little less than its share, never more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from sidecar.metrics import Metrics

# The bucket holds this many seconds of refill: a background heatmap costs ~25 ms of CPU (a
# shrink-on-load decode ~8 ms, the INT8 CNN ~7 ms on each of 2 threads, the read), so at the
# default share of 0.25 the bucket holds about one heatmap. A larger bucket would let an idle
# spell be paid back as a burst of back-to-back heatmaps on every core at once, the very burst
# that delays the legacy server's renders.
BURST_S = 0.1
# Balances this close to zero count as repaid (float rounding of refill x share).
_EPSILON = 1e-9


def offloop_cpu() -> float:
    """CPU seconds of this process outside the calling thread (call it on the event loop)."""
    return time.process_time() - time.thread_time()


class CpuBudget:
    """A token bucket of CPU seconds for background work; see the module docstring.

    ``clock`` (wall seconds) and ``cpu`` (the meter, ``offloop_cpu``) are injectable for tests.
    Not thread-safe: used from the event loop only.
    """

    def __init__(
        self,
        share: float,
        *,
        burst_s: float = BURST_S,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = offloop_cpu,
        metrics: Metrics | None = None,
    ) -> None:
        if not share > 0 or not burst_s >= 0:
            raise ValueError("share must be > 0 and burst_s >= 0")
        self.share = share
        self.capacity = share * burst_s
        self.spent = 0.0  # CPU seconds charged since start
        self._clock = clock
        self._cpu = cpu
        self._metrics = metrics
        self._balance = self.capacity
        self._stamp = clock()

    def balance(self) -> float:
        """CPU seconds available now; negative while an overdraft is being repaid."""
        now = self._clock()
        self._balance = min(self.capacity, self._balance + (now - self._stamp) * self.share)
        self._stamp = now
        return self._balance

    def ready(self) -> bool:
        return self.balance() > -_EPSILON

    def delay(self) -> float:
        """Wall seconds until ``ready``; 0 when it is."""
        balance = self.balance()
        return 0.0 if balance > -_EPSILON else -balance / self.share

    def charge(self, cpu_s: float) -> None:
        """Take ``cpu_s`` CPU seconds (clamped at 0: a meter never runs backwards)."""
        cpu_s = max(0.0, cpu_s)
        self.balance()
        self._balance -= cpu_s
        self.spent += cpu_s
        if self._metrics is not None:
            self._metrics.background_cpu.inc(cpu_s)

    @contextmanager
    def metered(self) -> Iterator[None]:
        """Charge the CPU used off the loop while the block runs (exceptions included)."""
        start = self._cpu()
        try:
            yield
        finally:
            self.charge(self._cpu() - start)

    def held(self, stage: str) -> None:
        """Count background work held back for the budget (``stage``: decode or cnn)."""
        if self._metrics is not None:
            self._metrics.background_held.inc(stage=stage)

    async def wait(self, stage: str) -> None:
        """Return once ``ready``; counted as held once when it had to wait."""
        if self.ready():
            return
        self.held(stage)
        while not self.ready():
            await asyncio.sleep(self.delay())


def metered(budget: CpuBudget | None) -> AbstractContextManager[None]:
    """``budget.metered()``, or nothing to charge without a budget."""
    return nullcontext() if budget is None else budget.metered()
