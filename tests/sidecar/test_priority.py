"""Worker threads can run below the event loop's priority, and pass that on to their threads."""

from __future__ import annotations

import os
import threading

import pytest

from sidecar.priority import lowered_pool, run_lowered


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


# Lowering by 5 must show: a runner already at nice 15 or more would pass without it.
pytestmark = pytest.mark.skipif(
    not hasattr(os, "setpriority") or _nice() + 5 > 19,
    reason="needs per-thread nice, and room below the runner's priority",
)


def test_a_lowered_pool_runs_below_its_caller_and_the_caller_stays() -> None:
    mine = _nice()
    with lowered_pool(2, 5, "test-lowered") as pool:
        assert pool.submit(_nice).result() == mine + 5
    assert _nice() == mine


def test_threads_started_by_a_lowered_thread_inherit_its_priority() -> None:
    # What makes ONNX Runtime's own threads run lowered: they are started by a lowered thread.
    def start_child() -> int:
        seen: list[int] = []
        child = threading.Thread(target=lambda: seen.append(_nice()))
        child.start()
        child.join()
        return seen[0]

    mine = _nice()
    assert run_lowered(start_child, 3, "test-parent") == mine + 3
    assert _nice() == mine


def test_zero_leaves_the_priority_alone() -> None:
    mine = _nice()
    with lowered_pool(1, 0, "test-equal") as pool:
        assert pool.submit(_nice).result() == mine
