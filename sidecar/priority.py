"""Optionally lower the CPU priority of the threads that do bulk work, below the event loop's.

On a small box under overload every core is busy with decodes and engine calls, and the event
loop, which needs only a sliver of CPU per request, competes with them as an equal; every
answer (give-ups and cache hits included) waits when it does. Lowering the workers
(``server.worker_nice``) is meant to keep the loop ahead of them. Measured on the 2-core dev box
(``python -m bench.service --only overload``, worker_nice 10 against 0) it shortened the client
tail in some runs but cut the cold capacity, and the runs were too noisy to decide, so it is off
by default. It ranks the workers below this process's own loop only: with autogroups
(``kernel.sched_autogroup_enabled``) Linux shares the CPU between sessions first, so another
process, the legacy server included, gets nothing from it; what keeps background work off
their cores is its CPU budget (sidecar/cpu_budget.py).

Linux schedules threads individually and a thread's nice value is its own, inherited by the
threads it starts, so the decode pool, the batcher's worker and the threads ONNX Runtime starts
when a session is created (from a thread already lowered) all run below the loop. Raising a
priority back needs privileges, hence the dedicated threads: the loop's thread is never lowered.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger("heatcrop.priority")

T = TypeVar("T")


def lower_this_thread(nice: int) -> None:
    """Add ``nice`` to the calling thread's nice value (Linux: per thread); 0 does nothing."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # a sandbox may forbid it: slower under overload, never broken
        log.warning("cannot lower the priority of worker thread %d: %s", tid, exc)


def lowered_pool(workers: int, nice: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run ``nice`` below the caller."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=lower_this_thread, initargs=(nice,)
    )


def run_lowered(fn: Callable[[], T], nice: int, name: str) -> T:
    """``fn()`` in a fresh thread lowered by ``nice``; threads it starts inherit that priority.

    For creating an ONNX Runtime session: its intra-op threads are started then, by the
    creating thread, and keep its priority for the life of the session.
    """
    with lowered_pool(1, nice, name) as pool:
        return pool.submit(fn).result()
