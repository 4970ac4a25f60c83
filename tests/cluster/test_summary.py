"""The rate a backfill reports with every worker busy, from each worker's own batch times."""

from __future__ import annotations

import pytest

from sidecar.backfill import BackfillSummary


def test_the_busy_rate_sums_each_workers_rate_over_its_own_span() -> None:
    summary = BackfillSummary()
    # Worker a: 64 originals from 10 s to 12 s; b started late and ran into the tail alone.
    summary.add_span("a", 11.0, 12.0, 32)
    summary.add_span("a", 10.0, 11.0, 32)
    summary.add_span("b", 10.5, 11.5, 16)
    summary.add_span("b", 11.5, 12.5, 24)
    assert summary.spans == {"a": (10.0, 12.0, 64), "b": (10.5, 12.5, 40)}
    assert summary.busy_per_s() == pytest.approx(32 + 20)
    assert summary.as_dict()["busy_computed_per_s"] == pytest.approx(52)


def test_a_summary_without_spans_reports_no_rate() -> None:
    summary = BackfillSummary()
    summary.add_span("a", 5.0, 5.0, 0)  # a batch of cached originals only, timed at 0 s
    assert summary.busy_per_s() == 0.0
