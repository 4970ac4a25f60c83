"""bench.hops: nginx's access-log lines of the edge (formats in nginx/edge.conf.in and
nginx/legacy.conf.in) turned into per-hop latencies of the misses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.hops import parse_line, percentile, read_lines, summarise

REQ = '"GET /img/400x300/a.jpg HTTP/1.1"'
PUBLIC_MISS = f"127.0.0.1 {REQ} 200 9120 cache=MISS served=smart path=smart rt=0.131 urt=0.130"
PUBLIC_HIT = f"127.0.0.1 {REQ} 200 9120 cache=HIT served=smart path=smart rt=0.000 urt=-"
INNER_SMART = (
    f"hop=inner {REQ} 200 served=smart path=smart rt=0.129 "
    'addr="127.0.0.1:8081 : 127.0.0.1:8888" ustatus="200 : 200" urt="0.052 : 0.077"'
)
# The first sidecar refused the connection, the second timed out: nginx's own fallback.
INNER_EDGE_FALLBACK = (
    f"hop=inner {REQ} 200 served=fallback path=edge-fallback rt=0.233 "
    'addr="127.0.0.1:8081, 127.0.0.1:8082 : 127.0.0.1:8888" ustatus="502, 504 : 200" '
    'urt="0.000, 0.150 : 0.083"'
)
TODAY_MISS = (
    f'127.0.0.1 {REQ} 200 9120 cache=MISS rt=0.101 addr="127.0.0.1:8888" ustatus="200" urt="0.100"'
)


def test_an_inner_line_gives_each_hop_its_address_status_and_seconds() -> None:
    line = parse_line(INNER_EDGE_FALLBACK, "inner")
    assert line is not None
    assert (line.status, line.path, line.seconds) == (200, "edge-fallback", 0.233)
    sidecar, legacy = line.hops
    assert sidecar.addr == "127.0.0.1:8081, 127.0.0.1:8082"
    assert (sidecar.status, sidecar.seconds) == ("504", pytest.approx(0.150))
    assert (legacy.addr, legacy.status, legacy.seconds) == ("127.0.0.1:8888", "200", 0.083)


def test_a_cache_hit_has_no_hop() -> None:
    line = parse_line(PUBLIC_HIT, "public")
    assert line is not None and line.cache == "HIT" and line.hops == ()
    assert parse_line("not a log line", "public") is None


def test_the_summary_splits_the_misses_by_hop_and_by_the_sidecars_answer() -> None:
    public = [parse_line(PUBLIC_MISS, "public"), parse_line(PUBLIC_HIT, "public")]
    inner = [parse_line(INNER_SMART, "inner"), parse_line(INNER_EDGE_FALLBACK, "inner")]
    s = summarise([p for p in public if p], [i for i in inner if i])
    assert (s.misses.n, s.misses.p95_ms) == (1, pytest.approx(131))
    assert s.hits.n == 1
    assert s.sidecar.n == 2 and s.sidecar.p95_ms == pytest.approx(150)
    assert s.legacy.p50_ms == pytest.approx(77) and s.legacy.p95_ms == pytest.approx(83)
    assert list(s.by_path) == ["smart", "edge-fallback"]
    assert s.by_path["smart"].p50_ms == pytest.approx(52)


def test_todays_edge_has_one_hop_the_legacy_servers() -> None:
    line = parse_line(TODAY_MISS, "legacy")
    assert line is not None
    s = summarise([line], [])
    assert s.legacy.p95_ms == pytest.approx(100) and s.sidecar.n == 0
    assert s.sidecar.text() == "–"


def test_lines_are_read_from_an_offset(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(PUBLIC_HIT + "\n")
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write(PUBLIC_MISS + "\n")
    assert [x.cache for x in read_lines(log, offset, "public")] == ["MISS"]
    assert read_lines(tmp_path / "missing.log", 0, "public") == []


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (
        50.0,
        95.0,
        100.0,
    )
    assert math.isnan(percentile([], 95))
