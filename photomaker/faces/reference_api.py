"""Drop-in for the reference package's face API (``from photomaker import FaceAnalysis2, analyze_faces``).

PhotoMaker v2's README and scripts compute the face embedding with InsightFace:

    face_detector = FaceAnalysis2(providers=['CUDAExecutionProvider'], allowed_modules=['detection', 'recognition'])
    face_detector.prepare(ctx_id=0, det_size=(640, 640))
    faces = analyze_faces(face_detector, bgr_image)
    id_embeds = torch.stack([torch.from_numpy(faces[0]['embedding'])])

This module gives that code the same call pattern and results on this project's InsightFace-ONNX backend
(the same buffalo_l models), without the ``insightface`` package: BGR uint8 input, faces as dicts with
``bbox``, ``kps``, ``det_score`` and the raw 512-d ``embedding``, most confident first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from photomaker.errors import FaceModelUnavailableError, InvalidRequestError
from photomaker.faces.base import Face
from photomaker.faces.insightface_backend import (
    DETECTION_SIZES,
    DETECTION_THRESHOLD,
    MODEL_DIR_ENV,
    MODEL_FILES,
    InsightFaceAnalyzer,
    default_model_dir,
)

logger = logging.getLogger(__name__)

PACK_NAME = "buffalo_l"
SUPPORTED_MODULES = ("detection", "recognition")
KNOWN_INSIGHTFACE_MODULES = ("detection", "recognition", "landmark_2d_106", "landmark_3d_68", "genderage")
DEFAULT_ROOT = "~/.insightface"
"""Where the ``insightface`` package keeps model packs (``<root>/models/<name>``): reused when present."""


class ReferenceFace(dict):
    """One face as InsightFace returns it: a dict whose keys also read as attributes (``face.embedding``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"face has no {name!r}; it has {', '.join(self)}") from None

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding scaled to unit length (what IP-Adapter-FaceID style code uses)."""
        embedding = self["embedding"]
        return embedding / np.linalg.norm(embedding)

    @property
    def embedding_norm(self) -> float:
        return float(np.linalg.norm(self["embedding"]))


class FaceAnalysis2:
    """InsightFace's ``FaceAnalysis`` call pattern (as extended by the reference's ``FaceAnalysis2``).

    Args:
        name: the model pack; only ``"buffalo_l"`` (the pack PhotoMaker v2 was trained with) is supported.
        root: where packs live, as in InsightFace (``<root>/models/<name>``). When not given, the first folder
            holding both model files is used among ``$PHOTOMAKER_INSIGHTFACE_DIR``, ``~/.insightface/models/
            buffalo_l`` (InsightFace's own download) and ``~/.cache/photomaker/insightface/buffalo_l``; when none
            does, the pack is fetched into the last (or the missing files are named with where to put them).
        allowed_modules: InsightFace task names; ``detection`` and ``recognition`` are what is computed (None
            means both). Other tasks (landmarks, gender/age) are refused with a clear error.
        providers: onnxruntime execution providers, e.g. ``['CUDAExecutionProvider']``; ones this onnxruntime
            build lacks are skipped (with a log line), falling back to the CPU.
        download: fetch the pack when the files are missing (set False to only read local files).
    """

    def __init__(
        self,
        name: str = PACK_NAME,
        root: str | os.PathLike[str] | None = None,
        allowed_modules: Sequence[str] | None = None,
        *,
        providers: Sequence[str] | None = None,
        download: bool = True,
        **kwargs: Any,
    ) -> None:
        if name != PACK_NAME:
            raise FaceModelUnavailableError(
                f"model pack {name!r} is not supported; use name='{PACK_NAME}' (SCRFD det_10g + ArcFace w600k_r50, "
                "the pack PhotoMaker v2 was trained with)"
            )
        self.allowed_modules = _check_modules(allowed_modules)
        if kwargs:
            logger.info("FaceAnalysis2 ignores InsightFace options it does not need: %s", ", ".join(sorted(kwargs)))
        self.model_dir = _model_dir(name, root)
        self._requested_providers = list(providers) if providers is not None else None
        self._download = download
        try:
            self._analyzer = InsightFaceAnalyzer(
                self.model_dir, download=download, providers=_usable_providers(self._requested_providers)
            )
        except FaceModelUnavailableError as exc:
            where = (
                f"FaceAnalysis2 looked in {self.model_dir} (root={os.fspath(root)!r})"
                if root is not None
                else f"FaceAnalysis2 also uses an InsightFace download in {DEFAULT_ROOT}/models/{name} "
                "when it holds both files"
            )
            raise FaceModelUnavailableError(f"{exc} {where}.") from exc
        self.det_thresh = DETECTION_THRESHOLD
        self.det_size = DETECTION_SIZES[0]

    def prepare(
        self, ctx_id: int = 0, det_thresh: float = DETECTION_THRESHOLD, det_size: tuple[int, int] | int = (640, 640)
    ) -> None:
        """Set the detection threshold and input size; ``ctx_id < 0`` runs on the CPU (as in InsightFace)."""
        if not 0.0 < det_thresh < 1.0:
            raise InvalidRequestError(f"det_thresh must be between 0 and 1 (InsightFace uses 0.5), got {det_thresh}")
        self.det_thresh = float(det_thresh)
        self.det_size = _square_size(det_size)
        if ctx_id < 0 and self._analyzer.providers != ["CPUExecutionProvider"]:
            self._analyzer = InsightFaceAnalyzer(
                self.model_dir, download=self._download, providers=["CPUExecutionProvider"]
            )

    @property
    def providers(self) -> list[str]:
        """The execution providers the sessions actually use."""
        return list(self._analyzer.providers)

    def get(
        self, img: np.ndarray, max_num: int = 0, det_size: tuple[int, int] | int | None = (640, 640)
    ) -> list[ReferenceFace]:
        """Faces in a BGR uint8 image (OpenCV's order, as the reference passes it), most confident first.

        ``det_size=None`` uses the size given to :meth:`prepare`. ``max_num > 0`` keeps that many faces,
        preferring large faces near the image centre, in that preference order (as InsightFace does).
        """
        bgr = _check_bgr(img)
        size = self.det_size if det_size is None else _square_size(det_size)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        faces = self._analyzer.detections_at_size(rgb, size, threshold=self.det_thresh)
        if max_num > 0 and len(faces) > max_num:
            faces = _largest_central(faces, rgb.shape[:2])[:max_num]
        return [self._as_reference(rgb, face) for face in faces]

    def _as_reference(self, rgb: np.ndarray, face: Face) -> ReferenceFace:
        result = ReferenceFace(
            bbox=np.asarray(face.bbox, dtype=np.float32),
            kps=np.asarray(face.landmarks, dtype=np.float32),
            det_score=np.float32(face.score),
        )
        if "recognition" in self.allowed_modules:
            result["embedding"] = self._analyzer.embed(rgb, face)
        return result

    def __repr__(self) -> str:
        return f"FaceAnalysis2(model_dir={str(self.model_dir)!r}, det_size={self.det_size}, providers={self.providers})"


def analyze_faces(
    face_analysis: FaceAnalysis2, img_data: np.ndarray, det_size: tuple[int, int] = (640, 640)
) -> list[ReferenceFace]:
    """Faces in a BGR image, retrying detection at smaller sizes until one is found (PhotoMaker v2's rule).

    Tries the size given to ``prepare`` first, then 640, 576, 512, 448, 384, 320 and 256; returns the faces of
    the first size that finds any, or an empty list. ``det_size`` is accepted for the reference's signature,
    which ignores it too.
    """
    if not isinstance(face_analysis, FaceAnalysis2):
        raise TypeError(
            "analyze_faces needs a FaceAnalysis2 (from photomaker import FaceAnalysis2), got "
            f"{type(face_analysis).__name__}"
        )
    for size in (None, *DETECTION_SIZES):
        faces = face_analysis.get(img_data, det_size=size)
        if faces:
            return faces
    return []


def _check_modules(allowed_modules: Sequence[str] | None) -> tuple[str, ...]:
    if allowed_modules is None:
        return SUPPORTED_MODULES
    if isinstance(allowed_modules, str):
        raise InvalidRequestError(
            f"allowed_modules must be a list of task names such as ['detection', 'recognition'], got the string "
            f"{allowed_modules!r}"
        )
    modules = tuple(allowed_modules)
    unknown = [m for m in modules if m not in KNOWN_INSIGHTFACE_MODULES]
    unsupported = [m for m in modules if m in KNOWN_INSIGHTFACE_MODULES and m not in SUPPORTED_MODULES]
    if unknown:
        raise InvalidRequestError(
            f"unknown InsightFace module(s) {', '.join(map(repr, unknown))}; use 'detection' and 'recognition'"
        )
    if unsupported:
        raise InvalidRequestError(
            f"module(s) {', '.join(map(repr, unsupported))} are not provided here; only 'detection' and "
            "'recognition' (what PhotoMaker v2 needs) are. Use the insightface package for the others."
        )
    if "detection" not in modules:
        raise InvalidRequestError("allowed_modules must include 'detection': faces are found before anything else")
    return modules


def _model_dir(name: str, root: str | os.PathLike[str] | None) -> Path:
    """The pack folder: ``<root>/models/<name>`` when ``root`` is given, else the first complete candidate."""
    if root is not None:
        return Path(root).expanduser() / "models" / name
    candidates = []
    if os.environ.get(MODEL_DIR_ENV):
        candidates.append(Path(os.environ[MODEL_DIR_ENV]).expanduser())
    candidates += [Path(DEFAULT_ROOT).expanduser() / "models" / name, default_model_dir()]
    for folder in candidates:
        if all((folder / file).is_file() for file in MODEL_FILES):
            return folder
    return default_model_dir()


def _usable_providers(requested: list[str] | None) -> list[str] | None:
    """The requested providers this onnxruntime has, CPU appended as the fallback; None means the default."""
    if requested is None:
        return None
    import onnxruntime

    available = onnxruntime.get_available_providers()
    usable = [p for p in requested if p in available]
    skipped = [p for p in requested if p not in available]
    if skipped:
        logger.info("onnxruntime here has no %s; using %s", ", ".join(skipped), ", ".join(usable or ["the CPU"]))
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    return usable


def _square_size(det_size: tuple[int, int] | int) -> int:
    """The detector input side from InsightFace's (width, height) tuple; it must be square, a multiple of 32."""
    if isinstance(det_size, (int, np.integer)) and not isinstance(det_size, bool):
        width = height = int(det_size)
    elif isinstance(det_size, Sequence) and len(det_size) == 2:
        width, height = (int(v) for v in det_size)
    else:
        raise InvalidRequestError(f"det_size must be (width, height) such as (640, 640), got {det_size!r}")
    if width != height or width <= 0 or width % 32:
        raise InvalidRequestError(
            f"det_size must be square and a positive multiple of 32 (e.g. (640, 640)), got {det_size!r}"
        )
    return width


def _check_bgr(img: Any) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise InvalidRequestError(
            f"FaceAnalysis2 needs an HxWx3 uint8 BGR array (e.g. cv2.imread, or np.array(pil_image)[:, :, ::-1]), "
            f"got {type(img).__name__} with shape {getattr(img, 'shape', None)} and dtype {getattr(img, 'dtype', None)}"
        )
    return img


def _largest_central(faces: list[Face], shape: tuple[int, int]) -> list[Face]:
    """Faces ranked by area minus twice the squared distance of the box centre from the image centre."""
    centre = np.array([shape[1] // 2, shape[0] // 2], dtype=np.float64)

    def preference(face: Face) -> float:
        box = np.asarray(face.bbox, dtype=np.float64)
        offset = (box[:2] + box[2:]) / 2 - centre
        return face.area - 2.0 * float(offset @ offset)

    return sorted(faces, key=preference, reverse=True)
