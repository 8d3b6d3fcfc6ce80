"""The process-wide face analyzers, one per backend and model folder, built on first use.

Kept apart from the package's ``__init__`` so that modules inside ``photomaker.faces`` (the identity score, the
reference-compatible API) can reach an analyzer without importing the package they belong to.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from photomaker.errors import InvalidRequestError
from photomaker.faces.base import FaceAnalyzer

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
