"""What the /crop steps share: the jobs they fill in (``CropJob`` per request, ``AnalyseJob``
per original being analysed), the services they use, and the small records kept between
requests (the path's override, the original's last seen identity, a give-up's pixels).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from engines.base import Engine
from kernels.window import CropBox
from sidecar.admission import DecodeAdmission
from sidecar.batcher import Batcher
from sidecar.caches import Caches, box_key, heatmap_key
from sidecar.core import Analysis, CropCore
from sidecar.decode import Decoded, Header
from sidecar.errors import DeadlineExceeded
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.singleflight import SingleFlight
from sidecar.sizes import Size
from sidecar.sources import Source

log = logging.getLogger("heatcrop.pipeline")

# How long a fetched original's identity is trusted without asking the source again.
IDENTITY_TTL_S = 30.0
IDENTITY_ENTRIES = 100_000

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Override:
    """An editor's must-keep box for one path; ``box`` None is a cleared override."""

    box: Box | None
    version: int

    def encode(self) -> bytes:
        return json.dumps({"box": self.box, "version": self.version}).encode()

    def tag(self) -> str:
        """What the box key says of this override: a hash of its box ("" when cleared); see
        ``CropJob.set_identity``."""
        if self.box is None:
            return ""
        return hashlib.sha1(json.dumps(list(self.box)).encode()).hexdigest()[:12]

    @classmethod
    def decode(cls, raw: bytes | None) -> Override | None:
        """The stored record, or None when there is none or it does not parse."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            box = data["box"]
            version = int(data["version"])
        except (ValueError, KeyError, TypeError):
            log.warning("override record does not parse; ignored")
            return None
        if box is not None and not (isinstance(box, list) and len(box) == 4):
            return None
        return cls(None if box is None else (box[0], box[1], box[2], box[3]), version)


class IdentityMemo:
    """path → the original's last seen identity, trusted for ``ttl_s``; a bounded LRU.

    The heatmap and box keys name the original's identity (path + validators), which only a
    fetch tells. Remembering it lets box and heatmap cache hits answer without touching the
    source at all (for an HTTP origin a full GET per request); the price is that a changed
    original is noticed up to ``ttl_s`` late. The original's size from its header is kept with
    the identity: what cached records of it are checked against (sidecar/records.py).
    """

    def __init__(self, ttl_s: float = IDENTITY_TTL_S, max_entries: int = IDENTITY_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float, tuple[int, int] | None]] = OrderedDict()

    def get(self, path: str, now: float) -> str | None:
        entry = self._entries.get(path)
        if entry is None or entry[1] <= now:
            return None  # an expired entry stays, as a sign the path was seen (``seen``)
        self._entries.move_to_end(path)
        return entry[0]

    def size(self, path: str) -> tuple[int, int] | None:
        """The size stored with ``path``'s identity (None: unknown, or no image header)."""
        entry = self._entries.get(path)
        return None if entry is None else entry[2]

    def seen(self, path: str) -> bool:
        """Whether ``path`` was fetched here before (its identity may have expired since)."""
        return path in self._entries

    def put(
        self, path: str, identity: str, now: float, size: tuple[int, int] | None = None
    ) -> None:
        self._entries[path] = (identity, now + self.ttl_s, size)
        self._entries.move_to_end(path)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class Pending:
    """A give-up's decoded original queued for a background heatmap, and that heatmap."""

    decoded: Decoded
    analysis: asyncio.Future[Analysis]


@dataclass
class Services:
    """What the steps use; built once per app."""

    settings: Settings
    engine: Engine
    core: CropCore
    batcher: Batcher
    caches: Caches
    source: Source
    decodes: DecodeAdmission  # the decode pool and what is queued in it
    search_pool: Executor  # window searches, unless quick enough to run on the loop
    metrics: Metrics
    search_inline: bool = False
    flights: SingleFlight[tuple[str, Analysis]] = field(default_factory=SingleFlight)
    identities: IdentityMemo = field(default_factory=IdentityMemo)
    background: dict[str, Pending] = field(default_factory=dict)  # by heatmap key
    # cold_policy "legacy" (sidecar/step_cold.py): paths queued for a background heatmap, with
    # (heatmap key, bytes) when the request read them, and the task that works through them.
    cold: OrderedDict[str, tuple[str, bytes] | None] = field(default_factory=OrderedDict)
    cold_worker: asyncio.Task[None] | None = None
    # Fire-and-forget cache writes: the loop keeps only weak references to tasks, so these
    # hold them until done; the services' clean-up waits for them before the caches close.
    writes: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def heat_version(self) -> str:
        """What heatmap keys name as the model: the engine's version, which names the face
        detector too when one is joined to it (engines/face_engine.py: its boxes are cached
        with the heatmap)."""
        return self.engine.version

    def spawn_write(
        self, write: Awaitable[Any], on_done: Callable[[asyncio.Task[Any]], None]
    ) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(write)
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)
        task.add_done_callback(on_done)

    async def cancel_cold(self) -> None:
        """Stop the background heatmaps of cold answers (at shutdown: nobody waits for them)."""
        self.cold.clear()
        if self.cold_worker is not None:
            self.cold_worker.cancel()
            await asyncio.gather(self.cold_worker, return_exceptions=True)

    async def drain_writes(self, timeout_s: float) -> None:
        """Let pending cache writes finish (a Redis write is bounded by its own timeout);
        cancel what is left after ``timeout_s``."""
        if not self.writes:
            return
        _, late = await asyncio.wait(set(self.writes), timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


@dataclass
class CropJob:
    """One /crop request, filled in by the steps of ``sidecar.pipeline.STEPS``."""

    path: str
    size: Size
    deadline: float  # loop.time()
    identity: str | None = None
    override: Override | None = None
    heat_key: str = ""  # "" until the identity is known
    box_key: str = ""  # "" until the identity is known
    box_looked_up: str = ""  # the box key the box cache was last asked for
    analysis: Analysis | None = None
    box: CropBox | None = None
    cached: bool = False
    # The original's (width, height) from its header, with the identity; None: unknown, or
    # not an image. Cached records are checked against it, and not read without it.
    original_size: tuple[int, int] | None = None

    def set_identity(self, identity: str, model_version: str, search_version: str) -> None:
        """The original's identity, and with it the keys of its heatmap and of this box.

        The heatmap key names the identity and the model version (``heatmap_key``). The box
        key is the heatmap key, the reduced aspect, and a variant (``box_key``): the search
        settings' version (``CropCore.search_version``) and, when the path has an override with
        a box, a hash of that box (``Override.tag``), not the override's version. So a box found
        with other search settings or for another must-keep box is never served, even if the
        override record (and with it the version count) was lost and restarted; clearing an
        override brings back the boxes found without one.
        """
        self.identity = identity
        self.heat_key = heatmap_key(identity, model_version)
        tag = self.override.tag() if self.override else ""
        variant = f"{search_version}.{tag}" if tag else search_version
        self.box_key = box_key(self.heat_key, self.size.width, self.size.height, variant)


@dataclass
class AnalyseJob:
    """One original being analysed, once for all the requests for its path (single-flight),
    filled in by the steps of ``analyse`` in ``sidecar.pipeline.STEPS``."""

    path: str
    deadline: float  # the first request's, loop.time()
    identity: str = ""
    heat_key: str = ""
    data: bytes = b""  # the original as fetched
    header: Header | None = None  # its header as the fetch checked it (``Original.header``)
    original_size: tuple[int, int] | None = None  # from its header (``Original.size``)
    decoded: Decoded | None = None
    analysis: Analysis | None = None


Step = Callable[[Services, CropJob], Awaitable[None]]
AnalyseStep = Callable[[Services, AnalyseJob], Awaitable[None]]


def check_deadline(svc: Services, deadline: float, step: str) -> None:
    """DeadlineExceeded, counted as a give-up for time, when ``deadline`` has passed."""
    if asyncio.get_running_loop().time() >= deadline:
        svc.metrics.giveups.inc(reason="deadline")
        raise DeadlineExceeded(f"deadline passed before step {step}")
