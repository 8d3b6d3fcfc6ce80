"""InsightFace-compatible face analysis with onnxruntime: SCRFD detection + ArcFace embeddings (PhotoMaker v2).

PhotoMaker v2 was trained with the raw 512-d embedding that InsightFace's ``buffalo_l`` pack computes
(SCRFD ``det_10g.onnx``, ArcFace ``w600k_r50.onnx``). This module runs those two ONNX files directly,
re-implementing the pre- and post-processing from the published descriptions, so the ``insightface``
Python package (and its build toolchain) is not needed.

Colour order: the reference passes OpenCV BGR images to InsightFace, which swaps them to RGB
(``swapRB``) when building the network input, so both networks see RGB. This backend takes RGB arrays and
feeds them unchanged: the same tensors, without two swaps.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from photomaker.errors import FaceModelUnavailableError
from photomaker.faces.base import Face, FaceAnalyzer, check_rgb, select_confident_faces
from photomaker.faces.geometry import ARCFACE_TEMPLATE_112, similarity_transform

logger = logging.getLogger(__name__)

MODEL_DIR_ENV = "PHOTOMAKER_INSIGHTFACE_DIR"
BUFFALO_L_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
DETECTOR_FILE = "det_10g.onnx"
RECOGNISER_FILE = "w600k_r50.onnx"
MODEL_FILES = (DETECTOR_FILE, RECOGNISER_FILE)

DETECTION_SIZES = (640, 576, 512, 448, 384, 320, 256)
"""Detector input sizes tried in turn until a face is found (as PhotoMaker v2's reference does)."""
SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
DETECTION_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
DETECTION_MEAN, DETECTION_STD = 127.5, 128.0
RECOGNITION_MEAN, RECOGNITION_STD = 127.5, 127.5
DOWNLOAD_TIMEOUT_S = 60

LICENCE = (
    "InsightFace buffalo_l models (SCRFD det_10g, ArcFace w600k_r50): non-commercial research use only; "
    "contact InsightFace for a commercial licence"
)


def default_model_dir() -> Path:
    """``$PHOTOMAKER_INSIGHTFACE_DIR``, else ``~/.cache/photomaker/insightface/buffalo_l``."""
    from_env = os.environ.get(MODEL_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "photomaker" / "insightface" / "buffalo_l"


def ensure_models(model_dir: Path, *, download: bool = True) -> None:
    """Make sure ``det_10g.onnx`` and ``w600k_r50.onnx`` are in ``model_dir``, fetching the pack if allowed."""
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if not missing:
        return
    if not download:
        raise FaceModelUnavailableError(_missing_message(model_dir, missing, "automatic download is disabled"))
    logger.info("InsightFace models missing in %s; downloading %s (about 280 MB)", model_dir, BUFFALO_L_URL)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=model_dir) as scratch:
            archive = Path(scratch) / "buffalo_l.zip"
            _download(BUFFALO_L_URL, archive)
            _extract(archive, missing, model_dir)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise FaceModelUnavailableError(_missing_message(model_dir, missing, f"the download failed: {exc}")) from exc


def _download(url: str, destination: Path) -> None:
    """Stream ``url`` to ``destination`` (separate so tests can replace it; no network in tests)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, destination.open("wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _extract(archive: Path, names: Sequence[str], model_dir: Path) -> None:
    """Copy the wanted files (at any depth inside the zip) into ``model_dir``, each via an atomic rename."""
    with zipfile.ZipFile(archive) as pack:
        by_name = {Path(member).name: member for member in pack.namelist()}
        for name in names:
            if name not in by_name:
                raise KeyError(f"{name} is not in {archive.name}")
            partial = model_dir / f".{name}.part"
            with pack.open(by_name[name]) as source, partial.open("wb") as target:
                shutil.copyfileobj(source, target, length=1 << 20)
            partial.replace(model_dir / name)


def _missing_message(model_dir: Path, missing: Sequence[str], reason: str) -> str:
    return (
        f"InsightFace models not found: {', '.join(missing)} missing in {model_dir}, and {reason}. "
        f"To fix: download {BUFFALO_L_URL} on a machine with internet access, unzip {DETECTOR_FILE} and "
        f"{RECOGNISER_FILE} into {model_dir} (or into any folder and set {MODEL_DIR_ENV} to it). "
        "These models are for non-commercial research only; the 'dlib' face backend works offline without them "
        "(PhotoMaker v2 needs this one)."
    )


# ------------------------------------------------------------------------------------------ SCRFD detection


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize keeping the aspect ratio into the top-left corner of a black ``size`` x ``size`` canvas.

    Returns the canvas and the (x, y) scale factors from original to canvas pixels.
    """
    import cv2

    height, width = rgb.shape[:2]
    if height > width:
        new_height, new_width = size, max(1, int(size * width / height))
    else:
        new_width, new_height = size, max(1, int(size * height / width))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:new_height, :new_width] = cv2.resize(rgb, (new_width, new_height))
    return canvas, (new_width / width, new_height / height)


def detection_blob(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """SCRFD input: 1x3xSxS float32, RGB, ``(x - 127.5) / 128``; and the scale factors of :func:`letterbox`."""
    canvas, scale = letterbox(rgb, size)
    blob = (canvas.astype(np.float32) - DETECTION_MEAN) / DETECTION_STD
    return blob.transpose(2, 0, 1)[None], scale


def anchor_centres(size: int, stride: int, num_anchors: int = SCRFD_ANCHORS) -> np.ndarray:
    """(N, 2) anchor centres (x, y) of one stride: row-major over the feature map, each repeated per anchor."""
    cells = size // stride
    ys, xs = np.mgrid[0:cells, 0:cells]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, num_anchors, axis=0)


def decode_scrfd(
    outputs: Sequence[np.ndarray], size: int, threshold: float = DETECTION_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn SCRFD's 9 outputs into boxes (K, 4), scores (K,), keypoints (K, 5, 2) in canvas pixels, pre-NMS.

    Outputs are matched to strides by shape, not by position: per stride a score map (N, 1), box distances
    (N, 4) and keypoint offsets (N, 10), with N = 2 * (size / stride)^2 (an optional leading batch axis of 1 is
    dropped). Box = anchor centre -/+ (left, top, right, bottom) * stride; keypoint = centre + offset * stride.
    """
    by_kind = _split_outputs(outputs)
    boxes, scores, keypoints = [], [], []
    for stride in SCRFD_STRIDES:
        count = SCRFD_ANCHORS * (size // stride) ** 2
        score, distance, offset = (by_kind[width].get(count) for width in (1, 4, 10))
        if score is None or distance is None or offset is None:
            raise FaceModelUnavailableError(
                f"{DETECTOR_FILE} does not look like SCRFD: no outputs with {count} anchors for stride {stride} "
                f"at input size {size}; replace it with the file from {BUFFALO_L_URL}"
            )
        keep = np.flatnonzero(score[:, 0] >= threshold)
        centres = anchor_centres(size, stride)[keep]
        dist = distance[keep] * stride
        boxes.append(np.concatenate([centres - dist[:, :2], centres + dist[:, 2:]], axis=1))
        keypoints.append(centres[:, None, :] + offset[keep].reshape(-1, 5, 2) * stride)
        scores.append(score[keep, 0])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(keypoints)


def _split_outputs(outputs: Sequence[np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
    """{last dimension: {anchor count: array}} for the score (1), box (4) and keypoint (10) outputs."""
    by_kind: dict[int, dict[int, np.ndarray]] = {1: {}, 4: {}, 10: {}}
    for output in outputs:
        array = np.asarray(output, dtype=np.float32)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 2 and array.shape[1] in by_kind:
            by_kind[array.shape[1]][array.shape[0]] = array
    return by_kind


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Greedy non-maximum suppression: indices of kept boxes, highest score first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.array(keep, dtype=np.int64)


# ------------------------------------------------------------------------------------------ ArcFace embedding


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face so its 5 landmarks land on the ArcFace template; returns (chip, 2x3 matrix)."""
    import cv2

    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    matrix = similarity_transform(landmarks, template)
    chip = cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)
    return chip, matrix


def recognition_blob(chip: np.ndarray) -> np.ndarray:
    """ArcFace input: 1x3xHxW float32, RGB, ``(x - 127.5) / 127.5``."""
    blob = (chip.astype(np.float32) - RECOGNITION_MEAN) / RECOGNITION_STD
    return blob.transpose(2, 0, 1)[None]


class InsightFaceAnalyzer(FaceAnalyzer):
    """SCRFD + ArcFace (InsightFace ``buffalo_l``) run with onnxruntime; the face embedding PhotoMaker v2 needs.

    Licence: the buffalo_l models are released by InsightFace for **non-commercial research use only**
    (see :attr:`licence`); the code here is this project's own.

    Models are read from ``model_dir``, else ``$PHOTOMAKER_INSIGHTFACE_DIR``, else
    ``~/.cache/photomaker/insightface/buffalo_l``; when missing they are fetched once from the published
    release zip (``download=False`` forbids that). Without them :class:`FaceModelUnavailableError` says which
    files to put where.

    Detection: SCRFD on a letterboxed square input, tried at :data:`DETECTION_SIZES` until a face is found,
    score threshold 0.5, NMS at IoU 0.4. Faces come back as :func:`select_confident_faces` ranks them:
    detections under :attr:`min_relative_score` of the best dropped, then largest first (the reference takes
    the most confident face; for a one-person ID photo they are the same face). :meth:`detections_at_size`
    gives the raw detections in the reference's order, for :class:`~photomaker.faces.reference_api.FaceAnalysis2`.
    Embedding: the raw, unnormalised 512-d ArcFace output on the 112x112 chip aligned by a least-squares
    similarity transform of the 5 landmarks onto the ArcFace template; this is what PhotoMaker v2 consumes.
    Same person when the cosine similarity is at least ``same_person_threshold`` (0.4 by default: a
    heuristic, not a published constant; same-person pairs typically score 0.5-0.8 with this model, different
    people below 0.2-0.3). :meth:`distance` is between L2-normalised embeddings (raw norms vary by image).
    """

    name = "insightface"
    embedding_dim = 512
    threshold_metric = "similarity"
    licence = LICENCE
    min_relative_score = 0.7
    """SCRFD scores are probabilities above the 0.5 detection threshold; a clear face scores 0.8-0.95, so a
    detection under 70% of the best (e.g. 0.6 next to 0.9) is not a candidate for the photo's subject."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        download: bool = True,
        providers: Sequence[str] | None = None,
        detection_sizes: Sequence[int] = DETECTION_SIZES,
        detection_threshold: float = DETECTION_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
        same_person_threshold: float = 0.4,
    ) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise FaceModelUnavailableError(
                f"the insightface face backend needs onnxruntime ({exc}); install it with 'pip install "
                "onnxruntime' (or onnxruntime-gpu)"
            ) from exc
        self.model_dir = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
        ensure_models(self.model_dir, download=download)
        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's warnings about unused initialisers are noise here
        self._detector = _open_session(onnxruntime, self.model_dir / DETECTOR_FILE, options, providers)
        self._recogniser = _open_session(onnxruntime, self.model_dir / RECOGNISER_FILE, options, providers)
        self._detector_input = self._detector.get_inputs()[0].name
        self._recogniser_input = self._recogniser.get_inputs()[0]
        fixed = self._detector.get_inputs()[0].shape[2:]
        if all(isinstance(dim, int) for dim in fixed):  # a detector exported with a fixed input size
            if fixed[0] != fixed[1]:
                raise FaceModelUnavailableError(
                    f"{DETECTOR_FILE} takes a fixed {fixed[1]}x{fixed[0]} input; this backend letterboxes photos "
                    f"into a square, so it needs a square or dynamic-size SCRFD such as the one in {BUFFALO_L_URL}"
                )
            detection_sizes = (int(fixed[0]),)
        # SCRFD's feature maps are size / stride cells for strides 8, 16 and 32: other sizes round and misalign.
        bad = [
            size
            for size in detection_sizes
            if not (isinstance(size, (int, np.integer)) and size > 0 and size % 32 == 0)
        ]
        if bad or not detection_sizes:
            raise ValueError(f"detection_sizes must be positive multiples of 32, got {tuple(detection_sizes)}")
        self.detection_sizes: tuple[int, ...] = tuple(detection_sizes)
        height = self._recogniser_input.shape[2]
        self._chip_size = height if isinstance(height, int) else 112
        self.detection_threshold = detection_threshold
        self.nms_threshold = nms_threshold
        self.same_person_threshold = same_person_threshold
        self.providers = list(self._detector.get_providers())
        logger.info("InsightFace analyzer ready (models from %s, providers %s)", self.model_dir, self.providers)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = check_rgb(rgb)
        for size in self.detection_sizes:
            faces = self.detect_at_size(rgb, size)
            if faces:
                if size != self.detection_sizes[0]:
                    logger.info("face found only at detector size %d", size)
                return faces
        return []

    def detect_at_size(self, rgb: np.ndarray, size: int) -> list[Face]:
        """One detector pass at input size ``size`` (a multiple of 32): confident faces, largest first."""
        return select_confident_faces(self.detections_at_size(rgb, size), self.min_relative_score)

    def detections_at_size(self, rgb: np.ndarray, size: int, threshold: float | None = None) -> list[Face]:
        """Every detection scoring at least ``threshold`` (default: the analyzer's) at input size ``size``, in
        original image coordinates, highest score first (InsightFace's order)."""
        blob, (scale_x, scale_y) = detection_blob(check_rgb(rgb), size)
        outputs = self._detector.run(None, {self._detector_input: blob})
        boxes, scores, keypoints = decode_scrfd(
            outputs, size, self.detection_threshold if threshold is None else threshold
        )
        keep = nms(boxes, scores, self.nms_threshold)
        scale = np.array([scale_x, scale_y], dtype=np.float32)
        return [
            Face(
                bbox=tuple(float(v) for v in (boxes[i].reshape(2, 2) / scale).ravel()),
                score=float(scores[i]),
                landmarks=(keypoints[i] / scale).astype(np.float32),
            )
            for i in keep
        ]

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        chip, _ = align_face(check_rgb(rgb), face.landmarks, self._chip_size)
        output = self._recogniser.run(None, {self._recogniser_input.name: recognition_blob(chip)})[0]
        return np.asarray(output, dtype=np.float32).reshape(-1)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between the L2-normalised embeddings (``sqrt(2 - 2 cos)``)."""
        return float(np.sqrt(max(0.0, 2.0 - 2.0 * self.similarity(a, b))))


def _open_session(onnxruntime, path: Path, options, providers: Sequence[str]):  # -> onnxruntime.InferenceSession
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable or invalid files
        raise FaceModelUnavailableError(
            f"cannot load {path}: {exc}; delete the file so it is downloaded again, or replace it with the one "
            f"from {BUFFALO_L_URL}"
        ) from exc
