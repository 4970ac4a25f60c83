"""The typed errors the engines raise, and the base every typed error of heatcrop shares.

A typed error carries what a service needs to answer for it: the HTTP status, a message safe to
show a client, and whether the caller should fall back to the legacy crop instead of showing an
error (the original may be fine, only our path failed). Modelled on imgproxy's errors.go.

The base lives here, beside the engines, so that the engines raise typed errors without
importing the service; the service's own errors (bad request, source not found, ...) are
subclasses of ``HeatcropError``, and these two are the same classes there.
"""

from __future__ import annotations


class HeatcropError(Exception):
    """Base of every error our code raises on purpose."""

    status: int = 500
    public_message: str = "internal error"
    fallback: bool = True

    def __init__(self, detail: str = "", *, public_message: str | None = None) -> None:
        super().__init__(detail or self.public_message)
        self.detail = detail
        if public_message is not None:
            self.public_message = public_message


class EngineError(HeatcropError):
    """A runtime failed: it cannot start on this machine, or an inference call went wrong."""

    status = 500
    public_message = "engine failure"
    fallback = True


class ModelNotBuilt(HeatcropError):
    """No usable model (or TensorRT plan) on disk: missing, half-written or not this one."""

    status = 503
    public_message = "model not built"
    fallback = True


def first_line(exc: BaseException) -> str:
    """The first line of an error's message: runtimes' messages can run to dozens of lines,
    and a log line or an operator's message has room for one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
