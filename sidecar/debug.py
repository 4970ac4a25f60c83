"""Debug endpoints for operators: why did heatcrop choose this box?

**Operators only. nginx must not expose ``/debug/`` publicly**: each request decodes a full
original and encodes a PNG or JPEG (far more work than ``/crop``), and the pages show the
originals. Route ``/debug/`` only from an internal location (VPN, allow-list) or not at all.

- ``GET /debug/{W}x{H}/{path}``: PNG of the original at display size with the heatmap the
  window search sees (``CropCore.prepared``) as a colour wash, the chosen box (green) and the
  centre box (white). ``X-Heatcrop-Timings: decode=..;infer=..;search=..`` (milliseconds, or
  ``cached`` for a part that came from a cache), plus ``X-Heatcrop-Box`` and
  ``X-Heatcrop-Confidence`` of the chosen box.
- ``GET /debug/cropped/{W}x{H}/{path}?method=heatcrop|centre|attention``: the JPEG of that
  method's crop resized to exactly W x H, with its box in ``X-Heatcrop-Box``. ``heatcrop`` is
  the box ``/crop`` answers (same pipeline, same caches, overrides kept), even when /crop would
  fall back for low confidence; ``centre`` the legacy centre crop; ``attention`` libvips'
  attention smartcrop of the largest window of that aspect.
- ``GET /debug/gallery?src=<path>``: an HTML page comparing the three methods and the overlay
  at 1:1, 4:5, 16:9, 9:16 and 3:2. An inline script reports every image's ``naturalWidth`` in
  ``<pre id="report">`` once the page has loaded, so a headless browser can check it rendered.

The original comes from the same source, and its heatmap from the same cache, as ``/crop``; a
heatmap that is not cached yet is computed by ``CropCore.analyse`` in the decode pool (not
through the batcher: these requests must not take batch slots from ``/crop``), once per original
across concurrent requests, and cached for ``/crop`` too. Errors are the typed errors of
``/crop``, answered with their status and public message; an unexpected exception is logged and
answered 503, never 500.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar
from urllib.parse import quote

import pyvips
from aiohttp import web

from kernels.window import CropBox, largest_window
from sidecar.caches import heatmap_key
from sidecar.core import Analysis
from sidecar.decode import display_pixels
from sidecar.errors import BadRequest, BadSize, CorruptImage, HeatcropError
from sidecar.job import CropJob, Services
from sidecar.overlay import render_overlay
from sidecar.pipeline import run_crop
from sidecar.records import AnalysisExpect
from sidecar.routes import SERVICES, raw_tail
from sidecar.singleflight import SingleFlight
from sidecar.sizes import Size, parse_size
from sidecar.sources import Original, checked_path, clean_path

log = logging.getLogger("heatcrop.debug")

# Debug requests decode full originals and may run the model off the batcher: a generous budget,
# still bounded so that a stuck source cannot hold a request for ever.
DEBUG_DEADLINE_S = 30.0
METHODS = ("heatcrop", "centre", "attention")
GALLERY_ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 5), (16, 9), (9, 16), (3, 2))
GALLERY_WIDTH = 300
JPEG_QUALITY = 85
# Never a key of the pipeline's own flights or caches: paths cannot contain NUL.
_FLIGHT_PREFIX = "\x00debug\x00"

T = TypeVar("T")

DEBUG_FLIGHTS = web.AppKey("debug_flights", SingleFlight)


def add_debug_routes(app: web.Application) -> None:
    """Register the debug routes (on an app with the routes of sidecar.routes)."""
    app[DEBUG_FLIGHTS] = SingleFlight()
    # The cropped route first: "/debug/cropped/WxH/p" would also match "/debug/{size}/{path}".
    app.router.add_get("/debug/gallery", gallery)
    app.router.add_get("/debug/cropped/{size}/{path:.+}", partial(_answer, _cropped))
    app.router.add_get("/debug/{size}/{path:.+}", partial(_answer, _overlay))


async def _answer(
    work: Callable[[web.Request, Services], Awaitable[web.Response]], request: web.Request
) -> web.Response:
    """Run ``work``; map failures like /crop: typed errors → status + public message."""
    try:
        return await work(request, request.app[SERVICES])
    except HeatcropError as exc:
        return web.Response(status=exc.status, text=exc.public_message)
    except Exception:
        log.exception("debug %s failed unexpectedly", request.path)
        return web.Response(status=503, text="debug rendering failed")


# -- the work shared by the endpoints -------------------------------------------------------


@dataclass
class Inspection:
    """One original looked at for one size: what the endpoints draw and report."""

    original: Original
    analysis: Analysis
    size: Size
    box: CropBox
    timings: dict[str, str]


async def _in_pool(svc: Services, fn: Callable[[], T]) -> T:
    # The decode pool, not counted as decodes: /crop's admission does not wait for these.
    return await asyncio.get_running_loop().run_in_executor(svc.decodes.pool, fn)


def _parse(request: web.Request, svc: Services, skip: int) -> tuple[Size, str]:
    server = svc.settings.server
    # Not limited to server.allowed_sizes: the gallery's sizes are its own, and nothing here is
    # served to the public or fills the legacy server's cache.
    size = parse_size(
        request.match_info["size"], max_width=server.max_width, max_height=server.max_height
    )
    if not size.crops:
        raise BadSize(f"debug size {size}", public_message="debug needs both sides > 0")
    return size, clean_path(raw_tail(request, skip))


async def inspect(request: web.Request, svc: Services, size: Size, path: str) -> Inspection:
    """Fetch, heatmap (cache or analysis in the pool), then /crop's own box for ``size``."""
    loop = asyncio.get_running_loop()
    original = await svc.source.fetch(path, budget_s=DEBUG_DEADLINE_S)
    key = heatmap_key(original.identity, svc.heat_version)
    flights: SingleFlight[Analysis] = request.app[DEBUG_FLIGHTS]
    analysis = await flights.run(
        _FLIGHT_PREFIX + key, partial(_cached_or_analysed, svc, original, key)
    )
    # With the identity and heatmap known, run_crop goes straight to the box cache and search.
    svc.identities.put(path, original.identity, loop.time(), original.size)
    job = CropJob(path, size, deadline=loop.time() + DEBUG_DEADLINE_S)
    t0 = time.perf_counter()
    await run_crop(svc, job)
    search_ms = (time.perf_counter() - t0) * 1e3
    assert job.box is not None
    timings = {
        "decode": _ms(analysis.timings_ms.get("decode")),
        "infer": _ms(analysis.timings_ms.get("infer")),
        "search": "cached" if job.cached else _ms(search_ms),
    }
    return Inspection(original, job.analysis or analysis, size, job.box, timings)


async def _cached_or_analysed(svc: Services, original: Original, key: str) -> Analysis:
    analysis = None
    if original.size is not None:  # else not an image: the analysis says how
        expect = AnalysisExpect(original.size, svc.settings.source.max_pixels)
        analysis = await svc.caches.get_analysis(key, expect)
    if analysis is None:
        analysis = await _in_pool(svc, partial(svc.core.analyse, original.data))
        await svc.caches.put_analysis(key, analysis)
    return analysis


def _ms(value: float | None) -> str:
    # The heatmap cache keeps no timings: no number means the part was not run for this request.
    return "cached" if value is None else f"{value:.1f}ms"


def _box_headers(box: CropBox) -> dict[str, str]:
    return {
        "X-Heatcrop-Box": ",".join(str(v) for v in box.as_tuple()),
        "X-Heatcrop-Confidence": f"{box.confidence:.5f}",
    }


# -- /debug/{W}x{H}/{path} ------------------------------------------------------------------


async def _overlay(request: web.Request, svc: Services) -> web.Response:
    size, path = _parse(request, svc, 2)
    seen = await inspect(request, svc, size, path)
    png = await _in_pool(svc, partial(_render, svc, seen))
    headers = {
        "X-Heatcrop-Timings": ";".join(f"{k}={v}" for k, v in seen.timings.items()),
        "Cache-Control": "no-store",
        **_box_headers(seen.box),
    }
    return web.Response(body=png, content_type="image/png", headers=headers)


def _render(svc: Services, seen: Inspection) -> bytes:
    analysis = seen.analysis
    centre = svc.core.center(analysis, seen.size.aspect)
    heat = svc.core.prepared(analysis)
    faces = svc.core.protected(analysis)
    return render_overlay(
        seen.original.data, heat, seen.box, centre, analysis.width, analysis.height, faces
    )


# -- /debug/cropped/{W}x{H}/{path}?method=... -----------------------------------------------


async def _cropped(request: web.Request, svc: Services) -> web.Response:
    method = request.query.get("method", "heatcrop")
    if method not in METHODS:
        raise BadRequest(
            f"method {method[:32]!r}", public_message="method must be " + "|".join(METHODS)
        )
    size, path = _parse(request, svc, 3)
    seen = await inspect(request, svc, size, path)
    box = await _method_box(svc, seen, method)
    analysis = seen.analysis
    jpeg = await _in_pool(
        svc,
        partial(crop_jpeg, seen.original.data, analysis.width, analysis.height, box, size),
    )
    headers = {"X-Heatcrop-Method": method, "Cache-Control": "no-store", **_box_headers(box)}
    return web.Response(body=jpeg, content_type="image/jpeg", headers=headers)


async def _method_box(svc: Services, seen: Inspection, method: str) -> CropBox:
    analysis, aspect = seen.analysis, seen.size.aspect
    if method == "heatcrop":
        return seen.box
    if method == "centre":
        return svc.core.center(analysis, aspect)
    data = seen.original.data
    return await _in_pool(
        svc, partial(attention_box, data, analysis.width, analysis.height, aspect)
    )


def _load(data: bytes, width: int, height: int) -> pyvips.Image:
    """The original at its display size as the decoder sees it (``display_pixels``)."""
    pixels = display_pixels(data, width, height)
    return pyvips.Image.new_from_array(pixels, interpretation="srgb")


def attention_box(data: bytes, width: int, height: int, aspect: float) -> CropBox:
    """libvips' attention crop of the largest window of ``aspect``, in original pixels."""
    image = _load(data, width, height)
    cw, ch = largest_window(width, height, aspect)
    try:
        _, found = image.smartcrop(
            cw, ch, interesting="attention", attention_x=True, attention_y=True
        )
    except pyvips.Error as exc:
        raise CorruptImage(f"debug smartcrop: {exc}") from exc
    # libvips centres the window on the attention point, kept inside the image.
    x0 = min(max(int(found["attention_x"]) - cw // 2, 0), width - cw)
    y0 = min(max(int(found["attention_y"]) - ch // 2, 0), height - ch)
    return CropBox(x0, y0, x0 + cw, y0 + ch)


def crop_jpeg(data: bytes, width: int, height: int, box: CropBox, size: Size) -> bytes:
    """JPEG of ``box`` of the original (``width`` x ``height``), resized to exactly ``size``."""
    image = _load(data, width, height)
    try:
        part = image.crop(box.x0, box.y0, box.width, box.height)
        out = part.thumbnail_image(size.width, height=size.height, size="force")
        return bytes(out.jpegsave_buffer(Q=JPEG_QUALITY))
    except pyvips.Error as exc:
        raise CorruptImage(f"debug crop: {exc}") from exc


# -- /debug/gallery?src=... -----------------------------------------------------------------


async def gallery(request: web.Request) -> web.Response:
    src = request.query.get("src", "")
    try:
        path = checked_path(src)  # the query string is decoded already
    except HeatcropError as exc:
        return web.Response(status=exc.status, text=exc.public_message)
    return web.Response(
        text=gallery_html(path), content_type="text/html", headers={"Cache-Control": "no-store"}
    )


def gallery_sizes() -> list[Size]:
    return [Size(GALLERY_WIDTH, round(GALLERY_WIDTH * h / w)) for w, h in GALLERY_ASPECTS]


def gallery_urls(path: str, size: Size) -> dict[str, str]:
    """Column title → image URL, for one size."""
    quoted = quote(path, safe="/")
    urls = {m: f"/debug/cropped/{size}/{quoted}?method={m}" for m in METHODS}
    urls["overlay"] = f"/debug/{size}/{quoted}"
    return urls


_REPORT_SCRIPT = """
window.addEventListener("load", function () {
  var seen = [];
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    img.setAttribute("data-natural-width", String(img.naturalWidth));
    seen.push([img.getAttribute("src"), img.naturalWidth]);
  }
  document.getElementById("report").textContent = JSON.stringify(seen);
});
"""


def gallery_html(path: str) -> str:
    """The comparison page; every piece of the path is escaped for its context."""
    title = html.escape(path)
    rows = []
    for size in gallery_sizes():
        cells = "".join(
            f'<figure><img src="{html.escape(url)}" alt="{html.escape(name)} {size}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
            for name, url in gallery_urls(path, size).items()
        )
        rows.append(f"<section><h2>{size}</h2><div class=row>{cells}</div></section>")
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>heatcrop debug: {title}</title>"
        "<style>.row{display:flex;gap:8px;align-items:flex-start}"
        "figure{margin:0}.row img{max-width:300px}</style>"
        f"<script>{_REPORT_SCRIPT}</script></head><body>"
        f"<h1>{title}</h1>{''.join(rows)}"
        '<pre id="report"></pre></body></html>'
    )


def report_of(dom: str) -> list[tuple[str, int]]:
    """The (src, naturalWidth) pairs the page's script wrote, from a dumped DOM."""
    start = dom.index('<pre id="report">') + len('<pre id="report">')
    text = html.unescape(dom[start : dom.index("</pre>", start)])
    return [(src, int(width)) for src, width in json.loads(text)] if text else []
