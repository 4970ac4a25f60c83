"""``heatcrop backfill`` as an operator runs it, killed mid-run (SIGKILL) and started again: the
second run skips every original the first one finished, and computes only the rest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.cluster.conftest import LIMITS
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300.0
HEATMAPS = "heatcrop:v1:heatmaps:*"


def _config(tmp_path: Path, root: Path, model_dir: Path, url: str) -> Path:
    config = tmp_path / "heatcrop.toml"
    config.write_text(
        f"[source]\nroot = {json.dumps(str(root))}\n"
        f"max_bytes = {LIMITS['max_bytes']}\nmax_pixels = {LIMITS['max_pixels']}\n"
        f"[engine]\nmodel_dir = {json.dumps(str(model_dir))}\nthreads = 1\n"
        f'[cache]\nbackend = "redis"\nredis_url = "{url}"\n'
    )
    return config


def _backfill(config: Path, listing: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = ["--config", str(config), "backfill", "--list", str(listing)]
    argv += ["--workers", "1", "--batch", "4", "--progress-every", "1"]
    with log.open("ab") as err:
        # Its own process group: Ray's processes started by this run go with it.
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the run's own process group (its pid): the driver and the Ray it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def _settled(client: redis.Redis, quiet_s: float = 2.0) -> int:
    """The number of heatmaps once it has not changed for ``quiet_s``."""
    deadline = time.monotonic() + 60
    count = len(client.keys(HEATMAPS))
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = len(client.keys(HEATMAPS))
        if now == count:
            return count
        count = now
    raise AssertionError("heatmaps still being stored a minute after the kill")


def test_a_killed_backfill_started_again_redoes_no_finished_original(
    model_dir, originals, redis_server: RedisServer, tmp_path
) -> None:
    root = tmp_path / "many"
    for i in range(5):
        for folder in ("recipes", "cats", "space"):
            shutil.copytree(originals / folder, root / f"set{i}" / folder)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    config = _config(tmp_path, root, model_dir, redis_server.url)
    client = redis.Redis(port=redis_server.port)
    log = tmp_path / "backfill.log"

    first = _backfill(config, listing, log)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(client.keys(HEATMAPS)) < 4:
            assert first.poll() is None, f"the first run ended early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no heatmap stored in time"
            time.sleep(0.02)
    finally:
        _stop_group(first)
    # A worker whose batch was in flight may still store it as Ray's processes go down.
    finished = _settled(client)
    assert 4 <= finished < len(paths), "the run was not killed mid-way"

    second = _backfill(config, listing, log)
    try:
        out, _ = second.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        _stop_group(second)
    assert second.returncode == 0, log.read_text()
    summary = json.loads(out)
    assert summary["failed"] == 0
    assert summary["skipped_cached"] == finished
    assert summary["done"] == len(paths) - finished
    assert len(client.keys(HEATMAPS)) == len(paths)
