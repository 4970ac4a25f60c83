"""Faces in the service, on by default: the real detector joined to the real model, through
aiohttp, on photos with known faces (tests/support/faces.py).

- every crop of a face near the edge and of a small group keeps each face whole;
- the faces are cached with the heatmap, under a key naming the detector, wherever the heatmap
  was made: a request, a give-up finished in the background, ``heatcrop warm``;
- a missing or tampered detector serves without faces, with one warning saying why;
- a burst of face-dense originals costs the detector what any photo costs: the next new
  original still gets its smart crop, and no photo keeps more than ``kernel.max_faces``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from engines.faces import FACES_MANIFEST_NAME, find_face_model
from kernels.faces import count_sliced
from sidecar.app import make_app
from sidecar.caches import heatmap_key, make_caches
from sidecar.routes import SERVICES
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    KernelSettings,
    ServerSettings,
    Settings,
    SettingsError,
    SourceSettings,
    load,
)
from sidecar.warm import warm
from tests.support.faces import portrait_near_edge, small_group, without_faces
from tests.support.images import jpeg
from tests.support.sidecar_metrics import scraped

SIZES = ("300x300", "400x500", "640x360", "360x640", "400x600", "600x400", "300x600")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    root = tmp_path_factory.mktemp("originals")
    heads = {}
    for name, make in (("edge.jpg", portrait_near_edge), ("group.jpg", small_group)):
        data, boxes = make()
        (root / name).write_bytes(data)
        heads[name] = boxes
    (root / "coffee.jpg").write_bytes(jpeg(skdata.coffee()))
    # Face-dense: 8 x 8 astronaut heads, each ~75 px, in a 600x660 frame.
    tile = skdata.astronaut()[20:240, 130:320][::3, ::3]
    dense = jpeg(np.ascontiguousarray(np.tile(tile, (9, 9, 1))[:660, :600]))
    for i in range(24):
        (root / f"dense-{i}.jpg").write_bytes(dense)
    for i in range(3):
        (root / f"plain-{i}.jpg").write_bytes(jpeg(skdata.chelsea()[:, i:]))
    return root, heads


def _settings(model_dir: Path, root: Path, **kernel: object) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=SourceSettings(root=str(root)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        kernel=dataclasses.replace(KernelSettings(), **kernel),
    )


def _box(resp) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in resp.headers["X-Heatcrop-Box"].split(","))
    return x0, y0, x1, y1


async def _analysis(client, path: str):
    svc = client.server.app[SERVICES]
    original = await svc.source.fetch(path)
    return await svc.caches.get_analysis(heatmap_key(original.identity, svc.heat_version))


def test_faces_are_on_by_default():
    assert Settings().kernel.faces is True


async def test_no_crop_slices_a_face_near_the_edge_or_in_a_small_group(
    aiohttp_client, model_dir, photos
):
    root, heads = photos
    client = await aiohttp_client(make_app(_settings(model_dir, root)))
    for name, boxes in heads.items():
        for size in SIZES:
            resp = await client.get(f"/crop/{size}/{name}")
            assert resp.status == 200 and resp.headers["X-Heatcrop-Path"] == "smart", size
            assert count_sliced(np.array(boxes), _box(resp)) == 0, (name, size, _box(resp))
        analysis = await _analysis(client, name)
        assert analysis is not None and len(analysis.faces) == len(boxes)
    assert await scraped(client, "heatcrop_nn_runs_total") == 2
    assert await scraped(client, "heatcrop_faces_per_photo_count") == 2
    assert await scraped(client, "heatcrop_faces_per_photo_sum") == 4
    assert await scraped(client, "heatcrop_face_seconds_count") == 2


async def test_the_heatmap_key_names_the_detector_and_faces_off_the_model_alone(
    aiohttp_client, model_dir, photos, session_engine
):
    root, _ = photos
    on = await aiohttp_client(make_app(_settings(model_dir, root)))
    svc = on.server.app[SERVICES]
    _, digest = find_face_model(model_dir)
    assert svc.heat_version.startswith(svc.engine.engine.version + "+yunet-" + digest[:12])
    off = await aiohttp_client(make_app(_settings(model_dir, root, faces=False)))
    plain = off.server.app[SERVICES]
    assert plain.heat_version == plain.engine.version != svc.heat_version
    resp = await off.get("/crop/300x300/group.jpg")
    assert resp.status == 200 and resp.headers["X-Heatcrop-Path"] == "smart"
    analysis = await _analysis(off, "group.jpg")
    assert analysis is not None and analysis.faces.shape == (0, 5)


@pytest.mark.parametrize("damage", ["missing", "tampered"])
async def test_a_missing_or_tampered_detector_serves_without_faces_and_says_why_once(
    aiohttp_client, model_dir, photos, tmp_path, damage, caplog: pytest.LogCaptureFixture
):
    root, _ = photos
    folder = without_faces(model_dir, tmp_path / "model")
    if damage == "tampered":
        graph, _ = find_face_model(model_dir)
        (folder / FACES_MANIFEST_NAME).write_bytes((model_dir / FACES_MANIFEST_NAME).read_bytes())
        (folder / graph.name).write_bytes(graph.read_bytes()[:-2] + b"\0\0")
    with caplog.at_level(logging.INFO):
        client = await aiohttp_client(make_app(_settings(folder, root)))
        for size in ("300x300", "200x100"):
            resp = await client.get(f"/crop/{size}/group.jpg")
            assert resp.status == 200 and resp.headers["X-Heatcrop-Path"] in ("smart", "cached")
    lines = [r for r in caplog.records if r.name == "heatcrop.faces"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    why = "no faces.json" if damage == "missing" else "does not match its sha256"
    assert why in lines[0].getMessage()
    svc = client.server.app[SERVICES]
    assert svc.heat_version == svc.engine.version and "yunet" not in svc.heat_version
    analysis = await _analysis(client, "group.jpg")
    assert analysis is not None and analysis.faces.shape == (0, 5)


async def test_a_give_up_finished_in_the_background_carries_its_faces(
    aiohttp_client, model_dir, photos
):
    root, heads = photos
    settings = _settings(model_dir, root)
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, cold_policy="legacy")
    )
    client = await aiohttp_client(make_app(settings))
    resp = await client.get("/crop/300x300/group.jpg")
    assert resp.status == 200 and resp.headers["X-Heatcrop-Path"] == "cold"
    for _ in range(2000):
        analysis = await _analysis(client, "group.jpg")
        if analysis is not None:
            break
        await asyncio.sleep(0.005)
    assert analysis is not None and len(analysis.faces) == len(heads["group.jpg"])
    resp = await client.get("/crop/360x640/group.jpg")
    assert resp.headers["X-Heatcrop-Path"] == "smart"
    assert count_sliced(np.array(heads["group.jpg"]), _box(resp)) == 0


async def test_warm_stores_the_faces_with_the_heatmap(model_dir, photos, redis_server):
    root, heads = photos
    settings = dataclasses.replace(
        _settings(model_dir, root),
        cache=CacheSettings(backend="redis", redis_url=redis_server.url),
    )
    summary = await warm(settings, ["group.jpg", "edge.jpg"], concurrency=2, progress=None)
    assert summary.done == 2
    caches = make_caches(settings.cache, l2_timeout_s=2.0)
    from engines.loader import load_engine
    from sidecar.faces import with_faces

    engine = with_faces(load_engine(settings.engine, warm=False), settings, warm=False)
    try:
        from sidecar.sources import make_source

        source = make_source(settings.source)
        for name, boxes in heads.items():
            original = await source.fetch(name)
            analysis = await caches.get_analysis(heatmap_key(original.identity, engine.version))
            assert analysis is not None and len(analysis.faces) == len(boxes)
        await source.close()
    finally:
        engine.close()
        await caches.close()


async def test_a_burst_of_face_dense_originals_leaves_the_next_original_smart(
    aiohttp_client, model_dir, photos
):
    # Item 4 of issue 23: with the old detector (its own FIFO thread, no bound, no deadline)
    # such a burst made every other new original fall back for minutes. Now the detector runs
    # inside the batcher's engine call: the burst is admitted or refused like any CNN work.
    root, _ = photos
    settings = _settings(model_dir, root)
    settings = dataclasses.replace(
        settings,
        server=dataclasses.replace(settings.server, deadline_ms=400, max_queue=8),
        kernel=dataclasses.replace(settings.kernel, max_faces=16),
    )
    client = await aiohttp_client(make_app(settings))
    burst = await asyncio.gather(*(client.get(f"/crop/300x300/dense-{i}.jpg") for i in range(24)))
    assert all(r.status == 200 for r in burst)
    assert {r.headers["X-Heatcrop-Path"] for r in burst} <= {"smart", "giveup"}
    for i in range(3):
        resp = await client.get(f"/crop/400x300/plain-{i}.jpg")
        assert resp.headers["X-Heatcrop-Path"] == "smart", resp.headers
    made = [await _analysis(client, f"dense-{i}.jpg") for i in range(24)]
    counts = {len(a.faces) for a in made if a is not None}
    assert counts == {16}  # far more heads than that in each: the cap, not the detector, stops


def test_the_face_settings_are_validated():
    assert load(environ={"HEATCROP_KERNEL_FACES": "false"}).kernel.faces is False
    assert load(environ={"HEATCROP_KERNEL_FACE_SCORE": "0.7"}).kernel.face_score == 0.7
    assert load(environ={"HEATCROP_KERNEL_MAX_FACES": "8"}).kernel.max_faces == 8
    for var, bad in (
        ("HEATCROP_KERNEL_FACES", "sometimes"),
        ("HEATCROP_KERNEL_FACE_WEIGHT", "-1"),
        ("HEATCROP_KERNEL_FACE_SCORE", "1.5"),
        ("HEATCROP_KERNEL_MAX_FACES", "0"),
    ):
        with pytest.raises(SettingsError, match=var):
            load(environ={var: bad})
    with pytest.raises(SettingsError, match="HEATCROP_KERNEL_FACES"):
        Settings(kernel=dataclasses.replace(KernelSettings(), faces=1)).validate()  # type: ignore[arg-type]


def test_face_settings_change_the_search_version(session_engine):
    from sidecar.core import CropCore

    on = CropCore(session_engine, KernelSettings(faces=True), SourceSettings())
    off = CropCore(session_engine, KernelSettings(faces=False), SourceSettings())
    weighted = CropCore(
        session_engine, KernelSettings(faces=True, face_weight=0.1), SourceSettings()
    )
    assert len({on.search_version, off.search_version, weighted.search_version}) == 3


async def test_the_debug_overlay_draws_the_faces_kept_whole(aiohttp_client, model_dir, photos):
    import pyvips

    from sidecar.overlay import DISPLAY_LONG_SIDE, FACE

    root, heads = photos
    client = await aiohttp_client(make_app(_settings(model_dir, root)))
    resp = await client.get("/debug/300x300/group.jpg")
    assert resp.status == 200 and resp.content_type == "image/png"
    png = pyvips.Image.new_from_buffer(await resp.read(), "").numpy()
    analysis = await _analysis(client, "group.jpg")
    svc = client.server.app[SERVICES]
    protected = svc.core.protected(analysis)
    assert len(protected) == len(heads["group.jpg"])
    scale = DISPLAY_LONG_SIDE / 1200
    for x0, y0, x1, _, _ in protected:
        # The middle of each box's top edge is drawn in the face colour.
        top = png[round(round(y0) * scale), round((x0 + x1) / 2 * scale), :3]
        assert tuple(int(v) for v in top) == FACE
