"""Person masks for training images: the offline face-and-hair ellipse, or a segmentation model from the Hub.

The mask is an L-mode image of the training image's size, 255 inside the person (or face) region. Training
uses it to replace the ID images' background with noise and to restrict the loss to the person (the paper uses
Mask2Former person masks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from photomaker.errors import ImageRejected, ModelLoadError

logger = logging.getLogger(__name__)

HAIR_GROWTH = 0.7
"""The ellipse reaches this many face-box heights above the box's top (dlib's box ends at the brows)."""
CHIN_GROWTH = 0.25
"""... and this many below its bottom (dlib's box ends near the lower lip)."""
SIDE_GROWTH = 0.35
"""... and this many face-box widths beyond each side (ears, hair at the temples)."""
FEATHER = 0.15
"""Width of the soft edge, as a share of the ellipse's radius: the mask falls from 255 to 0 across it."""


def face_hair_mask(
    size: tuple[int, int],
    face_box: Sequence[float],
    landmarks: np.ndarray | None = None,
) -> Image.Image:
    """The face-and-hair region as a feathered ellipse around ``face_box``, tilted with the eye line.

    Pure geometry, in the training image's pixels: the ellipse holds the face box grown by
    :data:`SIDE_GROWTH` to each side, :data:`HAIR_GROWTH` upwards and :data:`CHIN_GROWTH` downwards;
    ``landmarks`` (5 x 2, the face analyzer's order) give the head's roll. Inside the ellipse shrunk by
    :data:`FEATHER` the mask is 255; it falls linearly to 0 at the ellipse.
    """
    width, height = size
    x0, y0, x1, y1 = (float(v) for v in face_box)
    face_w, face_h = x1 - x0, y1 - y0
    if face_w <= 0 or face_h <= 0:
        raise ImageRejected("mask", f"the face box {tuple(face_box)} is empty")
    top, bottom = y0 - HAIR_GROWTH * face_h, y1 + CHIN_GROWTH * face_h
    centre_x, centre_y = (x0 + x1) / 2, (top + bottom) / 2
    radius_x, radius_y = face_w * (0.5 + SIDE_GROWTH), (bottom - top) / 2
    angle = 0.0
    if landmarks is not None:
        left_eye, right_eye = np.asarray(landmarks, np.float64)[:2]
        angle = math.atan2(right_eye[1] - left_eye[1], right_eye[0] - left_eye[0])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = xs + 0.5 - centre_x, ys + 0.5 - centre_y
    cos, sin = math.cos(angle), math.sin(angle)
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    radius = np.sqrt((along / radius_x) ** 2 + (across / radius_y) ** 2)
    values = np.clip((1.0 - radius) / FEATHER, 0.0, 1.0)
    return Image.fromarray(np.round(values * 255).astype(np.uint8), mode="L")


class SegmentationMasker:
    """A person (or face-parsing) mask from a transformers image-segmentation model.

    ``model`` is a Hub id or a local folder, e.g. ``facebook/mask2former-swin-large-coco-panoptic`` with
    ``labels=("person",)``, or a face-parsing SegFormer with its face and hair labels. The mask is the union of
    the segments whose label is in ``labels``.
    """

    def __init__(self, model: str, labels: Sequence[str] = ("person",), device: str | None = None) -> None:
        from transformers import pipeline

        try:
            self._segment = pipeline("image-segmentation", model=model, device=device)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the segmentation model {model!r}: {exc}. It must be a transformers "
                "image-segmentation model: a Hub id (needs network access, or a copy in the Hugging Face cache "
                f"made with 'hf download {model}' while online) or a local folder; or leave --mask-model out to "
                "use the offline face-and-hair mask"
            ) from exc
        known = {str(name).lower() for name in self._segment.model.config.id2label.values()}
        wanted = {label.lower() for label in labels}
        unknown = sorted(wanted - known)
        if unknown:
            raise ModelLoadError(
                f"the segmentation model {model!r} has no label {', '.join(unknown)}; pass --mask-labels with "
                f"some of: {', '.join(sorted(known))}"
            )
        self.model_name = model
        self.labels = tuple(sorted(wanted))

    def __call__(self, image: Image.Image) -> Image.Image:
        """The union of the wanted segments, as an L mask of the image's size; ``ImageRejected("mask")`` if empty."""
        union = np.zeros((image.height, image.width), dtype=bool)
        for segment in self._segment(image):
            if str(segment["label"]).lower() in self.labels:
                union |= np.asarray(segment["mask"].convert("L").resize(image.size)) > 127
        if not union.any():
            raise ImageRejected("mask", f"the segmentation model found no {' or '.join(self.labels)} in the image")
        return Image.fromarray(union.astype(np.uint8) * 255, mode="L")
