"""Offline face analysis with dlib: HOG (or CNN) detection, landmarks, 128-d ResNet identity embeddings.

The model files come from the ``face_recognition_models`` package (CC0). They are located on disk without
importing that package (its ``__init__`` needs ``pkg_resources``, which recent setuptools removed).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Literal

import numpy as np

from photomaker.errors import FaceModelUnavailableError
from photomaker.faces.base import Face, FaceAnalyzer, check_rgb, select_confident_faces
from photomaker.faces.geometry import ARCFACE_TEMPLATE_112

logger = logging.getLogger(__name__)

SHAPE_5_FILE = "shape_predictor_5_face_landmarks.dat"
SHAPE_68_FILE = "shape_predictor_68_face_landmarks.dat"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"

DETECTION_MAX_SIDE = 1024
"""Photos are searched at most at this size (HOG time grows with pixels; faces in ID photos are large)."""

CHIP_SIZE, CHIP_PADDING = 150, 0.25
"""dlib's ResNet embedding model was trained on 150x150 chips aligned by the 5-point model, padding 0.25."""

# Mouth corners relative to the eye centres in the ArcFace template, in units of the eye distance: along the
# eye line from the eyes' midpoint, and perpendicular to it (downwards). Used to approximate the corners from
# dlib's 5-point model, which has none.
_EYE_MID = (ARCFACE_TEMPLATE_112[0] + ARCFACE_TEMPLATE_112[1]) / 2
_EYE_DISTANCE = float(np.linalg.norm(ARCFACE_TEMPLATE_112[1] - ARCFACE_TEMPLATE_112[0]))
_MOUTH_ALONG = float((ARCFACE_TEMPLATE_112[4, 0] - ARCFACE_TEMPLATE_112[3, 0]) / 2 / _EYE_DISTANCE)
_MOUTH_DOWN = float(((ARCFACE_TEMPLATE_112[3, 1] + ARCFACE_TEMPLATE_112[4, 1]) / 2 - _EYE_MID[1]) / _EYE_DISTANCE)


def default_model_dir() -> Path | None:
    """Folder with the dlib ``.dat`` files from ``face_recognition_models``, or None if not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaceAnalyzer(FaceAnalyzer):
    """dlib face analysis, fully offline; the default backend.

    - Detection: HOG + linear SVM (``detector="hog"``, fast on CPU, frontal faces of about 80 px and up, 40 px
      after one automatic upsampling pass) or the MMOD CNN (``detector="cnn"``, slower, handles more poses).
    - Landmarks: by default from the 5-point model (CC0). It gives the two corners of each eye and the bottom
      of the nose, mapped to the 5-point convention as: eye centre = midpoint of its two corners; nose = the
      bottom of the nose (a little below the nose *tip* InsightFace reports); mouth corners = approximated
      from the eye centres with the ArcFace template's proportions (0.41 eye distances to each side of the
      eyes' midpoint, 1.16 eye distances below it, perpendicular to the eye line), so head pitch and an open
      or smiling mouth are not reflected. ``precise_landmarks=True`` uses the 68-point model instead (eye
      centres from the 6 points around each eye, nose tip, the two mouth corners), see the licence note.
    - Identity: dlib's ResNet on a 150x150 chip aligned with the 5-point landmarks, a 128-d embedding.
      Same person when the euclidean distance is below 0.6 (dlib's published threshold, 99.38% on LFW).

    Licence: dlib is under the Boost Software License; the 5-point, CNN and ResNet models in
    ``face_recognition_models`` are CC0 (public domain), usable commercially. The 68-point model is trained on
    the iBUG 300-W dataset, whose licence excludes commercial use; it is only loaded with
    ``precise_landmarks=True``.
    """

    name = "dlib"
    embedding_dim = 128
    threshold_metric = "distance"
    min_relative_score = 0.5
    """HOG margins of real faces measured 0.66-1.67 on the example portraits under crops, mirroring and
    rescaling; false detections on the space suit 0.01-0.36, never above 0.31 of the real face's score."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        detector: Literal["hog", "cnn"] = "hog",
        precise_landmarks: bool = False,
        same_person_threshold: float = 0.6,
    ) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise FaceModelUnavailableError(
                f"the dlib face backend needs the dlib package ({exc}); install it with 'pip install dlib-bin'"
            ) from exc
        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        needed = [SHAPE_5_FILE, RESNET_FILE]
        needed += [SHAPE_68_FILE] if precise_landmarks else []
        needed += [CNN_DETECTOR_FILE] if detector == "cnn" else []
        missing = [f for f in needed if folder is None or not (folder / f).is_file()]
        if missing:
            where = f"in {folder}" if folder is not None else "(face_recognition_models is not installed)"
            raise FaceModelUnavailableError(
                f"dlib face models missing {where}: {', '.join(missing)}; install them with "
                "'pip install face_recognition_models' or pass model_dir= a folder that holds these files"
            )
        assert folder is not None
        self.model_dir = folder
        self.detector_kind = detector
        self.precise_landmarks = precise_landmarks
        self.same_person_threshold = same_person_threshold
        licence = "dlib: Boost Software License; models from face_recognition_models: CC0 (free for any use)"
        if precise_landmarks:
            licence += "; 68-point landmark model: iBUG 300-W terms, no commercial use"
        self.licence = licence
        self._dlib = dlib
        self._lock = threading.Lock()  # dlib objects are not documented as safe for concurrent calls
        self._hog = dlib.get_frontal_face_detector() if detector == "hog" else None
        self._cnn = dlib.cnn_face_detection_model_v1(str(folder / CNN_DETECTOR_FILE)) if detector == "cnn" else None
        self._shape5 = dlib.shape_predictor(str(folder / SHAPE_5_FILE))
        self._shape68 = dlib.shape_predictor(str(folder / SHAPE_68_FILE)) if precise_landmarks else None
        self._resnet = dlib.face_recognition_model_v1(str(folder / RESNET_FILE))
        logger.info("dlib face analyzer ready (%s detector, models from %s)", detector, folder)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = check_rgb(rgb)
        height, width = rgb.shape[:2]
        scale = min(1.0, DETECTION_MAX_SIDE / max(height, width))
        small = rgb if scale == 1.0 else _resize(rgb, scale)
        with self._lock:
            found = self._run_detector(small, upsample=0)
            if not found:  # small faces: one pyramid level up halves the minimum face size
                found = self._run_detector(small, upsample=1)
            faces = []
            for (x0, y0, x1, y1), score in found:
                bbox = (x0 / scale, y0 / scale, x1 / scale, y1 / scale)
                faces.append(Face(bbox=bbox, score=score, landmarks=self._landmarks(rgb, bbox)))
        return select_confident_faces(faces, self.min_relative_score)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        rgb = check_rgb(rgb)
        with self._lock:
            shape = self._shape5(rgb, self._rectangle(face.bbox))
            chip = self._dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            descriptor = self._resnet.compute_face_descriptor(chip)
        return np.asarray(descriptor, dtype=np.float32)

    def _run_detector(self, rgb: np.ndarray, upsample: int) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes as (x0, y0, x1, y1) with exclusive x1/y1, and scores."""
        if self._cnn is not None:
            return [
                ((d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1), float(d.confidence))
                for d in self._cnn(rgb, upsample)
            ]
        assert self._hog is not None
        rects, scores, _ = self._hog.run(rgb, upsample, 0.0)
        return [
            ((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)) for r, s in zip(rects, scores, strict=True)
        ]

    def _rectangle(self, bbox: tuple[float, float, float, float]):  # -> dlib.rectangle
        x0, y0, x1, y1 = (int(round(v)) for v in bbox)
        return self._dlib.rectangle(x0, y0, max(x1 - 1, x0), max(y1 - 1, y0))

    def _landmarks(self, rgb: np.ndarray, bbox: tuple[float, float, float, float]) -> np.ndarray:
        rect = self._rectangle(bbox)
        if self._shape68 is not None:
            points = _parts(self._shape68(rgb, rect))
            return np.stack(
                [points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[30], points[48], points[54]]
            ).astype(np.float32)
        return five_point_landmarks(_parts(self._shape5(rgb, rect)))


def five_point_landmarks(dlib_points: np.ndarray) -> np.ndarray:
    """Map dlib's 5-point shape to the InsightFace 5-point convention (see the class docstring).

    dlib's order: 0, 1 = outer and inner corner of the eye on the viewer's right; 2, 3 = outer and inner corner
    of the eye on the viewer's left; 4 = bottom of the nose.
    """
    pts = np.asarray(dlib_points, np.float64)
    left_eye = (pts[2] + pts[3]) / 2
    right_eye = (pts[0] + pts[1]) / 2
    along = right_eye - left_eye  # eye line, viewer's left to right
    down = np.array([-along[1], along[0]])  # perpendicular, pointing from the eyes towards the mouth
    middle = (left_eye + right_eye) / 2
    mouth_centre = middle + _MOUTH_DOWN * down
    left_mouth = mouth_centre - _MOUTH_ALONG * along
    right_mouth = mouth_centre + _MOUTH_ALONG * along
    return np.stack([left_eye, right_eye, pts[4], left_mouth, right_mouth]).astype(np.float32)


def _parts(shape) -> np.ndarray:  # shape: dlib.full_object_detection
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float64)


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
