"""Turn user ID photos into what the ID encoder needs: face-centred crops and, for v2, face embeddings.

The app, the CLI and the service all call :func:`prepare_id_photos`, so every entry point refuses the same
photos with the same messages and crops the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from photomaker.errors import IDImageError, NoFaceError
from photomaker.faces.base import Face, FaceAnalyzer
from photomaker.faces.consistency import describe_mismatch, identity_outliers
from photomaker.faces.geometry import DEFAULT_FACE_FRACTION, crop_image, face_crop_box
from photomaker.images import load_image, photo_label

logger = logging.getLogger(__name__)

SMALL_FACE_PIXELS = 64
"""Faces narrower than this are usable but blurry once enlarged to 224x224; the user is told."""


@dataclass
class PreparedPhotos:
    """ID photos ready for the encoder, in the order given (never reordered)."""

    images: list[Image.Image]
    """RGB photos: square face-centred crops, or the whole photos when ``crop=False``."""
    faces: list[Face]
    """The face used in each photo, in the ORIGINAL photo's coordinates (with ``embedding`` when computed)."""
    face_embeds: np.ndarray | None
    """(N, embedding_dim) float32, row i from photo i's face in the original photo; None unless requested."""
    warnings: list[str]
    """Messages for the user (several faces, small face, photos that do not look like one person); the photos
    were still used."""


def prepare_id_photos(
    photos: Sequence[Any],
    analyzer: FaceAnalyzer,
    *,
    crop: bool = True,
    need_embeddings: bool = False,
    names: Sequence[str | None] | None = None,
    noun: str = "photo",
    face_fraction: float = DEFAULT_FACE_FRACTION,
) -> PreparedPhotos:
    """Load each photo, find its face (the largest confident one), crop around it, and embed it if asked.

    ``photos`` are anything :func:`photomaker.images.load_image` accepts; ``names`` (e.g. upload file names)
    label them in messages, defaulting to file names for paths. Raises :class:`NoFaceError` for a photo
    without a face and :class:`IDImageError` for an unreadable photo, both naming the photo. PhotoMaker v2
    needs ``need_embeddings=True`` with the ``insightface`` backend (512-d ArcFace embeddings).

    With two or more photos every face is embedded (whatever ``need_embeddings`` says) to check that the
    photos show one person; when they do not, a warning names the photo that differs. The photos are still
    used: mixing identities is a feature.
    """
    if len(photos) == 0:
        raise IDImageError("no ID photos given; add at least one photo of the person's face")
    if names is not None and len(names) != len(photos):
        raise ValueError(f"got {len(names)} names for {len(photos)} photos")
    images: list[Image.Image] = []
    faces: list[Face] = []
    embeddings: list[np.ndarray] = []
    warnings: list[str] = []
    labels: list[str] = []
    embed = need_embeddings or len(photos) > 1
    for index, photo in enumerate(photos):
        label = photo_label(index, _name_of(photo, names[index] if names is not None else None), noun)
        labels.append(label)
        image = load_image(photo, name=label)
        rgb = np.asarray(image)
        found = analyzer.detect(rgb)
        if not found:
            raise NoFaceError(
                f"{label}: no face found; use a photo where the face is clearly visible, lit from the front "
                "and not too small"
            )
        face = found[0]
        if len(found) > 1:
            warnings.append(f"{label}: {len(found)} faces found; using the largest one")
        if face.width < SMALL_FACE_PIXELS:
            warnings.append(
                f"{label}: the face is small ({face.width:.0f} px wide); a closer photo gives a better likeness"
            )
        if embed:
            face = dataclasses.replace(face, embedding=analyzer.embed(rgb, face))
            embeddings.append(face.embedding)
        faces.append(face)
        images.append(crop_image(image, face_crop_box(face.bbox, image.size, face_fraction)) if crop else image)
    if len(embeddings) > 1:
        mismatch = describe_mismatch(identity_outliers(embeddings, analyzer), labels, analyzer)
        if mismatch is not None:
            warnings.append(mismatch)
    for message in warnings:
        logger.info(message)
    face_embeds = np.stack(embeddings).astype(np.float32) if need_embeddings else None
    return PreparedPhotos(images=images, faces=faces, face_embeds=face_embeds, warnings=warnings)


def _name_of(photo: Any, given: str | None) -> str | None:
    """The given name, else the file name of a path, open file or opened PIL image; None for anonymous data."""
    if given:
        return given
    if isinstance(photo, (str, os.PathLike)):
        return os.path.basename(os.fspath(photo))
    filename = getattr(photo, "filename", None) or getattr(photo, "name", None)
    return os.path.basename(filename) if isinstance(filename, str) and filename else None
