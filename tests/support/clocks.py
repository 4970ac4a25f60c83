"""A wall clock a test can stop and start: for the CPU budget's refill (sidecar/cpu_budget.py)."""

from __future__ import annotations

import time


class PausableClock:
    """Seconds that stand still while paused and follow ``time.monotonic`` while running.

    ``advance`` jumps ahead; paused, an overdrawn budget stays overdrawn however long the test
    waits, so "held" is a state to observe rather than a race against the refill.
    """

    def __init__(self, *, paused: bool = True) -> None:
        self._offset = 0.0
        self._frozen_at: float | None = 0.0 if paused else None
        self._base = time.monotonic()

    def __call__(self) -> float:
        if self._frozen_at is not None:
            return self._frozen_at
        return time.monotonic() - self._base + self._offset

    def pause(self) -> None:
        if self._frozen_at is None:
            self._frozen_at = self()

    def resume(self) -> None:
        if self._frozen_at is not None:
            self._offset = self._frozen_at - (time.monotonic() - self._base)
            self._frozen_at = None

    def advance(self, seconds: float) -> None:
        if self._frozen_at is not None:
            self._frozen_at += seconds
        else:
            self._offset += seconds
