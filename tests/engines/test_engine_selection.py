"""engines.loader: auto | trt | ort, with TensorRT absent, present without a matching plan,
present with one; "present" is an injected machine description, not a fake runtime."""

from __future__ import annotations

import logging

import pytest

from engines.errors import EngineError, ModelNotBuilt
from engines.loader import EngineOptions, choose, load_engine, resolved_precision
from engines.model import read_manifest
from engines.ort import OrtEngine
from engines.plans import NoMatchingPlan, Unavailable
from sidecar import settings as settings_mod
from sidecar.settings import EngineSettings, SettingsError
from tests.support.plan_files import H100, L4, MODEL_SHA, OLD_MODEL_SHA, other_trt, write_plan

ABSENT = Unavailable("TensorRT not importable: No module named 'tensorrt'")


def _settings(tmp_path, kind="auto", **kwargs):
    return EngineSettings(kind=kind, plan_dir=str(tmp_path), **kwargs)


def test_ort_is_ort(tmp_path):
    write_plan(tmp_path)
    choice = choose(_settings(tmp_path, "ort"), MODEL_SHA, H100)
    assert choice.kind == "ort" and choice.reason == "HEATCROP_ENGINE_KIND=ort"


def test_auto_without_tensorrt_is_ort(tmp_path):
    write_plan(tmp_path)
    choice = choose(_settings(tmp_path), MODEL_SHA, ABSENT)
    assert choice.kind == "ort" and choice.plan is None
    assert choice.reason == f"TensorRT not used: no TensorRT ({ABSENT.reason})"


def test_trt_without_tensorrt_is_a_typed_error(tmp_path):
    with pytest.raises(NoMatchingPlan, match="HEATCROP_ENGINE_KIND=trt, but no TensorRT") as info:
        choose(_settings(tmp_path, "trt"), MODEL_SHA, ABSENT)
    assert isinstance(info.value, ModelNotBuilt)


def test_engine_options_without_the_service_name_their_own_kind_setting(tmp_path):
    options = EngineOptions(
        kind="trt", model_dir="", plan_dir=str(tmp_path), trt_precision="fp16", threads=1
    )
    with pytest.raises(NoMatchingPlan, match=r"^kind=trt, but no TensorRT"):
        choose(options, MODEL_SHA, ABSENT)
    named = EngineOptions("ort", "", str(tmp_path), "fp16", 1, kind_var="--kind")
    assert choose(named, MODEL_SHA, H100).reason == "--kind=ort"


def test_auto_with_tensorrt_but_no_plans(tmp_path):
    choice = choose(_settings(tmp_path / "none"), MODEL_SHA, H100)
    assert choice.kind == "ort"
    assert "no fp16 plan for NVIDIA H100 80GB HBM3 (sm90), TensorRT 10.16.1.11" in choice.reason
    assert "no TensorRT plans in" in choice.reason and "make engines" in choice.reason


@pytest.mark.parametrize(
    ("plans", "summary"),
    [
        ([dict(machine=L4)], "1 other GPU"),
        ([dict(machine=other_trt(H100))], "1 other TensorRT"),
        ([dict(model_sha256=OLD_MODEL_SHA)], "1 stale"),
        ([dict(precision="int8")], "1 other precision"),
        ([dict(shapes=((224, 224),))], "1 missing buckets"),
        ([dict(machine=L4), dict(model_sha256=OLD_MODEL_SHA)], "1 other GPU, 1 stale"),
    ],
)
def test_present_but_mismatched(tmp_path, plans, summary):
    for kwargs in plans:
        write_plan(tmp_path, **kwargs)
    auto = choose(_settings(tmp_path), MODEL_SHA, H100)
    assert auto.kind == "ort" and auto.plan is None
    assert f"none usable ({summary})" in auto.reason
    with pytest.raises(NoMatchingPlan, match=f"none usable \\({summary}\\)"):
        choose(_settings(tmp_path, "trt"), MODEL_SHA, H100)


@pytest.mark.parametrize("kind", ["auto", "trt"])
def test_matching_plan_is_chosen(tmp_path, kind):
    write_plan(tmp_path, L4)
    wanted = write_plan(tmp_path)
    choice = choose(_settings(tmp_path, kind), MODEL_SHA, H100)
    assert choice.kind == "trt" and choice.plan == wanted and choice.machine == H100


def test_precision_setting_picks_the_plan(tmp_path):
    write_plan(tmp_path)
    int8 = write_plan(tmp_path, precision="int8")
    assert choose(_settings(tmp_path, trt_precision="int8"), MODEL_SHA, H100).plan == int8
    assert choose(_settings(tmp_path, trt_precision="fp32"), MODEL_SHA, H100).kind == "ort"


def test_precision_setting_is_validated():
    env = {"HEATCROP_ENGINE_TRT_PRECISION": "int8"}
    assert settings_mod.load(environ=env).engine.trt_precision == "int8"
    with pytest.raises(SettingsError, match="HEATCROP_ENGINE_TRT_PRECISION='bf16'"):
        settings_mod.load(environ={"HEATCROP_ENGINE_TRT_PRECISION": "bf16"})


# -- load_engine ------------------------------------------------------------------------------


def _model_settings(model_dir, tmp_path, kind="auto"):
    return EngineSettings(kind=kind, model_dir=str(model_dir), plan_dir=str(tmp_path), threads=1)


def _trt_must_not_load(monkeypatch):
    import engines.trt

    def refuse(*args, **kwargs):
        raise AssertionError("TrtEngine constructed")

    monkeypatch.setattr(engines.trt, "TrtEngine", refuse)


def test_load_auto_without_tensorrt_logs_one_line(model_dir, tmp_path, caplog, monkeypatch):
    _trt_must_not_load(monkeypatch)
    with caplog.at_level(logging.INFO, logger="heatcrop.engine"):
        engine = load_engine(_model_settings(model_dir, tmp_path), warm=False, probe=lambda: ABSENT)
    try:
        assert isinstance(engine, OrtEngine)
    finally:
        engine.close()
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    # ort_precision=auto: INT8 where this CPU has int8 dot products, FP32 elsewhere; said why.
    precision, why = resolved_precision("auto")
    assert message.startswith(f"engine: ONNX Runtime {precision.upper()} (1 threads)")
    assert f"(kind=auto, {why}): TensorRT not used: no TensorRT (TensorRT not" in message


def test_load_ort_does_not_probe(model_dir, tmp_path):
    def probe():
        raise AssertionError("kind=ort must not look for TensorRT")

    engine = load_engine(_model_settings(model_dir, tmp_path, "ort"), warm=False, probe=probe)
    assert isinstance(engine, OrtEngine)
    engine.close()


def test_load_auto_with_mismatched_plans_never_loads_them(model_dir, tmp_path, monkeypatch, caplog):
    _trt_must_not_load(monkeypatch)
    digest = str(read_manifest(model_dir)["sha256"])
    write_plan(tmp_path, L4, digest)
    write_plan(tmp_path, H100, OLD_MODEL_SHA)
    with caplog.at_level(logging.INFO, logger="heatcrop.engine"):
        engine = load_engine(_model_settings(model_dir, tmp_path), warm=False, probe=lambda: H100)
    assert isinstance(engine, OrtEngine)
    engine.close()
    assert "none usable (1 other GPU, 1 stale)" in caplog.records[-1].getMessage()


def test_load_trt_with_mismatched_plan_raises(model_dir, tmp_path, monkeypatch):
    _trt_must_not_load(monkeypatch)
    write_plan(tmp_path, L4, str(read_manifest(model_dir)["sha256"]))
    with pytest.raises(NoMatchingPlan, match="1 other GPU"):
        load_engine(_model_settings(model_dir, tmp_path, "trt"), warm=False, probe=lambda: H100)


def test_load_auto_falls_back_when_the_matching_plan_cannot_load(model_dir, tmp_path, caplog):
    # A matching plan on a machine described as having TensorRT; in CI the library import (or,
    # on a GPU box, deserializing these bytes) fails, and auto falls back to ONNX Runtime.
    write_plan(tmp_path, H100, str(read_manifest(model_dir)["sha256"]))
    with caplog.at_level(logging.INFO, logger="heatcrop.engine"):
        engine = load_engine(_model_settings(model_dir, tmp_path), warm=False, probe=lambda: H100)
    assert isinstance(engine, OrtEngine)
    engine.close()
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and "failed to load" in message


def test_load_trt_with_unloadable_plan_raises(model_dir, tmp_path):
    write_plan(tmp_path, H100, str(read_manifest(model_dir)["sha256"]))
    with pytest.raises(EngineError):
        load_engine(_model_settings(model_dir, tmp_path, "trt"), warm=False, probe=lambda: H100)


@pytest.mark.parametrize("error", [RuntimeError, TypeError, AttributeError])
def test_load_auto_falls_back_whatever_the_tensorrt_bindings_raise(
    model_dir, tmp_path, monkeypatch, caplog, error
):
    import engines.loader

    def broken(*args, **kwargs):
        raise error("binding changed")

    monkeypatch.setattr(engines.loader, "_load_trt", broken)
    write_plan(tmp_path, H100, str(read_manifest(model_dir)["sha256"]))
    with caplog.at_level(logging.INFO, logger="heatcrop.engine"):
        engine = load_engine(_model_settings(model_dir, tmp_path), warm=False, probe=lambda: H100)
    assert isinstance(engine, OrtEngine)
    engine.close()
    assert "failed to load: binding changed" in caplog.records[-1].getMessage()
    with pytest.raises(error):
        load_engine(_model_settings(model_dir, tmp_path, "trt"), warm=False, probe=lambda: H100)
