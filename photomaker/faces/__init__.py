"""Face analysis for ID photos: detection, landmarks, identity embeddings, photo preparation, identity score.

Two backends share the :class:`FaceAnalyzer` interface: ``"dlib"`` (default, offline, CC0 models, 128-d) and
``"insightface"`` (SCRFD + ArcFace ONNX models, 512-d, non-commercial licence; needed by PhotoMaker v2).
Backends import their heavy dependencies (dlib, onnxruntime, cv2) only when constructed.
"""

from __future__ import annotations

from photomaker.faces.base import (
    LANDMARK_NAMES,
    Face,
    FaceAnalyzer,
    select_confident_faces,
)
from photomaker.faces.consistency import identity_outliers
from photomaker.faces.geometry import DEFAULT_FACE_FRACTION, crop_image, face_crop_box
from photomaker.faces.prepare import PreparedPhotos, prepare_id_photos
from photomaker.faces.reference_api import FaceAnalysis2, analyze_faces
from photomaker.faces.registry import BACKENDS, get_face_analyzer
from photomaker.faces.score import IdentityScore, identity_score, score_images

__all__ = [
    "BACKENDS",
    "DEFAULT_FACE_FRACTION",
    "LANDMARK_NAMES",
    "Face",
    "FaceAnalysis2",
    "FaceAnalyzer",
    "IdentityScore",
    "PreparedPhotos",
    "analyze_faces",
    "crop_image",
    "face_crop_box",
    "get_face_analyzer",
    "identity_outliers",
    "identity_score",
    "prepare_id_photos",
    "score_images",
    "select_confident_faces",
]
