"""Training crops: SDXL aspect buckets and the face-share crop (pure geometry, no model).

SDXL was trained on buckets of about 1024 x 1024 pixels with different aspect ratios, each side a multiple of
64 (the SDXL paper's appendix lists them). A training image is cropped from its photo so that

- the face box covers at least ``min_face_share`` of the crop's area (the PhotoMaker paper: 10 %),
- the crop has exactly the aspect of one bucket, the bucket nearest (in log ratio) to the aspect of the
  largest such crop the photo allows, and lies inside the photo with the whole face box in it,

then resized to that bucket. Shortest side: the crop is resized to the bucket whatever its size, so a photo
whose crop is smaller than the bucket is upscaled (the photo is never padded and never stretched beyond the
bucket's aspect). Use photos whose shortest side is at least the resolution (the paper keeps >= 512 px at
1024) to avoid soft, upscaled training images; ``--min-face-size`` bounds how much a face can be upscaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from photomaker.errors import ImageRejected, TrainingDataError

SDXL_BUCKETS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048),
    (512, 1984),
    (512, 1920),
    (512, 1856),
    (576, 1792),
    (576, 1728),
    (576, 1664),
    (640, 1600),
    (640, 1536),
    (704, 1472),
    (704, 1408),
    (704, 1344),
    (768, 1344),
    (768, 1280),
    (832, 1216),
    (832, 1152),
    (896, 1152),
    (896, 1088),
    (960, 1088),
    (960, 1024),
    (1024, 1024),
    (1024, 960),
    (1088, 960),
    (1088, 896),
    (1152, 896),
    (1152, 832),
    (1216, 832),
    (1280, 768),
    (1344, 768),
    (1344, 704),
    (1408, 704),
    (1472, 704),
    (1536, 640),
    (1600, 640),
    (1664, 576),
    (1728, 576),
    (1792, 576),
    (1856, 512),
    (1920, 512),
    (1984, 512),
    (2048, 512),
)
"""SDXL's (width, height) buckets at 1024, as listed in the SDXL paper (portrait to landscape)."""

BUCKET_MULTIPLE = 32
"""Bucket sides at other resolutions are rounded to this: 8 (VAE) x 4 (the SDXL UNet's two downsamplings)."""


@dataclass(frozen=True)
class TrainingCrop:
    """Where a training image comes from in its photo, and what it becomes."""

    box: tuple[int, int, int, int]
    """(left, top, right, bottom) in the photo's pixels, right/bottom exclusive."""
    size: tuple[int, int]
    """(width, height) of the bucket the crop is resized to."""
    face_box: tuple[int, int, int, int]
    """The face box in the output image's pixels."""
    face_share: float
    """Face box area / crop area (the same in the output image: the resize keeps the aspect)."""

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) photo pixel coordinates -> the output image's pixel coordinates."""
        left, top, right, bottom = self.box
        scale = np.array([self.size[0] / (right - left), self.size[1] / (bottom - top)])
        return (np.asarray(points, np.float64) - np.array([left, top])) * scale


def sdxl_buckets(resolution: int = 1024) -> list[tuple[int, int]]:
    """SDXL's buckets scaled to ``resolution`` (the square bucket's side), sides rounded to 32, no duplicates."""
    if resolution < 4 * BUCKET_MULTIPLE or resolution % BUCKET_MULTIPLE:
        raise TrainingDataError(
            f"resolution must be a multiple of {BUCKET_MULTIPLE} and at least {4 * BUCKET_MULTIPLE}, got "
            f"{resolution}; SDXL's own is 1024"
        )
    buckets: list[tuple[int, int]] = []
    for width, height in SDXL_BUCKETS_1024:
        scaled = tuple(
            max(BUCKET_MULTIPLE, round(side * resolution / 1024 / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
            for side in (width, height)
        )
        if scaled not in buckets:
            buckets.append(scaled)  # type: ignore[arg-type]
    return buckets


def plan_crop(
    image_size: tuple[int, int],
    face_box: tuple[float, float, float, float],
    *,
    min_face_share: float = 0.10,
    buckets: list[tuple[int, int]],
) -> TrainingCrop:
    """The crop of a photo for one training image (see the module docstring); raises ``ImageRejected("crop")``.

    The crop is as large as the share allows (more context) and centred on the face as far as the photo's
    borders allow.
    """
    if not 0.0 < min_face_share <= 1.0:
        raise TrainingDataError(f"min_face_share must be in (0, 1], got {min_face_share}")
    width, height = image_size
    fx0, fy0 = max(0, math.floor(face_box[0])), max(0, math.floor(face_box[1]))
    fx1, fy1 = min(width, math.ceil(face_box[2])), min(height, math.ceil(face_box[3]))
    face_w, face_h = fx1 - fx0, fy1 - fy0
    if face_w <= 0 or face_h <= 0:
        raise ImageRejected("crop", f"the face box {tuple(round(v) for v in face_box)} lies outside the photo")
    max_area = face_w * face_h / min_face_share
    preferred = _largest_crop(width / height, width, height, max_area)
    preferred_aspect = preferred[0] / preferred[1]
    by_closeness = sorted(buckets, key=lambda b: abs(math.log(b[0] / b[1] / preferred_aspect)))
    for bucket in by_closeness:
        crop_w, crop_h = _largest_crop(bucket[0] / bucket[1], width, height, max_area)
        if crop_w < face_w or crop_h < face_h:
            crop_w, crop_h = _grow_to_face(bucket[0] / bucket[1], face_w, face_h)
        if crop_w > width or crop_h > height or face_w * face_h / (crop_w * crop_h) < min_face_share:
            continue
        left = _centre(fx0, fx1, crop_w, width)
        top = _centre(fy0, fy1, crop_h, height)
        scale_x, scale_y = bucket[0] / crop_w, bucket[1] / crop_h
        out_face = (
            max(0, math.floor((fx0 - left) * scale_x)),
            max(0, math.floor((fy0 - top) * scale_y)),
            min(bucket[0], math.ceil((fx1 - left) * scale_x)),
            min(bucket[1], math.ceil((fy1 - top) * scale_y)),
        )
        return TrainingCrop(
            box=(left, top, left + crop_w, top + crop_h),
            size=bucket,
            face_box=out_face,
            face_share=face_w * face_h / (crop_w * crop_h),
        )
    raise ImageRejected(
        "crop",
        f"no bucket's aspect fits a crop of this {width}x{height} photo that holds the {face_w}x{face_h} face "
        f"at a face share of at least {min_face_share:.0%}",
    )


def _largest_crop(aspect: float, width: int, height: int, max_area: float) -> tuple[int, int]:
    """The largest (w, h) of ``aspect`` inside width x height with an area of at most ``max_area``."""
    crop_h = min(height, width / aspect, math.sqrt(max_area / aspect))
    crop_w = crop_h * aspect
    return max(1, math.floor(crop_w)), max(1, math.floor(crop_h))


def _grow_to_face(aspect: float, face_w: int, face_h: int) -> tuple[int, int]:
    """The smallest (w, h) of ``aspect`` that holds a face_w x face_h box."""
    crop_h = max(face_h, face_w / aspect)
    return math.ceil(crop_h * aspect), math.ceil(crop_h)


def _centre(face_lo: int, face_hi: int, side: int, extent: int) -> int:
    """Start of a ``side``-long span centred on the face and kept inside [0, extent]; it covers the face."""
    start = round((face_lo + face_hi - side) / 2)
    start = min(max(start, 0), extent - side)
    return min(max(start, face_hi - side), face_lo)


def apply_crop(image: Image.Image, crop: TrainingCrop) -> Image.Image:
    """The training image: the crop resized to its bucket (Lanczos, RGB)."""
    return image.convert("RGB").crop(crop.box).resize(crop.size, Image.Resampling.LANCZOS)
