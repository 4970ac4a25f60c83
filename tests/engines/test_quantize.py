"""The INT8 graph (engines/quantize.py): reproducible, loadable, close to FP32, and never
served when it is missing or stale (FP32 serves, one log line says why)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines import quantize
from engines.artifacts import INT8_MANIFEST_NAME
from engines.errors import ModelNotBuilt
from engines.loader import EngineOptions, load_engine
from engines.model import find_int8_model, find_model, read_manifest
from engines.ort import OrtEngine
from sidecar.core import CropCore
from sidecar.demo import write_demo_images
from sidecar.settings import KernelSettings, SettingsError, SourceSettings, load
from training.data import Box, iou

ASPECTS = (1.0, 4 / 5, 16 / 9, 9 / 16)


@pytest.fixture(scope="module")
def int8_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the exported FP32 model folder with its INT8 graph built beside it."""
    out = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(model_dir, out)
    assert quantize.build(out) is not None
    return out


@pytest.fixture(scope="module")
def demo_photos(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("demo")
    return [p.read_bytes() for p in write_demo_images(root)]


def _options(model_dir: Path, precision: str) -> EngineOptions:
    return EngineOptions("ort", str(model_dir), "", "fp16", 1, ort_precision=precision)


def test_committed_calibration_matches_the_shipped_model(model_dir: Path) -> None:
    # A changed export or read-out needs new ranges (`python -m engines.quantize calibrate`);
    # without them make model builds no INT8 graph and the service runs FP32.
    calibration = quantize.read_calibration()
    assert calibration.model_sha256 == read_manifest(model_dir)["sha256"]
    assert calibration.method == quantize.DEFAULT_METHOD
    for name, exact in quantize.EXACT_RANGES.items():
        assert calibration.ranges[name] == exact
    assert all(lo <= hi for lo, hi in calibration.ranges.values())


def test_same_inputs_give_the_same_bytes(model_dir: Path, int8_dir: Path) -> None:
    fp32 = find_model(model_dir).read_bytes()
    calibration = quantize.read_calibration()
    first = quantize.quantized_bytes(fp32, calibration)
    assert quantize.quantized_bytes(fp32, calibration) == first
    assert find_int8_model(int8_dir, read_manifest(int8_dir)["sha256"]).read_bytes() == first


def test_the_int8_graph_is_quantized_where_it_should_be(int8_dir: Path) -> None:
    import onnx

    path = find_int8_model(int8_dir, read_manifest(int8_dir)["sha256"])
    graph = onnx.load(str(path)).graph
    quantized = {n.name for n in graph.node if n.op_type == "DequantizeLinear"}
    assert len(quantized) > 100
    convs = [n for n in graph.node if n.op_type == "Conv"]
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for conv in convs:
        int8_weights = conv.input[1] in dq_outputs
        assert int8_weights != conv.name.startswith(quantize.KEEP_FLOAT_PREFIXES), conv.name
    assert sum(conv.input[1] in dq_outputs for conv in convs) > 40


def test_build_is_idempotent_and_names_what_it_used(int8_dir: Path) -> None:
    manifest = json.loads((int8_dir / INT8_MANIFEST_NAME).read_text())
    path = int8_dir / manifest["file"]
    before = path.stat().st_mtime_ns
    assert quantize.build(int8_dir) == path
    assert path.stat().st_mtime_ns == before
    assert manifest["fp32_sha256"] == read_manifest(int8_dir)["sha256"]
    assert manifest["method"] == quantize.DEFAULT_METHOD


def test_int8_loads_and_crops_the_demo_photos_like_fp32(
    int8_dir: Path, demo_photos: list[bytes]
) -> None:
    fp32 = load_engine(_options(int8_dir, "fp32"))
    int8 = load_engine(_options(int8_dir, "int8"))
    assert int8.version != fp32.version  # caches never mix their heatmaps
    kernel, source = KernelSettings(), SourceSettings()
    cores = [CropCore(e, kernel, source, "learned") for e in (fp32, int8)]
    ious, correlations = [], []
    for data in demo_photos:
        a, b = (core.analyse(data) for core in cores)
        ma, mb = (core.prepared(x) for core, x in zip(cores, (a, b), strict=True))
        correlations.append(np.corrcoef(ma.ravel(), mb.ravel())[0, 1])
        for aspect in ASPECTS:
            boxes = [core.box(x, aspect) for core, x in zip(cores, (a, b), strict=True)]
            ious.append(iou(*(Box.of(bx) for bx in boxes)))
    # bench/int8.py's agreement on the 560 dev photos: map r >= 0.998, mean box IoU >= 0.98.
    # On the stride-16 grid near-equal windows are more common, so a box may flip to its
    # neighbour (one of the demo boxes does); nearly all must agree.
    assert min(correlations) > 0.99, correlations
    assert np.mean(ious) > 0.97, ious
    assert np.mean(np.array(ious) > 0.8) >= 0.95, sorted(ious)[:5]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "heatcrop.engine" and r.levelno >= logging.WARNING
    ]


def test_missing_int8_graph_serves_fp32_with_one_log_line(
    int8_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fp32_only = tmp_path / "model"
    shutil.copytree(int8_dir, fp32_only)
    (fp32_only / INT8_MANIFEST_NAME).unlink()
    caplog.set_level(logging.INFO, logger="heatcrop.engine")
    engine = load_engine(_options(fp32_only, "int8"), warm=False)
    assert engine.version == OrtEngine(find_model(fp32_only), threads=1).version
    lines = _warnings(caplog)
    assert len(lines) == 1 and "FP32 instead of INT8" in lines[0], lines
    assert "no model-int8.json" in lines[0] and "make model" in lines[0]


def test_stale_int8_graph_serves_fp32_with_one_log_line(
    int8_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stale = tmp_path / "model"
    shutil.copytree(int8_dir, stale)
    manifest = json.loads((stale / INT8_MANIFEST_NAME).read_text())
    manifest["fp32_sha256"] = "0" * 64  # quantized from an older FP32 model
    (stale / INT8_MANIFEST_NAME).write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="heatcrop.engine")
    engine = load_engine(_options(stale, "int8"), warm=False)
    assert engine.version == OrtEngine(find_model(stale), threads=1).version
    lines = _warnings(caplog)
    assert len(lines) == 1 and "stale INT8 graph" in lines[0], lines


def test_tampered_int8_graph_is_refused(int8_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model"
    shutil.copytree(int8_dir, bad)
    manifest = json.loads((bad / INT8_MANIFEST_NAME).read_text())
    with (bad / manifest["file"]).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelNotBuilt, match="does not match its sha256"):
        find_int8_model(bad, read_manifest(bad)["sha256"])


def test_calibration_of_another_model_builds_nothing(
    int8_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(int8_dir, folder)
    doc = json.loads(quantize.CALIBRATION_PATH.read_text())
    doc["model_sha256"] = "f" * 64
    other = tmp_path / "calibration.json"
    other.write_text(json.dumps(doc))
    caplog.set_level(logging.WARNING, logger="heatcrop.quantize")
    assert quantize.build(folder, other) is None
    assert not (folder / INT8_MANIFEST_NAME).exists()  # the old INT8 graph is not served
    assert any("recalibrate" in r.getMessage() for r in caplog.records)
    assert quantize.build(folder, tmp_path / "absent.json") is None


def test_calibrate_measures_every_quantized_tensor(
    model_dir: Path, demo_photos: list[bytes], tmp_path: Path
) -> None:
    paths = []
    for i, data in enumerate(demo_photos[:3]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    photos = [pixels for _, pixels in quantize.decoded_photos(paths)]
    assert len(photos) == 3
    ranges = quantize.calibrate(find_model(model_dir), photos, "minmax")
    committed = quantize.read_calibration().ranges
    assert set(ranges) == set(committed)
    for name, exact in quantize.EXACT_RANGES.items():
        assert ranges[name] == exact
    calibration = quantize.Calibration("minmax", "a" * 64, ranges, {"folders": {"demo": 3}})
    assert quantize.Calibration.from_json(calibration.to_json()) == calibration


def test_calibration_photos_spread_over_each_folder(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(10):
            (tmp_path / folder / f"{i:02d}.jpg").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not a photo")
    chosen = quantize.calibration_photos([tmp_path / "a", tmp_path / "b"], 3)
    assert [p.name for p in chosen] == ["00.jpg", "03.jpg", "06.jpg"] * 2
    with pytest.raises(ValueError, match="no photos"):
        quantize.calibration_photos([tmp_path / "a" / "missing"], 3)


def test_unreadable_photos_are_skipped_and_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    skipped: list[str] = []
    assert list(quantize.decoded_photos([broken], lambda p, why: skipped.append(p.name))) == []
    assert skipped == ["broken.jpg"]


def test_precision_setting_is_validated() -> None:
    assert load(environ={"HEATCROP_ENGINE_ORT_PRECISION": "fp32"}).engine.ort_precision == "fp32"
    with pytest.raises(SettingsError, match="HEATCROP_ENGINE_ORT_PRECISION"):
        load(environ={"HEATCROP_ENGINE_ORT_PRECISION": "int4"})


def test_a_graph_built_with_other_settings_is_built_again(int8_dir: Path, tmp_path: Path) -> None:
    # A checkout that built its INT8 graph before a QUANT_SETTINGS change (reduce_range) must
    # not keep serving the old bytes: `make model` builds again.
    folder = tmp_path / "model"
    shutil.copytree(int8_dir, folder)
    manifest_path = folder / INT8_MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["settings"] = {**manifest["settings"], "reduce_range": False}
    manifest_path.write_text(json.dumps(manifest))
    assert quantize.build(folder) is not None
    assert json.loads(manifest_path.read_text())["settings"] == quantize.QUANT_SETTINGS
