import json

import numpy as np
import pytest
import pyvips
import skimage.data

from engines.base import PROFILES
from sidecar import cli
from sidecar.core import Analysis, CropCore, blend_profiles
from sidecar.errors import NotAnImage
from sidecar.settings import KernelSettings, Settings, SourceSettings
from tests.support.images import jpeg


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return jpeg(skimage.data.coffee())


@pytest.fixture(scope="module")
def core(session_engine) -> CropCore:
    return CropCore(session_engine, KernelSettings(), SourceSettings(), "auto")


def _analysis(food: np.ndarray, generic: np.ndarray, food_mass: float) -> Analysis:
    heat = np.stack([food, generic]).astype(np.float16)
    return Analysis(100, 50, heat, food_mass, "test")


def test_blend_profiles_follows_food_probability():
    food = np.zeros((7, 7), np.float32)
    food[0, 0] = 4.0
    generic = np.zeros((7, 7), np.float32)
    generic[6, 6] = 2.0
    only_food = blend_profiles(_analysis(food, generic, 1.0), "auto")
    assert only_food[0, 0] == pytest.approx(1.0) and only_food[6, 6] == 0.0
    only_generic = blend_profiles(_analysis(food, generic, 0.0), "auto")
    assert only_generic[6, 6] == pytest.approx(1.0) and only_generic[0, 0] == 0.0
    half = blend_profiles(_analysis(food, generic, 0.5), "auto")
    assert half[0, 0] == pytest.approx(half[6, 6])
    assert blend_profiles(_analysis(food, generic, 0.5), "food")[0, 0] == 4.0


def test_unknown_profile_is_refused(session_engine):
    with pytest.raises(ValueError, match="profile"):
        CropCore(session_engine, KernelSettings(), SourceSettings(), "faces")


def test_analyse_real_photo(core, coffee):
    analysis = core.analyse(coffee)
    assert (analysis.width, analysis.height) == (600, 400)
    assert analysis.heatmaps.shape[0] == len(PROFILES)
    assert analysis.heatmaps.dtype == np.float16
    assert analysis.food_mass > 0.5  # an espresso is food to ImageNet
    assert set(analysis.timings_ms) == {"decode", "infer"}


@pytest.mark.parametrize(("w", "h"), [(400, 300), (300, 400), (1, 1), (1000, 100), (100, 1000)])
def test_box_is_clamped_and_exact(core, coffee, w, h):
    analysis = core.analyse(coffee)
    box = core.box(analysis, w / h)
    assert 0 <= box.x0 < box.x1 <= 600 and 0 <= box.y0 < box.y1 <= 400
    # exact aspect within a pixel on one side
    assert abs(box.width - box.height * w / h) <= 1 or abs(box.height - box.width * h / w) <= 1
    assert box.confidence >= 0.0


def test_same_aspect_same_box(core, coffee):
    analysis = core.analyse(coffee)
    assert core.box(analysis, 400 / 300).as_tuple() == core.box(analysis, 800 / 600).as_tuple()


def test_crop_follows_the_subject_not_the_centre(core):
    # The cup sits in the left part of a wide canvas: the centre crop misses it, heatcrop must not.
    photo = skimage.data.coffee()
    canvas = np.full((400, 1400, 3), 128, np.uint8)
    canvas[:, :600] = photo
    analysis = core.analyse(jpeg(canvas))
    box = core.box(analysis, 1.0)
    centre = core.center(analysis, 1.0)
    cup = (150, 450)  # the cup's horizontal extent in the coffee photo
    overlap = max(0, min(box.x1, cup[1]) - max(box.x0, cup[0]))
    assert overlap >= 0.8 * (cup[1] - cup[0])
    assert centre.x0 == 500  # the centre crop would show the grey padding only
    assert box.confidence > 0.05 and core.is_confident(box)


def test_bad_bytes(core):
    with pytest.raises(NotAnImage):
        core.analyse(b"definitely not an image")


def test_cli_crop(tmp_path, model_dir, coffee, monkeypatch, capsys):
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(coffee)
    monkeypatch.setenv("HEATCROP_ENGINE_MODEL_DIR", str(model_dir))
    debug, out = tmp_path / "debug.png", tmp_path / "crop.jpg"
    argv = ["crop", str(photo), "--size", "400x300", "--debug", str(debug), "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["original"] == [600, 400]
    x0, y0, x1, y1 = report["box"]
    assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 400
    assert report["path"] in ("smart", "low-confidence")
    assert {"decode", "infer", "search"} <= set(report["timings_ms"])
    crop = pyvips.Image.new_from_file(str(out))
    assert (crop.width, crop.height) == (400, 300)
    overlay = pyvips.Image.new_from_file(str(debug))
    assert overlay.width == 800 and overlay.bands == 3


def test_cli_errors(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setenv("HEATCROP_ENGINE_MODEL_DIR", str(model_dir))
    assert cli.main(["crop", str(tmp_path / "missing.jpg"), "--size", "400x300"]) == 2
    assert "source not found" in capsys.readouterr().err
    text = tmp_path / "a.jpg"
    text.write_text("hello")
    assert cli.main(["crop", str(text), "--size", "400x300"]) == 2
    assert "not an image" in capsys.readouterr().err
    assert cli.main(["crop", str(text), "--size=-1x3"]) == 2
    assert "size" in capsys.readouterr().err
    monkeypatch.setenv("HEATCROP_KERNEL_MIN_SCALE", "7")
    assert cli.main(["crop", str(text), "--size", "4x3"]) == 2
    assert "HEATCROP_KERNEL_MIN_SCALE" in capsys.readouterr().err


def test_cli_no_crop_size(tmp_path, model_dir, coffee, monkeypatch, capsys):
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(coffee)
    monkeypatch.setenv("HEATCROP_ENGINE_MODEL_DIR", str(model_dir))
    assert cli.main(["crop", str(photo), "--size", "400x0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["box"] == [0, 0, 600, 400] and report["path"] == "no-crop"


def test_settings_default_profile_is_a_search_profile():
    from sidecar.core import SEARCH_PROFILES

    assert Settings().engine.profile in SEARCH_PROFILES
