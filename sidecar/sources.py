"""Where originals come from: a local folder or one fixed HTTP origin.

The request only ever names a *path*; the origin's base URL comes from settings, so no
request can make us fetch an arbitrary URL (no SSRF). Paths are checked after repeated
percent-decoding, so ``%2e%2e`` or ``%252e%252e`` cannot climb out of the root.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import posixpath
import stat
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote

import aiohttp

from sidecar.decode import Header, read_header
from sidecar.errors import (
    BadPath,
    DeadlineExceeded,
    HeatcropError,
    InputTooLarge,
    Overloaded,
    SourceNotFound,
    SourceTimeout,
    SourceUnavailable,
)
from sidecar.settings import SourceSettings

MAX_PATH = 1024
# Nested percent-encodings checked for traversal; more than that is not a real image path.
DECODINGS = 3


@dataclass(frozen=True)
class Original:
    data: bytes
    identity: str  # path + validators: a changed original gets a new heatmap key
    # Its header checked against the limits (``checked_header``), which the decode takes
    # instead of parsing it again; None when it does not pass the decoder's checks.
    header: Header | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) in display orientation, from the header; None when the header does
        not pass the decoder's checks. What a cached analysis or box of this original is held
        against (sidecar/records.py): the cache is shared, its records are not trusted."""
        return None if self.header is None else (self.header.width, self.header.height)


class Source(Protocol):
    async def fetch(self, path: str, budget_s: float | None = None) -> Original:
        """The original at ``path`` (decoded, as ``clean_path`` returns it); ``budget_s``:
        seconds after which nobody waits for it."""
        ...

    async def close(self) -> None: ...


def checked_header(data: bytes, settings: SourceSettings) -> Header | None:
    """The original's header checked against the limits (~0.3 ms for a photo), None when it
    does not pass the decoder's checks: then the decode fails too (saying why), and no heatmap
    of it exists."""
    try:
        return read_header(data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
    except HeatcropError:
        return None


def clean_path(raw: str) -> str:
    """The path a raw (percent-encoded) URL tail names, decoded once as nginx and the legacy
    server decode it, relative and normalised; BadPath otherwise.

    Deeper decodings are checked too (``%252e%252e`` is refused), but not used: a file whose
    name holds ``%41`` is requested as ``%2541`` and must stay ``%41``.
    """
    try:
        # Each run of escapes must be UTF-8 (nginx's guard refuses alike): a name decoded with
        # replacement characters names no file, and would count 3 bytes per bad byte.
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadPath(f"path {raw[:64]!r} is not UTF-8") from None
    deeper = path
    for _ in range(DECODINGS):
        decoded = unquote(deeper)
        if decoded == deeper:
            break
        deeper = decoded
        checked_path(deeper, shown=raw)
    else:
        raise BadPath(f"path {raw[:64]!r} is encoded too many times")
    return checked_path(path, shown=raw)


def checked_path(path: str, shown: str | None = None) -> str:
    """``path`` (already decoded) if it is relative, normalised and within limits; BadPath
    otherwise. ``shown``: what to quote in the error, the raw form when there is one."""
    what = (path if shown is None else shown)[:64]
    # MAX_PATH counts UTF-8 bytes, as the box record that stores the path does.
    too_long = len(path.encode("utf-8", "surrogatepass")) > MAX_PATH
    if not path or too_long or "\x00" in path or "\\" in path:
        raise BadPath(f"path {what!r} is empty, too long or has NUL/backslash")
    if path.startswith("/") or any(part in ("..", ".") for part in path.split("/")):
        raise BadPath(f"path {what!r} is absolute or has dot segments")
    if any(ord(c) < 32 for c in path):
        raise BadPath(f"path {what!r} has control characters")
    if path.endswith("/"):
        raise BadPath(f"path {what!r} names a folder")
    normal = posixpath.normpath(path)
    if normal != path or normal.startswith(".."):
        raise BadPath(f"path {what!r} is not normalised")
    return normal


class FolderSource:
    """Originals on a local disk (or a mounted bucket), read in a small pool of its own.

    Reads are bounded like every other queue: under overload, reads queued in a thread pool for
    requests that have already given up made every later read wait behind them (measured: 50 ms
    a read at 400 req/s on 2 cores). So at most ``MAX_READS`` reads are queued or running (more
    are refused at once), and a read whose budget ran out while it queued is skipped.
    """

    READ_THREADS = 4
    MAX_READS = 16

    def __init__(self, settings: SourceSettings) -> None:
        self.root = Path(settings.root).resolve()
        self._root_text = str(self.root)
        self.settings = settings
        self.max_bytes = settings.max_bytes
        self.reads = 0  # queued or running
        self._pool = ThreadPoolExecutor(self.READ_THREADS, thread_name_prefix="heatcrop-read")

    async def fetch(self, path: str, budget_s: float | None = None) -> Original:
        rel = checked_path(path)  # decoded already: decoding again would name another file
        if self.reads >= self.MAX_READS:
            raise Overloaded(f"{self.reads} reads already queued")
        # Only a read that has to queue behind others may be skipped: one that starts at once
        # is cheap, and its original may still serve the background heatmap of a give-up.
        queued = self.reads >= self.READ_THREADS
        expires = time.monotonic() + budget_s if budget_s is not None and queued else None
        self.reads += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._read, rel, expires)
        finally:
            self.reads -= 1

    def _read(self, rel: str, expires: float | None = None) -> Original:
        if expires is not None and time.monotonic() > expires:
            raise DeadlineExceeded(f"{rel}: budget spent while the read was queued")
        # Open first, then check what was opened: checking a name and opening it after lets
        # a symlink swapped in between lead outside the root (issue 21, item 7). The bytes
        # returned are read from this descriptor, so the decoder gets exactly what passed.
        fd = self._open(rel)
        try:
            info = os.fstat(fd)
            self._check_opened(rel, fd, info)
            data = _read_up_to(fd, self.max_bytes + 1, first=info.st_size + 1)
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise InputTooLarge(f"{rel} grew past the limit while reading")
        identity = f"file:{rel}:{info.st_size}:{info.st_mtime_ns}"
        # Read here, in the read thread: no extra hop, and off the event loop.
        return Original(data, identity, checked_header(data, self.settings))

    def _open(self, rel: str) -> int:
        try:
            # O_NONBLOCK: a FIFO put under the root must not hang the reader on open.
            return os.open(self.root / rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError) as exc:
            raise SourceNotFound(f"{rel}: {exc}") from exc
        except OSError as exc:  # a name too long, a symlink loop
            if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                raise
            raise SourceNotFound(f"{rel}: {exc}") from exc

    def _check_opened(self, rel: str, fd: int, info: os.stat_result) -> None:
        """BadPath when the opened file lies outside the root (wherever the name led);
        SourceNotFound when it is not a regular file; InputTooLarge over the limit."""
        real = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.commonpath([self._root_text, real]) != self._root_text:
            raise BadPath(f"{rel} resolves outside the root")
        if not stat.S_ISREG(info.st_mode):
            raise SourceNotFound(f"{rel} is not a file")
        if info.st_size > self.max_bytes:
            raise InputTooLarge(f"{rel}: {info.st_size} bytes")

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _read_up_to(fd: int, limit: int, first: int) -> bytes:
    """At most ``limit`` bytes from ``fd``, until its end; ``first``: the size of the first read
    (the file's size and one, so a file that did not grow is read in one call)."""
    chunks, size, want = [], 0, first
    while size < limit:
        chunk = os.read(fd, min(limit - size, want))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        want = 1 << 16
    return b"".join(chunks)


class HttpSource:
    """Originals behind one fixed HTTP origin, with a keep-alive pool and hard limits."""

    def __init__(self, settings: SourceSettings) -> None:
        if not settings.base_url.startswith(("http://", "https://")):
            raise ValueError("HEATCROP_SOURCE_BASE_URL must be an http(s) URL")
        self.base = settings.base_url.rstrip("/") + "/"
        self.settings = settings
        self.max_bytes = settings.max_bytes
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_ms / 1000,
            sock_read=settings.read_timeout_ms / 1000,
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=False
            )
        return self._session

    async def fetch(self, path: str, budget_s: float | None = None) -> Original:
        rel = checked_path(path)  # decoded already: quoted once for the origin
        url = self.base + quote(rel, safe="/")
        # The budget caps the whole exchange; the per-socket limits still apply within it.
        # (timeout=None would mean no limit at all, not the session's: pass it only when set.)
        budget = {} if budget_s is None else {"timeout": self._capped(budget_s)}
        try:
            async with self._client().get(url, allow_redirects=False, **budget) as resp:
                if resp.status == 404 or resp.status == 410:
                    raise SourceNotFound(f"origin {resp.status} for {rel}")
                if resp.status != 200:
                    raise SourceUnavailable(f"origin {resp.status} for {rel}")
                if (resp.content_length or 0) > self.max_bytes:
                    raise InputTooLarge(f"{rel}: Content-Length {resp.content_length}")
                data = await self._read_capped(resp, rel)
                identity = _http_identity(rel, resp.headers, data)
        except TimeoutError as exc:
            raise SourceTimeout(f"origin timed out for {rel}") from exc
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"origin error for {rel}: {exc}") from exc
        # Off the event loop: a header read is a third of a millisecond of libvips.
        header = await asyncio.to_thread(checked_header, data, self.settings)
        return Original(data, identity, header)

    def _capped(self, budget_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=max(budget_s, 0.001),
            sock_connect=self.timeout.sock_connect,
            sock_read=self.timeout.sock_read,
        )

    async def _read_capped(self, resp: aiohttp.ClientResponse, rel: str) -> bytes:
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise InputTooLarge(f"{rel}: body over {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _http_identity(rel: str, headers: Mapping[str, str], data: bytes) -> str:
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    if etag or modified:
        return f"http:{rel}:{etag or ''}:{modified or ''}:{len(data)}"
    # No validators: only the content itself tells a changed original apart.
    return f"http:{rel}:sha1:{hashlib.sha1(data).hexdigest()}"


def make_source(settings: SourceSettings) -> Source:
    return HttpSource(settings) if settings.kind == "http" else FolderSource(settings)
