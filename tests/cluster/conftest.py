"""Fixtures of the scale-out tests: a real three-master Redis Cluster per test, one local Ray
session per test module (Ray's start-up takes seconds), and a folder of originals."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skimage import data as skdata

from tests.support.images import jpeg, solid
from tests.support.redis_cluster import RedisCluster

# The good originals of the folder (distinct files: each has its own identity and heatmap).
GOOD = tuple(
    f"{folder}/{name}{i}.jpg"
    for folder, name in (("recipes", "coffee"), ("cats", "chelsea"), ("space", "rocket"))
    for i in range(4)
)
# The bad ones and what each must be counted as, with ``LIMITS`` in the source settings.
BAD = {
    "notes.jpg": "NotAnImage",
    "big.jpg": "InputTooLarge",  # over max_bytes
    "wide.png": "TooManyPixels",  # over max_pixels, a few KB on disk
}
LIMITS = {"max_bytes": 400_000, "max_pixels": 4_000_000}
RAY_HINT = (
    "ray is not installed; the backfill tests need the cluster extra, which `make setup` "
    "installs (or `pip install -e '.[cluster]'`)"
)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    images = {"coffee": skdata.coffee(), "chelsea": skdata.chelsea(), "rocket": skdata.rocket()}
    for path in GOOD:
        name = Path(path).stem.rstrip("0123456789")
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(jpeg(images[name]))
    (root / "notes.jpg").write_bytes(b"this is not an image at all, only some words\n" * 20)
    padding = bytes(LIMITS["max_bytes"])  # after the JPEG's end: a valid image, too many bytes
    (root / "big.jpg").write_bytes(jpeg(skdata.astronaut()) + padding)
    solid(4000, 3000).write_to_file(str(root / "wide.png"))
    return root


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A real three-master Redis Cluster on free loopback ports, each stopped by its PID."""
    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """Ray in local mode with two CPUs, shared by the module's tests."""
    try:
        import ray
    except ImportError:
        pytest.fail(RAY_HINT, pytrace=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
