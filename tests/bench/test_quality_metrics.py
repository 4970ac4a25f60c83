"""Crop-quality metrics (training/data.py) and baselines (bench/) on hand-computed and synthetic
cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pyvips

from bench.baselines import (
    CropNotFoundError,
    locate_crop,
    place_window,
    smartcrop_box,
    working_image,
)
from bench.quality import CentreMethod, SmartcropMethod, box_ok, evaluate, markdown_table
from training.data import (
    Box,
    all_dishes_kept,
    bde,
    centre_box,
    drop_first_fixations,
    fixations_kept,
    food_kept,
    iou,
    largest_window,
    load_set,
    union_area,
)

# --- IoU / BDE ------------------------------------------------------------------------------


def test_iou_hand_cases():
    a = Box(0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, Box(10, 0, 20, 10)) == 0.0  # touching edges share no pixel (x1 exclusive)
    assert iou(a, Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(a, Box(2, 2, 7, 7)) == pytest.approx(25 / 100)
    assert iou(Box(0, 0, 4, 2), Box(2, 0, 4, 6)) == pytest.approx(4 / (8 + 12 - 4))


def test_bde_hand_cases():
    gt = Box(10, 0, 100, 40)
    assert bde(gt, gt, 200, 100) == 0.0
    # x0 off by 10 of W=200, y1 off by 10 of H=100.
    assert bde(Box(0, 0, 100, 50), gt, 200, 100) == pytest.approx((10 / 200 + 10 / 100) / 4)
    # Worst case: every edge off by the full side.
    assert bde(Box(0, 0, 0, 0), Box(200, 100, 200, 100), 200, 100) == pytest.approx(1.0)


# --- food kept --------------------------------------------------------------------------------


def test_union_area_counts_overlap_once():
    assert union_area([]) == 0
    assert union_area([Box(0, 0, 10, 10), Box(5, 5, 15, 15)]) == 175
    assert union_area([Box(0, 0, 10, 10), Box(2, 2, 4, 4)]) == 100  # nested
    assert union_area([Box(0, 0, 10, 10)] * 3) == 100  # duplicates
    assert union_area([Box(3, 3, 3, 9), Box(0, 0, 2, 2)]) == 4  # empty box ignored


def test_union_area_matches_raster():
    rng = np.random.default_rng(7)
    for _ in range(50):
        boxes = []
        for _ in range(rng.integers(1, 7)):
            x0, y0 = rng.integers(0, 40, size=2)
            boxes.append(
                Box(int(x0), int(y0), int(x0 + rng.integers(0, 25)), int(y0 + rng.integers(0, 25)))
            )
        mask = np.zeros((70, 70), dtype=bool)
        for b in boxes:
            mask[b.y0 : b.y1, b.x0 : b.x1] = True
        assert union_area(boxes) == mask.sum()


def test_food_kept_uses_union_of_overlapping_dishes():
    dishes = [Box(0, 0, 10, 10), Box(5, 0, 15, 10)]  # union 150 px, 50 px shared
    crop = Box(0, 0, 10, 10)
    # Union: 100 of 150 kept. Summing per-dish areas would say (100 + 50) / 200 = 0.75.
    assert food_kept(crop, dishes) == pytest.approx(100 / 150)
    assert food_kept(Box(0, 0, 15, 10), dishes) == 1.0
    assert food_kept(Box(20, 20, 30, 30), dishes) == 0.0


def test_all_dishes_kept_threshold_per_dish():
    dishes = [Box(0, 0, 10, 10), Box(5, 0, 15, 10)]
    assert not all_dishes_kept(Box(0, 0, 10, 10), dishes)  # second dish keeps 50 %
    assert all_dishes_kept(Box(0, 0, 14, 10), dishes)  # second keeps exactly 90 %
    assert not all_dishes_kept(Box(0, 0, 13, 10), dishes)  # 80 %
    assert all_dishes_kept(Box(0, 0, 13, 10), dishes, threshold=0.8)


# --- fixations --------------------------------------------------------------------------------


def test_drop_first_fixation_of_each_subject():
    fix = np.array([[1, 1, 0], [2, 2, 0], [3, 3, 1], [4, 4, 0], [5, 5, 1], [6, 6, 2]], float)
    kept = drop_first_fixations(fix)
    assert kept.tolist() == [[2, 2, 0], [4, 4, 0], [5, 5, 1]]
    assert len(drop_first_fixations(np.zeros((0, 3)))) == 0


def test_fixations_kept_edges_exclusive():
    crop = Box(10, 10, 20, 20)
    pts = np.array([[10, 10], [19.9, 19.9], [20, 15], [15, 20], [9.99, 15], [15, 15]], float)
    assert fixations_kept(crop, pts) == pytest.approx(3 / 6)


def test_load_set_removes_first_fixations(tmp_path):
    root = tmp_path / "sal"
    (root / "images").mkdir(parents=True)
    entry = {
        "image": "a.jpg",
        "width": 100,
        "height": 50,
        "boxes": [[10, 10, 90, 40]],
        "kind": "saliency",
        "fixations_xy_subject": [[50, 25, 0], [10, 10, 0], [50, 25, 1], [80, 40, 1], [81, 41, 1]],
    }
    (root / "manifest.json").write_text(json.dumps([entry, {**entry, "image": "b.jpg"}]))
    es = load_set(tmp_path, "sal", limit=1)
    assert len(es.items) == 1
    assert es.items[0].fixations.tolist() == [[10, 10, 0], [80, 40, 1], [81, 41, 1]]
    assert es.protocol.aspects(es.items[0]) == {
        "1:1": 1.0,
        "4:5": 0.8,
        "16:9": 16 / 9,
        "9:16": 9 / 16,
    }


def test_load_set_rejects_box_outside_image(tmp_path):
    (tmp_path / "s").mkdir()
    entry = {
        "image": "a.jpg",
        "width": 100,
        "height": 50,
        "boxes": [[10, 10, 101, 40]],
        "kind": "crop",
    }
    (tmp_path / "s" / "manifest.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="outside"):
        load_set(tmp_path, "s")


# --- centre crop: aspect exactness, clamping --------------------------------------------------


@pytest.mark.parametrize("aspect", [1.0, 4 / 5, 16 / 9, 9 / 16, 3 / 2, 0.3, 5.0])
def test_largest_window_exact_aspect_and_full_side(aspect):
    rng = np.random.default_rng(int(aspect * 1000))
    for w, h in [(1, 1), (2, 3), (1600, 1067), (1067, 1600), *rng.integers(1, 3000, (100, 2))]:
        w, h = int(w), int(h)
        cw, ch = largest_window(w, h, aspect)
        assert 1 <= cw <= w and 1 <= ch <= h
        assert cw == w or ch == h  # largest: one side is the image's
        # Exact within rounding of the free side.
        if ch == h and cw < w:
            assert abs(cw - max(1.0, h * aspect)) <= 0.5
        elif cw == w and ch < h:
            assert abs(ch - max(1.0, w / aspect)) <= 0.5
        box = centre_box(w, h, aspect)
        assert box.inside(w, h)
        assert abs((box.x0 + box.x1) - w) <= 1 and abs((box.y0 + box.y1) - h) <= 1


def test_place_window_clamps_to_image():
    assert place_window(-500, 300, 1600, 800, 1.0) == Box(0, 0, 800, 800)
    assert place_window(5000, -9, 1600, 800, 1.0) == Box(800, 0, 1600, 800)
    assert place_window(1000, 400, 1600, 800, 1.0) == Box(600, 0, 1400, 800)
    assert place_window(400, 1e9, 800, 1600, 16 / 9) == Box(0, 1150, 800, 1600)


def test_box_ok():
    assert box_ok(Box(0, 0, 800, 800), 1600, 800, 1.0)
    assert box_ok(Box(0, 0, 801, 800), 1600, 800, 1.0)  # within a pixel
    assert not box_ok(Box(0, 0, 810, 800), 1600, 800, 1.0)
    assert not box_ok(Box(900, 0, 1700, 800), 1600, 800, 1.0)  # out of bounds


# --- libvips smartcrop box recovery -----------------------------------------------------------


def _photo(width: int, height: int, patch: Box, seed: int = 0) -> pyvips.Image:
    """Flat grey with a saturated, noisy patch: attention and entropy both want the patch."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, (patch.height, patch.width, 3), dtype=np.uint8)
    noise[..., 0] = np.maximum(noise[..., 0], 200)  # saturated red: attention's colour cue
    pixels[patch.y0 : patch.y1, patch.x0 : patch.x1] = noise
    return pyvips.Image.new_from_array(pixels, interpretation="srgb")


def test_locate_crop_exact_offsets():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    assert locate_crop(image, image[:, 17:57]) == (17, 0)
    assert locate_crop(image, image[23:53, :]) == (0, 23)
    assert locate_crop(image[..., 0], image[:, 5:65, 0]) == (5, 0)  # one band


def test_locate_crop_refuses_pixels_not_in_image():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    crop = image[:, 10:50].copy()
    crop[30, 5, 1] ^= 1
    with pytest.raises(CropNotFoundError):
        locate_crop(image, crop)
    with pytest.raises(ValueError, match="neither axis"):
        locate_crop(image, image[5:50, 5:50])


def test_locate_crop_flat_image_prefers_centre():
    image = np.zeros((40, 100, 3), dtype=np.uint8)
    assert locate_crop(image, image[:, :40]) == (30, 0)


@pytest.mark.parametrize("interesting", ["attention", "entropy"])
def test_smartcrop_box_known_answer(tmp_path, interesting):
    # 1600x800 original (working copy 512x256); the patch hugs the right edge, so the 1:1
    # largest window must be the right half, in original pixels.
    path = tmp_path / "right.png"
    _photo(1600, 800, Box(1350, 250, 1600, 550)).write_to_file(str(path))
    work = working_image(path)
    assert (work.width, work.height) == (512, 256)
    assert smartcrop_box(work, 1600, 800, 1.0, interesting) == Box(800, 0, 1600, 800)
    path = tmp_path / "left.png"
    _photo(1600, 800, Box(0, 250, 250, 550)).write_to_file(str(path))
    assert smartcrop_box(working_image(path), 1600, 800, 1.0, interesting) == Box(0, 0, 800, 800)


@pytest.mark.parametrize("interesting", ["attention", "entropy"])
def test_smartcrop_box_vertical_axis(tmp_path, interesting):
    path = tmp_path / "tall.png"
    _photo(600, 1500, Box(100, 1300, 500, 1500)).write_to_file(str(path))
    box = smartcrop_box(working_image(path), 600, 1500, 16 / 9, interesting)
    assert box == Box(0, 1500 - round(600 / (16 / 9)), 600, 1500)


@pytest.mark.parametrize("interesting", ["attention", "entropy"])
def test_smartcrop_offset_agrees_with_libvips_metadata(interesting):
    # Independent check of the pixel matching: libvips' extract_area records -left/-top in
    # the output's xoffset/yoffset. The patch sits off-centre but away from the borders.
    for seed, patch in enumerate([Box(700, 100, 900, 300), Box(250, 150, 400, 350)]):
        image = _photo(1200, 400, patch, seed).copy_memory()
        crop = image.smartcrop(400, 400, interesting=interesting)
        left, top = locate_crop(image.numpy(), crop.numpy())
        assert (left, top) == (-crop.xoffset, -crop.yoffset)
        assert left <= patch.x0 and left + 400 >= patch.x1  # the patch is in the crop


def test_smartcrop_box_exact_aspect_on_odd_sizes(tmp_path):
    path = tmp_path / "odd.png"
    _photo(1237, 811, Box(900, 300, 1100, 500)).write_to_file(str(path))
    work = working_image(path)
    for aspect in [1.0, 4 / 5, 16 / 9, 9 / 16, 1237 / 811]:
        box = smartcrop_box(work, 1237, 811, aspect, "attention")
        assert box_ok(box, 1237, 811, aspect)
        assert (box.width, box.height) == largest_window(1237, 811, aspect)


# --- harness on a synthetic set ---------------------------------------------------------------


def test_evaluate_scores_baselines_per_image(tmp_path):
    root = tmp_path / "food"
    (root / "images").mkdir(parents=True)
    entries = []
    for i, patch in enumerate([Box(1350, 250, 1600, 550), Box(600, 300, 900, 500)]):
        _photo(1600, 800, patch, i).write_to_file(str(root / "images" / f"{i}.png"))
        entries.append(
            {
                "image": f"{i}.png",
                "width": 1600,
                "height": 800,
                "boxes": [patch.as_list()],
                "kind": "object",
            }
        )
    (root / "manifest.json").write_text(json.dumps(entries))
    result = evaluate(
        load_set(tmp_path, "food"), [CentreMethod(), SmartcropMethod("entropy")], progress=False
    )
    # Centre 1:1 is x in [400, 1200): the first patch is outside, the second inside.
    assert result.per_image("centre", "kept", "1:1").tolist() == [0.0, 1.0]
    assert result.per_image("libvips entropy", "kept", "1:1").tolist() == [1.0, 1.0]
    assert result.mean("centre", "all90", "1:1") == 0.5
    assert math.isclose(
        result.mean("centre", "kept"),
        np.mean([result.mean("centre", "kept", a) for a in result.aspect_labels]),
    )
    table = markdown_table(result)
    assert "| libvips entropy | **1.000** |" in table
    assert "+0.500 ±" in table  # entropy minus centre on 1:1 / 4:5 drives the paired delta


def test_centre_box_is_the_services_centre_crop():
    # The "low conf → centre" rows use the service's centre; the baseline must be the same box.
    from kernels.window import center_box

    rng = np.random.default_rng(3)
    for w, h in rng.integers(1, 4000, (500, 2)):
        for aspect in (1.0, 4 / 5, 16 / 9, 9 / 16, 1.3):
            assert Box.of(center_box(int(w), int(h), aspect)) == centre_box(int(w), int(h), aspect)


def test_gallery_draw_box_frames_inside_and_clamps():
    from bench.gallery import draw_box

    pixels = np.zeros((50, 100, 3), dtype=np.uint8)
    draw_box(pixels, Box(20, 10, 60, 30), 0.5, (255, 0, 0), 1)  # display box 10,5 .. 30,15
    red = pixels[..., 0] > 0
    assert red[5, 10:30].all() and red[14, 10:30].all() and red[5:15, 10].all()
    assert red[5:15, 29].all() and not red[6:14, 11:29].any() and red.sum() == 56
    pixels[:] = 0
    draw_box(pixels, Box(0, 0, 400, 400), 0.5, (0, 255, 0), 2)  # beyond the image: clamped
    assert pixels[0, :, 1].all() and pixels[49, :, 1].all() and pixels[:, 99, 1].all()


def test_smartcrop_box_refuses_a_working_copy_of_another_shape(tmp_path):
    path = tmp_path / "p.png"
    _photo(800, 400, Box(0, 0, 100, 100)).write_to_file(str(path))
    with pytest.raises(ValueError, match="not 400x800"):
        smartcrop_box(working_image(path), 400, 800, 1.0, "attention")
