"""Redis Cluster as the shared tier: a real three-master cluster on loopback, the sidecar's own
caches and app on it, a master killed and brought back mid-test."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import redis

import sidecar.app
import sidecar.caches
from engines.base import PROFILES
from engines.buckets import bucket_for, heatmap_shape
from sidecar.app import make_app
from sidecar.caches import make_caches
from sidecar.codec import encode_analysis
from sidecar.core import Analysis
from sidecar.records import AnalysisExpect
from sidecar.routes import SERVICES
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    SettingsError,
    SourceSettings,
    load,
    redis_target,
)
from tests.cluster.conftest import GOOD
from tests.support.redis_cluster import RedisCluster
from tests.support.sidecar_metrics import scraped

ANSWERS = ("smart", "cached", "low-confidence")
RETRY_AFTER_S = 0.5


# -- the URL form ---------------------------------------------------------------------------


def test_a_cluster_url_names_its_seed_nodes() -> None:
    target = redis_target("redis-cluster://:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert target.cluster
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (target.password, target.db, target.ssl) == ("p@ss", 0, False)
    assert redis_target("rediss-cluster://h:7000").ssl
    single = redis_target("redis://cache.local:6380/3")
    assert (single.cluster, single.nodes, single.db) == (False, (("cache.local", 6380),), 3)


def test_settings_take_a_cluster_url_from_the_environment() -> None:
    env = {
        "HEATCROP_CACHE_BACKEND": "redis",
        "HEATCROP_CACHE_REDIS_URL": "redis-cluster://a:7000,b:7000",
    }
    assert load(environ=env).cache.redis_url == "redis-cluster://a:7000,b:7000"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "redis-cluster://",
        "redis-cluster://a:7000,,b:7000",
        "redis-cluster://a:notaport",
        "redis-cluster://a:7000/1",  # a cluster has db 0 only
        "redis://a:7000,b:7000",  # several hosts need the cluster form
        "cluster://a:7000",
    ],
)
def test_a_bad_url_stops_start_up_naming_the_variable(url: str) -> None:
    env = {"HEATCROP_CACHE_BACKEND": "redis", "HEATCROP_CACHE_REDIS_URL": url}
    with pytest.raises(SettingsError, match="HEATCROP_CACHE_REDIS_URL"):
        load(environ=env)


def test_the_error_does_not_show_the_password() -> None:
    with pytest.raises(SettingsError) as err:
        redis_target("redis-cluster://:s3cret@a:notaport")
    assert "s3cret" not in str(err.value)


# -- the caches on a cluster ----------------------------------------------------------------


def _analysis(width: int = 64, height: int = 48) -> Analysis:
    """One the service could have made: a channel per profile, on the engine's grid."""
    grid = heatmap_shape(bucket_for(width, height))
    return Analysis(width, height, np.ones((len(PROFILES), *grid), np.float16), 0.5, "v")


def _caches(url: str) -> sidecar.caches.Caches:
    # A patient budget: a busy 2-core machine must not trip the breaker of a cluster that is up.
    return make_caches(CacheSettings(backend="redis", redis_url=url), l2_timeout_s=2.0)


async def test_keys_spread_over_every_master(redis_cluster: RedisCluster) -> None:
    caches = _caches(redis_cluster.url)
    try:
        for i in range(60):
            assert await caches.heatmaps.set(f"k{i}", b"x" * 10)
            assert await caches.boxes.set(f"k{i}", b"y" * 10)
    finally:
        await caches.close()
    sizes = [redis.Redis(port=p).dbsize() for p in redis_cluster.ports]
    assert sum(sizes) == 120
    assert all(n > 0 for n in sizes), sizes


async def test_a_batch_of_heatmaps_is_read_in_one_call_and_checked(
    redis_cluster: RedisCluster,
) -> None:
    writer, reader = _caches(redis_cluster.url), _caches(redis_cluster.url)
    try:
        keys = [f"h{i}" for i in range(12)]
        for key in keys[:8]:
            assert await writer.put_analysis(key, _analysis())
        # A record stored under another key is no heatmap of this one.
        assert await writer.heatmaps.set(keys[8], encode_analysis(_analysis(), key="elsewhere"))
        expects = [AnalysisExpect()] * len(keys)
        found = await reader.get_analyses(keys, expects)
        assert found is not None
        assert [a is not None for a in found] == [True] * 8 + [False] * 4
        assert reader.decode_errors == 1
        assert reader.heatmaps.l2_hits == 9 and reader.heatmaps.l2_misses == 3
    finally:
        await writer.close()
        await reader.close()


async def test_a_batch_read_says_so_when_the_cluster_is_down(redis_cluster: RedisCluster) -> None:
    caches = _caches(redis_cluster.url)
    try:
        assert await caches.put_analysis("h", _analysis())
        redis_cluster.kill(0)
        redis_cluster.wait_state("fail")
        assert await caches.get_analyses(["h", "i"], [AnalysisExpect()] * 2) is None
        assert not caches.heatmaps.l2_up
    finally:
        await caches.close()


async def test_no_seed_node_reachable_is_memory_only_not_an_error(
    redis_cluster: RedisCluster,
) -> None:
    url = redis_cluster.url
    redis_cluster.stop()
    caches = _caches(url)
    try:
        assert await caches.heatmaps.set("k", b"v") is False  # memory took it, the cluster not
        assert await caches.heatmaps.get("k") == b"v"
        assert caches.heatmaps.l2_errors == 1
    finally:
        await caches.close()


# -- the sidecar on a cluster ---------------------------------------------------------------


@pytest.fixture
def quick_breaker(monkeypatch: pytest.MonkeyPatch) -> None:
    # A patient Redis budget (a busy 2-core machine must not trip the breaker), and a breaker
    # that tries the cluster again soon after it came back.
    caches = partial(make_caches, l2_timeout_s=2.0, retry_after_s=RETRY_AFTER_S)
    monkeypatch.setattr(sidecar.app, "make_caches", caches)


def _settings(model_dir: Path, originals: Path, url: str, **server: object) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000, **server),  # type: ignore[arg-type]
        source=SourceSettings(root=str(originals)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=CacheSettings(backend="redis", redis_url=url),
    ).validate()


async def _crop(client, size: str, path: str) -> str:
    resp = await client.get(f"/crop/{size}/{path}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Accel-Redirect"].startswith("/@legacy")
    return resp.headers["X-Heatcrop-Path"]


async def test_a_killed_master_leaves_the_sidecar_answering_from_memory_then_back(
    aiohttp_client, model_dir, originals, redis_cluster, quick_breaker, caplog
) -> None:
    settings = _settings(model_dir, originals, redis_cluster.url)
    client = await aiohttp_client(make_app(settings))
    heatmaps = client.app[SERVICES].caches.heatmaps
    first, second, third, fourth = GOOD[0], GOOD[4], GOOD[8], GOOD[1]
    assert await _crop(client, "300x100", first) in ANSWERS
    assert heatmaps.l2_up

    redis_cluster.kill(1)
    redis_cluster.wait_state("fail")
    with caplog.at_level(logging.WARNING):
        assert await _crop(client, "100x100", first) in ANSWERS  # its heatmap, from memory
        assert await _crop(client, "300x100", second) in ANSWERS  # computed, kept in memory
    assert not heatmaps.l2_up
    assert "redis failed" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    redis_cluster.restart(1)
    await asyncio.sleep(RETRY_AFTER_S)
    assert await _crop(client, "300x100", third) in ANSWERS
    assert await _crop(client, "300x100", fourth) in ANSWERS
    assert heatmaps.l2_up  # back: the breaker's probe found the cluster

    # What it computed since is in the cluster: a second sidecar runs no CNN for it.
    other = await aiohttp_client(make_app(settings))
    for path in (third, fourth):
        assert await _crop(other, "100x100", path) in ANSWERS
    assert await scraped(other, "heatcrop_nn_runs_total") == 0


async def test_an_override_set_through_one_sidecar_holds_on_another(
    aiohttp_client, model_dir, originals, redis_cluster, quick_breaker, monkeypatch
) -> None:
    monkeypatch.setattr(sidecar.caches, "OVERRIDE_L1_TTL_S", 0.2)
    settings = _settings(model_dir, originals, redis_cluster.url, override_token="t")
    one = await aiohttp_client(make_app(settings))
    two = await aiohttp_client(make_app(settings))
    path = GOOD[0]
    assert await _crop(two, "100x300", path) in ANSWERS  # before: no override, cached as such
    auth = {"Authorization": "Bearer t"}
    put = await one.put(f"/override/{path}", json={"box": [0, 0, 40, 40]}, headers=auth)
    assert put.status == 200, await put.text()
    await asyncio.sleep(0.3)  # the other sidecar's copy of "no override" has expired
    assert await _crop(two, "100x300", path) == "override"
    cleared = await one.delete(f"/override/{path}", headers=auth)
    assert cleared.status == 204
    await asyncio.sleep(0.3)
    assert await _crop(two, "100x300", path) in ANSWERS[:2]

    # With the master of the override's slot dead, a change is refused, not half stored.
    redis_cluster.kill(0)
    redis_cluster.wait_state("fail")
    moved = await one.put(f"/override/{path}", json={"box": [0, 0, 40, 40]}, headers=auth)
    assert moved.status == 503
