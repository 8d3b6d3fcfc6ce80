"""PNG metadata: every parameter written, read back, and turned into a request that remakes the image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photomaker import metadata
from photomaker.errors import InvalidRequestError
from photomaker.service import GenerationRequest

PARAMS = {
    "prompt": "a woman img astronaut, ✨ 宇宙",
    "negative_prompt": "blurry",
    "prompt_used": "film still of a woman img astronaut, ✨ 宇宙",
    "negative_prompt_used": "flat lighting blurry",
    "style": "Cinematic",
    "aspect_ratio": "CRT Monitor / Landscape (4:3)",
    "width": 1024,
    "height": 768,
    "seed": 1234567,
    "num_steps": 30,
    "guidance_scale": 4.5,
    "style_strength": 25.0,
    "start_merge_step": 7,
    "num_id_images": 2,
    "num_mix_images": 0,
    "mix_strength": None,
    "crop_faces": False,
    "fast": "hyper-sd-8",
    "base_model": "SG161222/RealVisXL_V4.0",
    "pm_version": 1,
    "adapter": "TencentARC/PhotoMaker",
    "face_backend": "dlib",
    "identity": {"similarity": 0.8123, "same_person": True, "face_found": True},
}


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


def test_save_and_read_back_every_parameter(tmp_path: Path, image: Image.Image) -> None:
    path = tmp_path / "out.png"
    metadata.save_png(image, path, PARAMS)
    read = metadata.read_parameters(path)
    for key, value in PARAMS.items():
        assert read[key] == value, key
    assert set(metadata.PARAMETER_KEYS) <= set(read)
    assert read["library_version"] and read["metadata_version"] == metadata.METADATA_VERSION
    with Image.open(path) as reopened:
        assert np.array_equal(np.asarray(reopened), np.asarray(image))


def test_human_readable_chunk(tmp_path: Path, image: Image.Image) -> None:
    path = tmp_path / "out.png"
    metadata.save_png(image, path, PARAMS)
    with Image.open(path) as reopened:
        text = reopened.info[metadata.TEXT_CHUNK]
    first, second, third = text.split("\n")
    assert first == PARAMS["prompt_used"]
    assert second == "Negative prompt: flat lighting blurry"
    for part in (
        "Steps: 30",
        "Seed: 1234567",
        "Guidance: 4.5",
        "Style: Cinematic",
        "Size: 1024x768",
        "Fast: hyper-sd-8",
        "PhotoMaker: v1 (TencentARC/PhotoMaker)",
        "Identity similarity: 0.8123",
    ):
        assert part in third


def test_image_with_metadata_keeps_pixels_and_carries_parameters(image: Image.Image) -> None:
    tagged = metadata.image_with_metadata(image, PARAMS)
    assert np.array_equal(np.asarray(tagged), np.asarray(image))
    assert json.loads(tagged.info[metadata.JSON_CHUNK])["seed"] == PARAMS["seed"]
    assert metadata.read_parameters(tagged)["prompt"] == PARAMS["prompt"]


def test_parameters_survive_gradio_png_download(tmp_path: Path, image: Image.Image) -> None:
    """The app's gallery saves results with Gradio; the downloaded PNG must still carry the parameters."""
    from gradio.processing_utils import save_pil_to_cache

    saved = save_pil_to_cache(metadata.image_with_metadata(image, PARAMS), str(tmp_path), format="png")
    assert metadata.read_parameters(saved)["prompt_used"] == PARAMS["prompt_used"]


def test_read_from_bytes(image: Image.Image) -> None:
    buffer = io.BytesIO()
    metadata.save_png(image, buffer, PARAMS)
    assert metadata.read_parameters(buffer.getvalue())["style"] == "Cinematic"


def test_png_without_parameters_is_refused_clearly(tmp_path: Path, image: Image.Image) -> None:
    path = tmp_path / "plain.png"
    image.save(path)
    with pytest.raises(InvalidRequestError, match="carries no PhotoMaker parameters"):
        metadata.read_parameters(path)
    with pytest.raises(InvalidRequestError, match="Cannot read"):
        metadata.read_parameters(b"not an image at all")


def test_request_from_parameters_reproduces_the_request(image: Image.Image) -> None:
    read = metadata.read_parameters(metadata.image_with_metadata(image, PARAMS))
    request = metadata.request_from_parameters(read, id_images=["me.jpg"])
    assert isinstance(request, GenerationRequest)
    assert request.id_images == ["me.jpg"]
    assert (request.prompt, request.negative_prompt, request.style) == (
        "a woman img astronaut, ✨ 宇宙",
        "blurry",
        "Cinematic",
    )
    assert (request.seed, request.num_outputs, request.best_of) == (1234567, 1, 1)
    assert (request.width, request.height, request.aspect_ratio) == (1024, 768, PARAMS["aspect_ratio"])
    assert (request.num_steps, request.guidance_scale, request.style_strength) == (30, 4.5, 25.0)
    assert (request.crop_faces, request.fast) == (False, "hyper-sd-8")


def test_request_from_parameters_needs_prompt_and_seed() -> None:
    with pytest.raises(InvalidRequestError, match="'seed'"):
        metadata.request_from_parameters({"prompt": "a man img"})
