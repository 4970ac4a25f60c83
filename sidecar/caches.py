"""Heatmap, box and override caches: a bounded in-process LRU, optionally in front of Redis.

Heatmaps and boxes are immutable per key (the key names the original's identity, the model
version and, for a box, the aspect and what else the box depends on: sidecar/job.py,
``CropJob.set_identity``), so a copy in process memory never goes stale; only overrides
change in place, and their in-process copies live a few seconds when Redis is shared. Redis
is a help, never a dependency: when it fails the caches carry on from memory and stop asking
it for ``retry_after_s`` (a circuit breaker), so a dead Redis costs neither errors nor a
connect attempt per request.

Nor is what Redis holds trusted (issue 21, item 8): a value over the largest record of its kind is
dropped unread (``GETRANGE`` fetches one byte past the bound), and a record is used only once the
codec has decoded it, it names the key it was read under, and it is what the request expects
(sidecar/records.py). Whatever fails is deleted from both tiers, logged once (key and reason) and
read as a miss; none of it is a Redis failure, so the breaker stays closed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.exceptions
from aiocache import RedisCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer, NullSerializer
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sidecar.codec import (
    MAX_ANALYSIS_BYTES,
    MAX_BOX_BYTES,
    BoxRecord,
    CodecError,
    decode_analysis,
    decode_box,
    encode_analysis,
    encode_box,
)
from sidecar.core import Analysis
from sidecar.records import AnalysisExpect, BadRecord, BoxExpect, check_analysis, check_box
from sidecar.settings import CacheSettings, RedisTarget, redis_target

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# What a failing Redis raises through aiocache: refused/reset sockets (OSError, and redis'
# ConnectionError), aiocache's per-operation timeout (TimeoutError) and Redis' own errors; a
# cluster client also its own (no seed node reachable, a slot no master covers), which are not
# RedisErrors; and on uvloop (the service's loop, and Ray's workers') a write on a connection
# the dead server closed can surface as uvloop's RuntimeError("unable to perform operation on
# <TCPTransport closed=True ...>; the handler is closed") instead of a ConnectionError (seen
# when a cluster master was killed under a backfill).
L2_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    RuntimeError,
)

L2_TIMEOUT_S = 0.05  # per Redis operation; a slow Redis must not eat the request's deadline
RETRY_AFTER_S = 5.0  # how long a failed Redis is left alone
L2_MAX_INFLIGHT = 64  # concurrent Redis operations per cache (and connections in its pool)
REDIS_PREFIX = "heatcrop:v1"

# Byte bounds per entry for the in-process tier, generous: a heatmap is ~0.5 KiB
# (2 x 7 x 14 float16 + header), a box ~50 bytes plus its path.
HEATMAP_BYTES_PER_ENTRY = 4096
BOX_BYTES_PER_ENTRY = 512
OVERRIDE_ENTRIES = 100_000
OVERRIDE_BYTES_PER_ENTRY = 512
# An override record is a JSON box of four ints up to 10^6 and a version count: ~60 bytes.
MAX_OVERRIDE_BYTES = 1024
# With a shared Redis, another sidecar may change an override: local copies (and local "there
# is none") are trusted this long.
OVERRIDE_L1_TTL_S = 2.0


class BoundedMemoryCache(BaseCache):
    """An aiocache backend: LRU bounded by entries (and bytes of bytes values), lazy TTL.

    aiocache's SimpleMemoryCache schedules one ``loop.call_later`` TimerHandle per key with a
    TTL, and has no bound at all. At 100k entries that is 100k live TimerHandles (a few hundred
    bytes each, plus their closures) in the loop's timer heap, whose every push and cancel is
    O(log n) on the request path, for keys that mostly get evicted or overwritten before their
    timer fires. Here an entry stores its expiry time and is dropped when it is next looked at
    or reaches the LRU end; the bound keeps the expired-but-unvisited ones in check.
    """

    NAME = "bounded-memory"

    def __init__(
        self,
        max_entries: int,
        max_bytes: int | None = None,
        clock: Clock = time.monotonic,
        **kwargs: Any,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        # No per-operation timeout by default: aiocache wraps each timed call in
        # asyncio.wait_for, a task per call, for operations that never wait on anything.
        kwargs.setdefault("timeout", None)
        super().__init__(serializer=NullSerializer(), **kwargs)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.nbytes = 0
        self.evictions = 0
        # key -> (value, expires_at or None, size counted against max_bytes)
        self._data: OrderedDict[str, tuple[Any, float | None, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    # -- synchronous access, for callers in this process -------------------------------------
    # aiocache's public methods wrap every call in decorators (an environment lookup, plugin
    # hooks, a serializer, a timeout) that cost more than the lookup itself; TieredCache's L1
    # is read on every request, so it uses these.

    def get_now(self, key: str) -> Any:
        return self._lookup(self.build_key(key), touch=True)

    def set_now(self, key: str, value: Any, ttl: float | None) -> bool:
        return self._store(self.build_key(key), value, ttl)

    def exists_now(self, key: str) -> bool:
        return self._lookup(self.build_key(key), touch=False) is not None

    def delete_now(self, key: str) -> bool:
        return self._drop(self.build_key(key))

    # -- aiocache primitives --------------------------------------------------------------

    async def _get(self, key: str, encoding: str | None = None, _conn: Any = None) -> Any:
        return self._lookup(key, touch=True)

    async def _gets(self, key: str, encoding: str | None = None, _conn: Any = None) -> Any:
        return self._lookup(key, touch=True)

    async def _multi_get(
        self, keys: list[str], encoding: str | None = None, _conn: Any = None
    ) -> list[Any]:
        return [self._lookup(k, touch=True) for k in keys]

    async def _set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> bool | int:
        if _cas_token is not None and _cas_token != self._lookup(key, touch=False):
            return 0
        return self._store(key, value, ttl)

    async def _multi_set(
        self, pairs: list[tuple[str, Any]], ttl: float | None = None, _conn: Any = None
    ) -> bool:
        for key, value in pairs:
            self._store(key, value, ttl)
        return True

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if self._lookup(key, touch=False) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return self._store(key, value, ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self._lookup(key, touch=False) is not None

    async def _increment(self, key: str, delta: int, _conn: Any = None) -> int:
        current = self._lookup(key, touch=False)
        if current is None:
            self._store(key, delta, None)
            return delta
        try:
            value = int(current) + delta
        except (TypeError, ValueError):
            raise TypeError("Value is not an integer") from None
        _, expires, _ = self._data[key]
        self._put(key, value, expires)
        return value

    async def _expire(self, key: str, ttl: float | None, _conn: Any = None) -> bool:
        value = self._lookup(key, touch=False)
        if value is None:
            return False
        self._put(key, value, self._expiry(ttl))
        return True

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return 1 if self._drop(key) else 0

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        if namespace:
            for key in [k for k in self._data if k.startswith(namespace)]:
                self._drop(key)
        else:
            self._data.clear()
            self.nbytes = 0
        return True

    async def _redlock_release(self, key: str, value: Any) -> int:
        if self._lookup(key, touch=False) == value:
            return 1 if self._drop(key) else 0
        return 0

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        return None

    # -- internals ------------------------------------------------------------------------

    def _lookup(self, key: str, touch: bool) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires, _ = entry
        if expires is not None and self.clock() >= expires:
            self._drop(key)
            return None
        if touch:
            self._data.move_to_end(key)
        return value

    def _store(self, key: str, value: Any, ttl: float | None) -> bool:
        if value is None:  # aiocache reads None as "missing": storing it would be a lie
            raise TypeError("None cannot be cached")
        if self.max_bytes is not None and _size(value) > self.max_bytes:
            self._drop(key)  # the old value must not outlive a newer one that did not fit
            return False
        self._put(key, value, self._expiry(ttl))
        self._evict()
        return True

    def _put(self, key: str, value: Any, expires: float | None) -> None:
        self._drop(key)
        size = _size(value)
        self._data[key] = (value, expires, size)
        self.nbytes += size

    def _drop(self, key: str) -> bool:
        entry = self._data.pop(key, None)
        if entry is None:
            return False
        self.nbytes -= entry[2]
        return True

    def _evict(self) -> None:
        while len(self._data) > self.max_entries or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        ):
            _, (_, _, size) = self._data.popitem(last=False)
            self.nbytes -= size
            self.evictions += 1

    def _expiry(self, ttl: float | None) -> float | None:
        # aiocache's convention: a falsy ttl means "no expiry".
        return self.clock() + ttl if ttl else None


def _size(value: Any) -> int:
    return len(value) if isinstance(value, bytes | bytearray) else 0


class BytesSerializer(BaseSerializer):
    """Bytes in, bytes out: the values are our own encodings (sidecar.codec), never pickles.

    ``encoding = None`` also tells aiocache's Redis backend not to decode replies as text.
    """

    DEFAULT_ENCODING = None

    def dumps(self, value: Any) -> bytes:
        if not isinstance(value, bytes):
            raise TypeError(f"expected bytes, got {type(value).__name__}")
        return value

    def loads(self, value: Any) -> Any:
        return value


class Refused(NamedTuple):
    """An L2 value refused before it was read whole: too large, or not a string."""

    reason: str


class RedisL2(RedisCache):
    """aiocache's RedisCache without the calls redis-py 5+ deprecates (SETEX, ``close()``),
    and with a read that never transfers more than a bound."""

    async def get_bounded(self, key: str, limit: int) -> bytes | Refused | None:
        """The value at ``key`` if it holds at most ``limit`` bytes; None when absent (or
        empty); ``Refused`` when it is larger (only ``limit`` + 1 bytes cross the wire) or not
        a string at all. A whole GET of a hostile 50 MB value blew the 50 ms budget of every
        read, which opened the breaker each time."""
        try:
            value = await self.client.getrange(self.build_key(key), 0, limit)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            return Refused("not a string value")
        if not value:
            return None
        if len(value) > limit:
            return Refused(f"over {limit} bytes")
        return bytes(value)

    async def _set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> Any:
        # aiocache calls SETEX/PSETEX, which redis-py deprecates (a warning per call).
        if _cas_token is not None:
            return await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        if not ttl:
            return await self.client.set(key, value)
        if isinstance(ttl, float):
            return await self.client.set(key, value, px=max(1, int(ttl * 1000)))
        return await self.client.set(key, value, ex=ttl)

    async def get_many_bounded(self, keys: list[str], limit: int) -> list[bytes | Refused | None]:
        """``get_bounded`` of each key in one round trip (a pipeline; a cluster client sends
        one per master); a key's own error (a wrong type) is ``Refused``, not a failure."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.getrange(self.build_key(key), 0, limit)
        out: list[bytes | Refused | None] = []
        for value in await pipe.execute(raise_on_error=False):
            if isinstance(value, redis.exceptions.ResponseError):
                if not str(value).startswith("WRONGTYPE"):
                    raise value
                out.append(Refused("not a string value"))
            elif isinstance(value, BaseException):
                raise value
            elif not value:
                out.append(None)
            else:
                out.append(Refused(f"over {limit} bytes") if len(value) > limit else bytes(value))
        return out

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        await self.client.aclose()


class RedisClusterL2(RedisL2):
    """``RedisL2`` on redis-py's cluster client: each key goes to the master of its slot.

    The keys carry no hash tag, so they spread over all slots (and masters); every operation
    the tiers use names one key, so none crosses slots."""

    def __init__(self, client: RedisCluster, **kwargs: Any) -> None:
        # BaseCache's, not RedisBackend's: that one builds a single-node connection pool.
        BaseCache.__init__(self, **kwargs)
        self.client = client
        self._start: asyncio.Future[Any] | None = None

    async def ready(self) -> None:
        """The cluster's slot map, read once (CLUSTER SLOTS from a seed node). It goes on past
        the operation that started it: an operation's timeout (50 ms in the service) must not
        cancel it half way, or every first operation would start it again and time out."""
        if self._start is None or (self._start.done() and self._start.exception() is not None):
            self._start = asyncio.ensure_future(self.client.initialize())
            # Its failure is the awaiting operation's; with none left awaiting, it is not lost
            # as an "exception never retrieved": the next operation starts it again.
            self._start.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._start)

    async def get_bounded(self, key: str, limit: int) -> bytes | Refused | None:
        await self.ready()
        return await super().get_bounded(key, limit)

    async def get_many_bounded(self, keys: list[str], limit: int) -> list[bytes | Refused | None]:
        await self.ready()
        return await super().get_many_bounded(keys, limit)

    async def _get(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        await self.ready()
        return await super()._get(key, encoding=encoding, _conn=_conn)

    async def _set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> Any:
        await self.ready()
        return await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)

    async def _delete(self, key: str, _conn: Any = None) -> Any:
        await self.ready()
        return await super()._delete(key, _conn=_conn)

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        if self._start is not None and not self._start.done():
            self._start.cancel()
            await asyncio.gather(self._start, return_exceptions=True)
        await super()._close(*args, _conn=_conn, **kwargs)
        # redis-py 8.1's aclose() closes nothing once a failure has marked the slot map for a
        # refresh (a master died): every node's connections would be left open.
        nodes = self.client.nodes_manager
        await nodes.aclose()
        await nodes.aclose("startup_nodes")

    def __repr__(self) -> str:
        return f"RedisClusterL2({self.namespace})"


_NOT_SET: Any = object()
_ABSENT = object()  # an L1 marker for "L2 has no such key", see negative_ttl_s
_FAILED = object()  # an L2 call that failed or was skipped


class TieredCache:
    """L1 (process memory) in front of an optional, shared L2 (Redis); bytes values.

    ``get`` reads L1, then L2, and copies an L2 hit into L1; ``set`` and ``delete`` go to both
    and return True when every tier took them. L2 failures are counted, logged once per
    up/down transition and never raised; after one, L2 is left alone for ``retry_after_s``,
    then a single call probes it. At most ``l2_max_inflight`` L2 operations run at once; beyond
    that a call skips L2 rather than queue behind a slow Redis.

    ``l1_ttl_s`` caps how long L1 keeps a copy (for values another process may change), and
    ``negative_ttl_s`` > 0 makes L1 remember an L2 miss that long (saves a round trip per
    request for keys that mostly do not exist, like overrides).

    ``max_value_bytes``: an L2 value over it (or not a string) is a miss, deleted and logged
    once, and never read whole; counted in ``l2_refused``, not as an L2 failure.
    """

    def __init__(
        self,
        name: str,
        l1: BoundedMemoryCache,
        l2: BaseCache | None = None,
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        negative_ttl_s: float = 0.0,
        l2_timeout_s: float = L2_TIMEOUT_S,
        retry_after_s: float = RETRY_AFTER_S,
        l2_max_inflight: int = L2_MAX_INFLIGHT,
        max_value_bytes: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.l1 = l1
        self.l2 = l2
        self.ttl_s = ttl_s
        self.l1_ttl_s = l1_ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.l2_timeout_s = l2_timeout_s
        self.retry_after_s = retry_after_s
        self.l2_max_inflight = l2_max_inflight
        self.max_value_bytes = max_value_bytes
        self.clock = clock
        self._down_until: float | None = None
        self._inflight = 0
        self.l1_hits = self.l1_misses = self.l1_negative_hits = 0
        self.l2_hits = self.l2_misses = self.l2_errors = 0
        self.l2_skipped = 0  # calls kept off L2 by the breaker
        self.l2_busy = 0  # calls that found every L2 slot taken
        self.l2_refused = 0  # values too large (or not strings), dropped unread

    @property
    def l2_up(self) -> bool:
        """False while the breaker keeps L2 out (also when there is no L2)."""
        return self.l2 is not None and self._down_until is None

    async def get(self, key: str) -> bytes | None:
        value = self.l1.get_now(key)
        if value is _ABSENT:
            self.l1_negative_hits += 1
            return None
        if value is not None:
            self.l1_hits += 1
            return value
        self.l1_misses += 1
        value = await self._l2_call(lambda l2: self._l2_get(l2, key))
        if value is _FAILED:
            return None
        if isinstance(value, Refused):
            self.l2_refused += 1
            await self.drop(key, value.reason)
            return None
        if not isinstance(value, bytes):  # None, or not ours: a miss either way
            self.l2_misses += 1
            if self.negative_ttl_s > 0:
                await self._fill_l1(key, _ABSENT, self.negative_ttl_s)
            return None
        self.l2_hits += 1
        await self._fill_l1(key, value, _min_ttl(self.ttl_s, self.l1_ttl_s))
        return value

    async def get_many(self, keys: list[str]) -> list[bytes | None] | None:
        """``get`` of many keys with one L2 round trip for those L1 lacks (no negative
        caching); None when L2 was wanted and failed or was skipped: nobody can say what it
        holds. For batch work (``heatcrop backfill``), which must not ask key by key."""
        out: list[bytes | None] = [self.l1.get_now(k) for k in keys]
        out = [None if v is _ABSENT else v for v in out]
        missing = [i for i, v in enumerate(out) if v is None]
        self.l1_hits += len(keys) - len(missing)
        self.l1_misses += len(missing)
        if not missing or self.l2 is None:
            return out
        limit = self.max_value_bytes or MAX_ANALYSIS_BYTES
        wanted = [keys[i] for i in missing]
        found = await self._l2_call(lambda l2: self._l2_get_many(l2, wanted, limit))
        if found is _FAILED:
            return None
        for i, key, value in zip(missing, wanted, found, strict=True):
            if isinstance(value, Refused):
                self.l2_refused += 1
                await self.drop(key, value.reason)
            elif value is None:
                self.l2_misses += 1
            else:
                self.l2_hits += 1
                await self._fill_l1(key, value, _min_ttl(self.ttl_s, self.l1_ttl_s))
                out[i] = value
        return out

    async def _l2_get_many(
        self, l2: BaseCache, keys: list[str], limit: int
    ) -> list[bytes | Refused | None]:
        if not isinstance(l2, RedisL2):  # any other aiocache backend: one call per key
            return [await self._l2_get(l2, k) for k in keys]
        async with asyncio.timeout(self.l2_timeout_s or None):
            return await l2.get_many_bounded(keys, limit)

    async def set(self, key: str, value: bytes, ttl_s: float | None = _NOT_SET) -> bool:
        """Store in both tiers (``ttl_s`` defaults to the cache's); True if every tier took it."""
        if not isinstance(value, bytes):
            raise TypeError(f"{self.name}: values are bytes, got {type(value).__name__}")
        ttl = self.ttl_s if ttl_s is _NOT_SET else ttl_s
        stored = self.l1.set_now(key, value, _min_ttl(ttl, self.l1_ttl_s))
        if self.l2 is None:
            return stored
        done = await self._l2_call(
            lambda l2: l2.set(key, value, ttl=ttl, timeout=self.l2_timeout_s)
        )
        return stored and done is not _FAILED

    async def drop(self, key: str, reason: str) -> None:
        """Delete a value found unusable from both tiers, with one warning."""
        log.warning("cache %s: dropping entry %s: %s", self.name, key, reason)
        await self.delete(key)

    def restore_local(self, key: str, value: bytes | None) -> None:
        """Put this process's copy back to ``value`` (None: no copy); the shared tier is not
        touched. For undoing a ``set`` that only this process took."""
        if value is None:
            self.l1.delete_now(key)
        else:
            self.l1.set_now(key, value, _min_ttl(self.ttl_s, self.l1_ttl_s))

    async def delete(self, key: str) -> bool:
        """Remove from both tiers; True unless L2 exists and could not be told."""
        self.l1.delete_now(key)
        if self.l2 is None:
            return True
        done = await self._l2_call(lambda l2: l2.delete(key, timeout=self.l2_timeout_s))
        return done is not _FAILED

    def stats(self) -> dict[str, int]:
        return {
            "l1_hits": self.l1_hits,
            "l1_misses": self.l1_misses,
            "l1_negative_hits": self.l1_negative_hits,
            "l1_entries": len(self.l1),
            "l1_bytes": self.l1.nbytes,
            "l1_evictions": self.l1.evictions,
            "l2_hits": self.l2_hits,
            "l2_misses": self.l2_misses,
            "l2_errors": self.l2_errors,
            "l2_skipped": self.l2_skipped,
            "l2_busy": self.l2_busy,
            "l2_refused": self.l2_refused,
            "l2_up": int(self.l2_up),
        }

    async def close(self) -> None:
        await self.l1.close()
        if self.l2 is not None:
            await self.l2.close()

    async def _fill_l1(self, key: str, value: Any, ttl: float | None) -> None:
        # Whatever reached L1 while we waited on L2 (a local set) is newer than L2's answer,
        # which may predate it; exists + set run without yielding, so nothing slips between.
        if not self.l1.exists_now(key):
            self.l1.set_now(key, value, ttl)

    async def _l2_get(self, l2: BaseCache, key: str) -> Any:
        limit = self.max_value_bytes
        if limit is None:
            return await l2.get(key, timeout=self.l2_timeout_s)
        if isinstance(l2, RedisL2):
            # aiocache's convention, kept: a timeout of 0 or None means none.
            async with asyncio.timeout(self.l2_timeout_s or None):
                return await l2.get_bounded(key, limit)
        value = await l2.get(key, timeout=self.l2_timeout_s)
        if isinstance(value, bytes) and len(value) > limit:
            return Refused(f"{len(value)} bytes, over {limit}")
        return value

    async def _l2_call(self, op: Callable[[BaseCache], Awaitable[Any]]) -> Any:
        if self.l2 is None or not self._l2_admitted():
            return _FAILED
        self._inflight += 1
        try:
            result = await op(self.l2)
        except redis.exceptions.MaxConnectionsError:
            # A pool smaller than l2_max_inflight: busy, not down.
            self.l2_busy += 1
            return _FAILED
        except L2_ERRORS as exc:
            self._l2_failed(exc)
            return _FAILED
        finally:
            self._inflight -= 1
        self._l2_ok()
        return result

    def _l2_admitted(self) -> bool:
        if self._inflight >= self.l2_max_inflight:
            self.l2_busy += 1
            return False
        if self._down_until is None:
            return True
        now = self.clock()
        if now < self._down_until:
            self.l2_skipped += 1
            return False
        # Half-open: this call probes; pushing the deadline keeps concurrent calls off L2
        # until the probe has answered.
        self._down_until = now + self.retry_after_s
        return True

    def _l2_failed(self, exc: BaseException) -> None:
        self.l2_errors += 1
        if self._down_until is None:
            log.warning(
                "cache %s: redis failed (%s: %s); memory only, next try in %.0f s",
                self.name,
                type(exc).__name__,
                exc,
                self.retry_after_s,
            )
        self._down_until = self.clock() + self.retry_after_s

    def _l2_ok(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            log.warning("cache %s: redis is back", self.name)


def _min_ttl(a: float | None, b: float | None) -> float | None:
    """The shorter of two TTLs where None (or 0) means "forever"."""
    if not a:
        return b or None
    if not b:
        return a
    return min(a, b)


# -- keys ---------------------------------------------------------------------------------


def heatmap_key(identity: str, model_version: str) -> str:
    """sha1 hex of model version + source identity: 40 characters whatever the path."""
    raw = f"{len(model_version)}:{model_version}:{identity}".encode("utf-8", "surrogatepass")
    return hashlib.sha1(raw).hexdigest()


def box_key(heat_key: str, aspect_w: int, aspect_h: int, variant: int | str = 0) -> str:
    """Heatmap key + reduced aspect (400x300 and 800x600 share one) + ``variant``, what else
    the box depends on (the service's: ``CropJob.set_identity``)."""
    if aspect_w < 1 or aspect_h < 1:
        raise ValueError(f"aspect {aspect_w}x{aspect_h}: both sides must be >= 1")
    if len(str(variant)) > 64:
        raise ValueError("variant is longer than 64 characters")
    g = math.gcd(aspect_w, aspect_h)
    return f"{heat_key}:{aspect_w // g}x{aspect_h // g}:{variant}"


def override_key(path: str) -> str:
    """sha1 hex of the source path, for the overrides cache."""
    return hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()


# -- the set of caches the service uses ---------------------------------------------------


# A popular box is read thousands of times a second: checking its CRC, parsing it and checking
# it against the request again each time was a tenth of a box-cache hit. The records are
# immutable and small, the memo's key is the cached bytes themselves (which keep their hash),
# the key they were read under and what the request expects; the memo is bounded.
@functools.lru_cache(maxsize=4096)
def _checked_box(raw: bytes, key: str, expect: BoxExpect | None) -> BoxRecord:
    record = decode_box(raw, key)
    if expect is not None:
        check_box(record, expect)
    return record


# What an analysis read where the original is not at hand must be: plausible.
PLAUSIBLE = AnalysisExpect()


def _checked_analysis(raw: bytes, key: str, expect: AnalysisExpect) -> Analysis:
    analysis = decode_analysis(raw, key)
    check_analysis(analysis, expect)
    return analysis


@dataclass
class Caches:
    heatmaps: TieredCache
    boxes: TieredCache
    overrides: TieredCache
    decode_errors: int = 0  # records dropped: undecodable, of another key, or not as expected

    async def get_analysis(self, key: str, expect: AnalysisExpect = PLAUSIBLE) -> Analysis | None:
        """The analysis at ``key`` if it is one the service could have made for the original
        ``expect`` describes (sidecar/records.py); None otherwise, the entry then deleted."""
        raw = await self.heatmaps.get(key)
        if raw is None:
            return None
        return await self._decoded(self.heatmaps, key, raw, _checked_analysis, expect)

    async def put_analysis(self, key: str, analysis: Analysis) -> bool:
        return await self.heatmaps.set(key, encode_analysis(analysis, key=key))

    async def get_analyses(
        self, keys: list[str], expects: list[AnalysisExpect]
    ) -> list[Analysis | None] | None:
        """``get_analysis`` of each key, with one round trip to the shared tier for them all;
        None when it could not be asked (down, or kept out by its breaker)."""
        raws = await self.heatmaps.get_many(keys)
        if raws is None:
            return None
        out: list[Analysis | None] = []
        for key, raw, expect in zip(keys, raws, expects, strict=True):
            if raw is None:
                out.append(None)
                continue
            decoded = self._decoded(self.heatmaps, key, raw, _checked_analysis, expect)
            out.append(await decoded)
        return out

    async def get_box(self, key: str, expect: BoxExpect | None = None) -> BoxRecord | None:
        """The box at ``key`` if it is one the search could have made for the request
        ``expect`` describes (None: only that it decodes, under this key); None otherwise,
        the entry then deleted."""
        raw = await self.boxes.get(key)
        if raw is None:
            return None
        return await self._decoded(self.boxes, key, raw, _checked_box, expect)

    async def put_box(
        self, key: str, box: tuple[int, int, int, int], confidence: float, path: str
    ) -> bool:
        return await self.boxes.set(key, encode_box(box, confidence, path, key=key))

    def stats(self) -> dict[str, dict[str, int]]:
        out = {c.name: c.stats() for c in (self.heatmaps, self.boxes, self.overrides)}
        out["codec"] = {"decode_errors": self.decode_errors}
        return out

    async def close(self) -> None:
        for cache in (self.heatmaps, self.boxes, self.overrides):
            await cache.close()

    async def _decoded(
        self,
        cache: TieredCache,
        key: str,
        raw: bytes,
        decode: Callable[[bytes, str, Any], Any],
        expect: Any,
    ) -> Any:
        """Decoded and checked value, or None (and the entry deleted) when it is not valid."""
        try:
            return decode(raw, key, expect)
        except (CodecError, BadRecord) as exc:
            self.decode_errors += 1
            await cache.drop(key, str(exc))
            return None


def make_caches(
    settings: CacheSettings,
    *,
    l2_timeout_s: float = L2_TIMEOUT_S,
    retry_after_s: float = RETRY_AFTER_S,
    clock: Clock = time.monotonic,
) -> Caches:
    """Caches bounded by ``settings``; backed by Redis (or a Redis Cluster) at ``redis_url``
    when backend is redis."""
    target = redis_target(settings.redis_url) if settings.backend == "redis" else None
    shared = target is not None

    def tier(
        kind: str,
        entries: int,
        bytes_per_entry: int,
        max_value_bytes: int,
        ttl_s: float | None,
        **kw: Any,
    ) -> TieredCache:
        l1 = BoundedMemoryCache(entries, entries * bytes_per_entry, clock=clock)
        l2 = None if target is None else _redis_l2(target, kind, l2_timeout_s)
        return TieredCache(
            kind,
            l1,
            l2,
            ttl_s=ttl_s,
            l2_timeout_s=l2_timeout_s,
            retry_after_s=retry_after_s,
            l2_max_inflight=L2_MAX_INFLIGHT,
            max_value_bytes=max_value_bytes,
            clock=clock,
            **kw,
        )

    override_l1 = OVERRIDE_L1_TTL_S if shared else None
    return Caches(
        heatmaps=tier(
            "heatmaps",
            settings.heatmap_entries,
            HEATMAP_BYTES_PER_ENTRY,
            MAX_ANALYSIS_BYTES,
            settings.ttl_s,
        ),
        boxes=tier(
            "boxes", settings.box_entries, BOX_BYTES_PER_ENTRY, MAX_BOX_BYTES, settings.ttl_s
        ),
        overrides=tier(
            "overrides",
            OVERRIDE_ENTRIES,
            OVERRIDE_BYTES_PER_ENTRY,
            MAX_OVERRIDE_BYTES,
            None,
            l1_ttl_s=override_l1,
            negative_ttl_s=override_l1 or 0.0,
        ),
    )


def _redis_l2(target: RedisTarget, kind: str, timeout_s: float) -> RedisL2:
    """The shared tier of one cache: aiocache's Redis backend on one Redis, or on redis-py's
    cluster client. One immediate retry on a fresh connection: after a Redis restart (or an
    idle connection dropped by the network) each pooled connection fails once, and that must
    not open the breaker. A dead Redis costs one more refused connect per breaker opening."""
    common: dict[str, Any] = {
        "serializer": BytesSerializer(),
        "namespace": f"{REDIS_PREFIX}:{kind}",
        "timeout": timeout_s,
    }
    if target.cluster:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            password=target.password,
            ssl=target.ssl,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=L2_MAX_INFLIGHT,  # per master
            retry=Retry(NoBackoff(), 1),
        )
        return RedisClusterL2(client, **common)
    (host, port), *_ = target.nodes
    return RedisL2(
        endpoint=host,
        port=port,
        db=target.db,
        password=target.password,
        ssl=target.ssl,
        create_connection_timeout=timeout_s,
        pool_max_size=L2_MAX_INFLIGHT,
        connection_pool_kwargs={"socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 1)},
        **common,
    )
