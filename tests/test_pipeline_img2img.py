"""PhotoMaker img2img on tiny random-weight models: strength, start_merge_step over the steps that run, and
equality with diffusers' own img2img pipeline when the ID never enters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image
from test_pipeline import SIZE, photo, reference_conditioning
from test_pipeline_control import PROMPT, TEXT_ONLY_PROMPT, ForwardRecorder, assert_close

from photomaker.errors import InvalidRequestError
from photomaker.pipeline_img2img import PhotoMakerStableDiffusionXLImg2ImgPipeline
from photomaker.testing import tiny_checkpoint, tiny_sdxl_components

STEPS = 5


@pytest.fixture(scope="module")
def pipe():
    pipe = PhotoMakerStableDiffusionXLImg2ImgPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_photomaker_adapter(tiny_checkpoint(1), pm_version=1)
    return pipe


def start_image(seed: int = 5) -> Image.Image:
    return photo(seed, size=SIZE)


def call(pipe, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("image", start_image())
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("output_type", "latent")
    return pipe(**kwargs).images


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_steps_that_run_follow_strength_and_merge_step_counts_them(pipe, strength):
    unet = ForwardRecorder(pipe.unet)
    try:
        call(pipe, input_id_images=[photo(1)], strength=strength, start_merge_step=1)
    finally:
        unet.remove()
    steps_run = int(STEPS * strength)
    pipe.scheduler.set_timesteps(STEPS)
    all_timesteps = pipe.scheduler.timesteps
    assert len(unet.calls) == steps_run
    expected = reference_conditioning(pipe, tiny_checkpoint(1), PROMPT, [photo(1)], start_merge_step=1, steps=steps_run)
    for step, (kwargs, (embeds, pooled)) in enumerate(zip(unet.calls, expected, strict=True)):
        assert kwargs["args"][1] == all_timesteps[STEPS - steps_run + step]
        assert_close(kwargs["encoder_hidden_states"], embeds, step)
        assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled, step)


def test_merge_step_past_the_end_equals_diffusers_img2img(pipe):
    ours = call(pipe, input_id_images=[photo(1)], strength=0.6, start_merge_step=STEPS, negative_prompt="blurry")
    plain = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    theirs = call(plain, prompt=TEXT_ONLY_PROMPT, strength=0.6, negative_prompt="blurry")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_lower_strength_stays_closer_to_the_start_image(pipe):
    start = np.asarray(start_image(), dtype=np.float32) / 255.0
    distances = []
    for strength in (0.2, 1.0):
        image = call(pipe, input_id_images=[photo(1)], strength=strength, output_type="np")[0]
        assert image.shape == (SIZE, SIZE, 3)
        distances.append(np.abs(image - start).mean())
    assert distances[0] < distances[1]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"image": None}, "image .the start image. is required"),
        ({"strength": 0.0}, "strength must be in"),
        ({"strength": 1.5}, "strength must be in"),
        ({"strength": 0.1}, "leaves no denoising step"),
    ],
)
def test_bad_inputs_are_refused_naming_the_argument(pipe, kwargs, named):
    with pytest.raises(InvalidRequestError, match=named):
        call(pipe, input_id_images=[photo(1)], **kwargs)
