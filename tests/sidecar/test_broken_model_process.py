"""The real ``python -m sidecar.app`` (and ``heatcrop``) process on a model folder with a graph
that ONNX Runtime cannot load or run, its manifest rewritten to agree (issue 21, item 6).

A broken INT8 graph must not cost the service: it starts, serves smart crops on FP32, and says
why in one WARNING line. A missing or broken FP32 graph is the operator's to fix: the process
exits non-zero and its whole stderr is the one message saying which file and how to rebuild it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nginx.stack import HOST, REPO, free_port, sidecar_environ, sidecar_service
from sidecar.demo import write_demo_images
from tests.support import model_files
from tests.support.edge_stack import SMART, fetch, sidecar_env
from tests.support.model_files import copy_model, replace_graph

pytestmark = pytest.mark.slow

# Never contacted: the sidecar only writes the legacy server's URLs into its redirects.
LEGACY = f"http://{HOST}:9"
# Time enough for a cold crop on a busy 2-core machine: this is about answering smartly.
TIMEOUT_MS = 20_000
EXIT_TIMEOUT_S = 120.0
# What python -m sidecar.app's logging writes (sidecar.app.main's format).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ ")

BROKEN_INT8: dict[str, Callable[[Path], bytes]] = {
    "truncated": lambda folder: model_files.truncated(folder, int8=True),
    "fails-to-run": lambda folder: model_files.fails_to_run(),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_demo_images(root)
    return root


@pytest.fixture
def broken_fp32(model_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A model folder whose FP32 graph is half written; the graph's new file name."""
    folder = copy_model(model_dir, tmp_path / "model")
    return folder, replace_graph(folder, model_files.truncated(folder, int8=False), int8=False)


@pytest.mark.parametrize("kind", sorted(BROKEN_INT8))
def test_broken_int8_graph_serves_smart_crops_on_fp32(
    model_dir: Path, tmp_path: Path, images: Path, kind: str
) -> None:
    folder = copy_model(model_dir, tmp_path / "model")
    name = replace_graph(folder, BROKEN_INT8[kind](folder), int8=True)
    sidecar = sidecar_service(
        tmp_path,
        images=images,
        legacy_base=LEGACY,
        # Asked for INT8 whatever the CPU (auto would not try it without int8 dot products).
        env=sidecar_env(folder, HEATCROP_ENGINE_ORT_PRECISION="int8"),
        nginx_timeout_ms=TIMEOUT_MS,
    )
    try:
        sidecar.start()  # StartError, with the log's tail, when it exits instead
        base = f"http://{sidecar.address}"
        assert fetch(base + "/healthz").status == 200
        resp = fetch(f"{base}/crop/400x300/recipes/{SMART}.jpg")
        assert resp.status == 200, resp.body[:200]
        assert resp.header("X-Heatcrop-Path") == "smart"
        assert sidecar.running
    finally:
        sidecar.stop()
    log = sidecar.log_path.read_text()
    assert "Traceback" not in log, log
    # Nothing but our log lines: ONNX Runtime printed its own for the failed run before.
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, log
    assert "ONNX Runtime FP32 instead of INT8" in warnings[0] and name in warnings[0]


def _run(
    cmd: list[str], model: Path, images: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = sidecar_environ(images, LEGACY, sidecar_env(model, **extra))
    env |= {"HEATCROP_SERVER_HOST": HOST, "HEATCROP_SERVER_PORT": str(free_port())}
    return subprocess.run(
        [sys.executable, *cmd],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        check=False,
    )


def _assert_one_message(done: subprocess.CompletedProcess[str], *quoted: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    for text in quoted:
        assert text in line, line
    return line


def test_sidecar_without_a_model_exits_with_the_message_alone(tmp_path: Path, images: Path) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    done = _run(["-m", "sidecar.app"], empty, images)
    line = _assert_one_message(done, f"no model.json in {empty}", "make setup")
    assert line.startswith("heatcrop: ")


def test_sidecar_with_a_broken_fp32_graph_exits_with_the_message_alone(
    broken_fp32: tuple[Path, str], images: Path
) -> None:
    folder, name = broken_fp32
    done = _run(["-m", "sidecar.app"], folder, images)
    line = _assert_one_message(
        done, f"ONNX Runtime cannot load {name} (", "INVALID_PROTOBUF", "make setup"
    )
    assert line.startswith("heatcrop: ")


@pytest.mark.parametrize("command", ["crop", "serve", "warm"])
def test_heatcrop_commands_with_a_broken_fp32_graph_exit_with_the_message_alone(
    broken_fp32: tuple[Path, str], images: Path, tmp_path: Path, command: str
) -> None:
    folder, name = broken_fp32
    args = {
        "crop": ["crop", str(images / "recipes" / f"{SMART}.jpg"), "--size", "400x300"],
        "serve": ["serve"],
        "warm": ["warm", "--list", str(tmp_path / "paths.txt")],
    }[command]
    (tmp_path / "paths.txt").write_text(f"recipes/{SMART}.jpg\n")
    # Redis for warm, whose memory cache would add a (true) warning; never reached here.
    redis = {"HEATCROP_CACHE_BACKEND": "redis", "HEATCROP_CACHE_REDIS_URL": f"redis://{HOST}:9"}
    done = _run(["-m", "sidecar.cli", *args], folder, images, **redis)
    line = _assert_one_message(done, f"ONNX Runtime cannot load {name} (", "make setup")
    assert json.loads(line)["error"] == "model not built"
