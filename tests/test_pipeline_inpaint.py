"""PhotoMaker inpainting ("put this person into my photo") on tiny random-weight models: the photo outside the
mask is kept, the ID enters after start_merge_step, 4- and 9-channel UNets, and equality with diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from PIL import Image
from test_pipeline import SIZE, photo, reference_conditioning
from test_pipeline_control import PROMPT, TEXT_ONLY_PROMPT, ForwardRecorder, assert_close

from photomaker.errors import InvalidRequestError
from photomaker.pipeline_inpaint import PhotoMakerStableDiffusionXLInpaintPipeline
from photomaker.testing import synthetic_mask, tiny_checkpoint, tiny_sdxl_components, tiny_unet_config

STEPS = 4
BOX = (16, 16, 48, 48)  # the repainted square; in latents (scale 8): rows and columns 2..5


def make_pipe(unet_channels: int = 4) -> PhotoMakerStableDiffusionXLInpaintPipeline:
    components = tiny_sdxl_components()
    if unet_channels == 9:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            components["unet"] = UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9})
    pipe = PhotoMakerStableDiffusionXLInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_photomaker_adapter(tiny_checkpoint(1), pm_version=1)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def target_photo() -> Image.Image:
    return photo(7, size=SIZE)


def call(pipe, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("image", target_photo())
    kwargs.setdefault("mask_image", synthetic_mask(SIZE, BOX))
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("output_type", "latent")
    return pipe(**kwargs).images


def photo_latents(pipe, seed: int = 0) -> torch.Tensor:
    """The target photo through the VAE as the pipeline samples it (the generator's first draws), scaled."""
    pixels = torch.from_numpy(np.asarray(target_photo(), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    posterior = pipe.vae.encode(pixels).latent_dist
    return posterior.sample(generator=torch.Generator().manual_seed(seed)) * pipe.vae.config.scaling_factor


def test_outside_the_mask_the_final_latents_are_the_photo_and_inside_the_person_is_drawn(pipe):
    latents = call(pipe, input_id_images=[photo(1)], strength=1.0, start_merge_step=1)
    other = call(pipe, input_id_images=[photo(2)], strength=1.0, start_merge_step=1)
    expected = photo_latents(pipe)
    outside = torch.ones_like(expected, dtype=torch.bool)
    outside[..., 2:6, 2:6] = False
    torch.testing.assert_close(latents[outside], expected[outside], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(latents[~outside], expected[~outside], atol=1e-2)
    assert not torch.allclose(latents[~outside], other[~outside], atol=1e-4)  # another person inside


def test_unet_gets_text_only_then_the_id_over_the_steps_that_run(pipe):
    unet = ForwardRecorder(pipe.unet)
    try:
        call(pipe, input_id_images=[photo(1)], strength=0.75, start_merge_step=0)
    finally:
        unet.remove()
    steps_run = int(STEPS * 0.75)
    expected = reference_conditioning(pipe, tiny_checkpoint(1), PROMPT, [photo(1)], start_merge_step=0, steps=steps_run)
    assert len(unet.calls) == steps_run
    for step, (kwargs, (embeds, pooled)) in enumerate(zip(unet.calls, expected, strict=True)):
        assert kwargs["args"][0].shape[1] == 4
        assert_close(kwargs["encoder_hidden_states"], embeds, step)
        assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled, step)


@pytest.mark.parametrize("unet_channels", [4, 9])
def test_merge_step_past_the_end_equals_diffusers_inpaint(unet_channels):
    pipe = make_pipe(unet_channels)
    ours = call(pipe, input_id_images=[photo(1)], strength=0.9, start_merge_step=STEPS)
    plain = StableDiffusionXLInpaintPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    theirs = call(plain, prompt=TEXT_ONLY_PROMPT, strength=0.9)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_nine_channel_unet_sees_mask_and_masked_photo():
    pipe = make_pipe(9)
    unet = ForwardRecorder(pipe.unet)
    images = call(pipe, input_id_images=[photo(1)], output_type="np")
    unet.remove()
    sample = unet.calls[0]["args"][0]
    assert sample.shape[1] == 9
    mask_channel = sample[:, 4]
    assert mask_channel[..., 2:6, 2:6].eq(1).all() and mask_channel.sum() == 2 * 16  # CFG doubles the batch
    assert images.shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"image": None}, "image .the photo to put the person into. is required"),
        ({"mask_image": None}, "mask_image is required"),
        ({"mask_image": synthetic_mask(32)}, "mask_image is 32x32 but image is 64x64"),
        ({"mask_image": Image.new("L", (SIZE, SIZE), 0)}, "mask_image is all black"),
        ({"strength": 1.2}, "strength must be in"),
        ({"strength": -0.1}, "strength must be in"),
    ],
)
def test_bad_inputs_are_refused_naming_the_argument(pipe, kwargs, named):
    with pytest.raises(InvalidRequestError, match=named):
        call(pipe, input_id_images=[photo(1)], **kwargs)


@pytest.mark.parametrize("unet_channels", [4, 9])
def test_each_image_of_a_batch_depends_on_its_own_generator_only(unet_channels):
    """Image k of a batch made with one generator per image equals the same seed asked alone, as in every other
    pipeline: the service stores one seed per image and remakes any of them alone."""
    pipe = make_pipe(unet_channels)
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
    batch = call(pipe, input_id_images=[photo(1)], num_images_per_prompt=2, generator=generators)
    alone = call(pipe, input_id_images=[photo(1)], generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(batch[1:], alone, rtol=1e-4, atol=1e-4)
