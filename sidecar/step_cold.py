"""Step ``cold``, with ``server.cold_policy = "legacy"``: a request whose original has no heatmap
in the caches is answered with the legacy crop at once (``ColdStart``, ``X-Heatcrop-Path:
cold``), and the heatmap is made in the background, so that the next request for the original,
any size, finds it.

Why (bench/results/load.md, docs/performance.md): a miss at the edge waits for the sidecar and
then for the legacy server's render. Under ``wait`` the sidecar part of a first sight is a read,
a decode and a CNN run; on the shared 2-core machine even a read and a header check in the
request cost p95 57 ms of the sidecar hop during a cold burst (a thread hop each, on cores the
legacy server is rendering on), against 21 ms for an answer that touches nothing. So:

- the request reads nothing when the heatmap cannot be cached: the identity is known and its
  heatmap missed, or the path was never seen by this sidecar and the caches are its own (memory
  backend). Only a path seen before whose identity has expired (``IdentityMemo``), or any path
  with a shared cache (Redis: another sidecar may have made it), is read first, in step
  ``analyse``, whose step ``cold-read`` answers the same way when the heatmap is not there;
- the background work is one original at a time (read, cache lookup, decode, CNN), from a queue
  of at most ``batcher.max_background`` paths, one entry per path: it takes a core at most, not
  both, while the legacy server renders the burst of first sights. A full queue refuses
  (counted), and a later request for the path tries again. Nothing is decoded when the batcher
  would not take the pixels;
- and within a CPU budget (``server.background_cpu_share``, sidecar/cpu_budget.py): a path's
  read and decode start only while the budget is not overdrawn and are charged with the CPU
  they used, as the batcher charges the CNN run. One at a time was not enough: on the shared
  2-core machine the back-to-back heatmaps of a burst of first sights still took the legacy
  server's cores (autogroups: the workers' lowered priority only ranks them within the
  sidecar), and the legacy renders of that burst queued past nginx's legacy timeout.

Limits: an original over the byte or pixel limit, or not an image, gets the legacy answer, and
the legacy server refuses it with its own words (it has the same limits: nginx/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import math

from sidecar.background import finish_in_background
from sidecar.caches import heatmap_key
from sidecar.cpu_budget import metered
from sidecar.decode import Decoded
from sidecar.errors import ColdStart, HeatcropError, Overloaded
from sidecar.job import AnalyseJob, CropJob, Services
from sidecar.records import AnalysisExpect

log = logging.getLogger("heatcrop.pipeline")


def _legacy(svc: Services) -> bool:
    return svc.settings.server.cold_policy == "legacy"


async def step_cold(svc: Services, job: CropJob) -> None:
    if not _legacy(svc) or job.analysis is not None:
        return
    if not job.heat_key and might_be_cached(svc, job.path):
        return  # read it first (step analyse); step cold-read answers if it is not there
    queue_cold(svc, job.path)
    raise ColdStart(f"no heatmap of {job.path} cached; legacy crop while it is made")


async def step_cold_read(svc: Services, job: AnalyseJob) -> None:
    if not _legacy(svc) or job.analysis is not None:
        return
    queue_cold(svc, job.path, job)
    raise ColdStart(f"no heatmap of {job.path} cached; legacy crop while it is made")


def might_be_cached(svc: Services, path: str) -> bool:
    """Whether a heatmap of ``path`` may be cached though its identity is not known now."""
    return svc.settings.cache.backend != "memory" or svc.identities.seen(path)


def queue_cold(svc: Services, path: str, read: AnalyseJob | None = None) -> None:
    """Queue ``path`` (with what was read of it, if it was) for a background heatmap; counted
    once in ``heatcrop_cold_total`` (queued, already, refused)."""
    if path in svc.cold or (read is not None and read.heat_key in svc.background):
        svc.metrics.cold.inc(result="already")
        return
    if len(svc.cold) >= svc.batcher.max_background:
        svc.metrics.cold.inc(result="refused")
        return
    svc.cold[path] = None if read is None else (read.heat_key, read.data)
    svc.metrics.cold.inc(result="queued")
    if svc.cold_worker is None or svc.cold_worker.done():
        svc.cold_worker = asyncio.ensure_future(_work(svc))


async def _work(svc: Services) -> None:
    """The queued paths, oldest first, one at a time, each once the CPU budget allows; each
    leaves the queue once done."""
    budget = svc.batcher.budget
    while svc.cold:
        if budget is not None:
            await budget.wait("decode")
        if not svc.cold:
            break
        path, read = next(iter(svc.cold.items()))
        try:
            result = await _heatmap(svc, path, read)
        except Exception:  # a bug must not stop the queue, nor end as an unretrieved error
            log.exception("background heatmap of %s failed unexpectedly", path)
            result = "failed"
        finally:
            svc.cold.pop(path, None)
        svc.metrics.cold_heatmaps.inc(result=result)


async def _heatmap(svc: Services, path: str, read: tuple[str, bytes] | None) -> str:
    """What became of one queued path, as ``sidecar.metrics.COLD_HEATMAP_RESULTS`` names it."""
    try:
        # The read and the decode are charged here; the CNN run by the batcher.
        with metered(svc.batcher.budget):
            found = await _prepare(svc, path, read)
    except Overloaded:
        return "dropped"
    except HeatcropError as exc:
        log.info("background heatmap of %s not made: %s", path, exc)
        return "failed"
    if isinstance(found, str):
        return found
    decoded, key = found
    if not finish_in_background(svc, decoded, key):
        return "dropped"
    pending = svc.background.get(key)
    try:
        if pending is not None:  # one at a time: its CNN run before the next read
            await pending.analysis
    except Overloaded:
        return "dropped"
    return "computed"


async def _cached(svc: Services, key: str, size: tuple[int, int] | None) -> bool:
    """Whether a heatmap fit for the original of ``size`` is cached (none without a size)."""
    if size is None:
        return False
    expect = AnalysisExpect(size, svc.settings.source.max_pixels)
    return await svc.caches.get_analysis(key, expect) is not None


async def _prepare(
    svc: Services, path: str, read: tuple[str, bytes] | None
) -> tuple[Decoded, str] | str:
    """The decoded original and its heatmap key, or what became of the path instead."""
    if read is None:
        # No request waits for it: no deadline; the source's own bound refuses it if busy.
        original = await svc.source.fetch(path)
        now = asyncio.get_running_loop().time()
        svc.identities.put(path, original.identity, now, original.size)
        key, data = heatmap_key(original.identity, svc.heat_version), original.data
        header = original.header  # checked by the fetch: the decode does not parse it again
        if key in svc.background or await _cached(svc, key, original.size):
            return "found"
    else:
        (key, data), header = read, None
    if not svc.batcher.takes_background():
        return "dropped"
    return await svc.decodes.decode(data, math.inf, svc.batcher, header), key
