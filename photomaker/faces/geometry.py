"""Pure geometry for faces: the ID-photo crop box, padding crops, and the similarity transform for alignment.

No model code lives here, so every rule can be tested with plain numbers.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

DEFAULT_FACE_FRACTION = 0.6
"""Side of the face box as a fraction of the crop's side.

At 0.6 the face box spans 60% of the 224x224 encoder input (about 134 px): the face dominates the image the
CLIP encoder sees while the whole head (hair, chin, some neck) stays in view. Detector boxes differ (dlib's
HOG box is tight, brow to lip; SCRFD's includes forehead and chin), so the head fills a little more of the
crop with SCRFD boxes.
"""

PAD_COLOUR = (255, 255, 255)
"""Fill for crop areas outside the photo (white, like transparent areas in ``images.load_image``)."""

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye (viewer's left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
"""Where ArcFace expects the 5 landmarks in its 112x112 input (the published ArcFace alignment template)."""


def face_crop_box(
    bbox: tuple[float, float, float, float],
    image_size: tuple[int, int],
    face_fraction: float = DEFAULT_FACE_FRACTION,
) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) integer box around the face, for cropping an ID photo.

    The square's side is ``max(face width, face height) / face_fraction``, centred on the face, then shifted
    to lie inside the image. When that square does not fit, it shrinks to the image's shorter side (a face
    already filling the photo is left nearly as is), but never below the face itself: a face wider than the
    image is tall gets a square that sticks out of the image, to be padded by :func:`crop_image`, so the face is
    never cut and never distorted. The returned box always contains the (clamped, rounded-out) face box.
    """
    if not 0.0 < face_fraction <= 1.0:
        raise ValueError(f"face_fraction must be in (0, 1], got {face_fraction}")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    fx0 = min(max(math.floor(bbox[0]), 0), width - 1)
    fy0 = min(max(math.floor(bbox[1]), 0), height - 1)
    fx1 = max(min(math.ceil(bbox[2]), width), fx0 + 1)
    fy1 = max(min(math.ceil(bbox[3]), height), fy0 + 1)
    face_side = max(fx1 - fx0, fy1 - fy0)

    side = math.ceil(face_side / face_fraction)
    side = max(min(side, width, height), face_side)

    left = _place(fx0, fx1, side, width)
    top = _place(fy0, fy1, side, height)
    return left, top, left + side, top + side


def _place(face_lo: int, face_hi: int, side: int, extent: int) -> int:
    """Start of a ``side``-long interval centred on the face, inside [0, extent] if it fits, covering the face."""
    if side <= extent:
        start = round((face_lo + face_hi - side) / 2)
        start = min(max(start, 0), extent - side)
    else:
        start = (extent - side) // 2  # pad evenly on both sides
    return min(max(start, face_hi - side), face_lo)


def crop_image(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Crop ``box`` from ``image``; parts of the box outside the image are filled with :data:`PAD_COLOUR`."""
    left, top, right, bottom = box
    if left >= 0 and top >= 0 and right <= image.width and bottom <= image.height:
        return image.crop(box)
    canvas = Image.new("RGB", (right - left, bottom - top), PAD_COLOUR)
    canvas.paste(image.convert("RGB"), (-left, -top))
    return canvas


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the least-squares similarity transform (rotation, uniform scale, translation).

    Maps ``source`` points (N, 2) as close as possible to ``target`` points (N, 2), by Umeyama's closed form
    (IEEE TPAMI 13(4), 1991): SVD of the cross-covariance, with a reflection guard.
    """
    src = np.asarray(source, np.float64)
    dst = np.asarray(target, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0  # the best orthogonal map would be a reflection; take the best rotation instead
    rotation = u @ np.diag(signs) @ vt
    src_variance = (src_c**2).sum() / len(src)
    if src_variance == 0:
        raise ValueError("the source points all coincide; cannot estimate a transform")
    scale = float((singular * signs).sum() / src_variance)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    pts = np.asarray(points, np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]
