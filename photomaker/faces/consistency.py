"""Do the ID photos show one person? Find the photos that do not look like the others.

PhotoMaker mixes whatever identities it is given (a documented feature), so a mismatch is reported, never
refused: the user learns which photo differs and decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from photomaker.faces.base import FaceAnalyzer


@dataclass(frozen=True)
class IdentityCheck:
    """Which photos (0-based, in upload order) do not look like the others, and the numbers behind it."""

    outliers: list[int]
    """Photos that match fewer than half of the other photos under the backend's same-person rule."""
    distances: np.ndarray
    """(N, N) pairwise distances on the backend's scale (see ``FaceAnalyzer.distance``)."""
    similarities: np.ndarray
    """(N, N) pairwise cosine similarities."""

    @property
    def one_person(self) -> bool:
        return not self.outliers


def identity_outliers(embeddings: Sequence[np.ndarray] | np.ndarray, analyzer: FaceAnalyzer) -> IdentityCheck:
    """Compare every pair of photos with the backend's same-person rule and flag the odd ones out.

    A photo is an outlier when it matches fewer than half of the other photos: with [A, A', B] only B is
    flagged; with two photos of different people both are (neither can be called the odd one out); with
    [A, A', B, B'] all four are (there is no majority). Fewer than two photos are never flagged.
    """
    vectors = [np.asarray(e, dtype=np.float32).ravel() for e in embeddings]
    count = len(vectors)
    distances = np.zeros((count, count), dtype=np.float64)
    similarities = np.ones((count, count), dtype=np.float64)
    matches = np.zeros(count, dtype=np.int64)
    for i in range(count):
        for j in range(i + 1, count):
            distance = analyzer.distance(vectors[i], vectors[j])
            similarity = analyzer.similarity(vectors[i], vectors[j])
            distances[i, j] = distances[j, i] = distance
            similarities[i, j] = similarities[j, i] = similarity
            if analyzer.decide_same_person(similarity, distance):
                matches[i] += 1
                matches[j] += 1
    outliers = [i for i in range(count) if count > 1 and 2 * matches[i] < count - 1]
    return IdentityCheck(outliers=outliers, distances=distances, similarities=similarities)


def describe_mismatch(check: IdentityCheck, labels: Sequence[str], analyzer: FaceAnalyzer) -> str | None:
    """One sentence for the user naming the photos that differ, or None when the photos show one person."""
    if check.one_person:
        return None
    count = len(labels)
    metric = check.distances if analyzer.threshold_metric == "distance" else check.similarities
    rule = analyzer.describe_threshold()
    if count == 2:
        return (
            f"{labels[0]} and {labels[1]} do not look like the same person ({analyzer.threshold_metric} "
            f"{metric[0, 1]:.2f}; same person when {rule}). Both are used, so the result mixes the two faces; "
            "if they should be one person, replace the photo that is not them."
        )
    if len(check.outliers) == count:
        return (
            f"The {count} ID photos do not look like one person (no photo matches most of the others; same "
            f"person when {rule}). All are used, so the result mixes their faces; if they should be one person, "
            "keep only photos of them."
        )
    others = [i for i in range(count) if i not in check.outliers]
    parts = []
    for index in check.outliers:
        mean = float(np.mean(metric[index, others]))
        parts.append(f"{labels[index]} ({analyzer.threshold_metric} {mean:.2f} to the others on average)")
    verb = "does" if len(parts) == 1 else "do"
    pronoun = "it is" if len(parts) == 1 else "they are"
    return (
        f"{', '.join(parts)} {verb} not look like the same person as the other photos (same person when {rule}). "
        f"{pronoun.capitalize()} still used, so the result mixes the faces; if that is not intended, replace "
        f"{'it' if len(parts) == 1 else 'them'}."
    )
