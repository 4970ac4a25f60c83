"""The sidecar's HTTP server: aiohttp's, except that a malformed request costs one log line.

aiohttp answers what its parser refuses (a 12,000-byte path, a 64 KiB header, 1,000 headers,
an unknown method on a kept-alive connection) with a 400 whose body quotes the parser's
message, the raw request line included, and logs a full traceback at ERROR. Public input must
not page anyone nor be echoed back: a client error is one INFO line and a short body. Server
errors (5xx) keep aiohttp's own handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

log = logging.getLogger("heatcrop.http")


class _QuietHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        log.info(
            "refused a malformed request from %s: %d %s",
            request.remote,
            status,
            type(exc).__name__ if exc is not None else "",
        )
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already; cannot send the error")
        resp = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}\n")
        resp.force_close()
        return resp


class _QuietServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _QuietHandler(self, loop=self._loop, **self._kwargs)


class QuietRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use ``_QuietHandler``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its Server itself (startup, request factory); only the class that
        # handles each connection differs, and it adds no state.
        server.__class__ = _QuietServer
        return server


async def _serve_until_stopped(app: web.Application, host: str, port: int) -> None:
    runner = QuietRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving on http://%s:%d", host, port)
        while True:  # until SIGINT or SIGTERM (the runner's handlers raise GracefulExit)
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def run(app: web.Application, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
    """Serve ``app`` on ``loop`` until SIGINT or SIGTERM, then clean it up (as run_app does)."""
    asyncio.set_event_loop(loop)
    task = loop.create_task(_serve_until_stopped(app, host, port))
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
                loop.run_until_complete(task)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
