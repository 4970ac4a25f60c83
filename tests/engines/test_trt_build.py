"""engines.build_trt without a GPU: what gets rebuilt, the graph rewrite, calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import pyvips

from engines import buckets
from engines.base import INPUT_NAME
from engines.build_trt import (
    BuildError,
    BuildSpec,
    NoTensorRT,
    build,
    calibration_batches,
    calibration_photos,
    cast_before_transpose,
    main,
    needs_build,
    parse_buckets,
    photos_digest,
    stale_plans,
)
from engines.model import find_model, read_manifest
from engines.plans import list_plans
from sidecar.decode import decode_to
from tests.support.images import halves
from tests.support.plan_files import H100, L4, MODEL_SHA, OLD_MODEL_SHA, other_trt, write_plan

SPEC = BuildSpec()


def _never_import(name: str):
    raise AssertionError(f"{name} must not be imported to decide that nothing needs building")


def test_needs_build_when_missing(tmp_path):
    assert needs_build(tmp_path, SPEC, H100, MODEL_SHA) == "missing"


def test_up_to_date_plan_is_kept(tmp_path):
    write_plan(tmp_path)
    assert needs_build(tmp_path, SPEC, H100, MODEL_SHA) == ""


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (BuildSpec(max_batch=128), "batch range 1..64"),
        (BuildSpec(opt_batch=16), "(opt 64)"),
        (BuildSpec(buckets=((224, 224),)), "other shape buckets"),
    ],
)
def test_other_build_options_rebuild(tmp_path, spec, reason):
    write_plan(tmp_path)
    assert reason in needs_build(tmp_path, spec, H100, MODEL_SHA)


def test_new_model_means_a_new_plan(tmp_path):
    write_plan(tmp_path, model_sha256=OLD_MODEL_SHA)
    # The new model's plan has another name: missing; the old one is stale.
    assert needs_build(tmp_path, SPEC, H100, MODEL_SHA) == "missing"
    assert [m.model_sha256 for m in stale_plans(tmp_path, H100, MODEL_SHA)] == [OLD_MODEL_SHA]


def test_corrupt_plan_is_rebuilt(tmp_path):
    manifest = write_plan(tmp_path, payload=b"0123456789")
    manifest.plan_path.write_bytes(b"9876543210")
    assert needs_build(tmp_path, SPEC, H100, MODEL_SHA).startswith("corrupt plan")
    manifest.plan_path.write_bytes(b"short")
    assert needs_build(tmp_path, SPEC, H100, MODEL_SHA).startswith("broken")
    manifest.path.write_text("{}")
    assert needs_build(tmp_path, SPEC, H100, MODEL_SHA).startswith("unreadable manifest")


def test_stale_plans_only_of_this_machine(tmp_path):
    write_plan(tmp_path)
    old_here = write_plan(tmp_path, model_sha256=OLD_MODEL_SHA, precision="int8")
    write_plan(tmp_path, L4, OLD_MODEL_SHA)  # another GPU's: kept for that GPU
    write_plan(tmp_path, other_trt(H100), OLD_MODEL_SHA)  # another TensorRT's: kept too
    assert stale_plans(tmp_path, H100, MODEL_SHA) == [old_here]


def test_build_keeps_a_current_plan_and_removes_stale_ones(model_dir, tmp_path):
    digest = str(read_manifest(model_dir)["sha256"])
    current = write_plan(tmp_path, model_sha256=digest)
    stale = write_plan(tmp_path, model_sha256=OLD_MODEL_SHA)
    other_gpu = write_plan(tmp_path, L4, OLD_MODEL_SHA)
    outcome = build(model_dir, tmp_path, SPEC, machine=H100, importer=_never_import)
    assert not outcome.built and outcome.manifest == current
    assert set(outcome.removed) == {stale.path, stale.plan_path}
    assert {e.path for e in list_plans(tmp_path)} == {current.path, other_gpu.path}
    assert other_gpu.plan_path.is_file()


def test_build_without_tensorrt_writes_nothing(model_dir, tmp_path):
    def refuse(name: str):
        raise ImportError(f"No module named {name!r}")

    out = tmp_path / "engines"
    with pytest.raises(NoTensorRT, match="TensorRT not importable"):
        build(model_dir, out, SPEC, importer=refuse)
    assert not out.exists()


def test_int8_needs_photos(model_dir, tmp_path):
    with pytest.raises(BuildError, match="--calib-dir"):
        build(model_dir, tmp_path, BuildSpec(precision="int8"), machine=H100)


def test_main_without_tensorrt_says_so(model_dir, tmp_path, capsys):
    # CI has no TensorRT: the real import fails and the tool says why, exit status 2.
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    code = main(["--model-dir", str(model_dir), "--out", str(tmp_path / "e")])
    assert code == 2
    assert "cannot build TensorRT plans here: TensorRT not importable" in capsys.readouterr().err


def test_main_refuses_bad_options(model_dir, tmp_path, capsys):
    code = main(["--model-dir", str(model_dir), "--out", str(tmp_path), "--max-batch", "0"])
    assert code == 1 and "batch" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (BuildSpec(precision="bf16"), "precision"),
        (BuildSpec(buckets=()), "no shape buckets"),
        (BuildSpec(buckets=((224, 240),)), "multiple of 32"),
        (BuildSpec(max_batch=8, opt_batch=16), "batch"),
        (BuildSpec(calib_batch=0), "calib_batch"),
    ],
)
def test_build_spec_checks(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.check()


def test_parse_buckets():
    assert parse_buckets("all") == buckets.all_buckets()
    assert parse_buckets("224x224, 448x224") == ((224, 224), (448, 224))
    with pytest.raises(ValueError, match="HxW"):
        parse_buckets("224*224")


def test_cast_before_transpose_gives_identical_outputs(model_dir):
    data = find_model(model_dir).read_bytes()
    rewritten = cast_before_transpose(data)
    graph = onnx.load_from_string(rewritten).graph
    first = [n for n in graph.node if INPUT_NAME in n.input]
    assert [n.op_type for n in first] == ["Cast"]
    onnx.checker.check_model(onnx.load_from_string(rewritten))
    batch = np.random.default_rng(7).integers(0, 256, (2, 224, 320, 3), dtype=np.uint8)
    want = _run(data, batch)
    got = _run(rewritten, batch)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    # Already rewritten: nothing more to do.
    assert cast_before_transpose(rewritten) == rewritten


def _run(model: bytes, batch: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: batch})


def _photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"p{i:02d}.jpg"
        halves(300 + 10 * i, 200).jpegsave(str(path), Q=90)
        paths.append(path)
    return paths


def test_calibration_batches_use_the_service_decode(tmp_path):
    paths = _photos(tmp_path / "photos", 5)
    bad = tmp_path / "photos" / "p99.jpg"
    bad.write_bytes(b"not a jpeg at all")
    skipped: list[Path] = []
    got = list(
        calibration_batches(
            [*paths[:2], bad, *paths[2:]], (224, 224), 2, lambda p, _: skipped.append(p)
        )
    )
    assert skipped == [bad]
    assert [b.shape for b in got] == [(2, 224, 224, 3), (2, 224, 224, 3)]  # 5th photo dropped
    want = [
        decode_to(p.read_bytes(), (224, 224), max_bytes=1 << 30, max_pixels=1 << 30).pixels
        for p in paths[:4]
    ]
    np.testing.assert_array_equal(np.concatenate(got), np.stack(want))


def test_fewer_usable_photos_than_one_calibration_batch_is_a_build_error(tmp_path):
    paths = _photos(tmp_path / "photos", 3)
    bad = tmp_path / "photos" / "p99.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(BuildError, match=r"at least 4 usable photos .* got 3"):
        list(calibration_batches([*paths, bad], (224, 224), 4))


def test_calibration_photos_and_digest(tmp_path):
    folder = tmp_path / "photos"
    paths = _photos(folder, 3)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "sub").mkdir()
    halves(100, 100).pngsave(str(folder / "sub" / "q.png"))
    found = calibration_photos(folder, 10)
    assert found == [*paths, folder / "sub" / "q.png"]
    assert calibration_photos(folder, 2) == paths[:2]
    before = photos_digest(paths)
    assert photos_digest(paths) == before
    halves(320, 200, (0, 255, 0)).jpegsave(str(paths[0]), Q=90)
    assert photos_digest(paths) != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no photos"):
        calibration_photos(tmp_path / "empty", 10)
    with pytest.raises(BuildError, match="not a folder"):
        calibration_photos(tmp_path / "absent", 10)


def test_calibration_pixels_send_each_photo_to_the_services_bucket(tmp_path):
    """Without a fixed bucket each photo goes where the service would send it: by its display
    orientation, so an EXIF-rotated landscape file lands in the portrait bucket."""
    from engines.build_trt import calibration_pixels
    from sidecar.decode import decode

    wide = tmp_path / "wide.jpg"
    halves(480, 320).jpegsave(str(wide), Q=90)
    turned = tmp_path / "turned.jpg"
    image = halves(480, 320).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    image.jpegsave(str(turned), Q=90)
    got = dict(calibration_pixels([wide, turned]))
    assert got[wide].shape[:2] == buckets.bucket_for(480, 320)
    assert got[turned].shape[:2] == buckets.bucket_for(320, 480)
    for path, pixels in got.items():
        served = decode(path.read_bytes(), max_bytes=1 << 30, max_pixels=1 << 30).pixels
        np.testing.assert_array_equal(pixels, served)
