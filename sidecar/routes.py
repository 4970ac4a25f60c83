"""HTTP routes of the sidecar: /crop, /override, /healthz, /metrics (/debug: sidecar.debug).

``GET /crop/{W}x{H}/{path}`` answers nginx, which follows ``X-Accel-Redirect`` to its internal
``/@legacy`` location (the legacy image server). Every answer from our code is one of:

- smart: 200, empty body, ``X-Accel-Redirect: /@legacy<dialect crop URL with the box>``,
  ``X-Heatcrop-Box: x0,y0,x1,y1`` (original pixels, x1/y1 exclusive, clamped, exact aspect),
  ``X-Heatcrop-Confidence`` and ``X-Heatcrop-Path``: ``smart`` (box computed now), ``cached``
  (box cache hit) or ``override`` (an editor's box was kept);
- fallback: 200, empty body, ``X-Accel-Redirect: /@legacy<dialect plain URL>`` (the legacy
  default crop, which the dialect marks to be cached ≤ 30 s) and ``X-Heatcrop-Path``:
  ``low-confidence`` (the box is no better than the centre), ``giveup`` (Overloaded, deadline,
  a typed error with ``fallback=True``, or any unexpected exception, which is logged),
  ``no-crop`` (W or H is 0: there is nothing to decide) or ``cold`` (``server.cold_policy =
  "legacy"`` and no heatmap of the original cached yet: it is being made in the background);
  The ``low-confidence`` answer also carries the rejected box and its confidence, for
  debugging; the other fallbacks carry no box;
- a typed error with ``fallback=False`` (bad size or path, missing source, not an image): its
  status and its public message as a short text body.

Smart answers carry an ``ETag`` (of their legacy URL). nginx keeps a smart crop for a short
while and then revalidates it with ``If-None-Match``: 304 when the crop is unchanged or the
work gave up, the new redirect when the box changed (an editor's override, or one removed).

Metrics: ``requests_total`` by outcome (the ``X-Heatcrop-Path`` value, except that a
``giveup`` is counted as ``error`` unless it was for time: Overloaded or DeadlineExceeded, and
typed errors without fallback count as ``error``), stage histograms (fetch, decode, search,
total; the batcher adds queue and infer), box and heatmap cache hits and misses.

``PUT /override/{path}`` with ``Authorization: Bearer <server.override_token>`` and a JSON body
``{"box": [x0, y0, x1, y1]}`` stores a must-keep box for the path (``DELETE`` clears it): 401
without a bearer token, 403 with a wrong one or when no token is configured (overrides off), 400
for a bad body or path, 404 when the original does not exist. The box is clipped to the
original (read from its header) before it is stored, and refused with 400 when nothing of it
lies inside; the answer carries the stored box and the override's version, which counts the
path's changes. The box cache key carries the override's box (``CropJob.set_identity``), so
boxes computed for another box, or without one, are never served while it holds.

Paths are taken from the raw request line (``raw_tail``, the debug pages' too), so ``..`` and
its percent-encodings reach ``clean_path`` and are refused with 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field

from aiohttp import web

from kernels.window import CropBox
from sidecar import metrics as metrics_mod
from sidecar.caches import override_key
from sidecar.decode import probe
from sidecar.errors import BadRequest, ColdStart, DeadlineExceeded, HeatcropError, Overloaded
from sidecar.job import CropJob, Override, Services
from sidecar.legacy import Dialect
from sidecar.pipeline import run_crop
from sidecar.sizes import parse_size
from sidecar.sources import clean_path

log = logging.getLogger("heatcrop.routes")

LEGACY_PREFIX = "/@legacy"


@dataclass
class Health:
    engine_warm: bool = False


@dataclass
class OverrideLock:
    """Serialises override changes so that two PUTs never get the same version."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


SERVICES = web.AppKey("services", Services)
DIALECT = web.AppKey("dialect", Dialect)
HEALTH = web.AppKey("health", Health)
OVERRIDE_LOCK = web.AppKey("override_lock", OverrideLock)
# Engine calls failing in a row before /healthz says 503: a few can fail on bad luck (an
# input the engine refuses), a run this long means the engine itself is broken.
ENGINE_FAILING_AFTER = 10
# {"box": [x0, y0, x1, y1]} with sane numbers is under 100 bytes; refuse long bodies unread.
MAX_OVERRIDE_BODY = 4096
# An override write reads the original's header to clip the box to it: an editor can wait.
OVERRIDE_FETCH_S = 5.0


def add_routes(app: web.Application) -> None:
    app.router.add_get("/crop/{size}/{path:.+}", crop)
    app.router.add_put("/override/{path:.+}", put_override)
    app.router.add_delete("/override/{path:.+}", delete_override)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


def raw_tail(request: web.Request, skip: int) -> str:
    """The raw (still percent-encoded) path after its first ``skip`` segments.

    Raw so that ``..`` and its percent-encodings reach ``clean_path`` to be refused (the
    router's copy is decoded and normalised already).
    """
    raw = request.raw_path.partition("?")[0]
    if not raw.startswith("/"):
        # An absolute-form request line (GET http://host/crop/...): drop scheme and host.
        raw = "/" + raw.partition("://")[2].partition("/")[2]
    parts = raw.split("/", skip + 1)
    return parts[skip + 1] if len(parts) > skip + 1 else ""


# -- /crop ----------------------------------------------------------------------------------


async def crop(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        return revalidated(request, await _crop(request, svc, start))
    finally:
        svc.metrics.stage_seconds.observe(loop.time() - start, stage="total")


async def _crop(request: web.Request, svc: Services, start: float) -> web.Response:
    server = svc.settings.server
    dialect = request.app[DIALECT]
    try:
        size = parse_size(
            request.match_info["size"],
            max_width=server.max_width,
            max_height=server.max_height,
            allowed=server.allowed_sizes,
        )
        path = clean_path(raw_tail(request, 2))
    except HeatcropError as exc:
        svc.metrics.requests.inc(outcome="error")
        return error_response(exc)
    if not size.crops:
        svc.metrics.requests.inc(outcome="no-crop")
        return redirect(dialect.plain_url(path, size), "no-crop")
    work_ms = server.deadline_ms - server.answer_margin_ms
    job = CropJob(path, size, deadline=start + work_ms / 1000)
    try:
        await run_crop(svc, job)
    except HeatcropError as exc:
        return _typed_failure(svc, dialect, job, exc)
    except Exception:
        log.exception("crop %s %s failed unexpectedly; answering the legacy crop", size, path)
        svc.metrics.requests.inc(outcome="error")
        return redirect(dialect.plain_url(path, size), "giveup")
    return _answer(svc, dialect, job)


def _answer(svc: Services, dialect: Dialect, job: CropJob) -> web.Response:
    box = job.box
    assert box is not None
    if job.override is not None and job.override.box is not None:
        kind = "override"
    elif not svc.core.is_confident(box):
        svc.metrics.requests.inc(outcome="low-confidence")
        return redirect(dialect.plain_url(job.path, job.size), "low-confidence", box)
    else:
        kind = "cached" if job.cached else "smart"
    svc.metrics.requests.inc(outcome=kind)
    return redirect(dialect.crop_url(job.path, box.as_tuple(), job.size), kind, box)


def _typed_failure(
    svc: Services, dialect: Dialect, job: CropJob, exc: HeatcropError
) -> web.Response:
    if isinstance(exc, ColdStart):
        svc.metrics.requests.inc(outcome="cold")
        return redirect(dialect.plain_url(job.path, job.size), "cold")
    timely = isinstance(exc, Overloaded | DeadlineExceeded)
    svc.metrics.requests.inc(outcome="giveup" if timely else "error")
    if not exc.fallback:
        return error_response(exc)
    if not timely:
        log.warning("crop %s %s: %s; answering the legacy crop", job.size, job.path, exc)
    return redirect(dialect.plain_url(job.path, job.size), "giveup")


# The answers nginx's cache may keep and revalidate: a smart crop's ETag names its legacy URL,
# so any change of box (an editor's override, a new model) is a new ETag. Fallbacks carry none:
# they expire within 30 s and are never extended.
SMART_KINDS = frozenset({"smart", "cached", "override"})
GIVEN_UP = frozenset({"giveup", "cold"})


def redirect(url: str, kind: str, box: CropBox | None = None) -> web.Response:
    headers = {"X-Accel-Redirect": LEGACY_PREFIX + url, "X-Heatcrop-Path": kind}
    if kind in SMART_KINDS:
        headers["ETag"] = etag_of(url)
    if box is not None:
        headers["X-Heatcrop-Box"] = ",".join(str(v) for v in box.as_tuple())
        headers["X-Heatcrop-Confidence"] = f"{box.confidence:.5f}"
    return web.Response(status=200, headers=headers)


def etag_of(url: str) -> str:
    return '"' + hashlib.sha256(url.encode("utf-8")).hexdigest()[:20] + '"'


def revalidated(request: web.Request, answer: web.Response) -> web.Response:
    """nginx revalidating a smart crop it holds (If-None-Match, its ETag): 304 when the answer
    is the same crop, or when the work gave up (what nginx holds is still an editor's or a
    model's box, better than the legacy crop); otherwise the new answer, which replaces it."""
    asked = request.headers.get("If-None-Match", "")
    if not asked:
        return answer
    kind = answer.headers.get("X-Heatcrop-Path", "")
    if answer.headers.get("ETag") == asked or kind in GIVEN_UP:
        return web.Response(status=304, headers={"ETag": asked, "X-Heatcrop-Path": kind})
    return answer


def error_response(exc: HeatcropError) -> web.Response:
    return web.Response(status=exc.status, text=exc.public_message)


# -- /override ------------------------------------------------------------------------------


async def put_override(request: web.Request) -> web.Response:
    denied = _authorise(request)
    if denied is not None:
        return denied
    try:
        path = clean_path(raw_tail(request, 1))
        box = parse_override(await _read_capped(request, MAX_OVERRIDE_BODY))
        box = clip_to_image(box, await _image_size(request.app[SERVICES], path))
    except HeatcropError as exc:
        return error_response(exc)
    record = await _store_override(request, path, box)
    if record is None:
        return _not_stored()
    return web.json_response({"path": path, "box": record.box, "version": record.version})


async def delete_override(request: web.Request) -> web.Response:
    denied = _authorise(request)
    if denied is not None:
        return denied
    try:
        path = clean_path(raw_tail(request, 1))
    except HeatcropError as exc:
        return error_response(exc)
    # A cleared record, not a deletion: the version goes on counting the path's changes
    # (the box key does not depend on it: CropJob.set_identity).
    if await _store_override(request, path, None) is None:
        return _not_stored()
    return web.Response(status=204)


async def _store_override(
    request: web.Request, path: str, box: tuple[int, int, int, int] | None
) -> Override | None:
    """The stored record; None when a tier could not take it (Redis down): the editor must
    hear that, since the local copy alone lives only seconds in a shared deployment."""
    overrides = request.app[SERVICES].caches.overrides
    key = override_key(path)
    async with request.app[OVERRIDE_LOCK].lock:
        raw = await overrides.get(key)
        previous = Override.decode(raw)
        record = Override(box, (previous.version if previous else 0) + 1)
        if not await overrides.set(key, record.encode()):
            # Not half-stored: this sidecar must not apply what the others never see.
            overrides.restore_local(key, raw)
            log.warning("override for %s not stored: the shared cache is unavailable", path)
            return None
    return record


def _not_stored() -> web.Response:
    return web.Response(status=503, text="override store unavailable; nothing changed")


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The body, or BadRequest as soon as it passes `limit` bytes (a read may return any
    part of it: loop to the end)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BadRequest("override body too large", public_message="body too large")
    return b"".join(chunks)


def parse_override(body: bytes) -> tuple[int, int, int, int]:
    """The box of ``{"box": [x0, y0, x1, y1]}``; BadRequest for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("override body is not JSON", public_message="body must be JSON") from exc
    box = data.get("box") if isinstance(data, dict) else None
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
    ):
        raise BadRequest("bad override box", public_message="box must be [x0, y0, x1, y1] ints")
    x0, y0, x1, y1 = box
    if min(box) < 0 or x0 >= x1 or y0 >= y1:
        raise BadRequest(
            "bad override box", public_message="box needs 0 <= x0 < x1 and 0 <= y0 < y1"
        )
    return x0, y0, x1, y1


async def _image_size(svc: Services, path: str) -> tuple[int, int]:
    """The original's display size from its header: an override is stored as it applies."""
    limits = svc.settings.source
    original = await svc.source.fetch(path, OVERRIDE_FETCH_S)
    width, height, _ = await asyncio.to_thread(
        probe, original.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels
    )
    return width, height


def clip_to_image(
    box: tuple[int, int, int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``box`` cut to the image, so that every crop can contain what is stored; BadRequest
    when nothing of it is inside (a box for another image, or for another orientation)."""
    width, height = size
    x0, y0 = min(box[0], width), min(box[1], height)
    x1, y1 = min(box[2], width), min(box[3], height)
    if x0 >= x1 or y0 >= y1:
        raise BadRequest(
            f"override box {box} outside the {width}x{height} image",
            public_message=f"box lies outside the {width}x{height} image",
        )
    return x0, y0, x1, y1


def _authorise(request: web.Request) -> web.Response | None:
    """None when the bearer token matches; the 401/403 answer otherwise."""
    token = request.app[SERVICES].settings.server.override_token
    if not token:
        return web.Response(status=403, text="overrides are disabled")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return web.Response(
            status=401, text="bearer token required", headers={"WWW-Authenticate": "Bearer"}
        )
    # Header values arrive with undecodable bytes as surrogates: encode them back, never fail.
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        return web.Response(status=403, text="wrong token")
    return None


# -- health and metrics ---------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    if not request.app[HEALTH].engine_warm:
        return web.Response(status=503, text="starting")
    failing = request.app[SERVICES].batcher.failing_calls
    if failing >= ENGINE_FAILING_AFTER:
        # Every crop still gets the legacy fallback; a supervisor should restart this one.
        return web.Response(status=503, text=f"engine failing: {failing} calls in a row")
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body.encode(), headers={"Content-Type": metrics_mod.CONTENT_TYPE})
