import asyncio
import os
import subprocess
import sys

import pytest
from aiohttp import web
from skimage import data as skdata

from sidecar.errors import (
    BadPath,
    DeadlineExceeded,
    InputTooLarge,
    Overloaded,
    SourceNotFound,
    SourceTimeout,
    SourceUnavailable,
)
from sidecar.settings import SourceSettings
from sidecar.sources import FolderSource, HttpSource, clean_path, make_source
from tests.support.images import jpeg
from tests.support.redis_server import free_port

# Reads raced against the swap: until each state (file, symlink) was met EACH_STATE times,
# at most MAX_READS_RACED. The old check-then-open code lost the race in 8 runs of 8 (4 to
# 33 reads of the outside file each, 0.4-1.6 s a run).
EACH_STATE = 20
MAX_READS_RACED = 5000
# root/flip.jpg: a hard link to root/inside, then a symlink to the outside file, and again
# (the symlink first: renaming a hard link over another link to the same file does nothing).
FLIPPER = """
import os, sys
root, secret = sys.argv[1], sys.argv[2]
name, tmp = os.path.join(root, "flip.jpg"), os.path.join(root, ".next")
os.link(os.path.join(root, "inside"), name)
print("flipping", flush=True)
while True:
    os.symlink(secret, tmp)
    os.replace(tmp, name)
    os.link(os.path.join(root, "inside"), tmp)
    os.replace(tmp, name)
"""


@pytest.mark.parametrize(
    "raw",
    [
        "../etc/passwd",
        "a/../../b",
        "/etc/passwd",
        "%2e%2e/etc/passwd",
        "%252e%252e/x",
        "a/%2F../b",
        "a\\..\\b",
        "a/./b",
        "",
        "a\x00b",
        "%00",
        "a/\x07",
        "%25252525252e",
    ],
)
def test_clean_path_rejects_traversal(raw):
    with pytest.raises(BadPath) as info:
        clean_path(raw)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("raw", "want"),
    [("a/b.jpg", "a/b.jpg"), ("a%20b.jpg", "a b.jpg"), ("caf%C3%A9.jpg", "café.jpg")],
)
def test_clean_path_accepts_normal(raw, want):
    assert clean_path(raw) == want


# nginx's guard refuses these alike (tests/nginx/test_edge_guard.py): with the sidecar down,
# a folder's name or a name that is not UTF-8 must not reach the legacy server either.
@pytest.mark.parametrize("raw", ["x/y/", "a.jpg/", "%FF" * 400, "caf%E9.jpg", "%C3.jpg"])
def test_clean_path_refuses_folders_and_names_that_are_not_utf8(raw):
    with pytest.raises(BadPath) as info:
        clean_path(raw)
    assert info.value.status == 400


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "root"
    (root / "r").mkdir(parents=True)
    (root / "r" / "a.jpg").write_bytes(b"x" * 10)
    (tmp_path / "secret.jpg").write_bytes(b"s")
    os.symlink(tmp_path / "secret.jpg", root / "r" / "link.jpg")
    return root


async def test_folder_source(folder):
    src = FolderSource(SourceSettings(root=str(folder), max_bytes=100))
    got = await src.fetch("r/a.jpg")
    assert got.data == b"x" * 10 and got.identity.startswith("file:r/a.jpg:10:")
    with pytest.raises(SourceNotFound):
        await src.fetch("r/missing.jpg")
    with pytest.raises(SourceNotFound):
        await src.fetch("r")
    with pytest.raises(BadPath):
        await src.fetch("r/link.jpg")
    small = FolderSource(SourceSettings(root=str(folder), max_bytes=5))
    with pytest.raises(InputTooLarge):
        await small.fetch("r/a.jpg")


async def test_folder_identity_changes_with_content(folder):
    src = FolderSource(SourceSettings(root=str(folder)))
    first = (await src.fetch("r/a.jpg")).identity
    (folder / "r" / "a.jpg").write_bytes(b"y" * 11)
    assert (await src.fetch("r/a.jpg")).identity != first


@pytest.fixture
async def origin(aiohttp_server):
    async def image(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "slow.jpg":
            await asyncio.sleep(2)
        if name == "big.jpg":
            resp = web.StreamResponse()  # no Content-Length: the cap must hold while streaming
            await resp.prepare(request)
            for _ in range(20):
                await resp.write(b"z" * 1000)
            return resp
        if name == "boom.jpg":
            return web.Response(status=500)
        if name == "etag.jpg":
            return web.Response(body=b"img", headers={"ETag": '"v1"'})
        if name == "plain.jpg":
            return web.Response(body=b"img")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/base/{name:.+}", image)
    return await aiohttp_server(app, host="127.0.0.1")


def _http(origin, **kw):
    kw.setdefault("read_timeout_ms", 300)
    return HttpSource(SourceSettings(kind="http", base_url=str(origin.make_url("/base")), **kw))


async def test_http_source(origin):
    src = _http(origin, max_bytes=5000)
    try:
        etag = await src.fetch("etag.jpg")
        assert etag.data == b"img" and '"v1"' in etag.identity
        plain = await src.fetch("plain.jpg")
        assert "sha1:" in plain.identity
        with pytest.raises(SourceNotFound):
            await src.fetch("nope.jpg")
        with pytest.raises(SourceUnavailable):
            await src.fetch("boom.jpg")
        with pytest.raises(SourceTimeout):
            await src.fetch("slow.jpg")
        with pytest.raises(InputTooLarge):
            await src.fetch("big.jpg")
        with pytest.raises(BadPath):
            await src.fetch("../base/etag.jpg")
    finally:
        await src.close()


async def test_http_origin_down():
    # A free port: nothing listens, so the connection is refused (not a timeout).
    url = f"http://127.0.0.1:{free_port()}"
    down = SourceSettings(kind="http", base_url=url, connect_timeout_ms=200)
    src = HttpSource(down)
    try:
        with pytest.raises(SourceUnavailable):
            await src.fetch("a.jpg")
    finally:
        await src.close()


def test_make_source_and_bad_base():
    assert isinstance(make_source(SourceSettings()), FolderSource)
    with pytest.raises(ValueError, match="BASE_URL"):
        HttpSource(SourceSettings(kind="http", base_url="file:///etc"))


async def test_http_budget_caps_the_whole_fetch(origin):
    # The socket limit alone would wait out slow.jpg's 2 s and get its 404: a timeout instead
    # shows that the budget cut the exchange short.
    src = _http(origin, read_timeout_ms=5000)
    try:
        with pytest.raises(SourceTimeout):
            await src.fetch("slow.jpg", budget_s=0.1)
        assert (await src.fetch("etag.jpg", budget_s=5)).data == b"img"
    finally:
        await src.close()


async def test_folder_reads_are_bounded_and_skip_what_nobody_waits_for(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    src = FolderSource(SourceSettings(root=str(tmp_path)))
    try:
        # A free thread reads at once, budget or not (the original may still serve a
        # background heatmap); a read that has to queue is skipped once nobody waits for it.
        assert (await src.fetch("a.jpg", budget_s=-1.0)).data == b"x"
        src.reads = src.READ_THREADS  # as if every thread were busy
        with pytest.raises(DeadlineExceeded):
            await src.fetch("a.jpg", budget_s=-1.0)
        src.reads = src.MAX_READS  # as if that many were queued
        with pytest.raises(Overloaded):
            await src.fetch("a.jpg")
        src.reads = 0
        assert (await src.fetch("a.jpg", budget_s=5)).data == b"x"
    finally:
        await src.close()


def test_clean_path_limit_counts_utf8_bytes():
    # 410 characters, 1210 bytes: the box record stores at most 1024 bytes of path.
    with pytest.raises(BadPath):
        clean_path("/".join(["食" * 80] * 5) + "/a.jpg")
    assert clean_path("食" * 300 + ".jpg")  # 904 bytes


async def test_a_file_name_too_long_for_the_file_system_is_not_found(folder):
    src = FolderSource(SourceSettings(root=str(folder), max_bytes=100))
    with pytest.raises(SourceNotFound):
        await src.fetch("a" * 300 + ".jpg")
    with pytest.raises(SourceNotFound):
        await src.fetch("r/" + "b" * 300 + "/a.jpg")


async def test_a_symlink_loop_is_not_found(folder):
    os.symlink(folder / "r" / "loop.jpg", folder / "r" / "loop.jpg")
    src = FolderSource(SourceSettings(root=str(folder), max_bytes=100))
    with pytest.raises((SourceNotFound, BadPath)):
        await src.fetch("r/loop.jpg")


async def test_a_symlink_swapped_in_during_reads_never_serves_the_outside_file(tmp_path):
    # Issue 21 item 7: a file under the root swapped for a symlink to an outside file between
    # the check and the read. Another process (no GIL to share) flips the name as fast as it
    # can, atomically so that it always exists, while the source reads it; whatever each read
    # answers, it is never the outside file's bytes.
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"outside")
    (root / "inside").write_bytes(b"inside!")
    src = FolderSource(SourceSettings(root=str(root), max_bytes=100))
    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(root), str(secret)], stdout=subprocess.PIPE
    )
    served, refused = [], 0
    try:
        assert flipper.stdout is not None and flipper.stdout.readline() == b"flipping\n"
        # On a loaded machine the flipper may sit idle for a while: read until each state was
        # met often enough that the race was surely on, within a bound.
        for _ in range(MAX_READS_RACED):
            try:
                served.append((await src.fetch("flip.jpg")).data)
            except (BadPath, SourceNotFound):
                refused += 1
            if min(refused, len(served)) >= EACH_STATE:
                break
    finally:
        flipper.kill()
        flipper.wait(timeout=10)
        flipper.stdout.close()  # type: ignore[union-attr]
        await src.close()
    assert b"outside" not in served
    assert min(refused, len(served)) >= EACH_STATE  # the race was on


async def test_an_original_comes_with_its_size_from_the_header(tmp_path, aiohttp_server):
    # What cached records of it are checked against (sidecar/records.py); None: no image.
    photo = jpeg(skdata.coffee())
    (tmp_path / "coffee.jpg").write_bytes(photo)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    folder = FolderSource(SourceSettings(root=str(tmp_path)))

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=(tmp_path / request.match_info["name"]).read_bytes())

    app = web.Application()
    app.router.add_get("/{name}", image)
    origin = await aiohttp_server(app, host="127.0.0.1")
    http = HttpSource(SourceSettings(kind="http", base_url=str(origin.make_url("/"))))
    try:
        for src in (folder, http):
            assert (await src.fetch("coffee.jpg")).size == (600, 400)
            assert (await src.fetch("junk.jpg")).size is None
    finally:
        await folder.close()
        await http.close()
