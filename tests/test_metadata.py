"""PNG metadata: every parameter written, read back, and turned into a request that remakes the image."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photomaker import metadata, presets
from photomaker.errors import InvalidRequestError
from photomaker.images import MAX_IMAGE_PIXELS
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
    standard = {**PARAMS, "fast": None}
    read = metadata.read_parameters(metadata.image_with_metadata(image, standard))
    request = metadata.request_from_parameters(read, id_images=["me.jpg"])
    assert isinstance(request, GenerationRequest)
    assert request.id_images == ["me.jpg"]
    assert (request.prompt, request.negative_prompt, request.style) == (
        "a woman img astronaut, ✨ 宇宙",
        "blurry",
        "Cinematic",
    )
    assert (request.seed, request.num_outputs, request.best_of) == (1234567, 1, 1)
    # 1024x768 is the stored output size's own: the request leaves the size to it.
    assert (request.width, request.height, request.aspect_ratio) == (None, None, PARAMS["aspect_ratio"])
    assert (request.num_steps, request.guidance_scale, request.style_strength) == (30, 4.5, 25.0)
    assert (request.crop_faces, request.fast) == (False, None)
    custom = metadata.request_from_parameters({**standard, "width": 1024, "height": 512})
    assert (custom.width, custom.height) == (1024, 512)


def test_request_from_parameters_needs_prompt_and_seed() -> None:
    with pytest.raises(InvalidRequestError, match="'seed'"):
        metadata.request_from_parameters({"prompt": "a man img"})


# --- Restoring the settings of a PNG (what the app's "Reproduce from a PNG" shows) ---------------------------


@pytest.mark.parametrize("preset", list(presets.FAST_PRESETS))
def test_fast_mode_png_restores_the_preset_not_its_steps_and_guidance(preset: str) -> None:
    """A fast-mode PNG stores the preset's own steps (4-12) and guidance (0 for lightning-8), below the standard
    ranges: restoring them into the standard controls made the next Generate fail."""
    fast = presets.FAST_PRESETS[preset]
    stored = {**PARAMS, "fast": preset, "num_steps": fast.steps, "guidance_scale": fast.guidance_scale}
    restored = metadata.restore_settings(stored)
    request = restored.request
    assert request.fast == preset
    assert (request.num_steps, request.guidance_scale) == (presets.STEPS_DEFAULT, presets.GUIDANCE_DEFAULT)
    assert (request.style_strength, request.seed, request.num_outputs) == (25.0, PARAMS["seed"], 1)
    assert restored.changes == []
    by_label = metadata.restore_settings({**stored, "fast": fast.label}).request
    assert by_label.fast == preset  # the control holds keys


def test_out_of_range_values_are_clamped_and_reported() -> None:
    """A --tiny PNG (2 steps) loaded into a standard app, and values no control accepts."""
    stored = {
        **PARAMS,
        "fast": None,
        "num_steps": 2,
        "guidance_scale": 0.0,
        "style_strength": 80,
        "mix_strength": 1.5,
        "width": 4096,
        "height": 768,
        "seed": 2**31,
    }
    restored = metadata.restore_settings(stored, steps_min=presets.STEPS_MIN)
    request = restored.request
    assert request.num_steps == presets.STEPS_MIN
    assert request.guidance_scale == presets.GUIDANCE_MIN
    assert request.style_strength == presets.STYLE_STRENGTH_MAX
    assert request.mix_strength == presets.MIX_STRENGTH_MAX
    assert (request.width, request.height) == (presets.SIZE_MAX, 768)
    assert request.seed == presets.SEED_MAX
    assert len(restored.changes) == 6
    text = " ".join(restored.changes)
    for said in (
        "number of steps 2",
        "set to 20",
        "guidance scale 0",
        "style strength 80",
        "mix strength 1.5",
        "width 4096",
        "seed 2147483648",
    ):
        assert said in text

    # In --tiny mode the service accepts steps from 1: the same PNG keeps its 2 steps.
    tiny = metadata.restore_settings(stored, steps_min=1)
    assert tiny.request.num_steps == 2 and not any("steps" in change for change in tiny.changes)
    # In range: nothing changed, nothing said.
    assert metadata.restore_settings({**PARAMS, "fast": None}).changes == []


def test_unknown_names_and_bad_values_fall_back_to_defaults_and_are_reported() -> None:
    stored = {
        **PARAMS,
        "fast": "turbo-1",
        "style": "Baroque Nightmare",
        "aspect_ratio": "Square (1:1)",
        "num_steps": "many",
        "guidance_scale": float("nan"),
    }
    restored = metadata.restore_settings(stored)
    request = restored.request
    assert request.fast is None and request.style == GenerationRequest.style
    # The stored size stays, as a custom size, when its output size is unknown.
    assert request.aspect_ratio == GenerationRequest.aspect_ratio and (request.width, request.height) == (1024, 768)
    assert (request.num_steps, request.guidance_scale) == (presets.STEPS_DEFAULT, presets.GUIDANCE_DEFAULT)
    text = " ".join(restored.changes)
    for said in ("'turbo-1'", "'Baroque Nightmare'", "'many'", "nan"):
        assert said in text
    no_size = metadata.restore_settings({**stored, "width": None, "height": None})
    assert "'Square (1:1)'" in " ".join(no_size.changes)


# --- Reading the chunk without decoding the pixels ------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _parameters_chunk(params: dict) -> bytes:
    """An iTXt chunk as `save_png` writes it: keyword, no compression, no language, UTF-8 JSON."""
    return _chunk(b"iTXt", metadata.JSON_CHUNK.encode() + b"\0\0\0\0\0" + json.dumps(params).encode())


def _png(width: int, height: int, *, before_pixels: bytes = b"", after_pixels: bytes = b"") -> bytes:
    """A PNG header claiming `width` x `height` RGB pixels, followed by a few bytes of (truncated) image data."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + header + before_pixels + pixels + after_pixels + _chunk(b"IEND", b"")


def test_parameters_are_read_without_decoding_the_pixels() -> None:
    """100 megapixels in a few hundred bytes: the chunk before the image data is read, no pixel is decoded
    (decoding these truncated pixels would fail, and a real one would take seconds and gigabytes)."""
    data = _png(10_000, 10_000, before_pixels=_parameters_chunk({"prompt": "a man img", "seed": 3}))
    assert len(data) < 1000 and 10_000 * 10_000 > MAX_IMAGE_PIXELS
    assert metadata.read_parameters(data) == {"prompt": "a man img", "seed": 3}


def test_parameters_after_the_pixels_are_read_only_from_small_images(image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    plain = buffer.getvalue()
    trailing = plain[:-12] + _parameters_chunk({"prompt": "a man img", "seed": 4}) + plain[-12:]  # before IEND
    assert metadata.read_parameters(trailing)["seed"] == 4

    huge = _png(10_000, 10_000, after_pixels=_parameters_chunk({"prompt": "a man img", "seed": 5}))
    with pytest.raises(InvalidRequestError, match=r"10000x10000 pixels, more than the 40 megapixels"):
        metadata.read_parameters(huge)


def test_decompression_bomb_is_refused_clearly(tmp_path: Path) -> None:
    """Above twice PIL's own limit Image.open raises DecompressionBombError (not an OSError)."""
    side = 30_000
    assert side * side > 2 * (Image.MAX_IMAGE_PIXELS or 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side, before_pixels=_parameters_chunk({"prompt": "a man img", "seed": 6})))
    with pytest.raises(InvalidRequestError, match=r"'.*bomb\.png' is too large to read"):
        metadata.read_parameters(path)


def test_control_settings_are_restored_and_the_images_asked_for_again() -> None:
    params = {
        **PARAMS,
        "fast": None,
        "control_type": "depth",
        "control_image": "room.jpg",
        "control_scale": 0.6,
        "control_start": 0.1,
        "control_end": 0.9,
        "init_image": None,
        "strength": None,
        "mask_image": None,
        "mask_face": False,
        "style_image": metadata.UNNAMED_IMAGE,
        "style_image_scale": 0.4,
    }
    restored = metadata.restore_settings(params, id_images=["me.jpg"])
    request = restored.request
    assert (request.control_type, request.control_scale, request.control_start, request.control_end) == (
        "depth",
        0.6,
        0.1,
        0.9,
    )
    assert (request.style_image_scale, request.strength, request.mask_face) == (0.4, None, False)
    assert (request.control_image, request.style_image, request.init_image) == (None, None, None)
    assert restored.changes == [
        "The control image (room.jpg) is not stored in the image: give it again.",
        "The style image is not stored in the image: give it again.",
    ]
    start = metadata.restore_settings(
        {**PARAMS, "fast": None, "init_image": "beach.png", "strength": 0.9, "mask_face": True, "control_type": ""}
    )
    assert (start.request.strength, start.request.mask_face, start.request.control_type) == (0.9, True, "")
    assert start.changes == ["The start photo (beach.png) is not stored in the image: give it again."]


def test_the_summary_names_control_start_photo_and_style_image_when_used() -> None:
    used = metadata.format_parameters(
        {
            **PARAMS,
            "control_type": "pose",
            "control_scale": 0.8,
            "control_start": 0.0,
            "control_end": 0.5,
            "style_image": "art.png",
            "style_image_scale": 0.7,
        }
    )
    assert "Control: pose 0.8 (0.0-0.5)" in used and "Style image: scale 0.7" in used and "Mask" not in used
    start = metadata.format_parameters({**PARAMS, "init_image": "beach.png", "strength": 0.9, "mask_face": True})
    assert "Start photo: strength 0.9" in start and "Mask: the face" in start and "Control" not in start


def test_image_label_names_a_file_and_nothing_else() -> None:
    assert metadata.image_label("/home/me/photos/beach.png") == "beach.png"
    assert metadata.image_label(Image.new("RGB", (4, 4))) == metadata.UNNAMED_IMAGE
    assert metadata.image_label(b"\x89PNG...") == metadata.UNNAMED_IMAGE
    assert metadata.image_label(None) is None
