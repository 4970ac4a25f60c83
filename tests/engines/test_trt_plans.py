"""engines.plans: plan naming, manifests, matching against this machine, stale detection."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engines import buckets
from engines.errors import ModelNotBuilt
from engines.plans import (
    NoMatchingPlan,
    PlanError,
    PlanManifest,
    Status,
    Unavailable,
    calibration_cache_path,
    detect_machine,
    find_plan,
    gpu_slug,
    judge,
    list_plans,
    plan_stem,
    profile_shapes,
    read_manifest,
    read_plan,
    timing_cache_path,
)
from tests.support.plan_files import H100, L4, MODEL_SHA, OLD_MODEL_SHA, other_trt, write_plan

ALL = buckets.all_buckets()


def test_plan_stem_names_model_precision_gpu_and_tensorrt():
    stem = plan_stem(MODEL_SHA, H100, "fp16")
    assert stem == "heatcrop-lite0-39519606ea2c-fp16-nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11"
    others = {
        plan_stem(OLD_MODEL_SHA, H100, "fp16"),
        plan_stem(MODEL_SHA, H100, "int8"),
        plan_stem(MODEL_SHA, L4, "fp16"),
        plan_stem(MODEL_SHA, other_trt(H100), "fp16"),
        plan_stem(MODEL_SHA, replace(H100, compute_capability=(9, 1)), "fp16"),
    }
    assert stem not in others and len(others) == 5


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
        ("Tesla T4", "tesla-t4"),
        ("  /../ ", "gpu"),
    ],
)
def test_gpu_slug_is_a_safe_file_name_part(name, slug):
    assert gpu_slug(name) == slug


def test_plan_stem_refuses_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        plan_stem(MODEL_SHA, H100, "bf16")


def test_cache_file_names(tmp_path):
    assert (
        timing_cache_path(tmp_path, H100).name
        == "timing-nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11.cache"
    )
    assert timing_cache_path(tmp_path, H100) != timing_cache_path(tmp_path, other_trt(H100))
    calib = calibration_cache_path(tmp_path, MODEL_SHA, "ab" * 32)
    assert calib.name == "calib-39519606ea2c-abababababab.cache"


@pytest.mark.parametrize("bucket", ALL)
def test_profile_shapes_fix_height_and_width(bucket):
    low, opt, high = profile_shapes(bucket, 1, 16, 64)
    h, w = bucket
    assert (low, opt, high) == ((1, h, w, 3), (16, h, w, 3), (64, h, w, 3))


@pytest.mark.parametrize(
    ("bucket", "batches", "message"),
    [
        ((224, 224), (0, 1, 64), "batch"),
        ((224, 224), (1, 65, 64), "batch"),
        ((224, 224), (2, 1, 64), "batch"),
        ((224, 230), (1, 1, 64), "multiple of 32"),
        ((0, 224), (1, 1, 64), "multiple of 32"),
    ],
)
def test_profile_shapes_refuse_bad_ranges(bucket, batches, message):
    with pytest.raises(ValueError, match=message):
        profile_shapes(bucket, *batches)


def test_manifest_round_trip(tmp_path):
    written = write_plan(tmp_path, max_batch=32, shapes=((224, 224), (448, 224)))
    read = read_manifest(written.path)
    assert read == written
    assert read.plan_path == tmp_path / f"{plan_stem(MODEL_SHA, H100, 'fp16')}.plan"
    assert read.machine == H100
    data = json.loads(written.path.read_text())
    assert data["gpu"] == {"name": H100.gpu_name, "compute_capability": [9, 0]}
    assert data["tensorrt"] == H100.trt_version
    assert data["model"]["sha256"] == MODEL_SHA
    assert data["batch"] == {"min": 1, "opt": 32, "max": 32}
    assert data["buckets"] == [[224, 224], [448, 224]]


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("plan_sha256"), "plan_sha256"),
        (lambda d: d.update(format=2), "format"),
        (lambda d: d.update(precision="bf16"), "precision"),
        (lambda d: d.update(plan="../elsewhere.plan"), "bare file name"),
        (lambda d: d.update(buckets=[]), "no shape buckets"),
        (lambda d: d.update(buckets=[[224, 230]]), "multiple of 32"),
        (lambda d: d["batch"].update(max=0), "batch"),
        (lambda d: d["gpu"].update(compute_capability=["9", 0]), "integer"),
        (lambda d: d.update(plan_bytes=True), "integer"),
    ],
)
def test_bad_manifests_are_plan_errors(tmp_path, change, message):
    manifest = write_plan(tmp_path)
    _edit(manifest.path, change)
    with pytest.raises(PlanError, match=message) as info:
        read_manifest(manifest.path)
    assert isinstance(info.value, ModelNotBuilt)


def test_unreadable_manifest(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="unreadable"):
        read_manifest(tmp_path / "x.json")


def test_read_plan_checks_size_and_hash(tmp_path):
    manifest = write_plan(tmp_path, payload=b"0123456789")
    assert read_plan(manifest) == b"0123456789"
    manifest.plan_path.write_bytes(b"0123456788")  # same size, other bytes
    with pytest.raises(PlanError, match="does not match"):
        read_plan(manifest)
    manifest.plan_path.unlink()
    with pytest.raises(PlanError, match="cannot read"):
        read_plan(manifest)


def test_judge_match(tmp_path):
    manifest = write_plan(tmp_path)
    verdict = judge(manifest, H100, MODEL_SHA, ALL, "fp16")
    assert verdict.ok and verdict.status is Status.MATCH


@pytest.mark.parametrize(
    ("machine", "model", "status", "reason"),
    [
        (H100, OLD_MODEL_SHA, Status.STALE, "current is 0123456789ab"),
        (L4, MODEL_SHA, Status.OTHER_GPU, "built for NVIDIA H100 80GB HBM3 (sm90)"),
        (replace(H100, compute_capability=(9, 1)), MODEL_SHA, Status.OTHER_GPU, "sm90"),
        (other_trt(H100), MODEL_SHA, Status.OTHER_TRT, "TensorRT 10.16.1.11"),
        (Unavailable("TensorRT not importable"), MODEL_SHA, Status.UNKNOWN, "not importable"),
        # A plan of an old model is stale wherever it is looked at.
        (Unavailable("no GPU"), OLD_MODEL_SHA, Status.STALE, "built from model 39519606ea2c"),
    ],
)
def test_judge_mismatches(tmp_path, machine, model, status, reason):
    manifest = write_plan(tmp_path)
    verdict = judge(manifest, machine, model, ALL, "fp16")
    assert verdict.status is status and not verdict.ok
    assert reason in verdict.reason


def test_judge_unknown_model_skips_staleness(tmp_path):
    assert judge(write_plan(tmp_path), H100, None).ok


def test_judge_missing_buckets_and_other_precision(tmp_path):
    manifest = write_plan(tmp_path, shapes=((224, 224),))
    verdict = judge(manifest, H100, MODEL_SHA, ALL, "fp16")
    assert verdict.status is Status.INCOMPLETE and "14 shape buckets missing" in verdict.reason
    assert judge(manifest, H100, MODEL_SHA, [(224, 224)], "fp16").ok
    assert judge(manifest, H100, MODEL_SHA, [(224, 224)], "int8").status is Status.OTHER_PRECISION


def test_judge_broken_plan_file(tmp_path):
    manifest = write_plan(tmp_path)
    manifest.plan_path.write_bytes(b"truncated")
    assert judge(manifest, H100, MODEL_SHA).status is Status.BROKEN
    manifest.plan_path.unlink()
    verdict = judge(manifest, H100, MODEL_SHA)
    assert verdict.status is Status.BROKEN and "missing" in verdict.reason


def test_list_plans_reports_broken_manifests(tmp_path):
    assert list_plans(tmp_path / "absent") == []
    good = write_plan(tmp_path)
    (tmp_path / "aaa.json").write_text("[]")
    (tmp_path / "timing-x.cache").write_bytes(b"ignored")
    entries = list_plans(tmp_path)
    assert [e.path.name for e in entries] == ["aaa.json", good.path.name]
    assert entries[0].manifest is None and "not a plan manifest" in entries[0].error
    assert entries[1].manifest == good


def test_find_plan_picks_the_newest_match(tmp_path):
    write_plan(tmp_path, L4)
    write_plan(tmp_path, H100, OLD_MODEL_SHA)
    older = write_plan(tmp_path, stem="copy-a", built_at="2026-11-01T00:00:00+00:00")
    newer = write_plan(tmp_path, stem="copy-b", built_at="2026-11-29T00:00:00+00:00")
    search = find_plan(tmp_path, H100, MODEL_SHA, "fp16", ALL)
    assert search.plan == newer != older
    assert len(search.verdicts) == 4


def test_find_plan_explains_why_none(tmp_path):
    assert (
        find_plan(tmp_path, H100, MODEL_SHA, "fp16", ALL)
        .why_none()
        .startswith("no TensorRT plans in")
    )
    write_plan(tmp_path, L4)
    write_plan(tmp_path, other_trt(H100))
    write_plan(tmp_path, H100, OLD_MODEL_SHA)
    write_plan(tmp_path, H100, precision="int8")
    search = find_plan(tmp_path, H100, MODEL_SHA, "fp16", ALL)
    assert search.plan is None
    assert search.why_none() == (
        f"4 plan(s) in {tmp_path}, none usable "
        "(1 other GPU, 1 other TensorRT, 1 other precision, 1 stale)"
    )


def _refusing(missing: str):
    def importer(name: str):
        if name == missing or name.startswith(missing + "."):
            raise ImportError(f"No module named {missing!r}")
        raise AssertionError(f"{name} imported after {missing} was found missing")

    return importer


def test_detect_machine_without_tensorrt():
    probe = detect_machine(_refusing("tensorrt"))
    assert isinstance(probe, Unavailable)
    assert "TensorRT not importable" in probe.reason and "tensorrt" in probe.describe()


def test_detect_machine_without_pycuda():
    import types

    def importer(name: str):
        if name == "tensorrt":
            return types.ModuleType("tensorrt")
        raise ImportError("No module named 'pycuda'")

    probe = detect_machine(importer)
    assert isinstance(probe, Unavailable) and "pycuda not importable" in probe.reason


def test_detect_machine_when_cuda_libraries_fail_to_load():
    def importer(name: str):
        raise OSError("libnvinfer.so.10: cannot open shared object file")

    probe = detect_machine(importer)
    assert isinstance(probe, Unavailable) and "libnvinfer" in probe.reason


def test_machine_describe():
    assert H100.describe() == "NVIDIA H100 80GB HBM3 (sm90), TensorRT 10.16.1.11"


def test_no_matching_plan_is_a_typed_model_not_built():
    error = NoMatchingPlan("why")
    assert isinstance(error, ModelNotBuilt) and error.status == 503 and error.fallback


def test_manifest_fields_are_complete(tmp_path):
    # Every field the matching relies on is written out and read back.
    manifest = write_plan(tmp_path)
    data = manifest.to_json()
    assert PlanManifest.from_json(manifest.path, data) == manifest
