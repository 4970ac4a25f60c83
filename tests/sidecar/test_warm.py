"""``heatcrop warm`` end to end: real model, real JPEGs, a real redis-server, then the service."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from functools import partial
from pathlib import Path

import pytest
from skimage import data as skdata

import sidecar.app
from sidecar import cli
from sidecar.app import make_app
from sidecar.caches import make_caches
from sidecar.settings import (
    CacheSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    SourceSettings,
)
from sidecar.warm import read_paths, warm
from tests.support.images import jpeg
from tests.support.sidecar_metrics import scraped

GOOD = ("recipes/coffee.jpg", "cat.jpg")
BACKLOG = """\
# originals uploaded before the sidecar existed
recipes/coffee.jpg

cat.jpg
   cat.jpg
notes.jpg
gone/missing.jpg
../../etc/passwd
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    (root / "recipes").mkdir()
    (root / "recipes" / "coffee.jpg").write_bytes(jpeg(skdata.coffee()))
    (root / "cat.jpg").write_bytes(jpeg(skdata.chelsea()))
    (root / "notes.jpg").write_bytes(b"this is not an image at all, only some words\n" * 20)
    return root


@pytest.fixture
def patient_app_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    # The service's 50 ms Redis budget could trip its breaker on a busy 2-core test machine,
    # and a skipped Redis read would look like a missing heatmap here.
    monkeypatch.setattr(sidecar.app, "make_caches", partial(make_caches, l2_timeout_s=2.0))


def _settings(model_dir: Path, photos: Path, cache: CacheSettings) -> Settings:
    return Settings(
        server=ServerSettings(deadline_ms=10_000),
        source=SourceSettings(root=str(photos)),
        engine=EngineSettings(model_dir=str(model_dir), threads=1),
        cache=cache,
    )


def _toml(settings: Settings) -> str:
    lines = []
    for section in ("source", "engine", "cache"):
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(settings, section)).items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


async def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    # main() calls asyncio.run, which cannot nest in the test's loop: run it in a thread.
    rc = await asyncio.to_thread(cli.main, list(argv))
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_read_paths_skips_blanks_and_comments() -> None:
    assert read_paths(BACKLOG.splitlines()) == [
        "recipes/coffee.jpg",
        "cat.jpg",
        "cat.jpg",
        "notes.jpg",
        "gone/missing.jpg",
        "../../etc/passwd",
    ]


async def test_warm_fills_redis_and_the_service_runs_no_cnn(
    aiohttp_client, capsys, tmp_path, model_dir, photos, redis_server, patient_app_caches
) -> None:
    cache = CacheSettings(backend="redis", redis_url=redis_server.url)
    settings = _settings(model_dir, photos, cache)
    config = tmp_path / "heatcrop.toml"
    config.write_text(_toml(settings))
    backlog = tmp_path / "backlog.txt"
    backlog.write_text(BACKLOG)

    rc, summary = await _run_cli(
        capsys, "--config", str(config), "warm", "--list", str(backlog), "--concurrency", "3"
    )
    assert rc == 1  # three bad lines
    assert summary["done"] == 2
    assert summary["skipped_cached"] == 0
    assert summary["duplicates"] == 1
    assert summary["failed"] == 3
    assert summary["failed_by_type"] == {"BadPath": 1, "NotAnImage": 1, "SourceNotFound": 1}
    assert summary["rate_per_s"] > 0

    client = await aiohttp_client(make_app(settings))
    for size in ("300x100", "100x100"):
        resp = await client.get(f"/crop/{size}/recipes/coffee.jpg")
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Heatcrop-Path"] in ("smart", "low-confidence")
    assert await scraped(client, "heatcrop_nn_runs_total") == 0
    assert await scraped(client, "heatcrop_cache_requests_total", cache="heatmap", result="hit")

    good = tmp_path / "good.txt"
    good.write_text("\n".join(GOOD) + "\n")
    rc, again = await _run_cli(capsys, "--config", str(config), "warm", "--list", str(good))
    assert rc == 0
    assert (again["done"], again["skipped_cached"], again["failed"]) == (0, 2, 0)


async def test_warm_with_redis_down_counts_cache_write_failures(
    model_dir, photos, redis_server
) -> None:
    cache = CacheSettings(backend="redis", redis_url=redis_server.url)
    redis_server.stop()
    summary = await warm(_settings(model_dir, photos, cache), list(GOOD), progress=None)
    assert summary.done == 0
    assert summary.failed == {"CacheWriteFailed": 2}


async def test_memory_backend_is_a_dry_run_with_a_warning(model_dir, photos, caplog) -> None:
    settings = _settings(model_dir, photos, CacheSettings())
    with caplog.at_level(logging.WARNING, logger="heatcrop.warm"):
        summary = await warm(settings, ["cat.jpg", "cat.jpg"], concurrency=1, progress=None)
    assert "cache backend is memory" in caplog.text
    assert (summary.done, summary.skipped_cached, summary.duplicates) == (1, 0, 1)
    assert not summary.failed


async def test_concurrency_must_be_positive(model_dir, photos) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await warm(_settings(model_dir, photos, CacheSettings()), [], concurrency=0)
