"""Thumbor file loader that never reads outside its root: heatcrop's path rules for the
legacy server, which serves alone whenever the sidecar is down, slow or failing.

Thumbor 7.8's own ``file_loader`` checks the *joined* path against the root but then opens it,
following any symlink under the root to a file or folder outside it. This one opens the file
first and checks where the opened descriptor really is (``/proc/self/fd``, so a symlink swapped
in between the check and the read cannot escape), then refuses what is not a regular file or
is over ``HEATCROP_MAX_BYTES`` (the sidecar's ``source.max_bytes``). Names are decoded as the
stock loader decodes them (percent-decoded once, the literal name as a second try).

It also bounds the work a request can put on the legacy server, which renders one request at a
time and never stops a render that nobody waits for any more:

* a request whose ``X-Heatcrop-Deadline`` (epoch ms, set by the edge when it sends the hop:
  nginx gives up at that moment) has passed is answered 504 at once, before any read,
  decode or encode: after a burst, a queue of abandoned renders drains in milliseconds;
* an animated GIF whose frames hold more than ``HEATCROP_MAX_ANIMATION_PIXELS`` pixels in all
  is handed over as its first frame (Thumbor renders every frame, ~0.4 s per 512×512 one).

Runs inside Thumbor's own environment (``LOADER = 'nginx.thumbor_loader'``, this repository on
its PYTHONPATH): it imports nothing of heatcrop.
"""

from __future__ import annotations

import io
import os
import stat
import time
import warnings
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from thumbor.loaders import LoaderResult  # type: ignore[import-not-found]

TOO_LARGE = 413
# Too many pixels (or a side too long) for the sidecar's limits: a status of its own, so that
# nginx can tell the client which limit it met (edge.conf.in, @legacy_too_many_pixels; Thumbor's
# own MAX_PIXELS check would answer an empty 400 after the read).
TOO_MANY_PIXELS = 417
GATEWAY_TIMEOUT = 504
DEADLINE_HEADER = "X-Heatcrop-Deadline"


async def load(context: Any, path: str) -> LoaderResult:
    config = context.config
    root = os.path.realpath(config.FILE_LOADER_ROOT_PATH)
    max_bytes = int(getattr(config, "HEATCROP_MAX_BYTES", 0) or 0)
    result = LoaderResult()
    if expired(context):
        result.successful = False
        result.error = GATEWAY_TIMEOUT
        return result
    for name in dict.fromkeys((unquote(path), path)):
        found = read_inside(root, name, max_bytes)
        if found is not None:
            break
    else:
        found = LoaderResult.ERROR_NOT_FOUND
    if isinstance(found, tuple):
        data, mtime = found
        max_side = int(getattr(config, "HEATCROP_MAX_SIDE", 0))
        if over_pixel_limits(data, int(config.MAX_PIXELS), max_side):
            result.successful = False
            result.error = TOO_MANY_PIXELS
            return result
        data = first_frame_if_over(data, int(getattr(config, "HEATCROP_MAX_ANIMATION_PIXELS", 0)))
        result.successful = True
        result.buffer = data
        result.metadata.update(
            size=len(data), updated_at=datetime.fromtimestamp(mtime, UTC).replace(tzinfo=None)
        )
    else:
        result.successful = False
        result.error = found
    return result


def read_inside(root: str, name: str, max_bytes: int) -> tuple[bytes, float] | str | int | None:
    """(bytes, mtime) of ``root/name``; None when nothing is there; an error (Thumbor's
    not-found, or 413) when it is outside the root, not a regular file or too large."""
    if "\x00" in name:
        return LoaderResult.ERROR_NOT_FOUND
    try:
        fd = os.open(os.path.join(root, name.lstrip("/")), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        real = os.readlink(f"/proc/self/fd/{fd}")
        info = os.fstat(fd)
        if os.path.commonpath([root, real]) != root or not stat.S_ISREG(info.st_mode):
            return LoaderResult.ERROR_NOT_FOUND
        if max_bytes and info.st_size > max_bytes:
            return TOO_LARGE
        data = fh.read(max_bytes + 1) if max_bytes else fh.read()
        if max_bytes and len(data) > max_bytes:  # grew since fstat
            return TOO_LARGE
        return data, info.st_mtime


def expired(context: Any) -> bool:
    """Whether the edge has given up on this request already (its deadline header passed)."""
    handler = getattr(context, "request_handler", None)
    request = getattr(handler, "request", None)
    raw = request.headers.get(DEADLINE_HEADER, "") if request is not None else ""
    try:
        deadline_ms = float(raw)
    except ValueError:
        return False  # no header (a direct request): nothing to go by
    return time.time() * 1000.0 > deadline_ms


def gif_frames(data: bytes) -> tuple[int, int]:
    """(frames, pixels in all frames) of a GIF, read from its block structure without decoding;
    (0, 0) for anything else or a GIF too broken to walk (Pillow then says what it is)."""
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 13:
        return 0, 0
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    frames = pixels = 0
    try:
        while pos < len(data):
            kind = data[pos]
            if kind == 0x3B:  # trailer
                break
            if kind == 0x21:  # extension: label, then sub-blocks
                pos = _skip_blocks(data, pos + 2)
            elif kind == 0x2C:  # image descriptor
                width = int.from_bytes(data[pos + 5 : pos + 7], "little")
                height = int.from_bytes(data[pos + 7 : pos + 9], "little")
                flags = data[pos + 9]
                pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
                pos = _skip_blocks(data, pos + 1)  # LZW code size, then the data
                frames += 1
                pixels += width * height
            else:
                return 0, 0
    except IndexError:
        pass
    return frames, pixels


def _skip_blocks(data: bytes, pos: int) -> int:
    while data[pos]:
        pos += data[pos] + 1
    return pos + 1


def first_frame_if_over(data: bytes, max_pixels: int) -> bytes:
    """``data``, or its first frame alone when it is an animated GIF over ``max_pixels``."""
    if max_pixels <= 0:
        return data
    frames, pixels = gif_frames(data)
    if frames <= 1 or pixels <= max_pixels:
        return data
    from PIL import Image  # Thumbor's own dependency

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.seek(0)
        img.save(out, format="GIF")
    return out.getvalue()


def over_pixel_limits(data: bytes, max_pixels: int, max_side: int) -> bool:
    """Whether the header says more pixels than ``max_pixels`` or a side over ``max_side``;
    False when Pillow cannot read the header (Thumbor's engine then says what it is)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Thumbor lowers Pillow's bomb limit to MAX_PIXELS: over it is our answer here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
    except Image.DecompressionBombError:
        return True
    except Exception:  # any other unreadable header is Thumbor's engine's to report
        return False
    return width * height > max_pixels or bool(max_side and max(width, height) > max_side)
