"""The backfill's listing: a file read in byte ranges (every path once, whatever the ranges),
or the folder walked; streamed, never held whole. No Ray runtime needed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sidecar import backfill_ray
from sidecar.backfill_ray import Listing, ListingDatasource, _lines, _walked
from sidecar.warm import read_paths

LINES = [f"{'deep/' * (i % 7)}photo-{i}-{'x' * (i % 13)}.jpg" for i in range(300)]
LINES[5:5] = ["# a comment", "", "   ", "  padded.jpg  ", "naïve/crème brûlée.jpg"]


@pytest.fixture
def listing(tmp_path: Path) -> Path:
    path = tmp_path / "paths.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64, 1000])
def test_ranges_read_every_line_once(listing: Path, parts: int) -> None:
    size = listing.stat().st_size
    edges = [size * k // parts for k in range(parts + 1)]
    got = [ln for a, b in itertools.pairwise(edges) for ln in _lines(listing, a, b)]
    assert [ln.rstrip("\n") for ln in got] == LINES


def test_a_datasource_splits_a_file_and_yields_rows_of_paths(
    listing: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill_ray, "CHUNK_BYTES", 500)
    source = ListingDatasource(Listing(file=listing), rows=16)
    tasks = source.get_read_tasks(parallelism=8)
    assert len(tasks) == 8 < source.read_tasks()
    rows = [row for task in tasks for block in task() for row in block.column("paths").to_pylist()]
    assert all(1 <= len(row) <= 16 for row in rows)
    assert [p for row in rows for p in row] == read_paths(LINES)


def test_a_walk_lists_files_relative_to_the_root(tmp_path: Path) -> None:
    for name in ("b/2.jpg", "a/1.jpg", "top.jpg", "a/z/3.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert list(_walked(tmp_path)) == ["top.jpg", "a/1.jpg", "a/z/3.png", "b/2.jpg"]
    source = ListingDatasource(Listing(walk=tmp_path), rows=3)
    tasks = source.get_read_tasks(parallelism=4)
    assert len(tasks) == source.read_tasks() == 1  # one walk, streamed a batch at a time
    rows = [b.column("paths").to_pylist() for b in tasks[0]()]
    assert rows == [[["top.jpg", "a/1.jpg", "a/z/3.png"]], [["b/2.jpg"]]]


def test_a_listing_is_a_file_or_a_walk() -> None:
    with pytest.raises(ValueError):
        Listing()
    with pytest.raises(ValueError):
        Listing(file=Path("a"), walk=Path("b"))
