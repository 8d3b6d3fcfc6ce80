"""The InsightFace-compatible ONNX backend, checked with tiny synthetic stand-ins for det_10g and w600k_r50.

The stand-ins (tests/faces_fixtures.py) have the real models' inputs and outputs and a known behaviour: the
detector reports a fixed box and keypoints around each red marker it sees in the input's first (red)
channel; the recogniser is a fixed linear map. No network: the model download is replaced by a stub.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from faces_fixtures import (
    SyntheticDetector,
    build_arcface_model,
    build_scrfd_model,
    expected_embedding,
    red_marker_image,
)

from photomaker.errors import FaceModelUnavailableError
from photomaker.faces import get_face_analyzer, prepare_id_photos
from photomaker.faces import insightface_backend as backend
from photomaker.faces.base import Face
from photomaker.faces.geometry import ARCFACE_TEMPLATE_112, transform_points
from photomaker.faces.insightface_backend import (
    InsightFaceAnalyzer,
    align_face,
    anchor_centres,
    decode_scrfd,
    detection_blob,
    nms,
)

SPEC = SyntheticDetector()


def _model_dir(root: Path, spec: SyntheticDetector = SPEC) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    build_scrfd_model(root / backend.DETECTOR_FILE, spec)
    build_arcface_model(root / backend.RECOGNISER_FILE)
    return root


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> InsightFaceAnalyzer:
    return InsightFaceAnalyzer(_model_dir(tmp_path_factory.mktemp("buffalo")), download=False)


def _expected_face(cell_centre: tuple[float, float], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Box and keypoints the synthetic detector encodes for an anchor at ``cell_centre`` (canvas pixels)."""
    centre = np.array(cell_centre, np.float64)
    left, top, right, bottom = np.array(SPEC.distances) * SPEC.stride
    box = np.array([centre[0] - left, centre[1] - top, centre[0] + right, centre[1] + bottom])
    keypoints = centre + np.array(SPEC.offsets) * SPEC.stride
    return box / scale, keypoints / scale


# ---------------------------------------------------------------- pre-processing


def test_detection_blob_letterboxes_into_the_top_left_and_keeps_rgb_order() -> None:
    wide = np.zeros((240, 320, 3), np.uint8)
    wide[..., 0] = 255  # pure red
    blob, scale = detection_blob(wide, 640)
    assert blob.shape == (1, 3, 640, 640) and blob.dtype == np.float32
    assert scale == (2.0, 2.0)
    assert np.allclose(blob[0, 0, :480], (255 - 127.5) / 128)  # red channel first: the network sees RGB
    assert np.allclose(blob[0, 2, :480], -127.5 / 128)
    assert np.allclose(blob[0, :, 480:], -127.5 / 128)  # black padding below the photo

    tall = np.full((320, 240, 3), 200, np.uint8)
    blob, scale = detection_blob(tall, 640)
    assert scale == (2.0, 2.0)
    assert np.allclose(blob[0, :, :, :480], (200 - 127.5) / 128)
    assert np.allclose(blob[0, :, :, 480:], -127.5 / 128)  # padding to the right

    _, scale = detection_blob(np.zeros((200, 300, 3), np.uint8), 256)
    assert scale == pytest.approx((256 / 300, 170 / 200))  # each axis by its own rounded size


def test_anchor_centres_are_row_major_with_each_centre_per_anchor() -> None:
    centres = anchor_centres(64, 32)
    assert centres.tolist() == [[0, 0], [0, 0], [32, 0], [32, 0], [0, 32], [0, 32], [32, 32], [32, 32]]


# ---------------------------------------------------------------- SCRFD decoding and NMS


def _outputs_with_one_hit(size: int, stride: int, index: int, score: float) -> list[np.ndarray]:
    outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            array = np.zeros((2 * (size // s) ** 2, width), np.float32)
            if s == stride:
                array[index] = {"score": [score], "bbox": [1, 2, 3, 4], "kps": np.arange(10) / 10}[kind]
            outputs.append(array)
    return outputs


def test_decode_scrfd_places_boxes_and_keypoints_from_anchor_centres() -> None:
    size, stride = 128, 16
    index = 2 * (2 * 8 + 3) + 1  # location (x=3, y=2), second anchor
    outputs = _outputs_with_one_hit(size, stride, index, 0.8)
    outputs = [outputs[i][None] if i % 2 else outputs[i] for i in range(9)]  # some with a batch axis
    outputs.reverse()  # order does not matter: outputs are matched by shape
    boxes, scores, keypoints = decode_scrfd(outputs, size, threshold=0.5)
    centre = np.array([3 * 16, 2 * 16])
    assert scores.tolist() == pytest.approx([0.8])
    assert boxes[0].tolist() == [48 - 16, 32 - 32, 48 + 48, 32 + 64]
    assert np.allclose(keypoints[0], centre + (np.arange(10) / 10).reshape(5, 2) * stride)


def test_decode_scrfd_applies_the_threshold_inclusively() -> None:
    assert len(decode_scrfd(_outputs_with_one_hit(64, 8, 5, 0.5), 64)[1]) == 1
    assert len(decode_scrfd(_outputs_with_one_hit(64, 8, 5, 0.49), 64)[1]) == 0


def test_decode_scrfd_refuses_outputs_that_are_not_scrfd() -> None:
    with pytest.raises(FaceModelUnavailableError, match=r"does not look like SCRFD.*stride 8"):
        decode_scrfd([np.zeros((10, 1), np.float32)], 64)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [4, 0, 14, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.7, 0.9, 0.8, 0.6], np.float32)
    # box 1 (best) overlaps box 0 at IoU 0.82 and box 2 at IoU 0.54; box 3 overlaps nothing
    assert nms(boxes, scores, 0.4).tolist() == [1, 3]
    assert nms(boxes, scores, 0.6).tolist() == [1, 2, 3]


# ---------------------------------------------------------------- detection through onnxruntime


@pytest.mark.parametrize(
    ("size", "marker", "cell_centre"),
    [
        ((320, 240), (100, 100, 108, 108), (192, 192)),  # wide: canvas marker at 200..216 -> cell (6, 6)
        ((240, 320), (100, 200, 108, 208), (192, 384)),  # tall: canvas marker at (200, 400) -> cell (6, 12)
    ],
)
def test_detect_decodes_the_synthetic_face_back_to_original_pixels(
    analyzer: InsightFaceAnalyzer, size: tuple[int, int], marker: tuple[int, ...], cell_centre: tuple[int, int]
) -> None:
    faces = analyzer.detect(red_marker_image(*size, marker))
    assert len(faces) == 1  # the two anchors at the marker fire with identical boxes: NMS keeps one
    box, keypoints = _expected_face(cell_centre, scale=2.0)  # both photos are scaled by 640 / 320
    assert np.allclose(faces[0].bbox, box, atol=1e-4)
    assert np.allclose(faces[0].landmarks, keypoints, atol=1e-4)
    assert faces[0].landmarks.dtype == np.float32
    assert faces[0].score > 0.99


def test_network_sees_rgb_not_bgr(analyzer: InsightFaceAnalyzer) -> None:
    blue = red_marker_image(320, 240, (100, 100, 108, 108))[..., ::-1].copy()
    assert analyzer.detect(blue) == []


def test_two_markers_give_two_faces(analyzer: InsightFaceAnalyzer) -> None:
    image = red_marker_image(320, 240, (20, 20, 28, 28))
    image[150:158, 200:208, 0] = 255
    assert len(analyzer.detect(image)) == 2


def test_the_largest_confident_face_comes_first_and_weak_detections_are_dropped(
    analyzer: InsightFaceAnalyzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    keypoints = np.zeros((5, 2), np.float32)
    small = Face((10.0, 10.0, 30.0, 30.0), 0.99, keypoints)
    large = Face((100.0, 100.0, 180.0, 180.0), 0.60, keypoints)  # under 0.7 x 0.99: dropped, although largest
    twin = Face((200.0, 100.0, 280.0, 180.0), 0.70, keypoints)
    decoded = (
        np.array([s.bbox for s in (small, large, twin)], np.float32),
        np.array([0.99, 0.6, 0.7], np.float32),
        np.zeros((3, 5, 2), np.float32),
    )
    monkeypatch.setattr(backend, "decode_scrfd", lambda *args, **kwargs: decoded)
    image = red_marker_image(320, 240, (100, 100, 108, 108))
    assert [face.score for face in analyzer.detect(image)] == pytest.approx([0.70, 0.99])
    # the raw detections keep InsightFace's order, most confident first, weak ones included
    assert [face.score for face in analyzer.detections_at_size(image, 640)] == pytest.approx([0.99, 0.70, 0.60])


def test_detection_sizes_must_fit_scrfd_strides(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, SyntheticDetector())
    with pytest.raises(ValueError, match=r"multiples of 32, got \(640, 600\)"):
        InsightFaceAnalyzer(folder, download=False, detection_sizes=(640, 600))


def test_detection_size_falls_back_until_a_face_is_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small_only = InsightFaceAnalyzer(_model_dir(tmp_path, SyntheticDetector(max_input_size=320)), download=False)
    image = red_marker_image(320, 240, (100, 100, 108, 108))
    assert all(small_only.detect_at_size(image, size) == [] for size in (640, 576, 512, 448, 384))
    with caplog.at_level(logging.INFO, logger="photomaker.faces.insightface_backend"):
        faces = small_only.detect(image)
    assert "face found only at detector size 320" in caplog.text
    box, _ = _expected_face((96, 96), scale=1.0)  # at 320 the photo is not scaled: marker in cell (3, 3)
    assert np.allclose(faces[0].bbox, box)
    assert small_only.detect(np.zeros((240, 320, 3), np.uint8)) == []


# ---------------------------------------------------------------- alignment and embedding


def test_alignment_puts_the_landmarks_on_the_arcface_template() -> None:
    angle, scale, shift = np.deg2rad(20), 2.5, np.array([150.0, 90.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE_112 @ (scale * rotation).T + shift
    image = np.zeros((500, 500, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(np.round(landmarks).astype(int), colours, strict=True):
        image[y - 4 : y + 5, x - 4 : x + 5] = colour
    chip, matrix = align_face(image, landmarks.astype(np.float32))
    assert chip.shape == (112, 112, 3)
    assert np.allclose(transform_points(matrix, landmarks), ARCFACE_TEMPLATE_112, atol=1e-3)
    for (x, y), colour in zip(np.round(ARCFACE_TEMPLATE_112).astype(int), colours, strict=True):
        assert chip[y, x].tolist() == list(colour)


def test_embedding_is_the_raw_network_output_on_the_aligned_rgb_chip(analyzer: InsightFaceAnalyzer) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    # landmarks exactly on the template: the aligned chip is the image itself
    face = Face(bbox=(0.0, 0.0, 112.0, 112.0), score=1.0, landmarks=ARCFACE_TEMPLATE_112.copy())
    embedding = analyzer.embed(image, face)
    expected = expected_embedding(image)
    assert embedding.shape == (512,) and embedding.dtype == np.float32
    assert np.allclose(embedding, expected, rtol=1e-4, atol=1e-4)
    assert abs(np.linalg.norm(embedding) - 1.0) > 0.5  # not normalised
    assert not np.allclose(embedding, expected_embedding(image[..., ::-1]), atol=1e-2)  # RGB, not BGR


def test_similarity_rule_and_normalised_distance(analyzer: InsightFaceAnalyzer) -> None:
    a = np.array([3.0, 4.0] + [0.0] * 510)
    assert analyzer.similarity(a, 10 * a) == pytest.approx(1.0)
    assert analyzer.distance(a, 10 * a) == pytest.approx(0.0, abs=1e-6)  # raw norms do not matter
    b = np.array([4.0, -3.0] + [0.0] * 510)
    assert analyzer.distance(a, b) == pytest.approx(np.sqrt(2))
    assert analyzer.is_same_person(a, 10 * a) and not analyzer.is_same_person(a, b)
    assert analyzer.describe_threshold() == "similarity >= 0.4"
    assert "non-commercial" in analyzer.licence


def test_prepare_keeps_embeddings_aligned_with_photos(analyzer: InsightFaceAnalyzer) -> None:
    photos = [red_marker_image(320, 240, (100, 100, 108, 108)), red_marker_image(240, 320, (100, 200, 108, 208))]
    photos[1][:, :, 1] = 90  # different content, so different embeddings
    prepared = prepare_id_photos(photos, analyzer, need_embeddings=True)
    assert prepared.face_embeds is not None and prepared.face_embeds.shape == (2, 512)
    for photo, face, row in zip(photos, prepared.faces, prepared.face_embeds, strict=True):
        assert np.array_equal(row, analyzer.embed(photo, face))
    assert not np.allclose(prepared.face_embeds[0], prepared.face_embeds[1])


# ---------------------------------------------------------------- model files


def _refuse_download(url: str, destination: Path) -> None:
    raise urllib.error.URLError("network unreachable")


def test_missing_models_explain_where_to_put_which_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "_download", _refuse_download)
    empty = tmp_path / "buffalo_l"
    with pytest.raises(FaceModelUnavailableError) as caught:
        InsightFaceAnalyzer(empty)
    message = str(caught.value)
    for needed in ("det_10g.onnx", "w600k_r50.onnx", str(empty), backend.BUFFALO_L_URL, "PHOTOMAKER_INSIGHTFACE_DIR"):
        assert needed in message
    assert "download failed" in message and "network unreachable" in message and "non-commercial" in message
    assert not list(empty.iterdir())  # no partial files left behind
    with pytest.raises(FaceModelUnavailableError, match="automatic download is disabled"):
        InsightFaceAnalyzer(tmp_path / "other", download=False)


def test_models_are_fetched_from_the_release_zip_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack = _model_dir(tmp_path / "pack")
    requested = []

    def fake_download(url: str, destination: Path) -> None:
        requested.append(url)
        with zipfile.ZipFile(destination, "w") as archive:
            for name in (backend.DETECTOR_FILE, backend.RECOGNISER_FILE, "genderage.onnx"):
                source = pack / name if name != "genderage.onnx" else pack / backend.DETECTOR_FILE
                archive.write(source, f"buffalo_l/{name}")

    monkeypatch.setattr(backend, "_download", fake_download)
    cache = tmp_path / "home" / ".cache" / "photomaker" / "insightface" / "buffalo_l"
    monkeypatch.setenv(backend.MODEL_DIR_ENV, str(cache))
    assert backend.default_model_dir() == cache
    analyzer = InsightFaceAnalyzer()
    assert requested == [backend.BUFFALO_L_URL]
    assert sorted(p.name for p in cache.iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    assert len(analyzer.detect(red_marker_image(320, 240, (100, 100, 108, 108)))) == 1
    InsightFaceAnalyzer()  # second start: files are there, nothing is downloaded
    assert len(requested) == 1


def test_corrupt_model_file_is_reported(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path)
    (folder / backend.RECOGNISER_FILE).write_bytes(b"truncated download")
    with pytest.raises(FaceModelUnavailableError, match=r"cannot load .*w600k_r50\.onnx.*delete the file"):
        InsightFaceAnalyzer(folder, download=False)


def test_get_face_analyzer_builds_the_onnx_backend_once(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path)
    first = get_face_analyzer("insightface", model_dir=folder)
    assert isinstance(first, InsightFaceAnalyzer) and first.embedding_dim == 512
    assert get_face_analyzer("insightface", model_dir=str(folder)) is first


# ---------------------------------------------------------------- the reference's FaceAnalysis2 / analyze_faces


@pytest.fixture
def reference_detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from photomaker import FaceAnalysis2

    monkeypatch.setenv(backend.MODEL_DIR_ENV, str(_model_dir(tmp_path / "pack")))
    # the reference's call pattern, unchanged (no CUDA here: onnxruntime's CPU provider takes over)
    face_detector = FaceAnalysis2(providers=["CUDAExecutionProvider"], allowed_modules=["detection", "recognition"])
    face_detector.prepare(ctx_id=0, det_size=(640, 640))
    return face_detector


def test_analyze_faces_returns_the_reference_dicts_from_a_bgr_image(reference_detector) -> None:
    from photomaker import analyze_faces

    rgb = red_marker_image(320, 240, (100, 100, 108, 108))
    bgr = rgb[:, :, ::-1]  # what the reference passes: np.array(pil_image)[:, :, ::-1]
    faces = analyze_faces(reference_detector, bgr)
    assert len(faces) == 1 and set(faces[0]) == {"bbox", "kps", "det_score", "embedding"}
    (face,) = faces
    box, keypoints = _expected_face((192, 192), scale=2.0)
    assert face["bbox"].shape == (4,) and np.allclose(face["bbox"], box, atol=1e-4)
    assert face["kps"].shape == (5, 2) and np.allclose(face["kps"], keypoints, atol=1e-4)
    assert face["det_score"] > 0.99
    ours = InsightFaceAnalyzer(Path(os.environ[backend.MODEL_DIR_ENV]), download=False)
    expected = ours.embed(rgb, ours.detect(rgb)[0])
    assert face["embedding"].shape == (512,) and face["embedding"].dtype == np.float32
    assert np.array_equal(face["embedding"], expected)  # raw, not normalised
    assert abs(np.linalg.norm(face["embedding"]) - 1.0) > 0.5
    assert face.embedding is face["embedding"] and np.linalg.norm(face.normed_embedding) == pytest.approx(1.0)
    assert reference_detector.providers == ["CPUExecutionProvider"]
    assert analyze_faces(reference_detector, np.ascontiguousarray(rgb)) == []  # RGB given: the marker is blue


def test_faces_come_in_the_reference_order_with_weak_ones_kept(
    reference_detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    from photomaker import analyze_faces

    boxes = np.array([(10, 10, 30, 30), (100, 100, 180, 180), (200, 100, 280, 180)], np.float32)
    scores = np.array([0.6, 0.99, 0.7], np.float32)
    keypoints = np.stack([b[:2] + ARCFACE_TEMPLATE_112 / 112 * (b[2:] - b[:2]) for b in boxes]).astype(np.float32)
    scale = 2.0  # the 320x240 photo is letterboxed into 640: decoded boxes are in canvas pixels
    monkeypatch.setattr(backend, "decode_scrfd", lambda *a, **k: (boxes * scale, scores, keypoints * scale))
    image = red_marker_image(320, 240, (100, 100, 108, 108))[:, :, ::-1]
    faces = analyze_faces(reference_detector, image)
    assert [float(f["det_score"]) for f in faces] == pytest.approx([0.99, 0.7, 0.6])  # most confident first
    # max_num keeps large faces near the centre (160, 120) first, as InsightFace does
    (kept,) = reference_detector.get(image, max_num=1)
    assert np.allclose(kept["bbox"], (100, 100, 180, 180))


def test_analyze_faces_retries_smaller_detector_sizes(tmp_path: Path) -> None:
    from photomaker import FaceAnalysis2, analyze_faces

    _model_dir(tmp_path / "models" / "buffalo_l", SyntheticDetector(max_input_size=320))
    detector = FaceAnalysis2(root=tmp_path, allowed_modules=["detection", "recognition"], download=False)
    detector.prepare(ctx_id=-1, det_size=(640, 640))
    assert detector.providers == ["CPUExecutionProvider"]
    bgr = red_marker_image(320, 240, (100, 100, 108, 108))[:, :, ::-1]
    assert detector.get(bgr) == []  # at 640 this detector sees nothing
    (face,) = analyze_faces(detector, bgr)
    box, _ = _expected_face((96, 96), scale=1.0)  # found at 320
    assert np.allclose(face["bbox"], box)
    assert analyze_faces(detector, np.zeros((240, 320, 3), np.uint8)) == []


def test_detection_only_gives_no_embedding(tmp_path: Path) -> None:
    from photomaker import FaceAnalysis2

    _model_dir(tmp_path / "models" / "buffalo_l")
    detector = FaceAnalysis2(root=tmp_path, allowed_modules=["detection"], download=False)
    (face,) = detector.get(red_marker_image(320, 240, (100, 100, 108, 108))[:, :, ::-1])
    assert set(face) == {"bbox", "kps", "det_score"}
    with pytest.raises(AttributeError, match="face has no 'embedding'; it has bbox, kps, det_score"):
        getattr(face, "embedding")  # noqa: B009 - the attribute access is what is tested


def test_missing_model_pack_says_where_to_put_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from photomaker import FaceAnalysis2

    with pytest.raises(FaceModelUnavailableError) as caught:
        FaceAnalysis2(root=tmp_path / "insightface", download=False)
    message = str(caught.value)
    for needed in ("det_10g.onnx", "w600k_r50.onnx", str(tmp_path / "insightface" / "models" / "buffalo_l")):
        assert needed in message
    monkeypatch.setattr(backend, "_download", _refuse_download)
    monkeypatch.setenv(backend.MODEL_DIR_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FaceModelUnavailableError, match=r"(?s)download failed.*~/.insightface/models/buffalo_l"):
        FaceAnalysis2(providers=["CUDAExecutionProvider"], allowed_modules=["detection", "recognition"])


def test_reference_api_refuses_what_it_cannot_do(reference_detector, tmp_path: Path) -> None:
    from photomaker import FaceAnalysis2, analyze_faces
    from photomaker.errors import InvalidRequestError

    with pytest.raises(FaceModelUnavailableError, match="'antelopev2' is not supported; use name='buffalo_l'"):
        FaceAnalysis2(name="antelopev2")
    with pytest.raises(InvalidRequestError, match=r"'genderage' are not provided here"):
        FaceAnalysis2(allowed_modules=["detection", "recognition", "genderage"])
    with pytest.raises(InvalidRequestError, match="unknown InsightFace module"):
        FaceAnalysis2(allowed_modules=["detect"])
    with pytest.raises(InvalidRequestError, match=r"det_size must be square .* got \(640, 480\)"):
        reference_detector.prepare(ctx_id=0, det_size=(640, 480))
    with pytest.raises(InvalidRequestError, match="HxWx3 uint8 BGR array"):
        analyze_faces(reference_detector, np.zeros((240, 320), np.float32))
    with pytest.raises(TypeError, match="needs a FaceAnalysis2"):
        analyze_faces(object(), np.zeros((240, 320, 3), np.uint8))
