"""Shared fixtures: the real ONNX model, exported once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import faces_build, quantize
from engines.export import export
from engines.ort import OrtEngine
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make model` builds: the FP32 graph, its INT8 twin (the service's default) and the
    face detector."""
    out = tmp_path_factory.mktemp("model")
    export(out)
    quantize.build(out)
    faces_build.build(out)
    return out


@pytest.fixture(scope="session")
def session_engine(model_dir: Path) -> Iterator[OrtEngine]:
    from engines.model import find_model

    engine = OrtEngine(find_model(model_dir), threads=1)
    yield engine
    engine.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped by its PID after the test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
