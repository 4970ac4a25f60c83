"""Typed errors: each carries the HTTP status, a public message and whether to fall back.

Modelled on imgproxy's errors.go: the message is safe to show a client, the status is what
the sidecar answers, and ``fallback`` says whether nginx should serve the legacy crop instead
of an error (the original may be fine, only our path failed).

The base ``HeatcropError`` and the engines' two (``EngineError`` 500, ``ModelNotBuilt`` 503)
are defined in engines/errors.py, so the engines raise them without importing the service;
they are the same classes here. Everything else is the service's own.
"""

from __future__ import annotations

from engines.errors import EngineError as EngineError
from engines.errors import HeatcropError as HeatcropError
from engines.errors import ModelNotBuilt as ModelNotBuilt


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
    """The original's byte size is over the limit: refused before decoding. No fallback: the
    legacy server is configured with the same limit (nginx/thumbor.py) and would refuse it
    too, with a less useful answer."""

    status = 413
    public_message = "source too large"
    fallback = False


class TooManyPixels(HeatcropError):
    """A decompression bomb or simply a huge image: refused from the header alone. No fallback:
    ``source.max_pixels`` is the legacy server's limit too (Thumbor's MAX_PIXELS), so the
    legacy crop would be a refusal with an empty body."""

    status = 413
    public_message = "source has too many pixels"
    fallback = False


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


class ColdStart(HeatcropError):
    """``server.cold_policy = "legacy"``: no heatmap of this original is cached, so the answer is
    the legacy crop now and the heatmap is made in the background (sidecar/step_cold.py)."""

    status = 503
    public_message = "heatmap not ready"
    fallback = True
