"""Thumbor file loader that never reads outside its root: heatcrop's path rules for the
legacy server, which serves alone whenever the sidecar is down, slow or failing.

Thumbor 7.8's own ``file_loader`` checks the *joined* path against the root but then opens it,
following any symlink under the root to a file or folder outside it. This one opens the file
first and checks where the opened descriptor really is (``/proc/self/fd``, so a symlink swapped
in between the check and the read cannot escape), then refuses what is not a regular file or
is over ``HEATCROP_MAX_BYTES`` (the sidecar's ``source.max_bytes``). Names are decoded as the
stock loader decodes them (percent-decoded once, the literal name as a second try).

Runs inside Thumbor's own environment (``LOADER = 'nginx.thumbor_loader'``, this repository on
its PYTHONPATH): it imports nothing of heatcrop.
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from thumbor.loaders import LoaderResult  # type: ignore[import-not-found]

TOO_LARGE = 413


async def load(context: Any, path: str) -> LoaderResult:
    config = context.config
    root = os.path.realpath(config.FILE_LOADER_ROOT_PATH)
    max_bytes = int(getattr(config, "HEATCROP_MAX_BYTES", 0) or 0)
    result = LoaderResult()
    for name in dict.fromkeys((unquote(path), path)):
        found = read_inside(root, name, max_bytes)
        if found is not None:
            break
    else:
        found = LoaderResult.ERROR_NOT_FOUND
    if isinstance(found, tuple):
        data, mtime = found
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
