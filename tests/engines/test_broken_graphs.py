"""Graphs whose manifest and sha256 agree but which ONNX Runtime cannot load or run (issue 21,
item 6): a broken INT8 graph is one more INT8 defect (FP32 serves, one WARNING line says
why); a broken FP32 graph is a ModelNotBuilt naming the file and how to rebuild it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from engines.errors import EngineError, ModelNotBuilt
from engines.loader import EngineOptions, load_engine
from engines.model import find_model
from engines.ort import GraphNotLoadable, OrtEngine
from tests.support import model_files
from tests.support.model_files import UNKNOWN_OP, copy_model, replace_graph

# (graph bytes of a model folder, what the reason must quote of ONNX Runtime's message)
UNLOADABLE: dict[str, tuple[Callable[[Path, bool], bytes], str]] = {
    "truncated": (
        lambda folder, int8: model_files.truncated(folder, int8=int8),
        "INVALID_PROTOBUF",
    ),
    "unknown-op": (lambda folder, int8: model_files.unknown_op(), UNKNOWN_OP),
}


def _options(model_dir: Path, precision: str) -> EngineOptions:
    return EngineOptions("ort", str(model_dir), "", "fp16", 1, ort_precision=precision)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _fp32_version(folder: Path) -> str:
    engine = OrtEngine(find_model(folder), threads=1)
    engine.close()
    return engine.version


@pytest.mark.parametrize("kind", sorted(UNLOADABLE))
def test_unloadable_int8_graph_serves_fp32_with_one_warning(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    folder = copy_model(model_dir, tmp_path / "model")
    make, quoted = UNLOADABLE[kind]
    name = replace_graph(folder, make(folder, True), int8=True)
    caplog.set_level(logging.INFO)
    engine = load_engine(_options(folder, "int8"), warm=False)
    try:
        assert engine.version == _fp32_version(folder)
    finally:
        engine.close()
    (line,) = _warnings(caplog)
    assert "\n" not in line and line.startswith("engine: ONNX Runtime FP32 instead of INT8 (")
    assert f"ONNX Runtime cannot load {name} ([ONNXRuntimeError]" in line
    assert quoted in line and "make model" in line


def test_int8_graph_failing_its_warm_up_serves_fp32_with_one_warning(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_model(model_dir, tmp_path / "model")
    name = replace_graph(folder, model_files.fails_to_run(), int8=True)
    caplog.set_level(logging.INFO)
    engine = load_engine(_options(folder, "int8"), warm=True)
    try:
        assert engine.version == _fp32_version(folder)
    finally:
        engine.close()
    (line,) = _warnings(caplog)
    assert "\n" not in line and "FP32 instead of INT8" in line
    assert f"{name} failed its warm-up run (ONNX Runtime inference failed:" in line
    assert "Reshape" in line and "make model" in line


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("kind", sorted(UNLOADABLE))
def test_unloadable_fp32_graph_is_not_built(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, precision: str
) -> None:
    # With int8 asked for, the INT8 graph is stale now (quantized from the FP32 graph replaced
    # here): FP32 is tried, and its failure is the one message, without an INT8 warning first.
    folder = copy_model(model_dir, tmp_path / "model")
    make, quoted = UNLOADABLE[kind]
    name = replace_graph(folder, make(folder, False), int8=False)
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelNotBuilt) as info:
        load_engine(_options(folder, precision), warm=True)
    message = str(info.value)
    assert message.startswith(f"ONNX Runtime cannot load {name} ([ONNXRuntimeError]")
    assert quoted in message and "\n" not in message
    assert f"in {folder}: run `make setup`" in message
    assert _warnings(caplog) == []


def test_fp32_graph_failing_its_warm_up_is_not_built(model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(model_dir, tmp_path / "model")
    name = replace_graph(folder, model_files.fails_to_run(), int8=False)
    with pytest.raises(ModelNotBuilt, match=f"^{name} failed its warm-up run .*make setup"):
        load_engine(_options(folder, "fp32"), warm=True)


def test_ort_engine_names_the_file_it_cannot_load(tmp_path: Path) -> None:
    path = tmp_path / "unknown-op.onnx"
    path.write_bytes(model_files.unknown_op())
    with pytest.raises(GraphNotLoadable) as info:
        OrtEngine(path, threads=2)
    assert isinstance(info.value, EngineError)
    assert str(info.value).startswith(f"ONNX Runtime cannot load {path}: [ONNXRuntimeError]")
    assert UNKNOWN_OP in info.value.reason and "\n" not in str(info.value)
