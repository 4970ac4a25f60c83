"""engines.ort.OrtEngine: the Engine protocol on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines import buckets
from engines.artifacts import sha256_hex
from engines.base import PROFILES, Engine, HeatmapBatch
from engines.errors import EngineError
from engines.export import export
from engines.ort import OrtEngine

GOLDEN = Path(__file__).parents[1] / "support" / "golden" / "lite0_reference.npz"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def engine(model_path):
    eng = OrtEngine(model_path, threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def coffee():
    with np.load(GOLDEN) as data:
        names = list(data["names_224x320"])
        i = names.index("coffee")
        return data["inputs_224x320"][i : i + 1], data["logits_224x320"][i]


def _noise(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_protocol_surface(engine, model_path):
    typed: Engine = engine  # static check that OrtEngine satisfies the protocol
    assert typed.name == "ort"
    assert engine.version == sha256_hex(model_path.read_bytes())[:12] + "-ort"
    assert model_path.name.endswith(engine.version.removesuffix("-ort") + ".onnx")
    assert engine.input_shapes == buckets.all_buckets()


def test_infer_matches_reference(engine, coffee):
    batch, ref_logits = coffee
    out = engine.infer(batch)
    assert isinstance(out, HeatmapBatch) and len(out) == 1
    grid = buckets.heatmap_shape((224, 320))
    assert out.heatmaps.shape == (1, len(PROFILES), *grid)
    assert out.food_mass.shape == (1,) and out.logits.shape == (1, 1000)
    assert all(a.dtype == np.float32 for a in (out.heatmaps, out.food_mass, out.logits))
    assert np.abs(out.logits[0] - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    assert (out.heatmaps >= 0).all()
    assert out.profile(0, "food").shape == grid


def test_outputs_are_owned_copies(engine, coffee):
    batch, _ = coffee
    first = engine.infer(batch)
    for array in (first.heatmaps, first.food_mass, first.logits):
        assert array.flags.owndata and array.flags.writeable
    kept = first.heatmaps.copy()
    first.heatmaps[:] = -1.0
    second = engine.infer(batch)
    np.testing.assert_array_equal(second.heatmaps, kept)


def test_deterministic(engine):
    batch = _noise(2, 224, 256)
    a, b = engine.infer(batch), engine.infer(batch)
    np.testing.assert_array_equal(a.heatmaps, b.heatmaps)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_non_contiguous_input(engine):
    batch = _noise(1, 224, 288)
    flipped = batch[:, :, ::-1]
    assert not flipped.flags.c_contiguous
    np.testing.assert_array_equal(
        engine.infer(flipped).heatmaps, engine.infer(np.ascontiguousarray(flipped)).heatmaps
    )


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((1, 224, 224, 3), np.float32), "uint8"),
        (np.zeros((224, 224, 3), np.uint8), r"\[N>=1, H, W, 3\]"),
        (np.zeros((1, 224, 224, 4), np.uint8), r"\[N>=1, H, W, 3\]"),
        (np.zeros((0, 224, 224, 3), np.uint8), r"\[N>=1, H, W, 3\]"),
        (np.zeros((1, 224, 240, 3), np.uint8), "224x240 is not one of"),
        (np.zeros((1, 480, 224, 3), np.uint8), "480x224 is not one of"),
        ([[0]], "numpy array"),
    ],
    ids=["float", "rank3", "rgba", "empty", "not-multiple", "too-long", "list"],
)
def test_invalid_batches_are_refused(engine, batch, message):
    with pytest.raises(ValueError, match=message):
        engine.infer(batch)


def test_warm_up_runs_every_bucket(model_path, monkeypatch):
    eng = OrtEngine(model_path, threads=1, shapes=[(224, 224), (256, 224), (224, 448)])
    seen: list[tuple[int, ...]] = []
    real = eng.infer

    def spy(batch):
        seen.append(batch.shape)
        return real(batch)

    monkeypatch.setattr(eng, "infer", spy)
    eng.warm_up()
    assert seen == [(1, 224, 224, 3), (1, 256, 224, 3), (1, 224, 448, 3)]
    eng.close()


def test_custom_shapes_limit_what_is_accepted(model_path):
    eng = OrtEngine(model_path, threads=1, shapes=[(224, 224)])
    assert eng.input_shapes == ((224, 224),)
    eng.infer(_noise(1, 224, 224))
    with pytest.raises(ValueError, match="224x256 is not one of"):
        eng.infer(_noise(1, 224, 256))
    eng.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threads": 0}, "threads"), ({"shapes": [(224, 230)]}, "multiple of 32")],
)
def test_bad_configuration(model_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        OrtEngine(model_path, **kwargs)


def test_thread_and_spin_settings_agree(model_path, engine):
    batch = _noise(3, 224, 224, seed=3)
    want = engine.infer(batch)
    for kwargs in ({"threads": 2}, {"threads": 2, "spin": True}):
        eng = OrtEngine(model_path, **kwargs)
        got = eng.infer(batch)
        np.testing.assert_allclose(got.heatmaps, want.heatmaps, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        eng.close()


def test_closed_engine_refuses(model_path):
    eng = OrtEngine(model_path, threads=1)
    eng.close()
    with pytest.raises(EngineError, match="after close"):
        eng.infer(_noise(1, 224, 224))


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        OrtEngine(tmp_path / "absent.onnx")


def test_split_batches_give_each_image_what_one_session_gives(engine, model_path):
    # threads=3: a batch of 5 runs as parts of 2, 2 and 1 on three 1-thread sessions.
    split = OrtEngine(model_path, threads=3, shapes=[(224, 224)])
    try:
        batch = _noise(5, 224, 224, seed=3)
        whole = split.infer(batch)
        for part in (batch[:2], batch[2:4], batch[4:]):
            alone = engine.infer(part)
            at = next(i for i in range(0, 5, 2) if np.array_equal(batch[i], part[0]))
            assert np.array_equal(whole.heatmaps[at : at + len(part)], alone.heatmaps)
            assert np.array_equal(whole.logits[at : at + len(part)], alone.logits)
        # One image runs on the 3-thread session: the same bits as on one thread.
        assert np.array_equal(split.infer(batch[:1]).heatmaps, engine.infer(batch[:1]).heatmaps)
    finally:
        split.close()
    with pytest.raises(EngineError, match="after close"):
        split.infer(batch[:2])
