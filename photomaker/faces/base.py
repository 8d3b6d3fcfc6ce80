"""The face-analysis interface shared by every backend: a detected ``Face`` and the ``FaceAnalyzer`` contract.

Backends differ in their models and in how they judge "same person" (dlib thresholds a euclidean distance,
ArcFace a cosine similarity); callers only use this interface, so the app, CLI and service never branch on
the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
"""Order of ``Face.landmarks`` rows, InsightFace's 5-point convention.

"Left" and "right" are from the viewer's perspective: in an upright frontal photo the "left eye" is the one
with the smaller x (it is the subject's right eye). This is the order the ArcFace alignment template uses.
"""


@dataclass(eq=False)
class Face:
    """One detected face, in the pixel coordinates of the image it was found in."""

    bbox: tuple[float, float, float, float]
    """(x0, y0, x1, y1): top-left and bottom-right corners, x1/y1 exclusive."""
    score: float
    """Detector confidence; its scale is backend-specific (SCRFD: probability, dlib HOG: SVM margin)."""
    landmarks: np.ndarray
    """(5, 2) float32 (x, y) points in :data:`LANDMARK_NAMES` order."""
    embedding: np.ndarray | None = None
    """Identity embedding when computed (``FaceAnalyzer.embed``), else None."""

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        """Box area in pixels; confident faces are ranked by it (the largest one is the photo's subject)."""
        return max(self.width, 0.0) * max(self.height, 0.0)


class FaceAnalyzer(ABC):
    """Detects faces and computes identity embeddings for RGB uint8 images.

    Subclasses set the class attributes below and implement :meth:`detect` and :meth:`embed`.
    """

    name: ClassVar[str]
    embedding_dim: ClassVar[int]
    threshold_metric: ClassVar[Literal["distance", "similarity"]]
    """Which number decides "same person": ``distance < threshold`` or ``similarity >= threshold``."""
    same_person_threshold: float
    licence: str
    """Licence of the model files, shown in the service's ready message (some forbid commercial use)."""
    min_relative_score: ClassVar[float]
    """Detections scoring below this fraction of the best one in the photo are dropped as unreliable
    (see :func:`select_confident_faces`); set per backend because score scales differ."""

    @abstractmethod
    def detect(self, rgb: np.ndarray) -> list[Face]:
        """The confidently detected faces in ``rgb`` (HxWx3 uint8, RGB), largest first; empty when there is none.

        Implementations pass their raw detections through :func:`select_confident_faces`.
        """

    @abstractmethod
    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The identity embedding (``embedding_dim`` floats) of ``face`` as found in ``rgb``."""

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of two embeddings, in [-1, 1]."""
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        norm = float(np.linalg.norm(a64) * np.linalg.norm(b64))
        return float(np.dot(a64, b64) / norm) if norm > 0 else 0.0

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between two embeddings, on the scale the backend's threshold uses."""
        return float(np.linalg.norm(np.asarray(a, np.float64).ravel() - np.asarray(b, np.float64).ravel()))

    def decide_same_person(self, similarity: float, distance: float) -> bool:
        """Apply the backend's published (or documented) same-person rule to precomputed numbers."""
        if self.threshold_metric == "distance":
            return distance < self.same_person_threshold
        return similarity >= self.same_person_threshold

    def is_same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.decide_same_person(self.similarity(a, b), self.distance(a, b))

    def describe_threshold(self) -> str:
        """The rule in words, e.g. "distance < 0.6", for messages and metadata."""
        sign = "<" if self.threshold_metric == "distance" else ">="
        return f"{self.threshold_metric} {sign} {self.same_person_threshold:g}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, embedding_dim={self.embedding_dim})"


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """Validate the detector input once, here, so that backends can trust it (C-contiguous HxWx3 uint8)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(
            f"face analysis needs an HxWx3 uint8 RGB array, got shape {shape} dtype {dtype}; "
            "convert with numpy.asarray(photomaker.images.load_image(photo))"
        )
    return np.ascontiguousarray(rgb)


def select_confident_faces(faces: list[Face], min_relative_score: float) -> list[Face]:
    """The faces a photo's subject can be chosen from: confident detections only, largest first.

    A detection counts as confident when its score is at least ``min_relative_score`` times the best score in
    the photo. "Largest first" alone is not safe: dlib's HOG detector was seen reporting a patch of a space
    suit (score 0.02) slightly larger than the real face (score 1.41), and picking it cropped the wrong region
    and made the identity score call a copy of the portrait a different person. Among confident faces the
    largest is the subject (ties: higher score first, so the order is deterministic). When the best score is
    not positive, only the faces scoring as high as the best are kept.
    """
    if not 0.0 <= min_relative_score <= 1.0:
        raise ValueError(f"min_relative_score must be in [0, 1], got {min_relative_score}")
    if not faces:
        return []
    best = max(face.score for face in faces)
    floor = best * min_relative_score if best > 0 else best
    confident = [face for face in faces if face.score >= floor]
    return sorted(confident, key=lambda face: (-face.area, -face.score))
