"""How much a generated image looks like the ID photos: the identity score shown in the app and CLI.

The largest confidently detected face in the generated image is compared with every reference embedding (one
per ID photo) and the per-reference cosine similarities and distances are averaged. The mean (rather than the
best match) rewards an image that resembles the person in all photos, not one photo's pose or lighting; with
the per-pair numbers averaged, the backend's published pairwise threshold keeps its meaning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from photomaker.errors import NoFaceError
from photomaker.faces.base import FaceAnalyzer
from photomaker.faces.prepare import prepare_id_photos
from photomaker.faces.registry import get_face_analyzer
from photomaker.images import load_image


@dataclass
class IdentityScore:
    """The comparison result; the numbers are None when the generated image has no face."""

    similarity: float | None
    """Mean cosine similarity to the references, in [-1, 1]; higher is more alike."""
    distance: float | None
    """Mean euclidean distance on the backend's scale (see ``FaceAnalyzer.distance``); lower is more alike."""
    same_person: bool | None
    """The backend's same-person rule applied to the means."""
    face_found: bool
    message: str
    """One line for people, e.g. "same person (distance 0.31 < 0.6, similarity 0.95; 2 reference photos)"."""
    backend: str = ""
    rule: str = ""
    """The same-person rule in words, e.g. "distance < 0.6"."""
    num_references: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (plain floats rounded to 4 decimals), for CLI output and PNG metadata."""
        values = asdict(self)
        for key in ("similarity", "distance"):
            if values[key] is not None:
                values[key] = round(float(values[key]), 4)
        return values


def identity_score(
    image: Any,
    reference_embeddings: np.ndarray | Sequence[np.ndarray],
    analyzer: FaceAnalyzer,
    *,
    name: str | None = None,
) -> IdentityScore:
    """Compare the largest confident face in ``image`` (anything ``load_image`` takes) with the references.

    ``reference_embeddings`` is (N, embedding_dim) or a list of N embeddings from the same ``analyzer``.
    A generated image without a face is not an error here: the score says "no face found".
    """
    references = np.atleast_2d(np.asarray(reference_embeddings, dtype=np.float32))
    if references.size == 0:
        raise ValueError("identity_score needs at least one reference embedding")
    if references.shape[1] != analyzer.embedding_dim:
        raise ValueError(
            f"reference embeddings have {references.shape[1]} values but the {analyzer.name} backend makes "
            f"{analyzer.embedding_dim}; compute them with the same backend"
        )
    label = name or "the generated image"
    rgb = np.asarray(load_image(image, name=label))
    common = {"backend": analyzer.name, "rule": analyzer.describe_threshold(), "num_references": len(references)}
    faces = analyzer.detect(rgb)
    if not faces:
        return IdentityScore(None, None, None, False, f"no face found in {label}", **common)
    embedding = analyzer.embed(rgb, faces[0])
    similarity = float(np.mean([analyzer.similarity(embedding, ref) for ref in references]))
    distance = float(np.mean([analyzer.distance(embedding, ref) for ref in references]))
    same = analyzer.decide_same_person(similarity, distance)
    photos = "reference photo" if len(references) == 1 else "reference photos"
    message = (
        f"{'same person' if same else 'different person'} (distance {distance:.3f}, similarity {similarity:.3f}; "
        f"rule: {analyzer.describe_threshold()}; {len(references)} {photos})"
    )
    return IdentityScore(similarity, distance, same, True, message, **common)


def score_images(
    reference_paths: Sequence[str | os.PathLike],
    image_path: str | os.PathLike,
    backend: str = "dlib",
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``python -m photomaker score``: identity score of ``image_path`` against reference photos, as a dict.

    Reference photos are read as ID photos are (largest face, a warning when there are several). Raises
    :class:`NoFaceError` naming the file when a reference photo or the image has no face (here a missing face
    is a user error: there is nothing to score).
    """
    if not reference_paths:
        raise ValueError("score needs at least one --reference photo")
    analyzer = get_face_analyzer(backend, model_dir)  # type: ignore[arg-type]
    references = prepare_id_photos(
        reference_paths,
        analyzer,
        crop=False,
        need_embeddings=True,
        names=[os.fspath(path) for path in reference_paths],
        noun="reference photo",
    )
    label = f"image {os.fspath(image_path)}"
    score = identity_score(image_path, list(references.face_embeds), analyzer, name=label)
    if not score.face_found:
        raise NoFaceError(f"{label}: no face found, so there is nothing to compare with the reference photos")
    result = score.as_dict()
    result["image"] = os.fspath(image_path)
    result["references"] = [os.fspath(path) for path in reference_paths]
    result["warnings"] = references.warnings
    return result
