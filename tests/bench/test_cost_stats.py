"""bench.cost_stats: what bench.cost counts as a cold answer, a give-up, a clean saturation run,
and how it sums figures up over photos and rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.cost_stats import (
    Latency,
    Saturation,
    answer_kind,
    cost_ratio,
    fmt_kinds,
    merge_kinds,
    quantile,
    rotated,
    spread,
)


@pytest.mark.parametrize(
    ("status", "path", "kind"),
    [
        (200, "smart", "cold"),
        (200, "low-confidence", "cold"),
        (200, "giveup", "given-up"),
        (200, "cold", "given-up"),  # cold_policy=legacy: the legacy crop now, heatmap later
        (200, "cached", "not-cold"),
        (200, "override", "not-cold"),
        (200, None, "error"),
        (200, "something new", "error"),
        (504, "smart", "error"),
        (415, None, "error"),
    ],
)
def test_each_answer_is_sorted_by_what_the_sidecar_did(
    status: int, path: str | None, kind: str
) -> None:
    assert answer_kind(status, path) == kind


def test_quantiles_are_numpys_linear_ones() -> None:
    values = [12.0, 3.0, 7.5, 30.0, 1.0, 9.0, 9.0]
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    assert math.isnan(quantile([], 0.5))
    with pytest.raises(ValueError):
        quantile(values, 1.5)


def test_a_spread_is_the_median_of_the_rounds_with_their_range_and_skips_nan() -> None:
    s = spread([3.0, math.nan, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.rounds) == (2.0, 1.0, 3.0, 3)
    assert s.fmt(1, "×") == "2.0× (1.0–3.0)"
    assert spread([1.25]).fmt(2) == "1.25"
    assert spread([math.nan]).fmt() == "—"


def test_latency_is_clean_only_when_every_answer_was_computed_now() -> None:
    lat = Latency(ms=(10.0, 20.0, 30.0), kinds={"cold": 3})
    assert (lat.median, lat.clean) == (20.0, True)
    assert lat.p90 == pytest.approx(28.0)
    assert not Latency(ms=(10.0, 20.0), kinds={"cold": 1, "not-cold": 1}).clean


def run(
    cold: int = 100, giveups: int = 0, metric_giveups: int = 0, cnn_runs: int | None = 100
) -> Saturation:
    kinds = {"cold": cold} | ({"given-up": giveups} if giveups else {})
    return Saturation(
        photos=cold + giveups,
        kinds=kinds,
        wall_s=2.0,
        server_cpu_s=3.0,
        client_cpu_s=0.1,
        metric_giveups=metric_giveups,
        cnn_runs=cnn_runs,
    )


def test_a_saturation_run_counts_only_cold_answers_as_images() -> None:
    r = run(cold=90, giveups=10, cnn_runs=90)
    assert r.rate == 45.0  # a legacy crop is no smart image
    assert r.cpu_ms == 30.0  # per photo asked: the give-ups' work is spent too
    assert r.client_cpu_ms == 1.0
    assert r.given_up == 10 and not r.clean


def test_a_run_is_not_clean_when_the_sidecar_counted_a_giveup_or_skipped_the_cnn() -> None:
    assert run().clean
    assert not run(metric_giveups=1).clean  # every answer cold, yet something gave up
    assert not run(cnn_runs=99).clean  # one photo was not cold after all
    assert run(cnn_runs=None).clean  # attention: no CNN to count


def test_the_cost_ratio_is_attentions_rate_over_heatcrops_and_none_after_a_giveup() -> None:
    attention = Saturation(photos=100, kinds={"cold": 100}, wall_s=1.0, server_cpu_s=1.6)
    assert cost_ratio(run(), attention) == 2.0
    assert math.isnan(cost_ratio(run(cold=99, giveups=1, cnn_runs=99), attention))


def test_kinds_merge_and_print_most_frequent_first() -> None:
    merged = merge_kinds([{"cold": 3}, {"cold": 2, "given-up": 4}])
    assert merged == {"cold": 5, "given-up": 4}
    assert fmt_kinds(merged) == "cold 5, given-up 4"


def test_the_order_rotates_through_every_method() -> None:
    names = ["a", "b", "c"]
    assert [rotated(names, k)[0] for k in range(4)] == ["a", "b", "c", "a"]
    assert sorted(rotated(names, 5)) == names
    assert rotated([], 2) == []
