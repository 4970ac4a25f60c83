"""The face rule in the service: the real detector beside the real model, through aiohttp."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from skimage import data as skdata

from kernels.faces import count_sliced
from sidecar.app import make_app
from sidecar.caches import heatmap_key
from sidecar.routes import SERVICES
from sidecar.settings import (
    EngineSettings,
    KernelSettings,
    ServerSettings,
    Settings,
    SettingsError,
    SourceSettings,
    load,
)
from tests.support.faces import with_faces
from tests.support.images import jpeg


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    (root / "astronaut.jpg").write_bytes(jpeg(skdata.astronaut()))  # 512x512, one face
    (root / "coffee.jpg").write_bytes(jpeg(skdata.coffee()))
    return root


@pytest.fixture(scope="module")
def faces_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_faces(model_dir, tmp_path_factory.mktemp("faces-model"))


def _settings(model_dir: Path, photos: Path, faces: bool = True) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=SourceSettings(root=str(photos)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        kernel=KernelSettings(faces=faces),
    )


def _box(resp) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in resp.headers["X-Heatcrop-Box"].split(","))
    return x0, y0, x1, y1


async def test_faces_are_cached_with_the_heatmap_and_never_sliced(
    aiohttp_client, faces_dir, photos
):
    client = await aiohttp_client(make_app(_settings(faces_dir, photos)))
    svc = client.server.app[SERVICES]
    assert svc.faces is not None
    boxes = {}
    for size in ("300x300", "100x400", "400x100"):
        resp = await client.get(f"/crop/{size}/astronaut.jpg")
        assert resp.status == 200
        boxes[size] = _box(resp)
    original = await svc.source.fetch("astronaut.jpg")
    analysis = await svc.caches.get_analysis(heatmap_key(original.identity, svc.heat_version))
    assert analysis is not None and len(analysis.faces) >= 1
    heads = svc.core.head_box.apply(analysis.faces)
    for box in boxes.values():
        assert count_sliced(heads, box) == 0
    # The heatmap key names the detector: another face model never answers from these.
    assert svc.faces.version in svc.heat_version
    assert svc.heat_version.startswith(svc.engine.version)


async def test_faces_off_keeps_the_heatmap_key_of_the_model_alone(
    aiohttp_client, faces_dir, photos
):
    client = await aiohttp_client(make_app(_settings(faces_dir, photos, faces=False)))
    svc = client.server.app[SERVICES]
    assert svc.faces is None and svc.heat_version == svc.engine.version
    resp = await client.get("/crop/300x300/astronaut.jpg")
    assert resp.status == 200 and resp.headers["X-Heatcrop-Path"] == "smart"
    original = await svc.source.fetch("astronaut.jpg")
    analysis = await svc.caches.get_analysis(heatmap_key(original.identity, svc.heat_version))
    assert analysis is not None and analysis.faces.shape == (0, 5)


async def test_a_missing_face_model_serves_without_faces_and_says_so_once(
    aiohttp_client, model_dir, photos, caplog: pytest.LogCaptureFixture
):
    # model_dir has the heatmap model only: no faces.json.
    with caplog.at_level(logging.WARNING, logger="heatcrop.app"):
        client = await aiohttp_client(make_app(_settings(model_dir, photos)))
        for size in ("300x300", "200x100"):
            resp = await client.get(f"/crop/{size}/coffee.jpg")
            assert resp.status == 200 and resp.headers["X-Heatcrop-Path"] in ("smart", "cached")
    lines = [r for r in caplog.records if r.name == "heatcrop.app" and "faces" in r.message]
    assert len(lines) == 1 and "faces.json" in lines[0].getMessage()
    assert client.server.app[SERVICES].faces is None
    assert (await client.get("/healthz")).status == 200


def test_the_face_settings_are_validated():
    assert load(environ={"HEATCROP_KERNEL_FACES": "true"}).kernel.faces is True
    assert load(environ={"HEATCROP_KERNEL_FACE_WEIGHT": "0.1"}).kernel.face_weight == 0.1
    with pytest.raises(SettingsError, match="HEATCROP_KERNEL_FACES"):
        load(environ={"HEATCROP_KERNEL_FACES": "sometimes"})
    with pytest.raises(SettingsError, match="HEATCROP_KERNEL_FACE_WEIGHT"):
        load(environ={"HEATCROP_KERNEL_FACE_WEIGHT": "-1"})
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
