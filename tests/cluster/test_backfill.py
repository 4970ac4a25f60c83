"""``heatcrop backfill`` on Ray Data in local mode (two CPUs, one Ray session for the module),
into a real Redis and a real Redis Cluster; then the sidecar, which must run no CNN."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
import time
from pathlib import Path

import pytest
import redis

import sidecar.app
from sidecar.app import make_app
from sidecar.backfill import BackfillSummary
from sidecar.caches import make_caches
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    SourceSettings,
)
from tests.cluster.conftest import BAD, GOOD, LIMITS
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.sidecar_metrics import scraped

pytestmark = pytest.mark.slow

# Ray's start-up, an actor's engine and a few dozen originals on two shared cores: minutes at
# worst; a run past this is a hang, failed rather than waited for.
RUN_TIMEOUT_S = 300.0
HEATMAPS = "heatcrop:v1:heatmaps:*"


def _settings(model_dir: Path, root: Path, url: str) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=SourceSettings(root=str(root), **LIMITS),  # type: ignore[arg-type]
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=CacheSettings(backend="redis", redis_url=url),
    ).validate()


def _backfill(settings: Settings, listing: object, workers: int = 2) -> BackfillSummary:
    """run_backfill in a thread, failed past RUN_TIMEOUT_S."""
    from sidecar.backfill_ray import Plan, run_backfill

    out: list[BackfillSummary | BaseException] = []

    def run() -> None:
        try:
            out.append(run_backfill(settings, listing, Plan(workers, batch_size=4), progress=None))  # type: ignore[arg-type]
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    assert out, f"backfill still running after {RUN_TIMEOUT_S} s"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _heatmap_keys(ports: list[int]) -> int:
    return sum(len(redis.Redis(port=p).keys(HEATMAPS)) for p in ports)


@pytest.fixture(params=["redis", "cluster"])
def shared(request, tmp_path) -> tuple[str, list[int]]:
    """(redis_url, ports) of a real single Redis or a real three-master Redis Cluster."""
    if request.param == "redis":
        server = RedisServer(tmp_path / "redis")
        server.start()
        request.addfinalizer(server.stop)
        return server.url, [server.port]
    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    request.addfinalizer(cluster.stop)
    return cluster.url, cluster.ports


@pytest.fixture
def patient_app_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    # A skipped Redis read on a busy 2-core machine would look like a missing heatmap here.
    monkeypatch.setattr(sidecar.app, "make_caches", lambda s: make_caches(s, l2_timeout_s=2.0))


async def test_after_a_backfill_a_cold_sidecar_serves_every_original_without_the_cnn(
    aiohttp_client, ray_session, model_dir, originals, shared, patient_app_caches
) -> None:
    from sidecar.backfill_ray import Listing

    url, ports = shared
    settings = _settings(model_dir, originals, url)
    summary = await asyncio.to_thread(_backfill, settings, Listing(walk=originals))
    assert (summary.done, summary.skipped) == (len(GOOD), 0)
    assert dict(summary.failed) == {type_: 1 for type_ in BAD.values()}
    assert _heatmap_keys(ports) == len(GOOD)
    # Each worker timed its batches: the rate with every worker busy.
    assert 1 <= len(summary.spans) <= 2
    assert summary.busy_per_s() > 0

    client = await aiohttp_client(make_app(settings))  # a new sidecar: nothing in memory
    for path in GOOD:
        resp = await client.get(f"/crop/400x300/{path}")
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Heatcrop-Path"] == "smart", path
    assert await scraped(client, "heatcrop_nn_runs_total") == 0
    hits = await scraped(client, "heatcrop_cache_requests_total", cache="heatmap", result="hit")
    assert hits == len(GOOD)

    again = await asyncio.to_thread(_backfill, settings, Listing(walk=originals))
    assert (again.done, again.skipped, again.failures) == (0, len(GOOD), len(BAD))


def test_a_listing_file_names_missing_and_bad_paths_and_counts_them(
    ray_session, model_dir, originals, redis_server, tmp_path
) -> None:
    from sidecar.backfill_ray import Listing

    listing = tmp_path / "paths.txt"
    lines = ["# the backlog", GOOD[0], "", f"  {GOOD[1]}  ", "gone/missing.jpg", "../etc/passwd"]
    listing.write_text("\n".join([*lines, *BAD]) + "\n")
    summary = _backfill(_settings(model_dir, originals, redis_server.url), Listing(file=listing))
    assert summary.done == 2
    assert dict(summary.failed) == {
        "SourceNotFound": 1,
        "BadPath": 1,
        **{type_: 1 for type_ in BAD.values()},
    }


def test_a_master_killed_mid_run_is_counted_and_the_next_run_finishes_the_rest(
    ray_session, model_dir, originals, redis_cluster, tmp_path
) -> None:
    from sidecar.backfill_ray import Listing

    # More originals than a worker makes in the time the kill takes, copies of the good ones.
    root = tmp_path / "many"
    for i in range(6):
        shutil.copytree(originals / "recipes", root / f"set{i}" / "recipes")
        shutil.copytree(originals / "cats", root / f"set{i}" / "cats")
    total = sum(1 for p in root.rglob("*.jpg"))
    settings = _settings(model_dir, root, redis_cluster.url)

    def kill_when_some_are_in() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and _heatmap_keys(redis_cluster.ports) < 4:
            time.sleep(0.02)
        redis_cluster.kill(2)

    killer = threading.Thread(target=kill_when_some_are_in, daemon=True)
    killer.start()
    first = _backfill(settings, Listing(walk=root), workers=1)
    killer.join(10)
    assert first.failures > 0
    assert set(first.failed) <= {"CacheWriteFailed", "CacheUnavailable"}, first.failed
    assert first.done + first.skipped + first.failures == total

    redis_cluster.restart(2)  # empty: what its slots held is lost
    stored = _heatmap_keys(redis_cluster.ports)
    second = _backfill(settings, Listing(walk=root))
    assert second.failures == 0
    # What was stored is skipped, not computed again; the rest is computed.
    assert (second.skipped, second.done) == (stored, total - stored)


@pytest.mark.parametrize("kind", ["walk", "file"])
def test_the_listing_reaches_the_workers_one_whole_batch_per_block(
    ray_session, tmp_path, kind: str
) -> None:
    """Ray Data would merge a read task's rows into one block and split it into 200 blocks of
    a few paths each: the workers then waited for their batches a few paths at a time."""
    from sidecar.backfill_ray import Listing, _walked, listing_dataset

    root = tmp_path / "root"
    for i in range(50):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"{i}.jpg").write_bytes(b"x")
    paths = list(_walked(root))
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    chosen = Listing(walk=root) if kind == "walk" else Listing(file=listing)
    ds = listing_dataset(chosen, 16).materialize()
    rows = [list(r["paths"]) for r in ds.take_all()]
    assert [len(r) for r in rows] == [16, 16, 16, 2]
    assert [p for r in rows for p in r] == paths
    assert ds.num_blocks() == len(rows)


def test_a_backfill_into_process_memory_is_refused(model_dir, originals) -> None:
    from sidecar.backfill_ray import Listing, run_backfill
    from sidecar.settings import SettingsError

    memory = dataclasses.replace(
        _settings(model_dir, originals, "redis://127.0.0.1:6379/0"), cache=CacheSettings()
    )
    with pytest.raises(SettingsError, match="HEATCROP_CACHE_BACKEND"):
        run_backfill(memory, Listing(walk=originals))
