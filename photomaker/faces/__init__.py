"""Face analysis for ID photos: detection, landmarks, identity embeddings, photo preparation, identity score.

Two backends share the :class:`FaceAnalyzer` interface: ``"dlib"`` (default, offline, CC0 models, 128-d) and
``"insightface"`` (SCRFD + ArcFace ONNX models, 512-d, non-commercial licence; needed by PhotoMaker v2).
Backends import their heavy dependencies (dlib, onnxruntime, cv2) only when constructed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from photomaker.errors import InvalidRequestError
from photomaker.faces.base import LANDMARK_NAMES, Face, FaceAnalyzer
from photomaker.faces.geometry import DEFAULT_FACE_FRACTION, crop_image, face_crop_box
from photomaker.faces.prepare import PreparedPhotos, prepare_id_photos
from photomaker.faces.score import IdentityScore, identity_score, score_images

BACKENDS = ("dlib", "insightface")

_cache: dict[tuple[str, str | None], FaceAnalyzer] = {}
_cache_lock = threading.Lock()


def get_face_analyzer(
    backend: Literal["dlib", "insightface"] = "dlib", model_dir: str | Path | None = None
) -> FaceAnalyzer:
    """The process-wide analyzer for ``backend`` (built once, thread-safe; a failed build is retried next call).

    Raises :class:`~photomaker.errors.FaceModelUnavailableError` when the backend's models are missing, and
    :class:`~photomaker.errors.InvalidRequestError` for an unknown backend name.
    """
    if backend not in BACKENDS:
        raise InvalidRequestError(f"unknown face backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    key = (backend, str(Path(model_dir).expanduser().resolve()) if model_dir is not None else None)
    with _cache_lock:  # held while building, so concurrent first calls load the models once
        analyzer = _cache.get(key)
        if analyzer is None:
            analyzer = _build(backend, model_dir)
            _cache[key] = analyzer
        return analyzer


def _build(backend: str, model_dir: str | Path | None) -> FaceAnalyzer:
    if backend == "dlib":
        from photomaker.faces.dlib_backend import DlibFaceAnalyzer

        return DlibFaceAnalyzer(model_dir)
    from photomaker.faces.insightface_backend import InsightFaceAnalyzer

    return InsightFaceAnalyzer(model_dir)


__all__ = [
    "BACKENDS",
    "DEFAULT_FACE_FRACTION",
    "LANDMARK_NAMES",
    "Face",
    "FaceAnalyzer",
    "IdentityScore",
    "PreparedPhotos",
    "crop_image",
    "face_crop_box",
    "get_face_analyzer",
    "identity_score",
    "prepare_id_photos",
    "score_images",
]
