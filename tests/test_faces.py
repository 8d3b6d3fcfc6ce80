"""Faces with the dlib backend on real portraits: detection, landmarks, identity, ID-photo preparation, score.

Also the pure crop geometry. The dlib models load once per test session (get_face_analyzer caches them).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from faces_fixtures import ASTRONAUT, GRACE_HOPPER
from PIL import Image

from photomaker.errors import (
    FaceModelUnavailableError,
    IDImageError,
    InvalidRequestError,
    NoFaceError,
)
from photomaker.faces import (
    DEFAULT_FACE_FRACTION,
    Face,
    FaceAnalyzer,
    crop_image,
    face_crop_box,
    get_face_analyzer,
    identity_outliers,
    identity_score,
    prepare_id_photos,
    score_images,
    select_confident_faces,
)
from photomaker.faces.dlib_backend import DlibFaceAnalyzer
from photomaker.faces.geometry import (
    ARCFACE_TEMPLATE_112,
    similarity_transform,
    transform_points,
)
from photomaker.faces.insightface_backend import InsightFaceAnalyzer
from photomaker.images import load_image

# Hand-checked face regions of the example portraits (x0, y0, x1, y1): forehead to chin, cheek to cheek.
ASTRONAUT_FACE = (175, 70, 275, 185)
GRACE_FACE = (160, 120, 380, 360)


@pytest.fixture(scope="module")
def dlib_analyzer() -> FaceAnalyzer:
    return get_face_analyzer("dlib")


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path))


def _no_face_image() -> Image.Image:
    ys, xs = np.mgrid[0:300, 0:400]
    sky = np.stack([xs * 0.3 + 60, ys * 0.2 + 120, np.full_like(xs, 220.0)], axis=-1)
    return Image.fromarray(sky.clip(0, 255).astype(np.uint8))


def _centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _contains(outer: tuple[float, ...], inner: tuple[float, ...]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


# ---------------------------------------------------------------- crop geometry (pure)


def test_small_face_gets_a_square_crop_centred_on_it() -> None:
    box = face_crop_box((500, 300, 560, 380), (1600, 1200))
    left, top, right, bottom = box
    assert right - left == bottom - top == round(80 / DEFAULT_FACE_FRACTION + 0.5)
    assert np.allclose(_centre(box), (530, 340), atol=1)
    assert _contains(box, (500, 300, 560, 380))


def test_face_filling_the_photo_is_left_nearly_whole() -> None:
    assert face_crop_box((40, 30, 470, 490), (512, 512)) == (0, 0, 512, 512)
    # portrait photo: the square shrinks to the shorter side and keeps the face
    box = face_crop_box((60, 100, 440, 560), (512, 700))
    assert box[2] - box[0] == 512 and _contains(box, (60, 100, 440, 560))


def test_face_at_the_edge_shifts_the_crop_inside_the_image() -> None:
    box = face_crop_box((0, 5, 50, 60), (400, 300))
    assert box[0] == 0 and box[1] == 0
    assert _contains(box, (0, 5, 50, 60)) and box[2] <= 400 and box[3] <= 300


def test_face_wider_than_the_photo_is_tall_is_padded_not_cut_or_distorted() -> None:
    pixels = np.zeros((200, 600, 3), np.uint8)
    pixels[:, 150:450] = (10, 200, 30)  # "the face": 300 px wide, the full 200 px height
    image = Image.fromarray(pixels)
    box = face_crop_box((150, 0, 450, 200), image.size)
    assert box[2] - box[0] == box[3] - box[1] == 300
    crop = np.asarray(crop_image(image, box))
    assert crop.shape == (300, 300, 3)
    assert (crop[:50] == 255).all() and (crop[-50:] == 255).all()  # white padding above and below
    assert (crop[50:250] == (10, 200, 30)).all()  # the whole face, unscaled


def test_crop_box_invariants_on_random_faces() -> None:
    rng = np.random.default_rng(7)
    for _ in range(500):
        width, height = rng.integers(20, 2000, size=2)
        x0, x1 = np.sort(rng.uniform(-20, width + 20, size=2))
        y0, y1 = np.sort(rng.uniform(-20, height + 20, size=2))
        fraction = float(rng.uniform(0.2, 1.0))
        box = face_crop_box((x0, y0, x1, y1), (int(width), int(height)), fraction)
        side = box[2] - box[0]
        assert side == box[3] - box[1] > 0
        clamped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
        assert _contains(box, clamped)
        # The documented size: face side / fraction, shrunk to the image's shorter side but never below the face.
        fx0, fy0 = min(max(np.floor(x0), 0), width - 1), min(max(np.floor(y0), 0), height - 1)
        face_side = max(max(min(np.ceil(x1), width), fx0 + 1) - fx0, max(min(np.ceil(y1), height), fy0 + 1) - fy0)
        assert side == max(min(int(np.ceil(face_side / fraction)), width, height), face_side)
        # Inside the image along every axis where the square fits.
        if side <= width:
            assert 0 <= box[0] and box[2] <= width
        if side <= height:
            assert 0 <= box[1] and box[3] <= height


def test_face_fraction_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="face_fraction"):
        face_crop_box((0, 0, 10, 10), (100, 100), face_fraction=1.5)


def test_similarity_transform_recovers_a_known_transform_and_never_reflects() -> None:
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 100, size=(5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ (scale * rotation).T + shift
    matrix = similarity_transform(points, moved)
    assert np.allclose(transform_points(matrix, points), moved, atol=1e-9)
    mirrored = points * [-1, 1]
    assert np.linalg.det(similarity_transform(points, mirrored)[:, :2]) > 0


def test_similarity_transform_is_the_least_squares_fit_on_noisy_points() -> None:
    """With noise no transform is exact: the result must be the least-squares similarity (as ArcFace's alignment)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        source = rng.uniform(0, 300, size=(5, 2))
        target = np.asarray(ARCFACE_TEMPLATE_112) + rng.normal(0, 3, size=(5, 2))
        # Unknowns (a, b, tx, ty) of [[a, -b, tx], [b, a, ty]]: a plain linear least-squares problem.
        rows = np.zeros((10, 4))
        rows[0::2] = np.column_stack([source[:, 0], -source[:, 1], np.ones(5), np.zeros(5)])
        rows[1::2] = np.column_stack([source[:, 1], source[:, 0], np.zeros(5), np.ones(5)])
        a, b, tx, ty = np.linalg.lstsq(rows, target.reshape(-1), rcond=None)[0]
        expected = np.array([[a, -b, tx], [b, a, ty]])
        assert np.allclose(similarity_transform(source, target), expected, atol=1e-9)


# ---------------------------------------------------------------- dlib detection and landmarks


@pytest.mark.parametrize(("path", "face_region"), [(ASTRONAUT, ASTRONAUT_FACE), (GRACE_HOPPER, GRACE_FACE)])
def test_example_portraits_give_plausible_boxes_and_landmarks(
    dlib_analyzer: FaceAnalyzer, path: Path, face_region: tuple[int, int, int, int]
) -> None:
    rgb = _rgb(path)
    faces = dlib_analyzer.detect(rgb)
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.bbox
    assert 0 <= x0 < x1 <= rgb.shape[1] and 0 <= y0 < y1 <= rgb.shape[0]
    region_width = face_region[2] - face_region[0]
    assert np.linalg.norm(_centre(face.bbox) - _centre(face_region)) < 0.2 * region_width
    assert 0.6 * region_width < face.width < 1.2 * region_width
    assert face.area == pytest.approx(face.width * face.height)

    marks = face.landmarks
    assert marks.shape == (5, 2) and marks.dtype == np.float32
    left_eye, right_eye, nose, left_mouth, right_mouth = marks
    assert left_eye[0] < nose[0] < right_eye[0]  # viewer's left eye first
    assert left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])  # eyes, nose, mouth
    assert (marks[:, 0] >= x0).all() and (marks[:, 0] <= x1).all()
    assert (marks[:, 1] >= y0).all() and (marks[:, 1] <= y1).all()


def test_approximate_mouth_corners_are_close_to_the_68_point_model() -> None:
    precise = DlibFaceAnalyzer(precise_landmarks=True)
    assert "no commercial use" in precise.licence
    approximate = get_face_analyzer("dlib")
    for path in (ASTRONAUT, GRACE_HOPPER):
        rgb = _rgb(path)
        rough, exact = approximate.detect(rgb)[0].landmarks, precise.detect(rgb)[0].landmarks
        eye_distance = np.linalg.norm(exact[1] - exact[0])
        error = np.linalg.norm(rough - exact, axis=1) / eye_distance
        assert (error[:2] < 0.1).all(), error  # eye centres agree
        assert (error[2:] < 0.35).all(), error  # nose bottom vs tip, approximated mouth corners


def test_cnn_detector_finds_the_face(dlib_analyzer: FaceAnalyzer) -> None:
    small = np.asarray(load_image(GRACE_HOPPER).resize((256, 300)))
    faces = DlibFaceAnalyzer(detector="cnn").detect(small)
    assert len(faces) == 1
    hog_box = np.array(dlib_analyzer.detect(_rgb(GRACE_HOPPER))[0].bbox) * 0.5
    assert np.linalg.norm(_centre(faces[0].bbox) - _centre(tuple(hog_box))) < 20


def test_missing_dlib_models_say_which_files_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FaceModelUnavailableError, match=r"shape_predictor_5_face_landmarks\.dat.*pip install"):
        DlibFaceAnalyzer(tmp_path)


def test_analyzer_is_cached_and_backend_names_are_checked() -> None:
    assert get_face_analyzer("dlib") is get_face_analyzer()
    with pytest.raises(InvalidRequestError, match="unknown face backend 'mtcnn'"):
        get_face_analyzer("mtcnn")  # type: ignore[arg-type]


def test_detector_input_is_checked(dlib_analyzer: FaceAnalyzer) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        dlib_analyzer.detect(np.zeros((10, 10), np.uint8))


# ---------------------------------------------------------------- identity


def test_mirrored_recropped_copy_is_the_same_person_and_the_two_people_differ(dlib_analyzer: FaceAnalyzer) -> None:
    def embedding(image: Image.Image) -> np.ndarray:
        rgb = np.asarray(image)
        return dlib_analyzer.embed(rgb, dlib_analyzer.detect(rgb)[0])

    grace = load_image(GRACE_HOPPER)
    astronaut = load_image(ASTRONAUT)
    copy = grace.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((60, 60, 480, 560)).resize((336, 400))
    grace_e, copy_e, astronaut_e = embedding(grace), embedding(copy), embedding(astronaut)
    assert grace_e.shape == (128,)
    assert dlib_analyzer.is_same_person(grace_e, copy_e)
    assert dlib_analyzer.distance(grace_e, copy_e) < 0.4
    assert not dlib_analyzer.is_same_person(grace_e, astronaut_e)
    assert dlib_analyzer.similarity(grace_e, copy_e) > dlib_analyzer.similarity(grace_e, astronaut_e)


# ---------------------------------------------------------------- ID photo preparation


def test_photos_are_cropped_around_the_face_and_keep_their_order(dlib_analyzer: FaceAnalyzer) -> None:
    prepared = prepare_id_photos([GRACE_HOPPER, ASTRONAUT], dlib_analyzer)
    assert prepared.face_embeds is None  # embedded for the one-person check, but not handed out unasked
    assert len(prepared.warnings) == 1 and "do not look like the same person" in prepared.warnings[0]
    for image, face, path in zip(prepared.images, prepared.faces, (GRACE_HOPPER, ASTRONAUT), strict=True):
        original = load_image(path)
        box = face_crop_box(face.bbox, original.size)
        assert _contains(box, face.bbox)
        assert image.size[0] == image.size[1] < min(original.size)
        assert np.array_equal(np.asarray(image), np.asarray(original.crop(box)))
        # the face fills about DEFAULT_FACE_FRACTION of the crop's side
        assert face.width / image.width == pytest.approx(DEFAULT_FACE_FRACTION, abs=0.02)
    assert prepared.faces[0].width > prepared.faces[1].width  # Grace first, as given


def test_crop_false_keeps_the_photos_whole(dlib_analyzer: FaceAnalyzer) -> None:
    prepared = prepare_id_photos([ASTRONAUT], dlib_analyzer, crop=False)
    assert np.array_equal(np.asarray(prepared.images[0]), _rgb(ASTRONAUT))


def test_embeddings_stay_aligned_with_the_photos(dlib_analyzer: FaceAnalyzer) -> None:
    mirrored = load_image(GRACE_HOPPER).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    prepared = prepare_id_photos([GRACE_HOPPER, ASTRONAUT, mirrored], dlib_analyzer, need_embeddings=True)
    embeds = prepared.face_embeds
    assert embeds is not None and embeds.shape == (3, 128) and embeds.dtype == np.float32
    # computed on the face in the ORIGINAL photo, not on the crop
    original = _rgb(GRACE_HOPPER)
    assert np.array_equal(embeds[0], dlib_analyzer.embed(original, dlib_analyzer.detect(original)[0]))
    assert np.array_equal(prepared.faces[1].embedding, embeds[1])
    assert dlib_analyzer.is_same_person(embeds[0], embeds[2])
    assert not dlib_analyzer.is_same_person(embeds[0], embeds[1])
    assert not dlib_analyzer.is_same_person(embeds[1], embeds[2])


def test_photo_without_a_face_is_refused_by_number_and_name(dlib_analyzer: FaceAnalyzer) -> None:
    with pytest.raises(NoFaceError, match=r"photo 2 \(beach\.jpg\): no face found; use a photo where the face"):
        prepare_id_photos([ASTRONAUT, _no_face_image()], dlib_analyzer, names=["me.png", "beach.jpg"])
    with pytest.raises(NoFaceError, match=r"photo 1: no face found"):
        prepare_id_photos([_no_face_image()], dlib_analyzer)


def test_unreadable_photo_and_empty_list_are_refused(dlib_analyzer: FaceAnalyzer, tmp_path: Path) -> None:
    broken = tmp_path / "scan.jpg"
    broken.write_text("not an image")
    with pytest.raises(IDImageError, match=r"photo 2 \(scan\.jpg\): not a readable image"):
        prepare_id_photos([ASTRONAUT, broken], dlib_analyzer)
    with pytest.raises(IDImageError, match="no ID photos"):
        prepare_id_photos([], dlib_analyzer)


def test_two_faces_use_the_larger_and_warn(dlib_analyzer: FaceAnalyzer) -> None:
    canvas = Image.new("RGB", (900, 520), (128, 128, 128))
    small = load_image(ASTRONAUT).crop((130, 30, 320, 230)).resize((228, 240))  # face about 105 px
    large = load_image(GRACE_HOPPER).crop((100, 80, 440, 420))  # face about 215 px
    canvas.paste(small, (40, 140))
    canvas.paste(large, (500, 90))
    prepared = prepare_id_photos([canvas], dlib_analyzer, names=["group.png"])
    assert prepared.warnings == ["photo 1 (group.png): 2 faces found; using the largest one"]
    face = prepared.faces[0]
    assert _contains((500, 90, 840, 430), face.bbox)
    assert face.width > 150


def test_exif_rotated_photo_is_analysed_upright(dlib_analyzer: FaceAnalyzer, tmp_path: Path) -> None:
    upright = load_image(GRACE_HOPPER)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # sideways pixels ...
    exif = stored.getexif()
    exif[0x0112] = 6  # ... that viewers rotate 90 degrees clockwise for display
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    assert dlib_analyzer.detect(np.asarray(stored)) == []  # the frontal detector needs the upright face
    prepared = prepare_id_photos([path], dlib_analyzer)
    face = prepared.faces[0]
    assert np.linalg.norm(_centre(face.bbox) - _centre(GRACE_FACE)) < 40
    left_eye, right_eye, _, left_mouth, _ = face.landmarks
    assert left_eye[0] < right_eye[0] and left_eye[1] < left_mouth[1]


def test_small_face_is_used_with_a_warning(dlib_analyzer: FaceAnalyzer) -> None:
    canvas = Image.new("RGB", (400, 400), (90, 90, 90))
    canvas.paste(load_image(ASTRONAUT).crop((150, 50, 300, 200)).resize((90, 90)), (150, 150))  # face ~50 px
    prepared = prepare_id_photos([canvas], dlib_analyzer)
    assert len(prepared.warnings) == 1 and "the face is small" in prepared.warnings[0]
    assert prepared.images[0].width < 150


# ---------------------------------------------------------------- identity score


def test_identity_score_of_same_and_different_people(dlib_analyzer: FaceAnalyzer) -> None:
    references = prepare_id_photos([GRACE_HOPPER], dlib_analyzer, need_embeddings=True).face_embeds
    copy = load_image(GRACE_HOPPER).transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((40, 40, 500, 560))
    same = identity_score(copy, references, dlib_analyzer)
    assert same.face_found and same.same_person is True
    assert same.distance < 0.6 and same.similarity > 0.9
    assert same.message.startswith("same person (distance ")
    other = identity_score(ASTRONAUT, references, dlib_analyzer)
    assert other.same_person is False and other.distance > 0.6
    record = json.loads(json.dumps(other.as_dict()))
    assert record["backend"] == "dlib" and record["rule"] == "distance < 0.6" and record["same_person"] is False
    assert record["distance"] == round(other.distance, 4)


def test_identity_score_says_when_there_is_no_face(dlib_analyzer: FaceAnalyzer) -> None:
    references = np.zeros((2, 128), np.float32)
    score = identity_score(_no_face_image(), references, dlib_analyzer)
    assert (score.face_found, score.similarity, score.distance, score.same_person) == (False, None, None, None)
    assert score.message == "no face found in the generated image"
    assert json.loads(json.dumps(score.as_dict()))["face_found"] is False
    with pytest.raises(ValueError, match="512 values but the dlib backend makes 128"):
        identity_score(ASTRONAUT, np.zeros((1, 512)), dlib_analyzer)


def test_score_images_for_the_cli(tmp_path: Path) -> None:
    mirrored = tmp_path / "out.png"
    load_image(GRACE_HOPPER).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    result = score_images([GRACE_HOPPER, GRACE_HOPPER], mirrored, backend="dlib")
    assert result["same_person"] is True and result["num_references"] == 2
    assert result["image"] == str(mirrored) and result["references"] == [str(GRACE_HOPPER)] * 2
    json.dumps(result)

    blank = tmp_path / "blank.png"
    _no_face_image().save(blank)
    with pytest.raises(NoFaceError, match=rf"reference photo 2 \({blank}\): no face found"):
        score_images([GRACE_HOPPER, blank], mirrored)
    with pytest.raises(NoFaceError, match=f"image {blank}: no face found"):
        score_images([GRACE_HOPPER], blank)


def test_face_dataclass_area() -> None:
    face = Face(bbox=(10.0, 20.0, 40.0, 60.0), score=1.0, landmarks=np.zeros((5, 2), np.float32))
    assert face.area == 1200.0 and face.embedding is None
    assert Face(bbox=(5.0, 5.0, 1.0, 1.0), score=1.0, landmarks=np.zeros((5, 2))).area == 0.0


def test_file_objects_are_named_in_messages(dlib_analyzer: FaceAnalyzer) -> None:
    buffer = io.BytesIO()
    _no_face_image().save(buffer, "PNG")
    buffer.seek(0)
    buffer.name = "/uploads/holiday.png"  # what web frameworks set on uploaded files
    with pytest.raises(NoFaceError, match=r"photo 1 \(holiday\.png\)"):
        prepare_id_photos([buffer], dlib_analyzer)


# ---------------------------------------------------------------- which detection is the subject (pure)


def _face(box: tuple[float, float, float, float], score: float) -> Face:
    return Face(bbox=box, score=score, landmarks=np.zeros((5, 2), np.float32))


@pytest.mark.parametrize(
    ("backend", "weak_score", "strong_score"),
    [(DlibFaceAnalyzer, 0.02, 1.41), (DlibFaceAnalyzer, 0.36, 0.8), (InsightFaceAnalyzer, 0.55, 0.92)],
)
def test_a_weak_detection_never_wins_over_a_much_stronger_one(
    backend: type[FaceAnalyzer], weak_score: float, strong_score: float
) -> None:
    weak = _face((100.0, 300.0, 210.0, 410.0), weak_score)  # slightly larger than the real face
    real = _face((170.0, 80.0, 270.0, 180.0), strong_score)
    for order in ([weak, real], [real, weak]):
        assert select_confident_faces(order, backend.min_relative_score) == [real]


@pytest.mark.parametrize(("backend", "scores"), [(DlibFaceAnalyzer, (1.3, 1.44)), (InsightFaceAnalyzer, (0.74, 0.9))])
def test_among_confident_faces_the_largest_comes_first(backend: type[FaceAnalyzer], scores: tuple[float, ...]) -> None:
    large = _face((500.0, 90.0, 716.0, 306.0), scores[0])
    small = _face((100.0, 200.0, 205.0, 305.0), scores[1])
    assert select_confident_faces([small, large], backend.min_relative_score) == [large, small]


def test_confident_face_ranking_edge_cases() -> None:
    twin_a, twin_b = _face((0.0, 0.0, 50.0, 50.0), 0.9), _face((60.0, 0.0, 110.0, 50.0), 0.95)
    assert select_confident_faces([twin_a, twin_b], 0.5) == [twin_b, twin_a]  # same size: higher score first
    assert select_confident_faces([], 0.5) == []
    lone_weak = _face((0.0, 0.0, 50.0, 50.0), 0.01)
    assert select_confident_faces([lone_weak], 0.5) == [lone_weak]  # the only detection is kept
    negative = [_face((0.0, 0.0, 90.0, 90.0), -0.3), _face((0.0, 0.0, 40.0, 40.0), -0.1)]
    assert [f.score for f in select_confident_faces(negative, 0.5)] == [-0.1]  # no positive best: only the best
    with pytest.raises(ValueError, match=r"min_relative_score must be in \[0, 1\], got 1.5"):
        select_confident_faces([twin_a], 1.5)


# ---------------------------------------------------------------- one person in the ID photos?


def test_identity_outliers_name_the_photo_that_differs(dlib_analyzer: FaceAnalyzer) -> None:
    person = np.zeros(128, np.float32)
    same = person.copy()
    same[0] = 0.2  # distance 0.2 < 0.6
    other = person.copy()
    other[1] = 0.9
    other_too = other.copy()
    other_too[2] = 0.1
    assert identity_outliers([person], dlib_analyzer).outliers == []
    assert identity_outliers([person, same], dlib_analyzer).outliers == []
    assert identity_outliers([person, other], dlib_analyzer).outliers == [0, 1]
    assert identity_outliers([person, same, other], dlib_analyzer).outliers == [2]
    assert identity_outliers([other, person, same], dlib_analyzer).outliers == [0]
    assert identity_outliers([person, same, other, other_too], dlib_analyzer).outliers == [0, 1, 2, 3]
    check = identity_outliers([person, same, other], dlib_analyzer)
    assert check.distances[0, 1] == pytest.approx(0.2) and check.distances[1, 0] == pytest.approx(0.2)


def test_two_different_people_get_a_warning_naming_both_photos_and_are_still_used(dlib_analyzer: FaceAnalyzer) -> None:
    prepared = prepare_id_photos([GRACE_HOPPER, ASTRONAUT], dlib_analyzer, names=["grace.jpg", "astro.png"])
    assert len(prepared.images) == 2  # not refused: mixing identities is a feature
    (warning,) = prepared.warnings
    assert warning.startswith("photo 1 (grace.jpg) and photo 2 (astro.png) do not look like the same person (distance")
    assert "same person when distance < 0.6" in warning and "mixes the two faces" in warning


def test_the_odd_photo_out_is_named(dlib_analyzer: FaceAnalyzer) -> None:
    grace = load_image(GRACE_HOPPER)
    mirrored = grace.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    prepared = prepare_id_photos([GRACE_HOPPER, ASTRONAUT, mirrored], dlib_analyzer, need_embeddings=True)
    (warning,) = prepared.warnings
    assert warning.startswith("photo 2 (astronaut.png) (distance ")
    assert "does not look like the same person as the other photos" in warning and "photo 1" not in warning
    assert prepared.face_embeds is not None and prepared.face_embeds.shape == (3, 128)
    assert prepare_id_photos([GRACE_HOPPER, mirrored], dlib_analyzer).warnings == []
