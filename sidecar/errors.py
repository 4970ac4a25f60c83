"""Typed errors: each carries the HTTP status, a public message and whether to fall back.

Modelled on imgproxy's errors.go: the message is safe to show a client, the status is what
the sidecar answers, and ``fallback`` says whether nginx should serve the legacy crop instead
of an error (the original may be fine, only our path failed).
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


class BadRequest(HeatcropError):
    status = 400
    public_message = "bad request"
    fallback = False


class BadSize(BadRequest):
    public_message = "invalid size"


class BadPath(BadRequest):
    public_message = "invalid path"


class SourceNotFound(HeatcropError):
    status = 404
    public_message = "source not found"
    fallback = False


class InputTooLarge(HeatcropError):
    """The original's byte size is over the limit: refused before decoding."""

    status = 413
    public_message = "source too large"
    fallback = True


class TooManyPixels(HeatcropError):
    """A decompression bomb or simply a huge image: refused from the header alone."""

    status = 413
    public_message = "source has too many pixels"
    fallback = True


class NotAnImage(HeatcropError):
    status = 415
    public_message = "source is not an image"
    fallback = False


class UnsupportedFormat(HeatcropError):
    status = 415
    public_message = "unsupported image format"
    fallback = True


class CorruptImage(HeatcropError):
    """Truncated or damaged data: the legacy server may still show something."""

    status = 422
    public_message = "source image is damaged"
    fallback = True


class SourceTimeout(HeatcropError):
    status = 504
    public_message = "source timed out"
    fallback = True


class SourceUnavailable(HeatcropError):
    status = 502
    public_message = "source unavailable"
    fallback = True


class DeadlineExceeded(HeatcropError):
    status = 503
    public_message = "gave up in time"
    fallback = True


class Overloaded(HeatcropError):
    status = 503
    public_message = "overloaded"
    fallback = True


class EngineError(HeatcropError):
    status = 500
    public_message = "engine failure"
    fallback = True


class ModelNotBuilt(HeatcropError):
    status = 503
    public_message = "model not built"
    fallback = True
