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

And only out of spare time (``MachineIdle``): while the whole machine left fewer than ``share``
plus ``IDLE_RESERVE_CORES`` cores idle over the last quarter second (``/proc/stat``), the bucket
refills at a trickle (``BUSY_TRICKLE`` of the share). The reserve is a core that a render of the
legacy server arriving now finds free: a background heatmap takes every core for a few ms (the
engine's two threads), and a render that meets it waits. Measured with ``python -m
bench.latency_first`` on the shared 2-core machine at 60 never-seen originals/s (the legacy
server busy ~0.9 core; bench/results/latency_first.md): with the rate alone the answers' p50 /
p95 were 16-21 / 30-38 ms against 14-16 / 25-29 ms with the sidecar down, in sets too noisy to
tell from the edge's own hops (16-18 / 26-39 ms with no background); with the reserve, 22-26 /
41-53 ms against 19-23 / 35-39 ms and one outlier (medians +12 % / +15 %), no background
22-24 / 37-45 ms. The trickle keeps heatmaps coming, one every few seconds, on a machine that
is never that idle. Where ``/proc/stat`` cannot be read, the rate alone holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from sidecar.metrics import Metrics

log = logging.getLogger("heatcrop.cpu_budget")

# The bucket holds this many seconds of refill: a background heatmap costs ~25 ms of CPU (a
# shrink-on-load decode ~8 ms, the INT8 CNN ~7 ms on each of 2 threads, the read), so at the
# default share of 0.25 the bucket holds about one heatmap. A larger bucket would let an idle
# spell be paid back as a burst of back-to-back heatmaps on every core at once, the very burst
# that delays the legacy server's renders.
BURST_S = 0.1
# Balances this close to zero count as repaid (float rounding of refill x share).
_EPSILON = 1e-9
# While the machine is busy, the refill is this fraction of the share: at the default share a
# heatmap every ~2 s, a CPU load the legacy server cannot notice.
BUSY_TRICKLE = 0.05
# Cores that must stay idle beside the background's share for it to refill at its full rate.
IDLE_RESERVE_CORES = 1.0
# /proc/stat counts in ticks of 10 ms per core: over a quarter second of 2 cores the idle share
# is read to 2 %, and the gate follows a burst of renders within that quarter second.
IDLE_WINDOW_S = 0.25
PROC_STAT = "/proc/stat"
_CORE_LINE = re.compile(r"^cpu\d+ ", re.MULTILINE)


def offloop_cpu() -> float:
    """CPU seconds of this process outside the calling thread (call it on the event loop)."""
    return time.process_time() - time.thread_time()


def cpu_ticks(text: str) -> tuple[int, int, int]:
    """(all ticks, idle ticks incl. iowait, cores) of the machine from /proc/stat's text."""
    first = text.split("\n", 1)[0].split()
    if len(first) < 9 or first[0] != "cpu":
        raise ValueError(f"not /proc/stat: {text[:60]!r}")
    # user nice system idle iowait irq softirq steal; guest time is counted in user already.
    ticks = [int(v) for v in first[1:9]]
    return sum(ticks), ticks[3] + ticks[4], len(_CORE_LINE.findall(text))


def _read_proc_stat() -> str:
    with open(PROC_STAT) as f:
        return f.read()


class MachineIdle:
    """Cores the whole machine left idle over the last window of ``window_s``, from /proc/stat.

    ``cores()`` is None until a first window has passed, and for good once /proc/stat cannot
    be read or parsed (logged once): the budget then holds by its rate alone. In a container
    /proc/stat is the host's: idle cores of the host, which a CPU quota may not let us use.
    """

    def __init__(
        self, read: Callable[[], str] = _read_proc_stat, window_s: float = IDLE_WINDOW_S
    ) -> None:
        self._read = read
        self._window_ticks = window_s * os.sysconf("SC_CLK_TCK")
        self._last: tuple[int, int] | None = None
        self._cores: float | None = None
        self._broken = False

    def cores(self) -> float | None:
        if self._broken:
            return None
        try:
            total, idle, ncpu = cpu_ticks(self._read())
        except (OSError, ValueError) as exc:
            log.warning(
                "machine idle time unreadable (%s): background CPU budget by rate only", exc
            )
            self._broken = True
            return None
        if self._last is None:
            self._last = (total, idle)
        elif total - self._last[0] >= self._window_ticks * max(1, ncpu):
            spent, rested = total - self._last[0], idle - self._last[1]
            self._cores = max(1, ncpu) * rested / spent
            self._last = (total, idle)
        return self._cores


class CpuBudget:
    """A token bucket of CPU seconds for background work; see the module docstring.

    ``clock`` (wall seconds) and ``cpu`` (the meter, ``offloop_cpu``) are injectable for tests;
    ``idle`` says how many cores the machine left idle lately (``MachineIdle.cores``; None: not
    known), without it the budget does not look at the machine. Not thread-safe: used from the
    event loop only.
    """

    def __init__(
        self,
        share: float,
        *,
        burst_s: float = BURST_S,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = offloop_cpu,
        idle: Callable[[], float | None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not share > 0 or not burst_s >= 0:
            raise ValueError("share must be > 0 and burst_s >= 0")
        self.share = share
        self.capacity = share * burst_s
        self.spent = 0.0  # CPU seconds charged since start
        self._clock = clock
        self._cpu = cpu
        self._idle = idle
        self._metrics = metrics
        self._balance = self.capacity
        self._stamp = clock()

    def balance(self) -> float:
        """CPU seconds available now; negative while an overdraft is being repaid."""
        now = self._clock()
        rate = self.share if not self.busy() else self.share * BUSY_TRICKLE
        self._balance = min(self.capacity, self._balance + (now - self._stamp) * rate)
        self._stamp = now
        return self._balance

    def busy(self) -> bool:
        """Whether the machine lately left fewer than ``share + IDLE_RESERVE_CORES`` idle."""
        cores = self._idle() if self._idle is not None else None
        return cores is not None and cores < self.share + IDLE_RESERVE_CORES

    def ready(self) -> bool:
        return self.balance() > -_EPSILON

    def delay(self) -> float:
        """Wall seconds until ``ready``; 0 when it is."""
        balance = self.balance()
        if balance > -_EPSILON:
            return 0.0
        if self._idle is not None:  # the rate may change with the machine's next window
            return min(IDLE_WINDOW_S, -balance / self.share)
        return -balance / self.share

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


def service_budget(share: float, metrics: Metrics) -> CpuBudget:
    """The sidecar's budget: ``share`` of a core, out of the machine's spare time."""
    return CpuBudget(share, idle=MachineIdle().cores, metrics=metrics)
