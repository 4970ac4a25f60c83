"""Caches: the bounded in-process LRU, the memory/Redis tiers against a real redis-server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio

from engines.base import PROFILES
from engines.buckets import bucket_for, heatmap_shape
from sidecar.caches import (
    RETRY_AFTER_S,
    BoundedMemoryCache,
    Caches,
    TieredCache,
    box_key,
    heatmap_key,
    make_caches,
    override_key,
)
from sidecar.codec import MAX_BOX_BYTES, BoxRecord
from sidecar.core import Analysis
from sidecar.records import AnalysisExpect
from sidecar.settings import CacheSettings, SettingsError
from tests.support.redis_server import RedisServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def an_analysis(seed: int = 0, width: int = 1600, height: int = 1067) -> Analysis:
    """One the service could have made: a channel per profile, on its bucket's grid."""
    shape = (len(PROFILES), *heatmap_shape(bucket_for(width, height)))
    maps = np.random.default_rng(seed).normal(size=shape).astype(np.float16)
    return Analysis(width, height, maps, 0.75, "lite0-test")


# -- BoundedMemoryCache --------------------------------------------------------------------


async def test_lru_evicts_the_least_recently_used():
    cache = BoundedMemoryCache(max_entries=3)
    for k in "abc":
        await cache.set(k, k.encode())
    assert await cache.get("a") == b"a"  # a is now the most recent
    await cache.set("d", b"d")
    assert await cache.multi_get(list("abcd")) == [b"a", None, b"c", b"d"]
    await cache.set("c", b"C")  # an overwrite refreshes too
    await cache.set("e", b"e")
    assert await cache.multi_get(list("acde")) == [None, b"C", b"d", b"e"]
    assert len(cache) == 3
    assert cache.evictions == 2


async def test_exists_does_not_refresh():
    cache = BoundedMemoryCache(max_entries=2)
    await cache.set("a", b"a")
    await cache.set("b", b"b")
    assert await cache.exists("a")
    await cache.set("c", b"c")
    assert not await cache.exists("a")


async def test_ttl_expires_lazily_by_the_injected_clock():
    clock = FakeClock()
    cache = BoundedMemoryCache(max_entries=10, clock=clock)
    await cache.set("short", b"1", ttl=10)
    await cache.set("forever", b"2")
    await cache.set("zero", b"3", ttl=0)  # aiocache: a falsy ttl means no expiry
    clock.advance(9.99)
    assert await cache.get("short") == b"1"
    clock.advance(0.01)
    assert await cache.get("short") is None
    assert not await cache.exists("short")
    assert len(cache) == 2  # the expired entry went when it was looked at
    clock.advance(1e9)
    assert await cache.multi_get(["forever", "zero"]) == [b"2", b"3"]


async def test_default_ttl_and_expire():
    clock = FakeClock()
    cache = BoundedMemoryCache(max_entries=10, clock=clock, ttl=5)
    await cache.set("a", b"a")
    await cache.set("b", b"b")
    assert await cache.expire("a", 0)  # no expiry any more
    assert await cache.expire("b", 60)
    assert not await cache.expire("missing", 60)
    clock.advance(30)
    assert await cache.multi_get(["a", "b"]) == [b"a", b"b"]
    clock.advance(30)
    assert await cache.multi_get(["a", "b"]) == [b"a", None]


async def test_no_timer_per_key():
    # SimpleMemoryCache would leave one TimerHandle per key in the loop's heap.
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    cache = BoundedMemoryCache(max_entries=10_000, clock=FakeClock())
    for i in range(1000):
        await cache.set(f"k{i}", b"x", ttl=60)
    assert len(loop._scheduled) == before  # type: ignore[attr-defined]


async def test_byte_bound_evicts_by_size():
    cache = BoundedMemoryCache(max_entries=100, max_bytes=10)
    await cache.set("a", b"aaaa")
    await cache.set("b", b"bbbb")
    assert cache.nbytes == 8
    await cache.set("c", b"cccc")
    assert await cache.multi_get(["a", "b", "c"]) == [None, b"bbbb", b"cccc"]
    assert cache.nbytes == 8
    await cache.set("b", b"b")  # an overwrite replaces the old size
    assert cache.nbytes == 5
    await cache.delete("c")
    assert cache.nbytes == 1


async def test_a_value_over_the_byte_bound_is_not_stored():
    cache = BoundedMemoryCache(max_entries=100, max_bytes=10)
    await cache.set("k", b"old")
    await cache.set("other", b"1234")
    assert await cache.set("k", b"x" * 11) is False
    assert await cache.get("k") is None  # not the stale old value either
    assert await cache.get("other") == b"1234"  # nothing else was evicted for it
    assert cache.nbytes == 4


async def test_aiocache_api_surface():
    cache = BoundedMemoryCache(max_entries=100)
    assert await cache.get("k", default=b"dflt") == b"dflt"
    assert await cache.set("k", b"v") is True
    assert await cache.exists("k")
    with pytest.raises(ValueError, match="already exists"):
        await cache.add("k", b"w")
    assert await cache.add("new", b"n") is True
    assert await cache.multi_set([("m1", b"1"), ("m2", b"2")]) is True
    assert await cache.multi_get(["m1", "m2", "nope"]) == [b"1", b"2", None]
    assert await cache.increment("count") == 1
    assert await cache.increment("count", 5) == 6
    with pytest.raises(TypeError):
        await cache.increment("k")
    assert await cache.delete("k") == 1
    assert await cache.delete("k") == 0
    assert not await cache.exists("k")
    await cache.set("other:x", b"x")
    assert await cache.clear(namespace="m") is True
    assert await cache.multi_get(["m1", "m2", "other:x"]) == [None, None, b"x"]
    assert await cache.clear() is True
    assert len(cache) == 0
    assert cache.nbytes == 0
    with pytest.raises(TypeError, match="None"):
        await cache.set("k", None)
    await cache.close()


async def test_namespace_and_cas():
    cache = BoundedMemoryCache(max_entries=100, namespace="hm:")
    await cache.set("k", b"v1")
    assert await cache.get("k", namespace="hm:") == b"v1"
    assert await cache.get("k", namespace="box:") is None
    assert await cache.set("k", b"v2", _cas_token=b"stale") == 0
    assert await cache.set("k", b"v2", _cas_token=b"v1") is True
    assert await cache.get("k") == b"v2"


async def test_add_after_expiry_is_allowed():
    clock = FakeClock()
    cache = BoundedMemoryCache(max_entries=10, clock=clock)
    await cache.add("k", b"1", ttl=1)
    clock.advance(2)
    assert await cache.add("k", b"2") is True
    assert await cache.get("k") == b"2"


def test_bounds_must_be_positive():
    with pytest.raises(ValueError, match="max_entries"):
        BoundedMemoryCache(max_entries=0)
    with pytest.raises(ValueError, match="max_bytes"):
        BoundedMemoryCache(max_entries=1, max_bytes=0)


# -- TieredCache, memory only --------------------------------------------------------------


async def test_memory_only_tier():
    clock = FakeClock()
    cache = TieredCache("t", BoundedMemoryCache(10, clock=clock), ttl_s=60, clock=clock)
    assert await cache.get("k") is None
    assert await cache.set("k", b"v") is True
    assert await cache.get("k") == b"v"
    clock.advance(61)
    assert await cache.get("k") is None
    assert await cache.set("k", b"v", ttl_s=None) is True
    clock.advance(1e6)
    assert await cache.get("k") == b"v"
    assert await cache.delete("k") is True
    assert await cache.get("k") is None
    stats = cache.stats()
    assert (stats["l1_hits"], stats["l1_misses"], stats["l2_up"]) == (2, 3, 0)
    with pytest.raises(TypeError, match="bytes"):
        await cache.set("k", "text")  # type: ignore[arg-type]
    await cache.close()


class StalledBackend(BoundedMemoryCache):
    """An L2 whose reads hang until released: a Redis slow to answer (or not answering).

    The value is read at once and delivered late, as a reply already on its way would be.
    """

    def __init__(self) -> None:
        super().__init__(max_entries=100)
        self.release = asyncio.Event()
        self.reads = 0

    async def _get(self, key: str, encoding: Any = None, _conn: Any = None) -> Any:
        self.reads += 1
        value = await super()._get(key)
        await self.release.wait()
        return value


async def test_l2_concurrency_is_bounded_without_queueing():
    l2 = StalledBackend()
    cache = TieredCache("t", BoundedMemoryCache(10), l2, l2_max_inflight=2, l2_timeout_s=None)
    stalled = [asyncio.create_task(cache.get(f"k{i}")) for i in range(2)]
    await asyncio.sleep(0)
    assert await cache.get("k9") is None  # no slot: answered at once, from L1 only
    assert (cache.l2_busy, cache.l2_skipped, cache.l2_errors) == (1, 0, 0)
    assert cache.l2_up  # being busy is not being down
    l2.release.set()
    assert await asyncio.gather(*stalled) == [None, None]
    assert l2.reads == 2


async def test_a_local_set_during_an_l2_read_wins():
    l2 = StalledBackend()
    cache = TieredCache("t", BoundedMemoryCache(10), l2, negative_ttl_s=60, l2_timeout_s=None)
    reading = asyncio.create_task(cache.get("k"))  # L2 answers "absent", but late
    await asyncio.sleep(0)
    l2.release.set()
    await cache.set("k", b"new")
    assert await reading is None
    assert await cache.get("k") == b"new"  # not hidden behind the stale "absent"


async def test_l2_timeout_opens_the_breaker(caplog):
    clock = FakeClock()
    l2 = StalledBackend()
    cache = TieredCache(
        "t", BoundedMemoryCache(10), l2, l2_timeout_s=0.01, retry_after_s=5, clock=clock
    )
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await cache.get("k") is None
        assert await cache.get("k") is None
    assert (cache.l2_errors, cache.l2_skipped, l2.reads) == (1, 1, 1)
    assert not cache.l2_up
    assert "TimeoutError" in caplog.text
    l2.release.set()
    clock.advance(5)
    assert await cache.set("k", b"v") is True
    assert cache.l2_up
    assert await l2.get("k") == b"v"


# -- against a real redis-server -----------------------------------------------------------


@pytest.fixture
async def sidecars(redis_server: RedisServer) -> AsyncIterator[Any]:
    """Makes Caches as separate sidecars would (own memory, same Redis); closes them after."""
    made: list[Caches] = []

    def make(clock: FakeClock | None = None, **kw: Any) -> Caches:
        settings = CacheSettings(backend="redis", redis_url=redis_server.url, ttl_s=3600, **kw)
        # A generous timeout: a busy CI machine must not trip the breaker in these tests.
        caches = make_caches(
            settings, l2_timeout_s=2.0, retry_after_s=5.0, clock=clock or FakeClock()
        )
        made.append(caches)
        return caches

    yield make
    for caches in made:
        await caches.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis(port=redis_server.port)
    yield client
    await client.aclose()


async def test_l2_hit_populates_l1(sidecars):
    a, b = sidecars(), sidecars()
    assert await a.boxes.set("k", b"box") is True
    assert await b.boxes.get("k") == b"box"  # another sidecar: from Redis
    assert await b.boxes.get("k") == b"box"  # then from its own memory
    stats = b.boxes.stats()
    assert (stats["l1_misses"], stats["l2_hits"], stats["l1_hits"]) == (1, 1, 1)
    assert stats["l2_up"] == 1


async def test_second_sidecar_sees_analyses_and_boxes(sidecars):
    a, b = sidecars(), sidecars()
    key = heatmap_key("folder:recipes/1.jpg:1234:99", "lite0-test")
    analysis = an_analysis()
    assert await a.put_analysis(key, analysis) is True
    got = await b.get_analysis(key)
    assert got is not None
    np.testing.assert_array_equal(got.heatmaps, analysis.heatmaps)
    assert (got.width, got.height, got.model_version) == (1600, 1067, "lite0-test")
    bkey = box_key(key, 4, 3)
    assert await a.put_box(bkey, (10, 20, 410, 320), 0.3, "recipes/1.jpg") is True
    assert await b.get_box(box_key(key, 800, 600)) == BoxRecord(
        (10, 20, 410, 320), 0.3, "recipes/1.jpg"
    )
    assert await b.get_box(box_key(key, 3, 4)) is None


async def test_redis_holds_plain_bytes_with_ttls(sidecars, redis_client):
    caches = sidecars()
    await caches.heatmaps.set("h", b"\x00heat")
    await caches.overrides.set("o", b"focal")
    assert await redis_client.get("heatcrop:v1:heatmaps:h") == b"\x00heat"
    assert 3500 < await redis_client.ttl("heatcrop:v1:heatmaps:h") <= 3600
    assert await redis_client.ttl("heatcrop:v1:overrides:o") == -1  # overrides never expire
    assert await caches.heatmaps.delete("h") is True
    assert await redis_client.exists("heatcrop:v1:heatmaps:h") == 0


async def test_undecodable_redis_content_is_a_miss_and_dropped(sidecars, redis_client, caplog):
    caches = sidecars()
    await redis_client.set("heatcrop:v1:heatmaps:bad", b"\x80\x04\x95pickle?")
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await caches.get_analysis("bad") is None
    assert caches.stats()["codec"]["decode_errors"] == 1
    assert "dropping entry bad: bad magic" in caplog.text
    assert await redis_client.exists("heatcrop:v1:heatmaps:bad") == 0
    assert await caches.heatmaps.get("bad") is None  # gone from memory too


async def test_overrides_cross_sidecars_within_their_local_ttl(sidecars):
    clock = FakeClock()
    a, b = sidecars(clock), sidecars(clock)
    key = override_key("recipes/1.jpg")
    assert await a.overrides.get(key) is None  # remembered as absent for a moment
    assert await b.overrides.set(key, b"focal-1") is True
    assert await a.overrides.get(key) is None
    clock.advance(2.0)
    assert await a.overrides.get(key) == b"focal-1"
    assert await b.overrides.delete(key) is True
    assert await a.overrides.get(key) == b"focal-1"  # its copy, for a moment
    clock.advance(2.0)
    assert await a.overrides.get(key) is None
    assert a.overrides.stats()["l1_negative_hits"] == 1


async def test_redis_down_and_back(sidecars, redis_server, redis_client, caplog):
    clock = FakeClock()
    caches, other = sidecars(clock), sidecars()
    boxes = caches.boxes
    await boxes.set("before", b"1")
    await other.boxes.set("only-in-redis", b"2")

    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        for i in range(50):
            assert await boxes.get("before") == b"1"  # from memory
            assert await boxes.get("only-in-redis") is None  # a miss, not an error
            assert await boxes.set(f"during-{i}", b"3") is False  # memory only
            assert await boxes.get(f"during-{i}") == b"3"
            assert await boxes.delete("nothing") is False
    stats = boxes.stats()
    assert stats["l2_errors"] == 1  # the breaker: one failure, then Redis is left alone
    assert stats["l2_skipped"] == 50 * 3 - 1  # the get of "during-i" is an L1 hit
    assert stats["l2_up"] == 0
    down_logs = [r for r in caplog.records if "redis failed" in r.getMessage()]
    assert len(down_logs) == 1

    clock.advance(5.0)  # half-open while still dead: a single probe, then skipped again
    assert await boxes.get("only-in-redis") is None
    assert await boxes.get("only-in-redis") is None
    assert (boxes.stats()["l2_errors"], boxes.stats()["l2_skipped"]) == (2, 150)

    redis_server.start()  # empty: no persistence
    assert await boxes.set("early", b"4") is False  # not retried before retry_after_s
    assert await redis_client.exists("heatcrop:v1:boxes:early") == 0
    clock.advance(5.0)
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await boxes.set("after", b"5") is True
    assert boxes.l2_up
    assert "redis is back" in caplog.text
    assert await redis_client.get("heatcrop:v1:boxes:after") == b"5"
    # The other sidecar never saw the outage; its pooled connection went stale with the
    # restart, and that alone must not count as Redis being down.
    assert await other.boxes.get("after") == b"5"
    assert other.boxes.stats()["l2_errors"] == 0
    assert boxes.stats()["l2_errors"] == 2


async def test_redis_absent_at_start_is_not_an_error(tmp_path):
    from tests.support.redis_server import free_port

    settings = CacheSettings(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    caches = make_caches(settings, clock=FakeClock())
    try:
        assert await caches.put_analysis("k", an_analysis()) is False  # Redis not told
        got = await caches.get_analysis("k")
        assert got is not None
        assert got.width == 1600
        assert caches.heatmaps.stats()["l2_errors"] == 1
    finally:
        await caches.close()


# -- make_caches, keys ---------------------------------------------------------------------


async def test_make_caches_memory_backend_bounds():
    settings = CacheSettings(heatmap_entries=123, box_entries=456, ttl_s=99)
    caches = make_caches(settings)
    try:
        assert [c.l2 for c in (caches.heatmaps, caches.boxes, caches.overrides)] == [None] * 3
        assert caches.heatmaps.l1.max_entries == 123
        assert caches.boxes.l1.max_entries == 456
        assert caches.overrides.l1.max_entries > 0
        assert all(c.l1.max_bytes for c in (caches.heatmaps, caches.boxes, caches.overrides))
        assert (caches.heatmaps.ttl_s, caches.boxes.ttl_s, caches.overrides.ttl_s) == (99, 99, None)
        assert await caches.put_box("b", (0, 0, 4, 3), 0.5, "p") is True
        assert (await caches.get_box("b")).box == (0, 0, 4, 3)
        assert set(caches.stats()) == {"heatmaps", "boxes", "overrides", "codec"}
    finally:
        await caches.close()


@pytest.mark.parametrize(
    "url",
    ["", "http://127.0.0.1:6379/0", "redis://", "redis://h:notaport/0", "redis://h:6379/x"],
)
def test_bad_redis_url_names_the_variable(url):
    with pytest.raises(SettingsError, match="HEATCROP_CACHE_REDIS_URL"):
        make_caches(CacheSettings(backend="redis", redis_url=url))


async def test_redis_url_parts():
    settings = CacheSettings(backend="redis", redis_url="redis://:p%40ss@cache.local:6380/3")
    caches = make_caches(settings)
    try:
        l2 = caches.heatmaps.l2
        assert (l2.endpoint, l2.port, l2.db, l2.password) == ("cache.local", 6380, 3, "p@ss")
        assert l2.namespace == "heatcrop:v1:heatmaps"
    finally:
        await caches.close()


def test_heatmap_key_is_bounded_and_distinct():
    k = heatmap_key("folder:recipes/1.jpg:123:456", "lite0-abc")
    assert len(k) == 40
    assert int(k, 16) >= 0
    assert len(heatmap_key("x/" * 10_000, "v")) == 40
    assert k == heatmap_key("folder:recipes/1.jpg:123:456", "lite0-abc")
    assert k != heatmap_key("folder:recipes/1.jpg:123:456", "lite0-abd")
    assert k != heatmap_key("folder:recipes/2.jpg:123:456", "lite0-abc")
    # the version/identity boundary cannot be shifted to forge a collision
    assert heatmap_key("2:x", "1") != heatmap_key("x", "1:2")


def test_box_key_reduces_the_aspect():
    hk = heatmap_key("id", "v")
    assert box_key(hk, 400, 300) == box_key(hk, 800, 600) == box_key(hk, 4, 3)
    assert box_key(hk, 400, 300) != box_key(hk, 300, 400)
    assert box_key(hk, 400, 300) != box_key(hk, 400, 300, 1)
    assert box_key(hk, 400, 300, "abc") == f"{hk}:4x3:abc"
    for w, h in ((0, 300), (400, 0), (-4, 3)):
        with pytest.raises(ValueError, match="aspect"):
            box_key(hk, w, h)
    with pytest.raises(ValueError, match="variant"):
        box_key(hk, 4, 3, "x" * 65)


def test_override_key():
    assert len(override_key("recipes/1.jpg")) == 40
    assert override_key("recipes/1.jpg") != override_key("recipes/2.jpg")


async def test_the_synchronous_methods_see_what_the_aiocache_api_sees():
    cache = BoundedMemoryCache(max_entries=100, namespace="hm:")
    assert cache.set_now("a", b"1", None)
    assert await cache.get("a") == b"1"
    await cache.set("b", b"2")
    assert cache.get_now("b") == b"2" and cache.exists_now("b")
    assert cache.delete_now("b") and not await cache.exists("b")
    assert cache.get_now("missing") is None and not cache.delete_now("missing")


async def test_a_stalled_real_redis_costs_one_timeout_then_the_breaker_keeps_it_out(
    redis_server, redis_client, caplog
):
    # The service's own 50 ms budget against a real Redis that stops answering (CLIENT PAUSE
    # holds every command for 2 s): one read gives up at the budget, the breaker opens, the
    # next read does not wait at all; once Redis answers again the breaker lets it back in.
    clock = FakeClock()
    settings = CacheSettings(backend="redis", redis_url=redis_server.url, ttl_s=3600)
    caches = make_caches(settings, clock=clock)
    try:
        assert await caches.boxes.set("k", b"box") is True  # connected and up
        await redis_client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
            assert await caches.heatmaps.get("absent") is None
            assert await caches.heatmaps.get("absent") is None
        stats = caches.heatmaps.stats()
        assert (stats["l2_errors"], stats["l2_skipped"], stats["l2_up"]) == (1, 1, 0)
        assert "redis failed" in caplog.text
        while not redis_server.ping():  # the pause ends
            await asyncio.sleep(0.05)
        clock.advance(RETRY_AFTER_S)
        assert await caches.heatmaps.set("h", b"heat") is True
        assert caches.heatmaps.stats()["l2_up"] == 1
    finally:
        await caches.close()


# -- what Redis holds is not trusted (issue 21, item 8) -------------------------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_value_over_the_bound_is_dropped_unread_and_the_breaker_stays_closed(
    sidecars, redis_client, caplog
):
    caches = sidecars()
    await redis_client.set("heatcrop:v1:boxes:huge", b"HCBX\x02" + bytes(8 * 1024 * 1024))
    sent = (await redis_client.info("stats"))["total_net_output_bytes"]
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await caches.get_box("huge") is None
    assert (await redis_client.info("stats"))["total_net_output_bytes"] - sent < 64 * 1024
    assert _warnings(caplog) == [f"cache boxes: dropping entry huge: over {MAX_BOX_BYTES} bytes"]
    assert await redis_client.exists("heatcrop:v1:boxes:huge") == 0
    stats = caches.boxes.stats()
    assert (stats["l2_refused"], stats["l2_errors"], stats["l2_up"]) == (1, 0, 1)


async def test_a_value_that_is_not_a_string_is_dropped_not_a_redis_failure(
    sidecars, redis_client, caplog
):
    caches = sidecars()
    await redis_client.rpush("heatcrop:v1:heatmaps:list", b"x")
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await caches.get_analysis("list") is None
    assert _warnings(caplog) == ["cache heatmaps: dropping entry list: not a string value"]
    assert await redis_client.exists("heatcrop:v1:heatmaps:list") == 0
    stats = caches.heatmaps.stats()
    assert (stats["l2_errors"], stats["l2_up"]) == (0, 1)
    assert await caches.heatmaps.set("list", b"v") is True  # Redis is used as before


async def test_a_record_copied_under_another_key_is_dropped(sidecars, redis_client, caplog):
    a, b = sidecars(), sidecars()
    key = heatmap_key("file:a.jpg:10:1", "lite0-test")
    assert await a.put_box(box_key(key, 1, 1), (0, 0, 400, 400), 0.5, "a.jpg") is True
    assert await a.put_analysis(key, an_analysis()) is True
    other = heatmap_key("file:b.jpg:10:1", "lite0-test")
    for kind, src, dst in (
        ("boxes", box_key(key, 1, 1), box_key(other, 1, 1)),
        ("heatmaps", key, other),
    ):
        raw = await redis_client.get(f"heatcrop:v1:{kind}:{src}")
        await redis_client.set(f"heatcrop:v1:{kind}:{dst}", raw)
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await b.get_box(box_key(other, 1, 1)) is None
        assert await b.get_analysis(other) is None
        assert await b.get_box(box_key(key, 1, 1)) is not None  # under its own key: fine
    assert len(_warnings(caplog)) == 2
    assert all("stored under another key" in w for w in _warnings(caplog))
    assert b.stats()["codec"]["decode_errors"] == 2


async def test_a_record_not_for_the_original_is_dropped_with_one_warning(
    sidecars, redis_client, caplog
):
    caches = sidecars()
    key = heatmap_key("file:a.jpg:10:1", "lite0-test")
    assert await caches.put_analysis(key, an_analysis(width=1, height=1)) is True
    expect = AnalysisExpect((1600, 1067), 75_000_000)
    other = sidecars()  # its own memory: the record comes from Redis
    with caplog.at_level(logging.WARNING, logger="sidecar.caches"):
        assert await other.get_analysis(key, expect) is None
        assert await other.get_analysis(key, expect) is None  # gone: a plain miss
    assert _warnings(caplog) == [
        f"cache heatmaps: dropping entry {key}: claims a 1x1 original; it is 1600x1067"
    ]
    assert await redis_client.exists(f"heatcrop:v1:heatmaps:{key}") == 0


async def test_the_size_bound_holds_for_any_second_tier():
    l2 = BoundedMemoryCache(10)
    cache = TieredCache("t", BoundedMemoryCache(10), l2, max_value_bytes=8, l2_timeout_s=None)
    await l2.set("big", b"123456789")
    await l2.set("small", b"12345678")
    assert await cache.get("big") is None
    assert await cache.get("small") == b"12345678"
    assert await l2.get("big") is None  # dropped from the second tier too
    assert cache.stats()["l2_refused"] == 1
