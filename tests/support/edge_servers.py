"""Misbehaving sidecars for the edge tests, each a real process on a loopback port.

    python -m tests.support.edge_servers hang PORT     # accepts, reads the request, never answers
    python -m tests.support.edge_servers error PORT    # answers every request with 500
    python -m tests.support.edge_servers hang-first PORT  # the first /crop hangs 3 s, the rest 500
    python -m tests.support.edge_servers status-429 PORT  # any status of no sidecar of ours
    python -m tests.support.edge_servers no-redirect PORT  # 200 without X-Accel-Redirect
    python -m tests.support.edge_servers broken-engine
        # the real sidecar (HEATCROP_* settings) whose engine raises on every request after warming

nginx must turn each into the legacy crop. ``/healthz`` answers 200 in every mode so the
stack's readiness check works the same way as for the real sidecar; ``/count`` tells how many
other requests reached this process.
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class _Handler(BaseHTTPRequestHandler):
    mode = "error"
    seen = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, b"ok")
            return
        if self.path == "/count":
            self._answer(200, str(_Handler.seen).encode())
            return
        with _Handler.lock:
            _Handler.seen += 1
            first = _Handler.seen == 1
        if self.mode == "hang":
            threading.Event().wait()  # until the process is stopped
        elif self.mode == "hang-first" and first:
            threading.Event().wait(3.0)  # past any edge timeout, then a late 500
        elif self.mode.startswith("status-"):
            # A status no sidecar of ours sends, cacheable for a day if nginx let it.
            self._answer(int(self.mode[7:]), b"odd answer", cache=True)
            return
        elif self.mode == "no-redirect":
            self._answer(200, b"", cache=True)  # 200 without X-Accel-Redirect
            return
        self._answer(500, b"sidecar broke")

    do_PUT = do_GET  # noqa: N815 (http.server dispatches on the method name)

    def _answer(self, status: int, body: bytes, *, cache: bool = False) -> None:
        self.send_response(status)
        if cache:
            self.send_header("Cache-Control", "public, max-age=86400")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_fake(mode: str, port: int) -> None:
    handler = type("Handler", (_Handler,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.address_family = socket.AF_INET
    server.serve_forever()


def serve_broken_engine() -> int:
    from engines.ort import OrtEngine
    from sidecar import app

    warm_up = OrtEngine.warm_up

    def warm_then_break(self: OrtEngine) -> None:
        warm_up(self)

        def infer(batch: np.ndarray) -> None:
            raise RuntimeError("engine failure injected by tests.support.edge_servers")

        self.infer = infer  # type: ignore[method-assign,assignment]

    OrtEngine.warm_up = warm_then_break  # type: ignore[method-assign]
    return app.main([])


def main(argv: list[str]) -> int:
    if argv[:1] == ["broken-engine"]:
        return serve_broken_engine()
    mode, port = argv[0], int(argv[1])
    if mode not in ("hang", "error", "hang-first", "no-redirect") and not mode.startswith(
        "status-"
    ):
        raise SystemExit(f"unknown mode {mode}")
    serve_fake(mode, port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
