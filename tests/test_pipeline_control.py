"""PhotoMaker's ControlNet and T2I-Adapter pipelines on tiny random-weight models with the real architecture.

What reaches the UNet, the ControlNet and the adapter residuals at every step is checked against the
independent reference of the prompt surgery, the two conditioning phases and the reference's control
pipelines (`reference_conditioning` in test_pipeline.py, plain tensor operations); with
`start_merge_step >= steps` each pipeline must give what diffusers' own pipeline gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from test_pipeline import SIZE, STEPS, photo, reference_conditioning

from photomaker.errors import CheckpointError, InvalidRequestError
from photomaker.pipeline_controlnet import PhotoMakerStableDiffusionXLControlNetPipeline
from photomaker.pipeline_t2i_adapter import PhotoMakerStableDiffusionXLAdapterPipeline
from photomaker.testing import (
    synthetic_control_image,
    tiny_checkpoint,
    tiny_controlnet,
    tiny_sdxl_components,
    tiny_t2i_adapter,
)

PROMPT = "a photo of a man img wearing a hat"
TEXT_ONLY_PROMPT = "a photo of a man wearing a hat"


def controlnet_pipe(num_controlnets: int = 1) -> PhotoMakerStableDiffusionXLControlNetPipeline:
    components = tiny_sdxl_components()
    nets = [tiny_controlnet(components["unet"], seed=index) for index in range(num_controlnets)]
    pipe = PhotoMakerStableDiffusionXLControlNetPipeline(
        **components, controlnet=nets[0] if num_controlnets == 1 else nets
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_photomaker_adapter(tiny_checkpoint(1), pm_version=1)
    return pipe


def adapter_pipe() -> PhotoMakerStableDiffusionXLAdapterPipeline:
    pipe = PhotoMakerStableDiffusionXLAdapterPipeline(**tiny_sdxl_components(), adapter=tiny_t2i_adapter())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_photomaker_adapter(tiny_checkpoint(1), pm_version=1)
    return pipe


@pytest.fixture(scope="module")
def cn_pipe():
    return controlnet_pipe()


@pytest.fixture(scope="module")
def t2i_pipe():
    return adapter_pipe()


def call(pipe, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("output_type", "latent")
    return pipe(**kwargs).images


class ForwardRecorder:
    """Records the keyword arguments (cloned tensors) of every forward call of a model, and its outputs."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[dict] = []
        self.outputs: list = []
        self._model = model
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)
        self._pre = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    @staticmethod
    def _clone(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, (list, tuple)):
            return [ForwardRecorder._clone(v) for v in value]
        if isinstance(value, dict):
            return {k: ForwardRecorder._clone(v) for k, v in value.items()}
        return value

    def _record_inputs(self, module, args, kwargs):
        # Before forward: the UNet pops the adapter's residual list while it runs. Positional ones under "args".
        self.calls.append({**self._clone(kwargs), "args": self._clone(list(args))})

    def _record(self, module, args, kwargs, output):
        self.outputs.append(self._clone(output))

    def remove(self):
        self._handle.remove()
        self._pre.remove()


def assert_close(actual, expected, step):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {step}: {m}")


# ----------------------------------------------------------------------------- ControlNet


def test_controlnet_gets_text_only_prompt_and_the_phase_conditioning_unet_switches_after_merge_step():
    pipe = controlnet_pipe()
    images = [photo(1), photo(2)]
    unet, controlnet = ForwardRecorder(pipe.unet), ForwardRecorder(pipe.controlnet)
    call(
        pipe,
        input_id_images=images,
        image=synthetic_control_image(SIZE),
        start_merge_step=1,
        negative_prompt="blurry",
        control_guidance_start=0.25,
        control_guidance_end=0.75,
        controlnet_conditioning_scale=0.8,
    )
    expected = reference_conditioning(pipe, tiny_checkpoint(1), PROMPT, images, "blurry", start_merge_step=1)
    text_only_embeds = expected[0][0]
    assert len(unet.calls) == len(controlnet.calls) == STEPS
    for step, (unet_kwargs, cn_kwargs, (embeds, pooled)) in enumerate(
        zip(unet.calls, controlnet.calls, expected, strict=True)
    ):
        assert_close(unet_kwargs["encoder_hidden_states"], embeds, step)
        assert_close(unet_kwargs["added_cond_kwargs"]["text_embeds"], pooled, step)
        assert_close(cn_kwargs["encoder_hidden_states"], text_only_embeds, step)
        assert_close(cn_kwargs["added_cond_kwargs"]["text_embeds"], pooled, step)
        assert_close(cn_kwargs["added_cond_kwargs"]["time_ids"], unet_kwargs["added_cond_kwargs"]["time_ids"], step)
    # The UNet really switched (the ID-fused prompt differs from the text-only one).
    assert not torch.allclose(unet.calls[1]["encoder_hidden_states"], unet.calls[2]["encoder_hidden_states"])

    # Residuals: what the ControlNet returned reaches the UNet; inside [0.25, 0.75] of the steps only (diffusers'
    # rule: step i acts when i/steps >= start and (i+1)/steps <= end), i.e. steps 1 and 2 of 4.
    assert [c["conditioning_scale"] for c in controlnet.calls] == [0.0, 0.8, 0.8, 0.0]
    for step, (unet_kwargs, (down, mid)) in enumerate(zip(unet.calls, controlnet.outputs, strict=True)):
        for got, made in zip(
            [*unet_kwargs["down_block_additional_residuals"], unet_kwargs["mid_block_additional_residual"]],
            [*down, mid],
            strict=True,
        ):
            assert_close(got, made, step)
        active = any(d.abs().max() > 0 for d in down)
        assert active == (step in (1, 2)), step


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_with_merge_step_past_the_end_equals_diffusers(cn_pipe, guess_mode):
    control = synthetic_control_image(SIZE, kind="pose")
    ours = call(
        cn_pipe,
        input_id_images=[photo(1)],
        image=control,
        start_merge_step=STEPS,
        controlnet_conditioning_scale=0.7,
        guess_mode=guess_mode,
        control_guidance_end=0.8,
    )
    plain = StableDiffusionXLControlNetPipeline(**cn_pipe.components)
    plain.set_progress_bar_config(disable=True)
    theirs = call(
        plain,
        prompt=TEXT_ONLY_PROMPT,
        image=control,
        controlnet_conditioning_scale=0.7,
        guess_mode=guess_mode,
        control_guidance_end=0.8,
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_guess_mode_runs_the_controlnet_on_the_conditional_half_with_the_text_only_prompt(cn_pipe):
    controlnet = ForwardRecorder(cn_pipe.controlnet)
    try:
        call(
            cn_pipe,
            input_id_images=[photo(1)],
            image=synthetic_control_image(SIZE),
            guess_mode=True,
            start_merge_step=0,
        )
    finally:
        controlnet.remove()
    text_only = reference_conditioning(cn_pipe, tiny_checkpoint(1), PROMPT, [photo(1)], start_merge_step=0)[0][0]
    for step, kwargs in enumerate(controlnet.calls):
        assert kwargs["encoder_hidden_states"].shape[0] == 1
        assert_close(kwargs["encoder_hidden_states"], text_only[1:], step)


def test_multi_controlnet_equals_diffusers_and_each_net_sees_the_text_only_prompt():
    pipe = controlnet_pipe(num_controlnets=2)
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    controls = [synthetic_control_image(SIZE, kind="pose", seed=1), synthetic_control_image(SIZE, seed=2)]
    recorders = [ForwardRecorder(net) for net in pipe.controlnet.nets]
    ours = call(
        pipe,
        input_id_images=[photo(1)],
        image=controls,
        start_merge_step=STEPS,
        controlnet_conditioning_scale=[0.5, 1.0],
        control_guidance_start=[0.0, 0.5],
    )
    for recorder in recorders:
        recorder.remove()
    assert [c["conditioning_scale"] for c in recorders[0].calls] == [0.5] * STEPS
    assert [c["conditioning_scale"] for c in recorders[1].calls] == [0.0, 0.0, 1.0, 1.0]
    text_only = reference_conditioning(pipe, tiny_checkpoint(1), PROMPT, [photo(1)], start_merge_step=STEPS)[0][0]
    for recorder in recorders:
        for step, kwargs in enumerate(recorder.calls):
            assert_close(kwargs["encoder_hidden_states"], text_only, step)

    plain = StableDiffusionXLControlNetPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    theirs = call(
        plain,
        prompt=TEXT_ONLY_PROMPT,
        image=controls,
        controlnet_conditioning_scale=[0.5, 1.0],
        control_guidance_start=[0.0, 0.5],
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_controlnet_makes_images_and_control_changes_them(cn_pipe):
    images = call(cn_pipe, input_id_images=[photo(1)], image=synthetic_control_image(SIZE, seed=1), output_type="np")
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    first = call(cn_pipe, input_id_images=[photo(1)], image=synthetic_control_image(SIZE, seed=1))
    second = call(cn_pipe, input_id_images=[photo(1)], image=synthetic_control_image(SIZE, seed=2))
    assert not torch.allclose(first, second, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"image": None}, "image (the control image) is required"),
        ({"control_guidance_start": 0.8, "control_guidance_end": 0.5}, "control_guidance_start (0.8)"),
        ({"controlnet_conditioning_scale": [0.5, 0.5]}, "controlnet_conditioning_scale has 2 values"),
        ({"start_merge_step": -1}, "start_merge_step"),
    ],
)
def test_controlnet_bad_inputs_are_refused_naming_the_argument(cn_pipe, kwargs, named):
    kwargs = {"image": synthetic_control_image(SIZE), **kwargs}
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        call(cn_pipe, input_id_images=[photo(1)], **kwargs)


def test_missing_control_image_is_a_typed_error(cn_pipe):
    with pytest.raises(InvalidRequestError):
        call(cn_pipe, input_id_images=[photo(1)])


# ----------------------------------------------------------------------------- T2I-Adapter


def reference_adapter_features(pipe, image, scale):
    """The adapter's input as diffusers prepares a PIL image (RGB in [0, 1]), through the adapter, times scale."""
    pixels = torch.from_numpy(np.asarray(image.resize((SIZE, SIZE)), dtype=np.float32) / 255.0)
    return [f * scale for f in pipe.adapter(pixels.permute(2, 0, 1)[None])]


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0])
def test_adapter_residuals_while_step_below_factor_times_steps_scaled_and_unet_switches(t2i_pipe, factor):
    sketch = synthetic_control_image(SIZE, kind="sketch")
    unet = ForwardRecorder(t2i_pipe.unet)
    try:
        call(
            t2i_pipe,
            input_id_images=[photo(1)],
            image=sketch,
            start_merge_step=1,
            adapter_conditioning_scale=0.7,
            adapter_conditioning_factor=factor,
        )
    finally:
        unet.remove()
    expected = reference_conditioning(t2i_pipe, tiny_checkpoint(1), PROMPT, [photo(1)], start_merge_step=1)
    features = reference_adapter_features(t2i_pipe, sketch, 0.7)
    assert len(unet.calls) == STEPS
    for step, (kwargs, (embeds, pooled)) in enumerate(zip(unet.calls, expected, strict=True)):
        assert_close(kwargs["encoder_hidden_states"], embeds, step)
        assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled, step)
        residuals = kwargs["down_intrablock_additional_residuals"]
        if step < int(STEPS * factor):
            assert len(residuals) == len(features)
            for got, feature in zip(residuals, features, strict=True):
                assert_close(got, torch.cat([feature, feature]), step)  # same residual for both CFG halves
        else:
            assert residuals is None, step


def test_adapter_with_merge_step_past_the_end_equals_diffusers(t2i_pipe):
    sketch = synthetic_control_image(SIZE, kind="sketch")
    ours = call(
        t2i_pipe,
        input_id_images=[photo(1)],
        image=sketch,
        start_merge_step=STEPS,
        adapter_conditioning_scale=0.7,
        adapter_conditioning_factor=0.8,
    )
    plain = StableDiffusionXLAdapterPipeline(**t2i_pipe.components)
    plain.set_progress_bar_config(disable=True)
    theirs = call(
        plain, prompt=TEXT_ONLY_PROMPT, image=sketch, adapter_conditioning_scale=0.7, adapter_conditioning_factor=0.8
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_adapter_makes_images(t2i_pipe):
    images = call(
        t2i_pipe,
        input_id_images=[photo(1)],
        image=synthetic_control_image(SIZE, kind="sketch"),
        output_type="np",
        num_images_per_prompt=2,
    )
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"image": None}, "image .the adapter's control image"),
        ({"adapter_conditioning_factor": 1.5}, "adapter_conditioning_factor must be between 0 and 1"),
        ({"adapter_conditioning_scale": [0.5, 0.5]}, "adapter_conditioning_scale must be one number"),
    ],
)
def test_adapter_bad_inputs_are_refused_naming_the_argument(t2i_pipe, kwargs, named):
    kwargs = {"image": synthetic_control_image(SIZE, kind="sketch"), **kwargs}
    with pytest.raises(InvalidRequestError, match=named):
        call(t2i_pipe, input_id_images=[photo(1)], **kwargs)


def test_a_pipeline_sharing_the_unet_takes_the_loaded_adapter_instead_of_fusing_it_again(cn_pipe):
    shared = {name: part for name, part in cn_pipe.components.items() if name != "controlnet"}
    other = PhotoMakerStableDiffusionXLAdapterPipeline(**shared, adapter=tiny_t2i_adapter())
    other.set_progress_bar_config(disable=True)
    with pytest.raises(CheckpointError, match="already holds a PhotoMaker LoRA"):
        other.load_photomaker_adapter(tiny_checkpoint(1), pm_version=1)
    other.use_photomaker_adapter_of(cn_pipe)
    assert other.id_encoder is cn_pipe.id_encoder and other.trigger_word == "img"
    images = call(
        other, input_id_images=[photo(1)], image=synthetic_control_image(SIZE, kind="sketch"), output_type="np"
    )
    assert images.shape == (1, SIZE, SIZE, 3)
    stranger = PhotoMakerStableDiffusionXLAdapterPipeline(**tiny_sdxl_components(), adapter=tiny_t2i_adapter())
    with pytest.raises(CheckpointError, match="shares this one's UNet"):
        stranger.use_photomaker_adapter_of(cn_pipe)


def test_the_id_encoder_s_offload_hook_comes_along_with_the_adapter(cn_pipe, monkeypatch):
    """Under model CPU offload the ID encoder visits the GPU through its hook; a pipeline that takes the adapter
    must take the hook too, or it would fuse with the encoder's offloaded CPU weights and GPU inputs."""
    hook = object()
    monkeypatch.setattr(cn_pipe, "_id_encoder_offload_hook", hook, raising=False)
    shared = {name: part for name, part in cn_pipe.components.items() if name != "controlnet"}
    other = PhotoMakerStableDiffusionXLAdapterPipeline(**shared, adapter=tiny_t2i_adapter())
    other.use_photomaker_adapter_of(cn_pipe)
    assert other._id_encoder_offload_hook is hook
