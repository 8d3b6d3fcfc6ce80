"""The service: configuration, request validation (no model), and generation on the tiny models."""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from photomaker import metadata, presets
from photomaker.errors import (
    IDImageError,
    InvalidRequestError,
    ModelLoadError,
    PromptError,
)
from photomaker.faces.base import FaceAnalyzer
from photomaker.service import (
    GenerationRequest,
    PhotoMakerService,
    ServiceConfig,
    explain_load_error,
    resolve_device_and_dtype,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
HOPPER = EXAMPLES / "grace_hopper.jpg"


def small_photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


def request(**overrides) -> GenerationRequest:
    fields = {
        "id_images": [small_photo()],
        "prompt": "a photo of a man img",
        "width": 64,
        "height": 64,
        "num_steps": 2,
        "num_outputs": 1,
        "seed": 7,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------ configuration


def test_config_from_env_then_overrides() -> None:
    env = {
        "PHOTOMAKER_BASE_MODEL": "me/base",
        "PHOTOMAKER_VERSION": "2",
        "PHOTOMAKER_FACE_BACKEND": "insightface",
        "PHOTOMAKER_OFFLOAD": "model",
        "PHOTOMAKER_VAE_TILING": "yes",
        "PHOTOMAKER_CACHE_SIZE": "3",
        "PHOTOMAKER_DTYPE": "bf16",
    }
    config = ServiceConfig.from_env({"offload": "sequential", "device": None}, environ=env)
    assert (config.base_model, config.pm_version, config.face_backend) == ("me/base", 2, "insightface")
    assert (config.offload, config.vae_tiling, config.cache_size, config.dtype) == ("sequential", True, 3, "bf16")
    assert config.device is None  # a None override keeps the environment / default


@pytest.mark.parametrize(("spelling", "version"), [("1", 1), ("v1", 1), ("2", 2), ("v2", 2), ("V2", 2)])
def test_pm_version_accepts_the_reference_spelling(spelling: str, version: int) -> None:
    """The reference and its tutorials write pm_version="v2"; the variable, the flags and the config take it."""
    backend = {"PHOTOMAKER_FACE_BACKEND": "insightface"}
    assert ServiceConfig.from_env(environ={"PHOTOMAKER_VERSION": spelling, **backend}).pm_version == version
    assert ServiceConfig(pm_version=spelling, face_backend="insightface").pm_version == version
    from photomaker import cli

    flags = ["--pm-version", spelling, "--face-backend", "insightface"]
    args = cli.build_parser().parse_args(["batch", "jobs.jsonl", "--out", "o", *flags])
    assert cli.service_config(args, device="cpu").pm_version == version


def test_validation_is_a_pure_function_of_request_and_config() -> None:
    """No service and no model: the plan comes from the request and the configuration alone."""
    from photomaker.validation import validate_request

    plan = validate_request(request(num_steps=3, style_strength=50), ServiceConfig(tiny_dir="unused", device="cpu"))
    assert (plan.width, plan.height, plan.num_steps, plan.seed, plan.start_merge_step) == (64, 64, 3, 7, 1)
    assert plan.id_images[0].size == (40, 48) and plan.prompt == "a photo of a man img"
    with pytest.raises(InvalidRequestError, match="num_steps must be between 20 and 100, got 3"):
        validate_request(request(num_steps=3), ServiceConfig(device="cpu"))  # steps from 20 without --tiny


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"PHOTOMAKER_VERSION": "3"}, "PHOTOMAKER_VERSION must be 1 or 2"),
        ({"PHOTOMAKER_VERSION": "v3"}, "PHOTOMAKER_VERSION must be 1 or 2"),
        ({"PHOTOMAKER_VERSION": "two"}, "PHOTOMAKER_VERSION='two' is not valid"),
        ({"PHOTOMAKER_OFFLOAD": "gpu"}, "PHOTOMAKER_OFFLOAD must be one of none, model, sequential"),
        ({"PHOTOMAKER_DTYPE": "int8"}, "PHOTOMAKER_DTYPE must be float16, bfloat16 or float32"),
        ({"PHOTOMAKER_COMPILE": "maybe"}, "PHOTOMAKER_COMPILE='maybe' is not valid"),
        ({"PHOTOMAKER_VERSION": "2", "PHOTOMAKER_FACE_BACKEND": "dlib"}, "PHOTOMAKER_FACE_BACKEND=insightface"),
    ],
)
def test_bad_configuration_names_the_variable(env: dict, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment.replace("(", r"\(")):
        ServiceConfig.from_env(environ=env)


def test_prepared_adapter_cache_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ServiceConfig().resolved_fused_cache_dir == str(tmp_path / "photomaker" / "prepared")
    assert ServiceConfig(tiny_dir="t").resolved_fused_cache_dir is None  # tests never fill the user's cache
    assert ServiceConfig(tiny_dir="t", fused_cache_dir="/c").resolved_fused_cache_dir == "/c"
    assert ServiceConfig.from_env(environ={"PHOTOMAKER_FUSED_CACHE_DIR": "off"}).resolved_fused_cache_dir is None
    assert ServiceConfig.from_env(environ={"PHOTOMAKER_FUSED_CACHE_DIR": "/d"}).resolved_fused_cache_dir == "/d"


def test_fast_mode_reads_the_tiny_models_loras_unless_told_otherwise() -> None:
    assert ServiceConfig(tiny_dir="t").resolved_fast_lora_dir == str(Path("t") / "fast-loras")
    assert ServiceConfig(tiny_dir="t", fast_lora_dir="/f").resolved_fast_lora_dir == "/f"
    assert ServiceConfig().resolved_fast_lora_dir is None  # the Hub


def test_face_backend_follows_the_version() -> None:
    assert ServiceConfig().resolved_face_backend == "dlib"
    assert ServiceConfig(pm_version=2).resolved_face_backend == "insightface"


def test_device_and_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device_and_dtype(None, None) == ("cpu", torch.bfloat16)
    assert resolve_device_and_dtype(None, None, tiny=True) == ("cpu", torch.float32)
    assert resolve_device_and_dtype("cpu", "fp16") == ("cpu", torch.float16)
    with pytest.raises(ModelLoadError, match="PHOTOMAKER_DEVICE='cuda' but torch .* sees no CUDA GPU"):
        resolve_device_and_dtype("cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_and_dtype(None, None) == ("cuda", torch.float16)


def test_out_of_memory_while_loading_says_how_to_fit() -> None:
    error = explain_load_error(
        torch.OutOfMemoryError("CUDA out of memory"), "the base model", "x/y", "PHOTOMAKER_BASE_MODEL"
    )
    assert "Out of memory" in str(error) and "PHOTOMAKER_OFFLOAD=model" in str(error)


# --------------------------------------------------------------------------------- validation (no model)


@pytest.fixture(scope="module")
def unloaded() -> PhotoMakerService:
    return PhotoMakerService(ServiceConfig())


@pytest.mark.parametrize(
    ("overrides", "error", "fragment"),
    [
        ({"id_images": []}, IDImageError, "Got 0 ID photos; give 1 to 4"),
        ({"id_images": [small_photo()] * 5}, IDImageError, "Got 5 ID photos; give 1 to 4"),
        ({"mix_images": [small_photo()] * 5}, IDImageError, "at most 4"),
        ({"id_images": [b"this is not an image"], "num_steps": 30}, IDImageError, "ID photo 1"),
        ({"prompt": ""}, PromptError, "The prompt is empty"),
        ({"prompt": " \t\n "}, PromptError, "The prompt is empty"),
        ({"prompt": "a man img " * 300}, InvalidRequestError, "keep it under 2000"),
        ({"prompt": "a man img and a woman img"}, PromptError, "2 times"),
        ({"prompt": "a sunset over the sea"}, PromptError, "no trigger word 'img'"),
        ({"num_steps": 0}, InvalidRequestError, "num_steps must be between 20 and 100, got 0"),
        ({"num_steps": 19}, InvalidRequestError, "num_steps must be between 20 and 100, got 19"),
        ({"num_steps": 100000}, InvalidRequestError, "num_steps must be between 20 and 100"),
        ({"num_steps": 30.5}, InvalidRequestError, "num_steps must be a whole number"),
        ({"num_steps": "50"}, InvalidRequestError, "num_steps must be a number"),
        ({"num_steps": True}, InvalidRequestError, "num_steps must be a number"),
        ({"num_steps": 30, "guidance_scale": -1}, InvalidRequestError, "guidance_scale must be between 0.1 and 10"),
        ({"num_steps": 30, "guidance_scale": math.nan}, InvalidRequestError, "guidance_scale must be a finite"),
        ({"num_steps": 30, "guidance_scale": math.inf}, InvalidRequestError, "guidance_scale must be a finite"),
        ({"num_steps": 30, "style_strength": 10}, InvalidRequestError, "style_strength must be between 15 and 50"),
        ({"num_steps": 30, "num_outputs": 0}, InvalidRequestError, "num_outputs must be between 1 and 4"),
        ({"num_steps": 30, "num_outputs": 5}, InvalidRequestError, "num_outputs must be between 1 and 4"),
        ({"num_steps": 30, "best_of": 9}, InvalidRequestError, "best_of must be between 1 and 4"),
        ({"num_steps": 30, "seed": -1}, InvalidRequestError, "seed must be between 0 and 2147483647"),
        ({"num_steps": 30, "seed": 2**31}, InvalidRequestError, "seed must be between 0 and 2147483647"),
        ({"num_steps": 30, "seed": 10**30}, InvalidRequestError, "seed must be between"),
        ({"num_steps": 30, "style": "Picasso"}, InvalidRequestError, "Unknown style 'Picasso'"),
        (
            {"num_steps": 30, "width": None, "height": None, "aspect_ratio": "2:1"},
            InvalidRequestError,
            "Unknown aspect ratio '2:1'",
        ),
        ({"num_steps": 30, "width": 100}, InvalidRequestError, "width must be a multiple of 8, got 100; use 96 or 104"),
        ({"num_steps": 30, "height": None}, InvalidRequestError, "Give both width and height"),
        ({"num_steps": 30, "width": 4096}, InvalidRequestError, "width must be between 64 and 2048"),
        (
            {"num_steps": 30, "mix_images": [small_photo()], "mix_strength": 1.5},
            InvalidRequestError,
            "mix_strength must be between 0 and 1",
        ),
        ({"num_steps": 30, "fast": "turbo"}, InvalidRequestError, "Unknown fast-mode preset 'turbo'"),
        ({"num_steps": 30, "crop_faces": "yes"}, InvalidRequestError, "crop_faces must be true or false"),
    ],
)
def test_bad_requests_are_refused_before_loading(
    unloaded: PhotoMakerService, overrides: dict, error: type, fragment: str
) -> None:
    with pytest.raises(error) as info:
        unloaded.generate(request(**overrides))
    assert fragment in str(info.value)
    assert unloaded.status().state == "idle"  # nothing was loaded to find this out


def test_valid_plan(unloaded: PhotoMakerService) -> None:
    plan = unloaded.validate(
        request(
            num_steps=50,
            style_strength=20,
            guidance_scale=5,
            prompt="a man img\x07 smiling",
            width=None,
            height=None,
            aspect_ratio="Widescreen TV / Landscape (16:9)",
        )
    )
    assert (plan.width, plan.height, plan.num_steps, plan.start_merge_step) == (1024, 576, 50, 10)
    assert plan.positive.startswith("candid photograph of a man img  smiling")
    assert plan.negative.endswith("watermark, text")
    assert any("control character" in warning for warning in plan.warnings)
    assert plan.id_weights is None


def test_trigger_word_is_inserted_with_a_note(unloaded: PhotoMakerService) -> None:
    plan = unloaded.validate(request(num_steps=30, prompt="a photo of a woman on the beach"))
    assert plan.prompt == "a photo of a woman img on the beach"
    assert any("Added the trigger word 'img'" in warning for warning in plan.warnings)


def test_random_seed_when_none(unloaded: PhotoMakerService) -> None:
    seeds = {unloaded.validate(request(num_steps=30, seed=None)).seed for _ in range(5)}
    assert len(seeds) > 1 and all(presets.SEED_MIN <= s <= presets.SEED_MAX for s in seeds)


def test_image_seeds_wrap_inside_the_valid_range(unloaded: PhotoMakerService) -> None:
    plan = unloaded.validate(request(num_steps=30, seed=presets.SEED_MAX))
    assert [plan.image_seed(k) for k in range(3)] == [presets.SEED_MAX, 0, 1]


@pytest.mark.parametrize(
    ("m", "first", "second"), [(0.0, 1.0, 0.0), (0.25, 1.0, 0.5), (0.5, 1.0, 1.0), (0.75, 0.5, 1.0), (1.0, 0.0, 1.0)]
)
def test_identity_mixing_weights(unloaded: PhotoMakerService, m: float, first: float, second: float) -> None:
    plan = unloaded.validate(
        request(num_steps=30, id_images=[small_photo(1), small_photo(2)], mix_images=[small_photo(3)], mix_strength=m)
    )
    assert plan.id_weights == pytest.approx([first, first, second])


def test_fast_mode_takes_steps_and_guidance_from_the_preset(unloaded: PhotoMakerService) -> None:
    preset = presets.FAST_PRESETS["lightning-8"]
    plan = unloaded.validate(
        request(num_steps=0, guidance_scale=math.nan, fast=preset.label, negative_prompt="blurry", style_strength=50)
    )
    assert (plan.num_steps, plan.guidance_scale, plan.start_merge_step) == (8, 0.0, preset.max_merge_step)
    assert any("so your negative prompt has no effect" in warning for warning in plan.warnings)
    plan = unloaded.validate(request(fast=preset.key))  # only the default style's negative
    assert any("the negative prompt of the style 'Photographic (Default)' has no effect" in w for w in plan.warnings)
    assert not unloaded.validate(request(fast=preset.key, style="(No style)", num_steps=presets.STEPS_DEFAULT)).warnings


def test_fast_mode_says_which_given_settings_it_did_not_use(unloaded: PhotoMakerService) -> None:
    plan = unloaded.validate(request(fast="hyper-sd-8", num_steps=30, guidance_scale=7, style="(No style)"))
    assert plan.warnings == [
        "Hyper-SD CFG (8 steps) uses its own 8 steps and guidance 5; the given steps 30 and guidance 7 were not used."
    ]


def test_trigger_word_is_taken_out_of_the_negative_prompt(unloaded: PhotoMakerService) -> None:
    plan = unloaded.validate(request(negative_prompt="blurry img, bad", style="(No style)", num_steps=30))
    assert plan.negative_prompt == "blurry, bad"
    assert plan.warnings == ["Removed 'img' from the negative prompt: it only marks the person in the prompt."]


def test_aspect_ratio_is_checked_even_with_a_custom_size(unloaded: PhotoMakerService) -> None:
    with pytest.raises(InvalidRequestError, match="aspect_ratio must be a preset name, got 123"):
        unloaded.validate(request(aspect_ratio=123))
    with pytest.raises(InvalidRequestError, match="Cinema"):
        unloaded.validate(request(aspect_ratio="Cinema"))


def test_best_of_without_face_analysis_is_refused() -> None:
    service = PhotoMakerService(ServiceConfig(face_backend="none"))
    with pytest.raises(InvalidRequestError, match="best_of needs identity scores"):
        service.validate(request(best_of=2, num_steps=presets.STEPS_DEFAULT))


# ------------------------------------------------------------------------------------ loading failures


@pytest.mark.parametrize(
    ("base_model", "fragments"),
    [
        ("nobody-here/no-such-model", ["HF_HUB_OFFLINE=1 is set", "'nobody-here/no-such-model'", "hf download"]),
        ("/no/such/folder/sdxl", ["looks like a local path but nothing exists"]),
        ("not a valid id", ["neither an existing local path nor a valid Hugging Face Hub id"]),
    ],
)
def test_load_failure_is_explained_and_the_service_keeps_answering(base_model: str, fragments: list[str]) -> None:
    service = PhotoMakerService(ServiceConfig(base_model=base_model, face_backend="none", device="cpu"))
    service.start_loading()
    with pytest.raises(ModelLoadError) as info:
        service.wait_ready(timeout=120)
    for fragment in fragments:
        assert fragment in str(info.value)
    status = service.status()
    assert status.state == "error" and status.message == str(info.value)
    refusals = []
    for _ in range(3):  # requests get the reason at once; no retry per request
        with pytest.raises(ModelLoadError) as refused:
            service.generate(request(num_steps=30))
        refusals.append(refused.value)
    assert [str(error) for error in refusals] == [str(info.value)] * 3
    # Each request its own exception: one shared object would collect every request's frames (and photos).
    assert len({id(error) for error in refusals}) == 3
    with pytest.raises(InvalidRequestError):  # and bad requests still get their own message
        service.generate(request(num_steps=0))


# --------------------------------------------------------------------------------- on the tiny models


@pytest.fixture(scope="module")
def tiny_service(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PhotoMakerService:
    config = ServiceConfig(
        tiny_dir=str(tiny_models_dir),
        face_backend="none",
        device="cpu",
    )
    service = PhotoMakerService(config)
    service.wait_ready(timeout=300)
    service.pipeline.set_progress_bar_config(disable=True)
    return service


def test_generate_end_to_end(tiny_service: PhotoMakerService) -> None:
    calls: list[tuple[int, int, str]] = []
    result = tiny_service.generate(request(num_outputs=2, num_steps=3, seed=100), lambda *a: calls.append(a))
    assert len(result.images) == 2 and result.seed == 100
    assert [item.seed for item in result.images] == [100, 101]
    for item in result.images:
        assert item.image.size == (64, 64)
        stored = metadata.read_parameters(item.image)
        assert stored["seed"] == item.seed and stored["num_steps"] == 3
        assert stored["start_merge_step"] == presets.start_merge_step(20, 3)
        assert stored["base_model"].endswith("base") and stored["pm_version"] == 1
        assert stored["crop_faces"] is False  # asked for, but nothing is cropped without face analysis
    denoising = [c for c in calls if c[2].startswith("Denoising")]
    assert [c[0] for c in denoising] == [1, 2, 3] and all(c[1] == 3 for c in denoising)
    assert result.prompt_used.startswith("candid photograph of a photo of a man img")


def test_same_seed_same_pixels_and_each_image_reproducible_alone(tiny_service: PhotoMakerService) -> None:
    first = tiny_service.generate(request(num_outputs=2, seed=2024))
    second = tiny_service.generate(request(num_outputs=2, seed=2024))
    for a, b in zip(first.images, second.images, strict=True):
        assert np.array_equal(pixels(a.image), pixels(b.image))
    assert not np.array_equal(pixels(first.images[0].image), pixels(first.images[1].image))

    # The second image, rebuilt from its PNG alone: the same picture.
    rebuilt = metadata.request_from_parameters(
        metadata.read_parameters(first.images[1].image), id_images=[small_photo()]
    )
    assert rebuilt.seed == 2025 and rebuilt.num_outputs == 1
    alone = tiny_service.generate(rebuilt).images[0]
    assert np.abs(pixels(alone.image) - pixels(first.images[1].image)).max() <= 2


def test_cache_hit_skips_the_id_encoder(tiny_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = tiny_service.pipeline.id_encoder
    runs: list[int] = []
    original = encoder.encode_images
    monkeypatch.setattr(encoder, "encode_images", lambda *a, **k: (runs.append(1), original(*a, **k))[1])
    photos = [small_photo(40), small_photo(41)]

    first = tiny_service.generate(request(id_images=photos, seed=1))
    assert not first.cache_hit and len(runs) == 1
    again = tiny_service.generate(request(id_images=[p.copy() for p in photos], prompt="a man img at night", seed=2))
    assert again.cache_hit and len(runs) == 1
    tiny_service.generate(request(id_images=photos[:1], seed=3))  # other photos: encoded again
    assert len(runs) == 2
    tiny_service.generate(request(id_images=photos, crop_faces=False, seed=4))  # other crop setting
    assert len(runs) == 3


def test_trigger_insertion_is_reported(tiny_service: PhotoMakerService) -> None:
    result = tiny_service.generate(request(prompt="portrait of a woman, studio light", style="(No style)"))
    assert result.prompt_used == "portrait of a woman img, studio light"
    assert any("Added the trigger word 'img'" in warning for warning in result.warnings)


def test_fast_mode_round_trip_leaves_standard_mode_unchanged(tiny_service: PhotoMakerService) -> None:
    pipe = tiny_service.pipeline
    standard = tiny_service.generate(request(seed=5)).images[0]
    euler = type(pipe.scheduler)

    fast = tiny_service.generate(request(seed=5, fast="lcm-4")).images[0]
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert (fast.parameters["fast"], fast.parameters["num_steps"]) == ("lcm-4", 4)
    assert not np.array_equal(pixels(fast.image), pixels(standard.image))

    back = tiny_service.generate(request(seed=5)).images[0]
    assert type(pipe.scheduler) is euler
    assert np.array_equal(pixels(back.image), pixels(standard.image))


def test_failure_inside_generation_frees_and_next_request_works(
    tiny_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = tiny_service.pipeline.unet

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(unet, "forward", out_of_memory)
        with pytest.raises(InvalidRequestError, match="Ran out of memory generating 1 image"):
            tiny_service.generate(request())
    assert len(tiny_service.generate(request()).images) == 1


def test_second_start_maps_the_prepared_adapter_and_generates_the_same(
    tiny_models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def start() -> PhotoMakerService:
        config = ServiceConfig(
            tiny_dir=str(tiny_models_dir), face_backend="none", device="cpu", fused_cache_dir=str(tmp_path)
        )
        service = PhotoMakerService(config)
        service.wait_ready(timeout=300)
        service.pipeline.set_progress_bar_config(disable=True)
        return service

    def weights(service: PhotoMakerService) -> dict[str, torch.Tensor]:
        pipe = service.pipeline
        return {
            **{f"unet.{k}": v.detach().clone() for k, v in pipe.unet.state_dict().items()},
            **{f"id_encoder.{k}": v.detach().clone() for k, v in pipe.id_encoder.state_dict().items()},
        }

    def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        assert actual.keys() == expected.keys()
        differing = [name for name in expected if not torch.equal(actual[name], expected[name])]
        assert differing == [], f"{len(differing)} tensors differ, e.g. {differing[:3]}"

    def assert_same_picture(actual: Image.Image, expected: Image.Image) -> None:
        # Fused at load and mapped from the cache, the weights are bit-identical (checked above), but the two
        # loading paths leave the tensors laid out differently, and some CPUs' kernels then round differently:
        # one 8-bit level on one pixel in 12,288 was seen on an AMD EPYC. Allow one level, nowhere more.
        difference = np.abs(pixels(actual) - pixels(expected))
        assert difference.max() <= 1, f"max difference {difference.max()} levels"

    first = start()
    (cache_file,) = tmp_path.glob("photomaker-prepared-*.safetensors")
    stored = cache_file.read_bytes()
    fused_at_load = weights(first)
    expected = first.generate(request(seed=9)).images[0]
    del first

    with caplog.at_level("INFO", logger="photomaker.loading"):
        second = start()
    assert "mapped from" in caplog.text
    assert_same_weights(weights(second), fused_at_load)
    assert_same_picture(second.generate(request(seed=9)).images[0].image, expected.image)
    # Fast mode fuses into the mapped weights: leaving it restores them exactly, and the file on disk stays.
    second.generate(request(seed=9, fast="lightning-8"))
    assert_same_picture(second.generate(request(seed=9)).images[0].image, expected.image)
    assert_same_weights(weights(second), fused_at_load)
    assert cache_file.read_bytes() == stored


def test_concurrent_start_loading_loads_once(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline as Pipeline

    loads: list[int] = []
    original = Pipeline.from_pretrained
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: (loads.append(1), original(*a, **k))[1])
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="none", device="cpu"))
    barrier = threading.Barrier(8)
    pipelines = []

    def start() -> None:
        barrier.wait()
        service.start_loading()
        service.wait_ready(timeout=300)
        pipelines.append(service.pipeline)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(pipelines) == 8 and all(p is pipelines[0] for p in pipelines)
    service.start_loading()  # ready: nothing happens
    assert len(loads) == 1 and service.status().state == "ready"


# ------------------------------------------------------------------------------------ with face analysis


@pytest.fixture(scope="module")
def face_service(tiny_models_dir: Path) -> PhotoMakerService:
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="dlib", device="cpu"))
    service.wait_ready(timeout=300)
    service.pipeline.set_progress_bar_config(disable=True)
    return service


def test_face_crops_and_identity_scores(face_service: PhotoMakerService) -> None:
    assert "Face models: dlib: Boost Software License" in face_service.status().message  # licence shown
    result = face_service.generate(request(id_images=[ASTRONAUT], num_outputs=2))
    assert len(result.crops) == 1 and result.crops[0].size != Image.open(ASTRONAUT).size  # cropped to the face
    for item in result.images:
        assert item.identity is not None and item.identity["face_found"] is False  # tiny outputs are noise
        assert metadata.read_parameters(item.image)["identity"] == item.identity


def test_photo_without_a_face_is_named(face_service: PhotoMakerService) -> None:
    with pytest.raises(IDImageError, match="photo 2: no face found"):
        face_service.generate(request(id_images=[ASTRONAUT, small_photo()]))


def test_a_cached_mix_is_scored_against_whoever_dominates_it(
    face_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import photomaker.faces

    real_score = photomaker.faces.identity_score
    seen: list[np.ndarray] = []

    def spy(image, references, analyzer, **kwargs):
        seen.append(np.asarray(references))
        return real_score(image, references, analyzer, **kwargs)

    monkeypatch.setattr(photomaker.faces, "identity_score", spy)
    mix = {"id_images": [ASTRONAUT], "mix_images": [HOPPER], "num_outputs": 1}
    first = face_service.generate(request(**mix, mix_strength=0.3))
    second = face_service.generate(request(**mix, mix_strength=0.8))  # same photos: a cache hit
    assert second.cache_hit and not first.cache_hit
    astronaut, hopper = (
        photomaker.faces.prepare_id_photos([p], face_service.face_analyzer, need_embeddings=True).face_embeds
        for p in (ASTRONAUT, HOPPER)
    )
    assert np.allclose(seen[0], astronaut) and np.allclose(seen[1], hopper)


def test_best_of_keeps_the_most_similar(face_service: PhotoMakerService, monkeypatch: pytest.MonkeyPatch) -> None:
    import photomaker.faces

    # Candidates of output 0: seeds 50, 51; of output 1: seeds 52, 53. The two best overall (50, 51) are not
    # what is kept: each output is the best of its own candidates, as a batch job would make it.
    similarities = iter([0.9, 0.8, 0.1, 0.3])

    @dataclasses.dataclass
    class FakeScore:
        similarity: float

        def as_dict(self) -> dict:
            return {"similarity": self.similarity, "face_found": True, "same_person": self.similarity > 0.6}

    monkeypatch.setattr(photomaker.faces, "identity_score", lambda *a, **k: FakeScore(next(similarities)))
    result = face_service.generate(request(id_images=[ASTRONAUT], num_outputs=2, best_of=2, seed=50))
    assert [item.seed for item in result.images] == [50, 53]
    assert [item.identity["similarity"] for item in result.images] == [0.9, 0.3]


# ------------------------------------------------------------------------------------------ PhotoMaker v2


class FakeArcFace(FaceAnalyzer):
    """Stands in for the InsightFace models (not downloadable here): one centred face, a 512-d embedding."""

    name = "insightface"
    embedding_dim = 512
    threshold_metric = "similarity"
    same_person_threshold = 0.3
    licence = "test only"

    def detect(self, rgb: np.ndarray) -> list:
        from photomaker.faces import Face

        h, w = rgb.shape[:2]
        points = np.array(
            [[0.4 * w, 0.4 * h], [0.6 * w, 0.4 * h], [0.5 * w, 0.5 * h], [0.42 * w, 0.6 * h], [0.58 * w, 0.6 * h]],
            dtype=np.float32,
        )
        return [Face((0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h), 0.99, points)]

    def embed(self, rgb: np.ndarray, face) -> np.ndarray:
        return np.random.default_rng(int(rgb.mean() * 1000)).standard_normal(512).astype(np.float32)


def test_v2_uses_face_embeddings(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import photomaker.faces

    fake = FakeArcFace()
    monkeypatch.setattr(photomaker.faces, "get_face_analyzer", lambda backend, model_dir=None: fake)
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), pm_version=2, device="cpu"))
    service.wait_ready(timeout=300)
    assert service.pipeline.pm_version == 2 and service.config.resolved_face_backend == "insightface"
    encoder = service.pipeline.id_encoder
    seen: list[torch.Tensor | None] = []
    original = encoder.encode_images
    monkeypatch.setattr(
        encoder, "encode_images", lambda pixels, embeds=None: (seen.append(embeds), original(pixels, embeds))[1]
    )

    photos = [small_photo(60), small_photo(61)]
    result = service.generate(request(id_images=photos))
    assert len(result.images) == 1 and metadata.read_parameters(result.images[0].image)["pm_version"] == 2
    assert len(seen) == 1 and tuple(seen[0].shape) == (2, 512)  # one embedding per photo, in order
    assert service.generate(request(id_images=photos, seed=8)).cache_hit and len(seen) == 1


def test_missing_face_models_are_a_load_error_with_the_fix(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import photomaker.faces
    from photomaker.errors import FaceModelUnavailableError

    def unavailable(backend, model_dir=None):
        raise FaceModelUnavailableError("buffalo_l models missing in /x; to fix: download buffalo_l.zip")

    monkeypatch.setattr(photomaker.faces, "get_face_analyzer", unavailable)
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), pm_version=2, device="cpu"))
    with pytest.raises(ModelLoadError, match="Cannot load the face analyser: buffalo_l models missing .* to fix"):
        service.wait_ready(timeout=300)
    assert service.status().state == "error"


def test_a_negative_prompt_cut_at_77_tokens_is_reported_like_the_prompt(tiny_service: PhotoMakerService) -> None:
    """The words a too-long negative prompt loses are named in the result's warnings, as a prompt's are."""
    negative = ", ".join(f"blurry{i}" for i in range(60)) + ", lastword"
    result = tiny_service.generate(request(negative_prompt=negative, style="(No style)"))
    notes = [note for note in result.warnings if "negative prompt" in note.lower() and "77 tokens" in note]
    assert len(notes) == 1, result.warnings
    assert "lastword" in notes[0]


def test_tiny_mode_loads_a_given_adapter_instead_of_the_tiny_official_one(tiny_models_dir: Path, tmp_path) -> None:
    """`generate --tiny DIR --adapter OUT/photomaker.bin` checks a checkpoint `train --tiny` exported (it used to
    load the tiny official one whatever --adapter said, and an eval sweep over adapters made identical images)."""
    from photomaker.testing import tiny_checkpoint

    other = tiny_checkpoint(1, seed=5)
    torch.save(other, tmp_path / "trained.bin")
    service = PhotoMakerService(
        ServiceConfig(tiny_dir=str(tiny_models_dir), adapter=str(tmp_path / "trained.bin"), face_backend="none")
    )
    service.wait_ready(timeout=300)
    loaded = service.pipeline.id_encoder.state_dict()
    name = "fuse_module.mlp1.fc1.weight"
    assert torch.equal(loaded[name].float(), other["id_encoder"][name].float())
    official = torch.load(tiny_models_dir / "photomaker-v1.bin", weights_only=True)["id_encoder"][name]
    assert not torch.equal(loaded[name].float(), official.float())
