"""Control images: canny, sketch, OpenPose drawing and COCO mapping, pose/depth estimators, masks, fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from photomaker.control_images import (
    COCO_KEYPOINT_NAMES,
    LIMB_COLOR_FACTOR,
    OPENPOSE_COLORS,
    OPENPOSE_KEYPOINT_NAMES,
    OPENPOSE_LIMBS,
    canny_edges,
    coco_to_openpose,
    depth_map,
    draw_openpose,
    face_mask,
    fit_to_size,
    looks_like_pose_skeleton,
    mask_face,
    pose_map,
    prepare_control_image,
    prepare_mask,
    sketch_to_adapter_input,
)
from photomaker.errors import ControlImageError, MaskError, NoFaceError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tiny_pose_estimator(tmp_path_factory):
    """A tiny ViTPose saved to disk and loaded through the registry, as a Hub checkpoint would be."""
    from photomaker.control_models import ControlModelRegistry
    from photomaker.testing_control import save_tiny_pose_model

    folder = save_tiny_pose_model(tmp_path_factory.mktemp("pose"))
    return ControlModelRegistry(overrides={"pose_estimator": folder, "person_detector": "none"}).pose_estimator()


@pytest.fixture(scope="module")
def tiny_depth_estimator(tmp_path_factory):
    from photomaker.control_models import ControlModelRegistry
    from photomaker.testing_control import save_tiny_depth_model

    folder = save_tiny_depth_model(tmp_path_factory.mktemp("depth"))
    return ControlModelRegistry(overrides={"depth_estimator": folder}).depth_estimator()


def _square_image(size: int = 64, lo: int = 16, hi: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((lo, lo, hi - 1, hi - 1), fill="white")
    return image


# ------------------------------------------------------------------------------------------------ canny


def test_canny_marks_the_border_of_a_square_and_nothing_else():
    edges = np.asarray(canny_edges(_square_image()))
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    lit_rows, lit_cols = np.nonzero(edges[..., 0])
    # Every edge pixel lies within one pixel of the square's border (rows/cols 15..16 and 47..48).
    on_border = (np.minimum(np.abs(lit_rows - 15.5), np.abs(lit_rows - 47.5)) <= 1) | (
        np.minimum(np.abs(lit_cols - 15.5), np.abs(lit_cols - 47.5)) <= 1
    )
    assert on_border.all()
    assert edges[32, 14:18, 0].any() and edges[32, 46:50, 0].any()  # left and right sides found
    assert not edges[20:44, 20:44].any() and not edges[:10, :10].any()  # inside and outside stay black


def test_canny_rejects_inverted_thresholds():
    with pytest.raises(ControlImageError, match="low <= high"):
        canny_edges(_square_image(), low_threshold=200, high_threshold=100)


# ----------------------------------------------------------------------------------------------- sketch


def test_sketch_from_dark_strokes_on_light_is_white_on_black_thresholded_at_half():
    drawing = Image.new("L", (32, 32), 255)
    drawing.putpixel((5, 10), 0)  # black stroke
    drawing.putpixel((6, 10), 100)  # dark grey: 1 - 100/255 = 0.61 > 0.5 -> stroke
    drawing.putpixel((7, 10), 160)  # light grey: 0.37 -> background
    result = sketch_to_adapter_input(drawing)
    pixels = np.asarray(result.image)
    assert pixels.shape == (32, 32, 3) and result.notes == ()
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[10, 5] = expected[10, 6] = 255
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)


def test_sketch_from_a_transparent_canvas_uses_the_alpha_channel():
    canvas = np.zeros((32, 32, 4), dtype=np.uint8)
    canvas[:, 3] = (0, 0, 0, 255)  # opaque black stroke
    canvas[:, 20] = (255, 255, 255, 100)  # faint white stroke: alpha 0.39 -> not a stroke
    canvas[:, 25] = (255, 255, 255, 200)  # white but opaque enough: a stroke whatever its colour
    pixels = np.asarray(sketch_to_adapter_input(Image.fromarray(canvas, "RGBA")).image)[..., 0]
    assert (pixels[:, 3] == 255).all() and (pixels[:, 25] == 255).all()
    assert (np.delete(pixels, [3, 25], axis=1) == 0).all()


def test_sketch_from_an_image_editor_dict_with_and_without_composite():
    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[8, :] = (0, 0, 0, 255)
    background = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    value = {"background": background, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}
    from_layers = np.asarray(sketch_to_adapter_input(value).image)[..., 0]
    value["composite"] = Image.fromarray(layer, "RGBA")
    from_composite = np.asarray(sketch_to_adapter_input(value).image)[..., 0]
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[8, :] = 255
    np.testing.assert_array_equal(from_layers, expected)
    np.testing.assert_array_equal(from_composite, expected)


def test_sketch_is_resized_to_the_output_and_the_user_is_told():
    drawing = Image.new("L", (32, 32), 255)
    ImageDraw.Draw(drawing).line((0, 16, 31, 16), fill=0, width=2)
    result = sketch_to_adapter_input(drawing, 64, 64)
    assert result.image.size == (64, 64)
    assert result.notes == ("The sketch (32x32) was resized to 64x64, the output size.",)
    assert np.asarray(result.image)[32, :, 0].all()


def test_an_empty_sketch_is_refused():
    with pytest.raises(ControlImageError, match="sketch is empty"):
        sketch_to_adapter_input(Image.new("RGB", (16, 16), "white"))
    with pytest.raises(ControlImageError, match="canvas is empty"):
        sketch_to_adapter_input({"background": None, "layers": [], "composite": None})


# ---------------------------------------------------------------------------------------------- fitting


def test_fit_keeps_same_size_and_resizes_same_aspect_with_a_note():
    image = Image.new("RGB", (32, 16))
    assert fit_to_size(image, 32, 16) == (image, None)
    resized, note = fit_to_size(image, 64, 32)
    assert resized.size == (64, 32) and note == "The control image (32x16) was resized to 64x32, the output size."


def test_fit_crops_the_centre_of_another_aspect():
    image = Image.new("RGB", (90, 30), "black")
    ImageDraw.Draw(image).rectangle((30, 0, 59, 29), fill=(255, 0, 0))  # the centre third is red
    fitted, note = fit_to_size(image, 60, 60)
    assert fitted.size == (60, 60)
    assert np.asarray(fitted)[5:55, 5:55, 0].min() == 255 and np.asarray(fitted)[..., 1].max() == 0
    assert note == (
        "The control image (90x30) has another aspect ratio than the 60x60 output: its centre (30x30) was "
        "cropped and resized to 60x60."
    )


def test_fit_pads_with_black_when_asked():
    fitted, note = fit_to_size(Image.new("RGB", (40, 20), "white"), 40, 40, fit="pad")
    pixels = np.asarray(fitted)[..., 0]
    assert fitted.size == (40, 40)
    assert (pixels[:10] == 0).all() and (pixels[30:] == 0).all() and (pixels[10:30] == 255).all()
    assert "padded with black" in note


# ------------------------------------------------------------------------------------------------- pose


def test_coco_to_openpose_reorders_keypoints_and_puts_the_neck_between_the_shoulders():
    coco = np.array([[float(i), float(10 * i)] for i in range(17)])
    scores = np.linspace(0.1, 0.9, 17)
    points, out_scores = coco_to_openpose(coco, scores)
    assert points.shape == (18, 2) and out_scores.shape == (18,)
    expected_order = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    for openpose_index, coco_index in enumerate(expected_order):
        if coco_index is None:
            continue
        assert OPENPOSE_KEYPOINT_NAMES[openpose_index] == COCO_KEYPOINT_NAMES[coco_index]
        np.testing.assert_array_equal(points[openpose_index], coco[coco_index])
        assert out_scores[openpose_index] == np.float32(scores[coco_index])
    np.testing.assert_allclose(points[1], [5.5, 55.0])  # mean of left (5) and right (6) shoulders
    assert out_scores[1] == np.float32(min(scores[5], scores[6]))


def test_each_limb_is_drawn_in_its_openpose_colour_at_60_percent_and_keypoints_at_full():
    assert len(OPENPOSE_LIMBS) == 17
    for limb_index, (a, b) in enumerate(OPENPOSE_LIMBS):
        points = np.zeros((18, 2), dtype=np.float32)
        scores = np.zeros(18, dtype=np.float32)
        points[a], points[b] = (10, 32), (54, 32)
        scores[a] = scores[b] = 1.0
        pixels = np.asarray(draw_openpose((64, 64), [(points, scores)]))
        expected_limb = tuple(int(c * LIMB_COLOR_FACTOR) for c in OPENPOSE_COLORS[limb_index])
        assert tuple(pixels[32, 32]) == expected_limb, f"limb {limb_index} ({a}-{b})"
        assert tuple(pixels[32, 10]) == OPENPOSE_COLORS[a] and tuple(pixels[32, 54]) == OPENPOSE_COLORS[b]
        assert tuple(pixels[5, 5]) == (0, 0, 0)


def test_limb_thickness_follows_openpose_s_4_px_per_512():
    points = np.zeros((18, 2), dtype=np.float32)
    scores = np.zeros(18, dtype=np.float32)
    points[1], points[2] = (100, 256), (400, 256)
    scores[1] = scores[2] = 1.0
    for side, half_width in ((512, 4), (1024, 8)):
        pixels = np.asarray(draw_openpose((side, side), [(points, scores)]))
        assert np.count_nonzero(pixels[:, 250].any(axis=-1)) == 2 * half_width + 1


def test_low_scoring_keypoints_and_their_limbs_are_left_out():
    points = np.array([[10 + 2 * i, 32] for i in range(18)], dtype=np.float32)
    points[1], points[2] = (10, 32), (54, 32)
    scores = np.zeros(18, dtype=np.float32)
    scores[1] = 1.0  # neck seen, right shoulder not
    pixels = np.asarray(draw_openpose((64, 64), [(points, scores)], score_threshold=0.3))
    assert tuple(pixels[32, 10]) == OPENPOSE_COLORS[1]
    assert (pixels[:, 20:] == 0).all()


def test_a_ready_made_skeleton_is_recognised_and_passed_through():
    points = np.array([[20 + 3 * (i % 6), 10 + 6 * (i // 6) * 2] for i in range(18)], dtype=np.float32)
    skeleton = draw_openpose((64, 64), [(points, np.ones(18, dtype=np.float32))])
    assert looks_like_pose_skeleton(skeleton)
    assert not looks_like_pose_skeleton(canny_edges(_square_image()))
    assert not looks_like_pose_skeleton(Image.open(EXAMPLES / "astronaut.png"))
    result = prepare_control_image("pose", skeleton, 64, 64)
    assert result.image.tobytes() == skeleton.tobytes()
    assert result.notes == ("The pose image is already an OpenPose skeleton, so it was used as is.",)


def test_pose_estimator_finds_17_keypoints_per_box_and_draws_them(tiny_pose_estimator):
    photo = Image.open(EXAMPLES / "astronaut.png").convert("RGB").resize((96, 96))
    people = tiny_pose_estimator.estimate(photo)
    assert len(people) == 1  # no detector: the whole image is the one person box
    assert people[0].keypoints.shape == (17, 2) and people[0].scores.shape == (17,)
    two = tiny_pose_estimator.estimate(photo, boxes=[(0, 0, 48, 96), (48, 0, 96, 96)])
    assert len(two) == 2
    # ViTPose widens a 48x96 box to its 3:4 input (72x96), then pads by 1.25 (90x120): keypoints map back
    # there, give or take one heatmap cell (90 / 24 px wide), which the sub-pixel refinement may step over.
    for person, centre_x in zip(two, (24, 72), strict=True):
        assert (np.abs(person.keypoints[:, 0] - centre_x) <= 45 + 4).all()
        assert (np.abs(person.keypoints[:, 1] - 48) <= 60 + 5).all()
    assert two[0].keypoints[:, 0].mean() < two[1].keypoints[:, 0].mean()
    drawn = np.asarray(pose_map(photo, tiny_pose_estimator, score_threshold=-np.inf))
    assert drawn.shape == (96, 96, 3)
    palette = {tuple(c) for c in OPENPOSE_COLORS} | {
        tuple(int(v * LIMB_COLOR_FACTOR) for v in c) for c in OPENPOSE_COLORS
    }
    lit = {tuple(p) for p in drawn.reshape(-1, 3) if p.any()}
    assert lit and lit <= palette


def test_pose_from_a_photo_without_a_person_is_refused(tiny_pose_estimator):
    with pytest.raises(ControlImageError, match="no person's pose"):
        pose_map(Image.new("RGB", (48, 64)), tiny_pose_estimator, score_threshold=np.inf)


def test_prepare_pose_fits_the_photo_then_estimates(tiny_pose_estimator):
    photo = Image.open(EXAMPLES / "astronaut.png").convert("RGB")
    with pytest.raises(ControlImageError, match="pose estimator is needed"):
        prepare_control_image("pose", photo, 64, 48)
    result = prepare_control_image("pose", photo, 64, 48, pose_estimator=tiny_pose_estimator)
    assert result.image.size == (64, 48)
    assert "has another aspect ratio" in result.notes[0]


# ------------------------------------------------------------------------------------------------ depth


def test_depth_map_is_normalised_to_0_255_in_three_equal_channels(tiny_depth_estimator):
    photo = Image.open(EXAMPLES / "grace_hopper.jpg").convert("RGB").resize((40, 50))
    pixels = np.asarray(depth_map(photo, tiny_depth_estimator))
    assert pixels.shape == (50, 40, 3) and pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    result = prepare_control_image("depth", photo, 32, 32, depth_estimator=tiny_depth_estimator)
    assert result.image.size == (32, 32) and len(result.notes) == 1


def test_prepare_refuses_unknown_types_and_missing_images():
    with pytest.raises(ControlImageError, match="unknown control type 'scribble'"):
        prepare_control_image("scribble", Image.new("RGB", (8, 8)), 8, 8)
    with pytest.raises(ControlImageError, match="needs a control image"):
        prepare_control_image("canny", None, 8, 8)


def test_prepare_canny_returns_edges_at_the_output_size_from_a_file(tmp_path):
    path = tmp_path / "square.png"
    _square_image(32, 8, 24).save(path)
    result = prepare_control_image("canny", str(path), 64, 64)
    assert result.image.size == (64, 64) and result.notes[0].startswith("The control image (32x32) was resized")
    assert np.asarray(result.image).any()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ControlImageError, match="the control image: not a readable image file"):
        prepare_control_image("canny", str(tmp_path / "broken.png"), 64, 64)


# ------------------------------------------------------------------------------------------------ masks


def test_face_mask_covers_the_grown_face_box_and_feathers_outwards():
    mask = np.asarray(face_mask((100, 100), (40, 40, 60, 60), grow=0.15, feather=0.1))
    assert mask.shape == (100, 100)
    assert mask[50, 50] == 255 and mask[38, 50] == 255 and mask[50, 38] == 255  # grown by 3 px each side
    assert mask[0, 0] == 0 and mask[50, 10] == 0 and mask[90, 50] == 0
    assert 0 < mask[50, 35] < 255  # feathered edge
    hair = np.asarray(face_mask((100, 100), (40, 40, 60, 60), region="face_and_hair"))
    assert hair[30, 50] == 255 and mask[30, 50] == 0  # hair extends upwards only with face_and_hair
    with pytest.raises(MaskError, match="face box"):
        face_mask((100, 100), (60, 40, 40, 60))
    with pytest.raises(MaskError, match="unknown face mask region 'hair'"):
        face_mask((100, 100), (40, 40, 60, 60), region="hair")


@pytest.mark.parametrize("name", ["astronaut.png", "grace_hopper.jpg"])
def test_mask_the_face_covers_the_detected_face(name):
    from photomaker.faces import get_face_analyzer

    analyzer = get_face_analyzer("dlib")
    photo = Image.open(EXAMPLES / name).convert("RGB")
    face = max(analyzer.detect(np.asarray(photo)), key=lambda f: f.area)
    mask = np.asarray(mask_face(photo, analyzer))
    assert mask.shape == (photo.height, photo.width)
    x0, y0, x1, y1 = face.bbox
    ys, xs = np.mgrid[0 : photo.height, 0 : photo.width]
    inside_inscribed = ((xs + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + (
        (ys + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    ) ** 2 <= 1
    assert (mask[inside_inscribed] == 255).all()
    assert (mask[int(y0) : int(y1), int(x0) : int(x1)] >= 128).mean() > 0.95
    assert (mask >= 128).mean() < 0.5  # the rest of the photo is kept


def test_mask_the_face_without_a_face_is_refused():
    from photomaker.faces import get_face_analyzer

    with pytest.raises(NoFaceError, match="no face was found in the target photo"):
        mask_face(Image.new("RGB", (64, 64), (90, 120, 200)), get_face_analyzer("dlib"))


def test_masks_that_change_nothing_or_everything_are_refused():
    with pytest.raises(MaskError, match="empty"):
        prepare_mask(Image.new("L", (16, 16), 0), 16, 16)
    with pytest.raises(MaskError, match="all white"):
        prepare_mask(Image.new("L", (16, 16), 255), 16, 16)
    with pytest.raises(MaskError, match="empty"):
        prepare_mask({"background": None, "layers": [Image.new("RGBA", (16, 16))], "composite": None}, 16, 16)
    with pytest.raises(MaskError, match="empty"):
        prepare_mask({"background": None, "layers": [], "composite": None}, 16, 16)


def test_a_mask_painted_over_the_target_photo_is_the_painted_strokes_only():
    photo = Image.new("RGB", (16, 16), (250, 250, 250))  # bright: read as a mask image it would be all white
    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[2:6, 10:14] = (255, 255, 255, 255)
    composite = photo.convert("RGBA")
    composite.alpha_composite(Image.fromarray(layer, "RGBA"))
    value = {"background": photo, "layers": [Image.fromarray(layer, "RGBA")], "composite": composite}
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[2:6, 10:14] = 255
    np.testing.assert_array_equal(np.asarray(prepare_mask(value, 16, 16).image), expected)
    uploaded = {"background": Image.fromarray(expected), "layers": [], "composite": None}
    np.testing.assert_array_equal(np.asarray(prepare_mask(uploaded, 16, 16).image), expected)


def test_a_drawn_mask_from_the_canvas_uses_the_alpha_and_is_resized_with_a_note():
    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[4:8, 4:8] = (255, 0, 0, 255)
    result = prepare_mask({"background": None, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}, 32, 32)
    pixels = np.asarray(result.image)
    assert result.image.mode == "L" and pixels.shape == (32, 32)
    assert (pixels[9:15, 9:15] == 255).all() and pixels[0, 0] == 0 and pixels[20, 20] == 0
    assert result.notes == ("The mask (16x16) was resized to 32x32, the output size.",)


# ------------------------------------------------------------------------------------- review additions


def test_a_sketch_already_white_on_black_keeps_its_polarity():
    drawing = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(drawing).line((0, 16, 31, 16), fill=255, width=1)
    pixels = np.asarray(sketch_to_adapter_input(drawing).image)[..., 0]
    expected = np.asarray(drawing)
    np.testing.assert_array_equal(pixels, expected)


def test_an_untouched_layer_over_the_target_photo_is_an_empty_mask_not_the_photo():
    photo = Image.open(EXAMPLES / "astronaut.png").convert("RGB").resize((64, 64))
    value = {"background": photo, "layers": [Image.new("RGBA", (64, 64))], "composite": photo}
    with pytest.raises(MaskError, match="the mask is empty"):
        prepare_mask(value, 64, 64)


def test_a_mask_painted_in_an_rgb_mode_editor_is_its_non_black_strokes():
    # gr.ImageEditor(image_mode="RGB") drops a layer's alpha: unpainted pixels arrive as black.
    layer = np.zeros((16, 16, 3), dtype=np.uint8)
    layer[2:6, 10:14] = (255, 0, 0)
    value = {"background": Image.new("RGB", (16, 16), "white"), "layers": [layer], "composite": None}
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[2:6, 10:14] = 255
    np.testing.assert_array_equal(np.asarray(prepare_mask(value, 16, 16).image), expected)


def test_no_person_s_limb_covers_another_person_s_keypoint():
    crossed = np.zeros((18, 2), dtype=np.float32), np.zeros(18, dtype=np.float32)
    crossed[0][0], crossed[1][0] = (32, 32), 1.0  # only the nose, at the centre
    crossing = np.zeros((18, 2), dtype=np.float32), np.zeros(18, dtype=np.float32)
    crossing[0][1], crossing[0][2] = (10, 32), (54, 32)  # neck to right shoulder, through the centre
    crossing[1][[1, 2]] = 1.0
    pixels = np.asarray(draw_openpose((64, 64), [crossed, crossing]))
    assert tuple(pixels[32, 32]) == OPENPOSE_COLORS[0]
    assert tuple(pixels[32, 20]) == tuple(int(c * LIMB_COLOR_FACTOR) for c in OPENPOSE_COLORS[0])


def test_control_images_from_files_get_the_upload_limits_and_keep_a_canvas_s_alpha(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (6500, 6500)).save(huge)  # 42 megapixels, over load_image's 40
    with pytest.raises(ControlImageError, match="the control image: the image is too large"):
        prepare_control_image("canny", str(huge), 64, 64)
    canvas = np.zeros((16, 16, 4), dtype=np.uint8)
    canvas[4:8, 4:8] = (255, 255, 255, 255)  # white strokes on a transparent canvas: only alpha tells them apart
    path = tmp_path / "mask.png"
    Image.fromarray(canvas, "RGBA").save(path)
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[4:8, 4:8] = 255
    np.testing.assert_array_equal(np.asarray(prepare_mask(str(path), 16, 16).image), expected)


@pytest.mark.parametrize("depth_estimation_type", ["relative", "metric"])
def test_depth_map_is_near_bright_whether_the_model_predicts_inverse_depth_or_distance(depth_estimation_type, tmp_path):
    import torch

    from photomaker.control_models import ControlModelRegistry
    from photomaker.testing_control import save_tiny_depth_model

    folder = save_tiny_depth_model(tmp_path, depth_estimation_type=depth_estimation_type)
    estimator = ControlModelRegistry(overrides={"depth_estimator": folder}).depth_estimator()
    photo = Image.open(EXAMPLES / "grace_hopper.jpg").convert("RGB").resize((40, 50))
    with torch.inference_mode():
        predicted = estimator.model(**estimator.processor(images=photo, return_tensors="pt")).predicted_depth
    predicted = torch.nn.functional.interpolate(predicted[:, None], size=(50, 40), mode="bicubic")[0, 0].numpy()
    nearness = predicted if depth_estimation_type == "relative" else 1.0 / np.maximum(predicted, 1e-3)
    expected = (nearness - nearness.min()) / (nearness.max() - nearness.min()) * 255.0
    np.testing.assert_allclose(np.asarray(depth_map(photo, estimator))[..., 0], expected, atol=1.0)


def test_a_sketch_painted_over_a_background_photo_is_its_strokes_whatever_their_colour():
    photo = Image.open(EXAMPLES / "astronaut.png").convert("RGB").resize((32, 32))
    layer = np.zeros((32, 32, 4), dtype=np.uint8)
    layer[10, 4:28] = (255, 230, 0, 255)  # a yellow brush: too light to count as a dark stroke
    composite = photo.convert("RGBA")
    composite.alpha_composite(Image.fromarray(layer, "RGBA"))
    value = {"background": photo, "layers": [Image.fromarray(layer, "RGBA")], "composite": composite}
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[10, 4:28] = 255
    np.testing.assert_array_equal(np.asarray(sketch_to_adapter_input(value).image)[..., 0], expected)


def test_a_phone_photo_s_exif_rotation_is_applied_before_fitting(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored landscape, shown rotated 90 degrees (portrait)
    _square_image(64).resize((64, 32)).save(path, exif=exif)
    result = prepare_control_image("canny", str(path), 32, 64)
    assert result.image.size == (32, 64) and result.notes == ()  # portrait as shown: nothing cropped
