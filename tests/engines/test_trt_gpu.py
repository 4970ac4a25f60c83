"""TensorRT against ONNX Runtime on real photos: needs a CUDA GPU, TensorRT and pycuda.

Skipped, with the reason, wherever ``detect_machine`` finds none of that (CI, the dev boxes).
Builds small plans (batch 1..8; fp16 for every bucket, as the loader wants, fp32 for the
photos' buckets only) into a temporary folder, so a run on a GPU takes a few minutes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engines.buckets import bucket_for
from engines.build_trt import BuildSpec, build
from engines.loader import load_engine
from engines.model import find_model, read_manifest
from engines.ort import OrtEngine
from engines.plans import Machine, NoMatchingPlan, detect_machine, find_plan
from engines.trt import TrtEngine
from sidecar.core import CropCore
from sidecar.decode import decode
from sidecar.errors import EngineError
from sidecar.settings import EngineSettings, KernelSettings, SourceSettings

pytestmark = pytest.mark.gpu

DEV_PHOTOS = Path(__file__).resolve().parents[2].parent / "shared/eval/fcdb_dev/images"
ASPECTS = (1.0, 16 / 9, 4 / 5, 9 / 16)
MAX_BATCH = 8
RTOL = 1e-2


@pytest.fixture(scope="module")
def machine() -> Machine:
    probe = detect_machine()
    if not isinstance(probe, Machine):
        pytest.skip(f"needs a CUDA GPU with TensorRT and pycuda: {probe.reason}")
    return probe


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[bytes]:
    from sidecar.demo import write_demo_images

    paths = write_demo_images(tmp_path_factory.mktemp("demo"))
    paths += sorted(DEV_PHOTOS.glob("*.jpg"))[:12]
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def decoded(photos):
    source = SourceSettings()
    return [decode(d, max_bytes=source.max_bytes, max_pixels=source.max_pixels) for d in photos]


@pytest.fixture(scope="module")
def plan_dir(machine, model_dir, decoded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines")
    build(model_dir, out, BuildSpec(precision="fp16", max_batch=MAX_BATCH), machine=machine)
    spec = BuildSpec(precision="fp32", max_batch=MAX_BATCH, buckets=_photo_buckets(decoded))
    build(model_dir, out, spec, machine=machine)
    return out


def _photo_buckets(decoded) -> tuple[tuple[int, int], ...]:
    return tuple(sorted({bucket_for(d.width, d.height) for d in decoded}))


def _engine(plan_dir, model_dir, machine, precision) -> TrtEngine:
    digest = str(read_manifest(model_dir)["sha256"])
    search = find_plan(plan_dir, machine, digest, precision, ())
    assert search.plan is not None, search.why_none()
    return TrtEngine(search.plan, machine, digest)


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def trt_engine(request, plan_dir, model_dir, machine):
    engine = _engine(plan_dir, model_dir, machine, request.param)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ort_engine(model_dir):
    engine = OrtEngine(find_model(model_dir), threads=2)
    yield engine
    engine.close()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))


def test_heatmaps_match_ort(trt_engine, ort_engine, decoded):
    for image in decoded:
        batch = image.pixels[np.newaxis]
        got, want = trt_engine.infer(batch), ort_engine.infer(batch)
        assert got.heatmaps.shape == want.heatmaps.shape
        for profile in range(want.heatmaps.shape[1]):
            assert _rel(got.heatmaps[0, profile], want.heatmaps[0, profile]) <= RTOL
        assert abs(float(got.food_mass[0]) - float(want.food_mass[0])) <= RTOL


def test_same_best_box_as_ort(trt_engine, ort_engine, photos):
    kernel, source = KernelSettings(), SourceSettings()
    on_gpu = CropCore(trt_engine, kernel, source, "auto")
    on_cpu = CropCore(ort_engine, kernel, source, "auto")
    for data in photos:
        a, b = on_gpu.analyse(data), on_cpu.analyse(data)
        for aspect in ASPECTS:
            assert on_gpu.box(a, aspect).as_tuple() == on_cpu.box(b, aspect).as_tuple()


def test_batches_larger_than_the_plan_are_split(trt_engine, decoded):
    image = decoded[0].pixels
    rng = np.random.default_rng(0)
    batch = np.stack([image] + [rng.permutation(image) for _ in range(2 * MAX_BATCH + 2)])
    whole = trt_engine.infer(batch)
    assert len(whole) == batch.shape[0] > trt_engine.max_batch
    for i in (0, MAX_BATCH - 1, MAX_BATCH, batch.shape[0] - 1):
        alone = trt_engine.infer(batch[i : i + 1])
        np.testing.assert_allclose(whole.heatmaps[i], alone.heatmaps[0], rtol=RTOL, atol=1e-3)


def test_outputs_are_owned_copies(trt_engine, decoded):
    batch = decoded[0].pixels[np.newaxis]
    first = trt_engine.infer(batch)
    kept = first.heatmaps.copy()
    for array in (first.heatmaps, first.food_mass, first.logits):
        assert array.flags.owndata and array.flags.writeable
    trt_engine.infer(np.zeros_like(batch))
    np.testing.assert_array_equal(first.heatmaps, kept)


def test_called_from_another_thread(trt_engine, decoded):
    # The service calls the engine from its batcher thread, not the one that loaded it.
    batch = decoded[1].pixels[np.newaxis]
    here = trt_engine.infer(batch)
    seen: list[int] = []

    def infer_elsewhere():
        seen.append(threading.get_ident())
        return trt_engine.infer(batch)

    with ThreadPoolExecutor(1) as pool:
        there = pool.submit(infer_elsewhere).result()
    assert seen and seen[0] != threading.get_ident()
    np.testing.assert_array_equal(here.heatmaps, there.heatmaps)


def test_lifecycle(plan_dir, model_dir, machine, decoded):
    engine = _engine(plan_dir, model_dir, machine, "fp16")
    digest = str(read_manifest(model_dir)["sha256"])
    assert engine.name == "trt" and engine.version == f"{digest[:12]}-trt-fp16"
    engine.warm_up()
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="after close"):
        engine.infer(decoded[0].pixels[np.newaxis])


@pytest.mark.parametrize("kind", ["auto", "trt"])
def test_loader_takes_the_matching_plan(plan_dir, model_dir, kind):
    settings = EngineSettings(kind=kind, model_dir=str(model_dir), plan_dir=str(plan_dir))
    engine = load_engine(settings, warm=True)
    try:
        assert isinstance(engine, TrtEngine) and engine.version.endswith("-trt-fp16")
    finally:
        engine.close()


def test_loader_refuses_a_plan_without_every_bucket(plan_dir, model_dir):
    # The fp32 plan holds only the photos' buckets: it cannot serve every request.
    settings = EngineSettings(
        kind="trt", model_dir=str(model_dir), plan_dir=str(plan_dir), trt_precision="fp32"
    )
    with pytest.raises(NoMatchingPlan, match="missing buckets"):
        load_engine(settings, warm=False)


def test_builder_keeps_the_current_plans(plan_dir, model_dir, machine, decoded):
    spec = BuildSpec(precision="fp32", max_batch=MAX_BATCH, buckets=_photo_buckets(decoded))
    outcome = build(model_dir, plan_dir, spec, machine=machine)
    assert not outcome.built and outcome.reason == "up to date"
