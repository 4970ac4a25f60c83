"""engines.trt without a GPU: preprocessing parity with ONNX Runtime, batch splitting, output
shapes, and that a plan which does not match is refused before TensorRT is imported."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import INPUT_NAME, OUTPUT_NAMES, prepare_batch
from engines.errors import EngineError
from engines.model import find_model
from engines.ort import OrtEngine
from engines.plans import NoMatchingPlan, PlanError
from engines.trt import TrtEngine, join_outputs, output_shapes, split_batch, stage
from tests.support.plan_files import H100, L4, MODEL_SHA, OLD_MODEL_SHA, other_trt, write_plan


class FeedRecorder:
    """Wraps an ORT session to keep the exact arrays ONNX Runtime was given."""

    def __init__(self, session):
        self.session = session
        self.feeds: list[np.ndarray] = []

    def run(self, names, feed):
        self.feeds.append(np.array(feed[INPUT_NAME], copy=True))
        return self.session.run(names, feed)


@pytest.fixture(scope="module")
def ort_engine(model_dir):
    engine = OrtEngine(find_model(model_dir), threads=1)
    yield engine
    engine.close()


def _trt_staged(batch, shapes, max_batch: int) -> np.ndarray:
    """What TrtEngine copies to the GPU for ``batch``: its host-side path without the GPU."""
    image = prepare_batch(batch, shapes)
    host = np.full((max_batch, *image.shape[1:]), 77, np.uint8)  # stale bytes from "before"
    sent = [stage(chunk, host).copy() for chunk in split_batch(image, max_batch)]
    return np.concatenate(sent)


@pytest.mark.parametrize("max_batch", [1, 3, 64])
@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.integers(0, 256, (5, 224, 288, 3), dtype=np.uint8),
        lambda rng: rng.integers(0, 256, (5, 224, 288, 3), dtype=np.uint8)[:, :, ::-1],
        lambda rng: np.moveaxis(rng.integers(0, 256, (5, 3, 224, 288), dtype=np.uint8), 1, 3),
        lambda rng: rng.integers(0, 256, (10, 224, 288, 3), dtype=np.uint8)[::2],
    ],
    ids=["contiguous", "flipped", "nchw-view", "strided"],
)
def test_preprocessing_parity_with_ort(ort_engine, monkeypatch, make, max_batch):
    batch = make(np.random.default_rng(max_batch))
    recorder = FeedRecorder(ort_engine._session)
    monkeypatch.setattr(ort_engine, "_session", recorder)
    ort_engine.infer(batch)
    (fed,) = recorder.feeds
    staged = _trt_staged(batch, ort_engine.input_shapes, max_batch)
    assert fed.dtype == staged.dtype == np.uint8
    np.testing.assert_array_equal(staged, fed)
    np.testing.assert_array_equal(fed, batch)


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((1, 224, 224, 3), np.float32),
        np.zeros((224, 224, 3), np.uint8),
        np.zeros((0, 224, 224, 3), np.uint8),
        np.zeros((1, 224, 240, 3), np.uint8),
        [[0]],
    ],
    ids=["float", "rank3", "empty", "not-a-bucket", "list"],
)
def test_both_runtimes_refuse_the_same_inputs(ort_engine, batch):
    with pytest.raises(ValueError) as from_ort:
        ort_engine.infer(batch)
    with pytest.raises(ValueError) as from_prepare:
        prepare_batch(batch, ort_engine.input_shapes)
    assert str(from_ort.value) == str(from_prepare.value)


@pytest.mark.parametrize("bucket", [(224, 224), (224, 448), (448, 224), (224, 320)])
def test_output_shapes_are_what_ort_returns(ort_engine, bucket):
    out = ort_engine.infer(np.zeros((2, *bucket, 3), np.uint8))
    want = output_shapes(2, bucket)
    assert [want[name] for name in OUTPUT_NAMES] == [
        out.heatmaps.shape,
        out.food_mass.shape,
        out.logits.shape,
    ]


def test_split_and_join_keep_order():
    batch = np.arange(130, dtype=np.uint8).reshape(130, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    chunks = split_batch(batch, 64)
    assert [c.shape[0] for c in chunks] == [64, 64, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), batch)
    parts = [
        (
            np.full((len(c), 2, 1, 1), i, np.float32),
            np.full(len(c), i, np.float32),
            np.zeros((len(c), 3), np.float32),
        )
        for i, c in enumerate(chunks)
    ]
    joined = join_outputs(parts)
    assert len(joined) == 130
    assert joined.food_mass.tolist() == [0.0] * 64 + [1.0] * 64 + [2.0] * 2
    assert join_outputs(parts[:1]).heatmaps is parts[0][0]
    with pytest.raises(ValueError, match="max_batch"):
        split_batch(batch, 0)


def test_stage_writes_only_the_front_of_the_buffer():
    host = np.full((4, 2, 2, 3), 9, np.uint8)
    view = stage(np.zeros((3, 2, 2, 3), np.uint8), host)
    assert view.shape == (3, 2, 2, 3) and np.shares_memory(view, host)
    assert (host[:3] == 0).all() and (host[3] == 9).all()


def _no_import(name: str):
    raise AssertionError(f"{name} imported for a plan that must be refused")


@pytest.mark.parametrize(
    ("machine", "model", "reason"),
    [
        (L4, MODEL_SHA, "built for NVIDIA H100"),
        (other_trt(H100), MODEL_SHA, "built with TensorRT 10.16.1.11"),
        (H100, OLD_MODEL_SHA, "current is 0123456789ab"),
    ],
)
def test_mismatched_plan_is_never_loaded(tmp_path, machine, model, reason):
    manifest = write_plan(tmp_path)  # an H100 / TensorRT 10.16.1.11 plan of MODEL_SHA
    with pytest.raises(NoMatchingPlan, match=reason):
        TrtEngine(manifest, machine, model, importer=_no_import)


def test_corrupt_plan_is_never_loaded(tmp_path):
    manifest = write_plan(tmp_path, payload=b"0123456789")
    manifest.plan_path.write_bytes(b"0123456780")
    with pytest.raises(PlanError, match="does not match"):
        TrtEngine(manifest, H100, MODEL_SHA, importer=_no_import)


def test_matching_plan_without_the_libraries_is_a_typed_error(tmp_path):
    manifest = write_plan(tmp_path)

    def refuse(name: str):
        raise ImportError(f"No module named {name!r}")

    with pytest.raises(EngineError, match="TensorRT runtime not importable"):
        TrtEngine(manifest, H100, MODEL_SHA, importer=refuse)


class _FakeContext:
    def __init__(self, log: list[str], fail: str) -> None:
        self.log, self.fail = log, fail

    def push(self) -> None:
        self.log.append("push")
        if self.fail == "push":
            raise _FakeCudaError("push failed")

    def detach(self) -> None:
        self.log.append("detach")


class _FakeCudaError(Exception):
    pass


def _fake_cuda(log: list[str], fail: str):
    import types

    cuda = types.SimpleNamespace(Error=_FakeCudaError, init=lambda: None)
    cuda.Device = lambda n: types.SimpleNamespace(
        retain_primary_context=lambda: _FakeContext(log, fail)
    )

    def pop() -> None:
        log.append("pop")
        if fail == "pop":
            raise _FakeCudaError("pop failed")

    cuda.Context = types.SimpleNamespace(pop=pop)
    return cuda


@pytest.mark.parametrize(("fail", "loads"), [("push", False), ("pop", False), ("pop", True)])
def test_the_retained_gpu_context_is_released_whatever_fails(tmp_path, monkeypatch, fail, loads):
    # No GPU here: fake CUDA bindings record what the engine does with its context. `loads`:
    # the plan loads (the pop after a good load fails), else loading fails (the fake
    # TensorRT has no runtime) and the pop of the clean-up fails.
    import types

    if loads:
        monkeypatch.setattr(TrtEngine, "_load", lambda self, data: None)
    manifest = write_plan(tmp_path)
    log: list[str] = []
    modules = {"tensorrt": types.SimpleNamespace(), "pycuda.driver": _fake_cuda(log, fail)}
    with pytest.raises(EngineError):
        TrtEngine(manifest, H100, MODEL_SHA, importer=modules.__getitem__)
    assert log[-1] == "detach" and log.count("detach") == 1
