"""Example training data for the prepare-data tests: real public-domain portraits under transforms, plus bad photos.

One identity (``eileen``, the NASA astronaut portrait) holds transformed copies of her photo and one photo of
each kind the pipeline must drop; ``grace`` (the US Navy portrait) is a second, clean identity.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from faces_fixtures import ASTRONAUT, GRACE_HOPPER
from PIL import Image

KEPT_EILEEN = ("original", "mirror", "crop", "rescale", "jpeg", "rotate")
"""Transformed copies of the astronaut portrait (face about 88 px): all must be kept."""

EXPECTED_DROPS = {
    "noise": "detect",
    "blank": "detect",
    "two_faces": "detect",
    "small_face": "face_size",
    "wrong_person": "verify",
    "no_class_word": "caption",
}
"""Photos of identity ``eileen`` and the stage that must drop each (at ``min_face_size=64``)."""

GIVEN_CAPTION = "a photo of a woman smiling in a spacesuit"
UNMARKABLE_CAPTION = "an astronaut portrait in front of a flag"


def open_image(path: str | Path | io.BytesIO) -> Image.Image:
    """The image at ``path``, fully read, with the file closed (no ResourceWarning)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return open_image(buffer).convert("RGB")


def eileen_photos() -> dict[str, Image.Image]:
    """The photos of identity ``eileen``, by stem: kept transforms first, then the ones to drop."""
    astronaut = open_image(ASTRONAUT).convert("RGB")
    grace = open_image(GRACE_HOPPER).convert("RGB")
    rng = np.random.default_rng(0)
    two = Image.new("RGB", (1024, 512), (128, 128, 128))
    two.paste(astronaut, (0, 0))
    two.paste(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    return {
        "original": astronaut,
        "mirror": astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "crop": astronaut.crop((60, 0, 460, 400)),
        "rescale": astronaut.resize((400, 400), Image.Resampling.LANCZOS),
        "jpeg": _jpeg(astronaut, 35),
        "rotate": astronaut.rotate(7, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)),
        "noise": Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)),
        "blank": Image.new("RGB", (320, 320), (200, 200, 200)),
        "two_faces": two,
        "small_face": astronaut.resize((256, 256), Image.Resampling.LANCZOS),
        "wrong_person": grace,
        "no_class_word": astronaut.crop((20, 0, 512, 492)),
    }


def write_identity_folders(root: Path) -> Path:
    """``root/src`` in the folder layout: ``eileen`` (class.txt ``woman``, captions) and ``grace``."""
    src = root / "src"
    eileen = src / "eileen"
    eileen.mkdir(parents=True)
    for stem, image in eileen_photos().items():
        image.save(eileen / f"{stem}.png")
    (eileen / "class.txt").write_text("woman\n", encoding="utf-8")
    (eileen / "original.txt").write_text(GIVEN_CAPTION + "\n", encoding="utf-8")
    (eileen / "no_class_word.txt").write_text(UNMARKABLE_CAPTION, encoding="utf-8")
    grace = src / "grace"
    grace.mkdir()
    hopper = open_image(GRACE_HOPPER).convert("RGB")
    hopper.save(grace / "portrait.jpg")
    hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(grace / "mirror.png")
    return src
