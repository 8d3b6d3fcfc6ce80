"""The dlib backend on real public-domain portraits under everyday edits: still "same person", and the two
people still "different".

ID photos arrive mirrored (selfies), cropped, rescaled, re-encoded, a little tilted and in front of busy
backgrounds; the identity score and the one-person check must not change their verdict for any of these.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from faces_fixtures import ASTRONAUT, GRACE_HOPPER
from PIL import Image, ImageDraw

from photomaker.faces import FaceAnalyzer, get_face_analyzer
from photomaker.images import load_image


def _mirror(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _crop(image: Image.Image) -> Image.Image:
    width, height = image.size
    return image.crop((width // 10, height // 12, width - width // 8, height - height // 6))


def _rescale(factor: float) -> Callable[[Image.Image], Image.Image]:
    def rescale(image: Image.Image) -> Image.Image:
        return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)

    return rescale


def _jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=35)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _rotate(degrees: float) -> Callable[[Image.Image], Image.Image]:
    def rotate(image: Image.Image) -> Image.Image:
        return image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(90, 90, 90))

    return rotate


def _on_noise(image: Image.Image) -> Image.Image:
    noise = np.random.default_rng(0).integers(0, 256, (900, 1000, 3), dtype=np.uint8)
    canvas = Image.fromarray(noise)
    canvas.paste(image.resize((image.width * 3 // 4, image.height * 3 // 4)), (380, 250))
    return canvas


def _on_texture(image: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (1000, 800), (235, 220, 200))
    draw = ImageDraw.Draw(canvas)
    rng = np.random.default_rng(1)
    for _ in range(400):  # a cluttered wall of coloured tiles and strokes
        x, y = rng.integers(0, 1000), rng.integers(0, 800)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + rng.integers(10, 60), y + rng.integers(10, 60)), fill=colour)
        else:
            draw.line((x, y, x + rng.integers(-80, 80), y + rng.integers(-80, 80)), fill=colour, width=4)
    canvas.paste(image.resize((image.width * 3 // 4, image.height * 3 // 4)), (60, 200))
    return canvas


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "mirror": _mirror,
    "crop": _crop,
    "downscale": _rescale(0.6),
    "upscale": _rescale(1.5),
    "jpeg": _jpeg,
    "rotate +10": _rotate(10),
    "rotate -10": _rotate(-10),
    "mirror, crop and downscale": lambda image: _rescale(0.8)(_crop(_mirror(image))),
    "noise background": _on_noise,
    "textured background": _on_texture,
}
PEOPLE = {"grace_hopper": GRACE_HOPPER, "astronaut": ASTRONAUT}


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return get_face_analyzer("dlib")


@pytest.fixture(scope="module")
def originals(analyzer: FaceAnalyzer) -> dict[str, np.ndarray]:
    return {name: _embedding(analyzer, load_image(path)) for name, path in PEOPLE.items()}


def _embedding(analyzer: FaceAnalyzer, image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image)
    faces = analyzer.detect(rgb)
    assert faces, "no face found"
    return analyzer.embed(rgb, faces[0])


@pytest.mark.parametrize("person", PEOPLE)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_an_edited_portrait_stays_the_same_person_and_unlike_the_other(
    analyzer: FaceAnalyzer, originals: dict[str, np.ndarray], person: str, transform: str
) -> None:
    edited = _embedding(analyzer, TRANSFORMS[transform](load_image(PEOPLE[person])))
    other = next(name for name in PEOPLE if name != person)
    distance = analyzer.distance(originals[person], edited)
    assert analyzer.is_same_person(originals[person], edited), f"{transform}: distance {distance:.3f}"
    assert distance < 0.45  # clearly inside dlib's 0.6 threshold, not just under it
    assert not analyzer.is_same_person(originals[other], edited)


def test_a_weak_false_detection_larger_than_the_face_is_not_picked(
    analyzer: FaceAnalyzer, originals: dict[str, np.ndarray]
) -> None:
    import dlib

    cropped = np.asarray(load_image(ASTRONAUT).crop((0, 0, 432, 432)))
    rects, scores, _ = dlib.get_frontal_face_detector().run(cropped, 0, 0.0)
    raw = sorted(zip(scores, (r.width() for r in rects), strict=True), reverse=True)
    # the scenario: HOG also fires on the space suit, weakly, on a box larger than the real face
    assert len(raw) == 2 and raw[1][0] < 0.1 * raw[0][0] and raw[1][1] > raw[0][1]
    faces = analyzer.detect(cropped)
    assert len(faces) == 1 and faces[0].score == pytest.approx(raw[0][0])
    assert faces[0].bbox[3] < 200  # the head, not the suit below it
    embedding = analyzer.embed(cropped, faces[0])
    assert analyzer.distance(originals["astronaut"], embedding) < 0.2
