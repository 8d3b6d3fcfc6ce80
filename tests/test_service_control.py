"""Control, start photo, mask and style image through the service (issue 11): what validation refuses and why,
which pipeline runs, what reaches the control model, and what the PNG records. Tiny models, 64 px, 2-3 steps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from photomaker import metadata, presets
from photomaker.control_images import CONTROL_TYPES, draw_openpose
from photomaker.control_models import CONTROL_MODEL_SPECS
from photomaker.errors import ControlImageError, InvalidRequestError, MaskError, NoFaceError
from photomaker.pipeline_controlnet import PhotoMakerStableDiffusionXLControlNetPipeline
from photomaker.pipeline_img2img import PhotoMakerStableDiffusionXLImg2ImgPipeline
from photomaker.pipeline_inpaint import PhotoMakerStableDiffusionXLInpaintPipeline
from photomaker.pipeline_t2i_adapter import PhotoMakerStableDiffusionXLAdapterPipeline
from photomaker.service import GenerationRequest, PhotoMakerService, ServiceConfig
from photomaker.testing import synthetic_control_image, synthetic_mask
from photomaker.testing_control import tiny_control_overrides
from photomaker.validation import validate_request

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
HOPPER = EXAMPLES / "grace_hopper.jpg"
NO_FACES = ServiceConfig(face_backend="none", device="cpu", tiny_dir="unused")


def request(**overrides) -> GenerationRequest:
    fields = {
        "id_images": [str(ASTRONAUT)],
        "prompt": "a photo of a woman img",
        "width": 64,
        "height": 64,
        "num_steps": 3,
        "num_outputs": 1,
        "seed": 11,
        "style": "(No style)",
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- validation


def test_the_control_types_offered_are_the_ones_control_images_makes() -> None:
    assert presets.CONTROL_TYPES == CONTROL_TYPES


def test_tiny_mode_points_every_control_model_at_the_tiny_ones(tiny_models_dir: Path) -> None:
    overrides = tiny_control_overrides(tiny_models_dir / "control")
    assert set(overrides) == set(CONTROL_MODEL_SPECS)
    assert all(Path(path).exists() for path in overrides.values())


BLACK = Image.new("L", (64, 64), 0)
WHITE = Image.new("L", (64, 64), 255)
CANNY = {"control_type": "canny", "control_image": str(HOPPER)}


@pytest.mark.parametrize(
    ("fields", "error", "fragment"),
    [
        ({"control_type": "pose"}, ControlImageError, "Control type 'pose' needs a control image"),
        ({"control_image": str(HOPPER)}, ControlImageError, "no control type: choose pose, canny, depth or sketch"),
        (
            {"control_type": "edges", "control_image": str(HOPPER)},
            InvalidRequestError,
            "control_type must be one of '', 'pose', 'canny', 'depth', 'sketch'",
        ),
        ({"mask_image": synthetic_mask()}, InvalidRequestError, "A mask needs a start photo (init_image"),
        ({"mask_face": True}, InvalidRequestError, "mask_face needs a start photo"),
        (
            {"init_image": str(HOPPER), "mask_image": synthetic_mask(), "mask_face": True},
            InvalidRequestError,
            "Give either a mask or mask_face",
        ),
        ({"init_image": str(HOPPER), "mask_image": BLACK}, MaskError, "the mask is empty"),
        ({"init_image": str(HOPPER), "mask_image": WHITE}, MaskError, "the mask is all white"),
        (
            {**CANNY, "init_image": str(HOPPER)},
            InvalidRequestError,
            "Control (canny) together with a start photo is not supported",
        ),
        ({**CANNY, "control_scale": 2.5}, InvalidRequestError, "control_scale must be between 0 and 2, got 2.5"),
        ({**CANNY, "control_end": 1.2}, InvalidRequestError, "control_end must be between 0 and 1"),
        (
            {**CANNY, "control_start": 0.6, "control_end": 0.5},
            InvalidRequestError,
            "control_start (0.6) must be below control_end (0.5)",
        ),
        (
            {"control_type": "sketch", "control_image": synthetic_control_image(64, "sketch"), "control_start": 0.2},
            InvalidRequestError,
            "The sketch adapter always applies from the first step, so control_start must be 0",
        ),
        (
            {"control_type": "sketch", "control_image": Image.new("RGB", (64, 64), "white")},
            ControlImageError,
            "the sketch is empty",
        ),
        (
            {"control_type": "sketch", "control_image": synthetic_control_image(64, "sketch"), "width": 72},
            InvalidRequestError,
            "The sketch adapter needs a width and height that are multiples of 16 px; 72x64 is not. Use 64x64, or "
            "one of the output sizes 'Instagram (1:1)'",
        ),
        ({**CANNY, "control_image": b"not an image"}, ControlImageError, "control image"),
        ({"init_image": str(HOPPER), "strength": 1.5}, InvalidRequestError, "strength must be between 0 and 1"),
        (
            {"init_image": str(HOPPER), "strength": 0.2},
            InvalidRequestError,
            "strength 0.2 with 3 steps leaves no step to run",
        ),
        (
            {"style_image": str(HOPPER), "style_image_scale": -0.1},
            InvalidRequestError,
            "style_image_scale must be between 0 and 1",
        ),
        (
            {"init_image": str(HOPPER), "mask_face": True},
            InvalidRequestError,
            "mask_face needs face detection, and this service runs without face analysis",
        ),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_bad_combinations_are_refused_with_what_to_change(fields: dict, error: type, fragment: str) -> None:
    with pytest.raises(error) as raised:
        validate_request(request(**fields), NO_FACES)
    assert fragment in str(raised.value)


def test_per_type_defaults_and_the_pipeline_each_mode_runs() -> None:
    canny = validate_request(request(**CANNY), NO_FACES).composition
    assert (canny.pipeline, canny.control_scale, canny.control_start, canny.control_end) == ("controlnet", 1.0, 0, 1)
    sketch = validate_request(
        request(control_type="sketch", control_image=synthetic_control_image(64, "sketch")), NO_FACES
    ).composition
    assert (sketch.pipeline, sketch.control_scale, sketch.control_end) == ("t2i_adapter", 0.7, 0.8)
    img2img = validate_request(request(init_image=str(HOPPER)), NO_FACES).composition
    assert (img2img.pipeline, img2img.strength) == ("img2img", presets.IMG2IMG_STRENGTH_DEFAULT)
    inpaint = validate_request(request(init_image=str(HOPPER), mask_image=synthetic_mask()), NO_FACES).composition
    assert (inpaint.pipeline, inpaint.strength) == ("inpaint", presets.INPAINT_STRENGTH_DEFAULT)
    plain = validate_request(request(), NO_FACES).composition
    assert plain.pipeline == "text2img" and plain.style_image is None


def test_a_start_photo_keeps_the_merge_step_s_place_in_the_noise_schedule() -> None:
    """Style strength 20 % of 50 steps merges at step 10; img2img at strength 0.2 runs the last 10 steps, which all
    lie past it: counted over the run the ID would never enter, counted over the schedule it enters at once."""
    plan = validate_request(request(init_image=str(HOPPER), num_steps=50, strength=0.2), NO_FACES)
    assert plan.start_merge_step == 10 and plan.composition.denoising_steps(50) == 10
    assert plan.composition.merge_step_in_run(plan.start_merge_step, 50) == 0
    half = validate_request(request(init_image=str(HOPPER), num_steps=50, strength=0.9), NO_FACES)
    assert half.composition.merge_step_in_run(half.start_merge_step, 50) == 5  # 5 steps skipped, merge at 10
    plain = validate_request(request(num_steps=50), NO_FACES)
    assert plain.composition.merge_step_in_run(plain.start_merge_step, 50) == plain.start_merge_step == 10


def test_images_of_another_size_are_fitted_and_the_user_is_told() -> None:
    plan = validate_request(request(**CANNY, width=64, height=128), NO_FACES)
    assert plan.composition.control_map.size == (64, 128)
    assert any("The control image (512x600) has another aspect ratio" in note for note in plan.warnings)
    plan = validate_request(request(init_image=str(HOPPER), mask_image=synthetic_mask(32)), NO_FACES)
    assert plan.composition.init_image.size == plan.composition.mask_image.size == (64, 64)
    assert any(note.startswith("The start photo (512x600)") for note in plan.warnings)
    assert any(note.startswith("The mask (32x32) was resized to 64x64") for note in plan.warnings)


# --------------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def service(tiny_models_dir: Path) -> PhotoMakerService:
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="none", device="cpu"))
    service.wait_ready(timeout=300)
    service.pipeline.set_progress_bar_config(disable=True)
    return service


def capture_inputs(module: torch.nn.Module, argument: str) -> list[torch.Tensor]:
    """Every `argument` (keyword or first positional) that `module` is called with, from now on."""
    seen: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((kwargs[argument] if argument in kwargs else args[0]).detach().clone())

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_canny_control_reaches_the_controlnet_and_the_png_records_it(service: PhotoMakerService) -> None:
    result = service.generate(request(**CANNY, control_scale=0.5))
    pipe = service._runner.modes().pipeline(validate_request(request(**CANNY), NO_FACES).composition)
    assert type(pipe) is PhotoMakerStableDiffusionXLControlNetPipeline
    assert pipe.unet is service.pipeline.unet and pipe.vae is service.pipeline.vae  # shared, not copied
    seen = capture_inputs(pipe.controlnet, "controlnet_cond")
    again = service.generate(request(**CANNY, control_scale=0.5))

    assert np.array_equal(pixels(again.images[0].image), pixels(result.images[0].image))
    expected = torch.from_numpy(np.asarray(result.control_image, dtype=np.float32) / 255).permute(2, 0, 1)
    assert len(seen) == 3  # one ControlNet call per step (classifier-free guidance batched)
    assert torch.allclose(seen[0][0].float(), expected, atol=1e-6)
    stored = metadata.read_parameters(result.images[0].image)
    assert (stored["control_type"], stored["control_image"], stored["control_scale"]) == (
        "canny",
        "grace_hopper.jpg",
        0.5,
    )
    assert (stored["control_start"], stored["control_end"], stored["init_image"]) == (0.0, 1.0, None)
    plain = service.generate(request())
    assert not np.array_equal(pixels(plain.images[0].image), pixels(result.images[0].image))
    assert plain.control_image is None


def test_sketch_runs_the_adapter_until_its_factor(service: PhotoMakerService) -> None:
    sketch = synthetic_control_image(64, "sketch")
    result = service.generate(request(control_type="sketch", control_image=png_bytes(sketch)))
    pipe = service._runner.modes()._pipelines[("t2i_adapter", "sketch")]
    assert type(pipe) is PhotoMakerStableDiffusionXLAdapterPipeline
    assert np.array_equal(np.asarray(result.control_image)[..., 0], 255 - np.asarray(sketch)[..., 0])
    stored = metadata.read_parameters(result.images[0].image)
    assert (stored["control_scale"], stored["control_end"], stored["control_image"]) == (0.7, 0.8, "(image)")


def test_pose_from_a_skeleton_and_a_photo_without_a_person(service: PhotoMakerService) -> None:
    rng = np.random.default_rng(0)
    skeleton = draw_openpose((64, 64), [(rng.uniform(8, 56, (18, 2)), np.ones(18))])
    result = service.generate(request(control_type="pose", control_image=skeleton))
    assert np.array_equal(np.asarray(result.control_image), np.asarray(skeleton))
    assert "already an OpenPose skeleton" in " ".join(result.warnings)
    assert type(service._runner.modes()._pipelines[("controlnet", "pose")]) is (
        PhotoMakerStableDiffusionXLControlNetPipeline
    )
    # The tiny random pose model finds nobody: the user is told what to give instead.
    with pytest.raises(ControlImageError, match="no person's pose was found"):
        service.generate(request(control_type="pose", control_image=str(HOPPER)))


def test_depth_map_comes_from_the_depth_estimator(service: PhotoMakerService) -> None:
    result = service.generate(request(control_type="depth", control_image=str(HOPPER)))
    depth = np.asarray(result.control_image)
    assert depth.shape == (64, 64, 3) and np.array_equal(depth[..., 0], depth[..., 2])  # grey, at the output size
    assert depth.max() > depth.min()
    assert "depth_estimator" in service._runner.modes().registry.loaded()


def test_img2img_starts_from_the_photo_and_runs_strength_times_the_steps(service: PhotoMakerService) -> None:
    steps: list[tuple[int, int, str]] = []
    result = service.generate(request(init_image=str(HOPPER), strength=0.7, num_steps=4), lambda *a: steps.append(a))
    assert type(service._runner.modes()._pipelines[("img2img", "")]) is PhotoMakerStableDiffusionXLImg2ImgPipeline
    denoising = [step for step in steps if step[2].startswith("Denoising")]
    assert [(done, total) for done, total, _ in denoising] == [(1, 2), (2, 2)]  # int(4 * 0.7) steps
    other = service.generate(request(init_image=str(ASTRONAUT), strength=0.7, num_steps=4))
    assert not np.array_equal(pixels(result.images[0].image), pixels(other.images[0].image))
    assert metadata.read_parameters(result.images[0].image)["strength"] == 0.7


def test_inpaint_redraws_only_the_masked_region(service: PhotoMakerService) -> None:
    mask = synthetic_mask(64, box=(24, 24, 40, 40))
    first = service.generate(request(init_image=str(HOPPER), mask_image=mask, seed=1))
    second = service.generate(request(init_image=str(HOPPER), mask_image=mask, seed=2))
    assert type(service._runner.modes()._pipelines[("inpaint", "")]) is PhotoMakerStableDiffusionXLInpaintPipeline
    assert np.array_equal(np.asarray(first.mask_image), np.asarray(mask))
    difference = np.abs(pixels(first.images[0].image) - pixels(second.images[0].image)).max(axis=-1)
    assert difference[28:36, 28:36].mean() > 4 * difference[:8, :].mean()  # the seed changes the masked part
    assert metadata.read_parameters(first.images[0].image)["strength"] == presets.INPAINT_STRENGTH_DEFAULT


def test_fast_mode_works_with_control(service: PhotoMakerService) -> None:
    result = service.generate(request(**CANNY, fast="hyper-sd-8"))
    stored = metadata.read_parameters(result.images[0].image)
    assert (stored["fast"], stored["num_steps"], stored["control_type"]) == ("hyper-sd-8", 8, "canny")
    standard = service.generate(request(**CANNY))  # back to standard sampling on the ControlNet pipeline
    assert metadata.read_parameters(standard.images[0].image)["fast"] is None
    controlnet_pipe = service._runner.modes()._pipelines[("controlnet", "canny")]
    assert controlnet_pipe.scheduler is service.pipeline.scheduler
    assert type(controlnet_pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_a_style_image_never_leaks_into_the_next_request(tiny_models_dir: Path) -> None:
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="none", device="cpu"))
    before = service.generate(request())
    styled = service.generate(request(style_image=str(HOPPER), style_image_scale=0.9))
    after = service.generate(request())
    assert service._runner.modes().registry.ip_adapter_source().weight_name == "ip-adapter.safetensors"
    assert not np.array_equal(pixels(styled.images[0].image), pixels(before.images[0].image))
    assert np.array_equal(pixels(after.images[0].image), pixels(before.images[0].image))
    stored = metadata.read_parameters(styled.images[0].image)
    assert (stored["style_image"], stored["style_image_scale"]) == ("grace_hopper.jpg", 0.9)


@pytest.fixture(scope="module")
def face_service(tiny_models_dir: Path) -> PhotoMakerService:
    service = PhotoMakerService(ServiceConfig(tiny_dir=str(tiny_models_dir), face_backend="dlib", device="cpu"))
    service.wait_ready(timeout=300)
    return service


def test_mask_face_masks_the_face_of_the_start_photo(face_service: PhotoMakerService) -> None:
    result = face_service.generate(request(init_image=str(ASTRONAUT), mask_face=True))
    mask = np.asarray(result.mask_image) >= 128
    assert 0.02 < mask.mean() < 0.5  # the face, not the photo
    rows, columns = np.nonzero(mask)
    assert 16 < columns.mean() < 48 and rows.mean() < 32  # the astronaut's face is in the upper middle
    assert metadata.read_parameters(result.images[0].image)["mask_face"] is True
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    with pytest.raises(NoFaceError, match="no face was found in the target photo"):
        face_service.generate(request(init_image=noise, mask_face=True))


def test_best_of_and_identity_scores_work_with_control(face_service: PhotoMakerService) -> None:
    result = face_service.generate(request(**CANNY, best_of=2))
    assert len(result.images) == 1 and result.images[0].identity is not None
    assert result.images[0].seed in (11, 12)
    assert metadata.read_parameters(result.images[0].image)["control_type"] == "canny"
