"""sidecar.metrics: Prometheus text format, histogram bucket math, bounded label sets."""

from __future__ import annotations

import math
import re
import time

import pytest

from sidecar.metrics import (
    CONTENT_TYPE,
    GIVEUP_REASONS,
    OUTCOMES,
    STAGE_BUCKETS,
    STAGES,
    Counter,
    Gauge,
    Histogram,
    Metrics,
    Registry,
    format_value,
)

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        assert m, f"bad label syntax at {text[pos:]!r}"
        name, raw = m.groups()
        assert name not in labels, f"duplicate label {name}"
        labels[name] = re.sub(r"\\[\\\"n]", lambda e: UNESCAPE[e.group(0)], raw)
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"expected ',' at {text[pos:]!r}"
            pos += 1
    return labels


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Check the exposition format line by line; return {family: type} and the samples."""
    assert text.endswith("\n") and "\n\n" not in text
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and name not in types, f"TYPE {name} out of place"
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            m = SAMPLE.fullmatch(line)
            assert m, f"bad sample line {line!r}"
            name, labels, value = m.groups()
            family = name
            if types.get(current) == "histogram":
                family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert family == current, f"{name} outside its family block {current}"
            samples.append((name, parse_labels(labels or ""), float(value)))
    return types, samples


def series(samples, name, **labels) -> float:
    found = [v for n, lab, v in samples if n == name and lab == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_service_metrics_render_and_parse_back():
    m = Metrics()
    m.requests.inc(outcome="smart")
    m.requests.inc(2, outcome="giveup")
    m.stage_seconds.observe(0.004, stage="infer")
    m.queue_depth.set(3)
    m.batch_size.observe(8)
    m.cache_requests.inc(cache="heatmap", result="hit")
    m.giveups.inc(reason="admission")
    m.nn_runs.inc(8)
    text = m.render()
    types, samples = parse(text)
    assert types == {
        "heatcrop_requests_total": "counter",
        "heatcrop_stage_seconds": "histogram",
        "heatcrop_queue_depth": "gauge",
        "heatcrop_batch_size": "histogram",
        "heatcrop_batch_seconds": "histogram",
        "heatcrop_cache_requests_total": "counter",
        "heatcrop_giveups_total": "counter",
        "heatcrop_nn_runs_total": "counter",
        "heatcrop_engine_calls_total": "counter",
        "heatcrop_cold_total": "counter",
        "heatcrop_cold_heatmaps_total": "counter",
        "heatcrop_background_cpu_seconds_total": "counter",
        "heatcrop_background_held_total": "counter",
        "heatcrop_face_seconds": "histogram",
        "heatcrop_faces_per_photo": "histogram",
    }
    assert series(samples, "heatcrop_requests_total", outcome="smart") == 1
    assert series(samples, "heatcrop_requests_total", outcome="giveup") == 2
    assert series(samples, "heatcrop_requests_total", outcome="no-crop") == 0
    assert series(samples, "heatcrop_stage_seconds_count", stage="infer") == 1
    assert series(samples, "heatcrop_stage_seconds_sum", stage="infer") == 0.004
    assert series(samples, "heatcrop_stage_seconds_bucket", stage="infer", le="0.005") == 1
    assert series(samples, "heatcrop_stage_seconds_bucket", stage="infer", le="0.0025") == 0
    assert series(samples, "heatcrop_queue_depth") == 3
    assert series(samples, "heatcrop_cache_requests_total", cache="heatmap", result="hit") == 1
    assert series(samples, "heatcrop_cache_requests_total", cache="box", result="miss") == 0
    assert series(samples, "heatcrop_giveups_total", reason="admission") == 1
    assert series(samples, "heatcrop_nn_runs_total") == 8
    # Every declared series exists from the start: 8 outcomes, 6 stages x (buckets + 3) ...
    assert sum(n == "heatcrop_requests_total" for n, _, _ in samples) == len(OUTCOMES)
    stage_lines = [s for s in samples if s[0].startswith("heatcrop_stage_seconds")]
    assert len(stage_lines) == len(STAGES) * (len(STAGE_BUCKETS) + 3)
    assert sum(n == "heatcrop_giveups_total" for n, _, _ in samples) == len(GIVEUP_REASONS)
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_render_is_deterministic():
    a, b = Metrics(), Metrics()
    for m in (a, b):
        m.requests.inc(outcome="error")
        m.stage_seconds.observe(0.2, stage="total")
    assert a.render() == b.render() == a.render()
    lines = a.render().splitlines()
    # Series in the declared order of the label values, not in the order of first use.
    outcome_lines = [line for line in lines if line.startswith("heatcrop_requests_total{")]
    assert [line.split('"')[1] for line in outcome_lines] == list(OUTCOMES)


def test_histogram_bucket_math():
    h = Histogram("latency_seconds", "Latency.", [0.001, 0.01, 0.1], {"stage": ("a", "b")})
    for v in (0.0005, 0.001, 0.003, 0.01, 0.05, 5.0, -1.0):
        h.observe(v, stage="a")
    h.observe(0.02, stage="b")
    # le is inclusive: 0.001 counts in the 0.001 bucket, 0.01 in the 0.01 bucket.
    assert h.cumulative(stage="a") == [(0.001, 3), (0.01, 5), (0.1, 6), (math.inf, 7)]
    assert h.count(stage="a") == 7
    assert h.sum(stage="a") == pytest.approx(0.0005 + 0.001 + 0.003 + 0.01 + 0.05 + 5.0 - 1.0)
    assert h.cumulative(stage="b") == [(0.001, 0), (0.01, 0), (0.1, 1), (math.inf, 1)]
    registry = Registry()
    registry.register(h)
    _, samples = parse(registry.render())
    buckets = [
        (lab["le"], v) for n, lab, v in samples if n.endswith("_bucket") and lab["stage"] == "a"
    ]
    assert buckets == [("0.001", 3), ("0.01", 5), ("0.1", 6), ("+Inf", 7)]
    assert series(samples, "latency_seconds_count", stage="a") == 7


def test_histogram_timer_observes_elapsed_seconds():
    h = Histogram("t_seconds", "T.", [1.0, 2.0])
    with h.time():
        time.sleep(0.01)
    assert h.count() == 1 and h.sum() >= 0.01  # a lower bound: sleeping cannot take less
    with pytest.raises(ValueError, match="declared"), h.time(stage="x"):
        pass


@pytest.mark.parametrize("buckets", [[], [0.1, 0.1], [0.2, 0.1], [0.1, math.nan], [math.inf, 1.0]])
def test_histogram_buckets_are_validated(buckets):
    with pytest.raises(ValueError, match="buckets"):
        Histogram("h", "H.", buckets)


def test_histogram_accepts_explicit_inf_and_refuses_le_label_and_nan():
    h = Histogram("h", "H.", [1, 2, math.inf])
    assert h.bounds == (1.0, 2.0)
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "H.", [1], {"le": ("x",)})
    with pytest.raises(ValueError, match="NaN"):
        h.observe(math.nan)


def test_labels_are_validated():
    c = Counter("hits_total", "Hits.", {"cache": ("heatmap", "box")})
    with pytest.raises(ValueError, match="not one of"):
        c.inc(cache="/recipes/123.jpg")  # request data never becomes a label
    with pytest.raises(ValueError, match="declared"):
        c.inc()
    with pytest.raises(ValueError, match="declared"):
        c.inc(cache="box", path="x")
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, cache="box")
    c.inc(cache="box")
    assert c.value(cache="box") == 1 and c.value(cache="heatmap") == 0


@pytest.mark.parametrize(
    ("name", "labels", "message"),
    [
        ("bad-name", {}, "metric name"),
        ("0start", {}, "metric name"),
        ("ok", {"bad-label": ("a",)}, "label name"),
        ("ok", {"__reserved": ("a",)}, "label name"),
        ("ok", {"empty": ()}, "at least one"),
        ("ok", {"dup": ("a", "a")}, "duplicate"),
    ],
)
def test_metric_schema_is_validated(name, labels, message):
    with pytest.raises(ValueError, match=message):
        Counter(name, "Help.", labels)


def test_duplicate_names_are_refused():
    registry = Registry()
    registry.register(Histogram("lat", "L.", [1]))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("lat", "L."))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("lat_count", "Clashes with the histogram's _count."))


def test_label_values_and_help_are_escaped():
    odd = 'quote" back\\slash\nnewline'
    c = Counter("odd_total", "Help with \\ and\nnewline.", {"v": (odd, "plain")})
    c.inc(5, v=odd)
    registry = Registry()
    registry.register(c)
    text = registry.render()
    assert "# HELP odd_total Help with \\\\ and\\nnewline." in text
    assert 'odd_total{v="quote\\" back\\\\slash\\nnewline"} 5.0' in text
    _, samples = parse(text)
    assert series(samples, "odd_total", v=odd) == 5
    assert series(samples, "odd_total", v="plain") == 0


def test_gauge_set_inc_dec_and_callback():
    g = Gauge("depth", "Depth.")
    g.set(4)
    g.inc()
    g.dec(2)
    assert g.value() == 3
    g.set_function(lambda: 11)
    assert g.value() == 11
    assert "depth 11.0" in g.render()

    def broken() -> float:
        raise RuntimeError("reading failed")

    g.set_function(broken)
    assert math.isnan(g.value())
    assert "depth NaN" in g.render()  # a failing reading does not fail the scrape
    g.set_function(None)
    assert g.value() == 3
    labelled = Gauge("per", "Per.", {"k": ("a",)})
    with pytest.raises(ValueError, match="callback"):
        labelled.set_function(lambda: 1)


def test_format_value():
    assert format_value(math.inf) == "+Inf"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"
    assert format_value(0.25) == "0.25"
    assert float(format_value(1e-4)) == 1e-4
