"""IP-Adapter (a style image) together with PhotoMaker in every pipeline, loaded from a local folder in the
official layout through diffusers' real `load_ip_adapter`.

On every step the UNet must get the style image's tokens in `added_cond_kwargs["image_embeds"]` while the
prompt stream stays PhotoMaker's (text-only, then ID-fused after start_merge_step).
"""

from __future__ import annotations

import pytest
import torch
from test_pipeline import SIZE, photo, reference_conditioning
from test_pipeline_control import PROMPT, ForwardRecorder, assert_close

from photomaker.pipeline import PhotoMakerStableDiffusionXLPipeline
from photomaker.pipeline_controlnet import PhotoMakerStableDiffusionXLControlNetPipeline
from photomaker.pipeline_img2img import PhotoMakerStableDiffusionXLImg2ImgPipeline
from photomaker.pipeline_inpaint import PhotoMakerStableDiffusionXLInpaintPipeline
from photomaker.pipeline_t2i_adapter import PhotoMakerStableDiffusionXLAdapterPipeline
from photomaker.testing import (
    IP_ADAPTER_TOKENS,
    synthetic_control_image,
    synthetic_mask,
    tiny_checkpoint,
    tiny_controlnet,
    tiny_sdxl_components,
    tiny_t2i_adapter,
    write_tiny_ip_adapter,
)

STEPS = 3


def build(kind: str):
    """A pipeline of that kind and the extra call arguments it needs."""
    components = tiny_sdxl_components()
    if kind == "text2img":
        return PhotoMakerStableDiffusionXLPipeline(**components), {"height": SIZE, "width": SIZE}
    if kind == "controlnet":
        pipe = PhotoMakerStableDiffusionXLControlNetPipeline(
            **components, controlnet=tiny_controlnet(components["unet"])
        )
        return pipe, {"image": synthetic_control_image(SIZE), "height": SIZE, "width": SIZE}
    if kind == "t2i_adapter":
        pipe = PhotoMakerStableDiffusionXLAdapterPipeline(**components, adapter=tiny_t2i_adapter())
        return pipe, {"image": synthetic_control_image(SIZE, kind="sketch"), "height": SIZE, "width": SIZE}
    if kind == "img2img":
        return PhotoMakerStableDiffusionXLImg2ImgPipeline(**components), {"image": photo(5, SIZE), "strength": 1.0}
    pipe = PhotoMakerStableDiffusionXLInpaintPipeline(**components)
    return pipe, {
        "image": photo(5, SIZE),
        "mask_image": synthetic_mask(SIZE),
        "strength": 1.0,
        "height": SIZE,
        "width": SIZE,
    }


@pytest.fixture(scope="module")
def ip_adapter_dir(tmp_path_factory):
    return write_tiny_ip_adapter(tmp_path_factory.mktemp("ip-adapter"), tiny_sdxl_components()["unet"])


def load(pipe, ip_adapter_dir, ip_adapter_first: bool):
    steps = [
        lambda: pipe.load_ip_adapter(str(ip_adapter_dir), subfolder="", weight_name="ip-adapter.safetensors"),
        lambda: pipe.load_photomaker_adapter(tiny_checkpoint(1), pm_version=1),
    ]
    for step in steps if ip_adapter_first else reversed(steps):
        step()
    pipe.set_ip_adapter_scale(0.7)
    pipe.set_progress_bar_config(disable=True)


@pytest.mark.parametrize("kind", ["text2img", "controlnet", "t2i_adapter", "img2img", "inpaint"])
def test_style_image_rides_image_embeds_every_step_and_the_id_still_reaches_the_unet(kind, ip_adapter_dir):
    pipe, extra = build(kind)
    load(pipe, ip_adapter_dir, ip_adapter_first=True)
    style = photo(9, 48)
    unet = ForwardRecorder(pipe.unet)
    styled = pipe(
        PROMPT,
        input_id_images=[photo(1)],
        ip_adapter_image=style,
        start_merge_step=0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **extra,
    ).images
    unet.remove()
    expected = reference_conditioning(pipe, tiny_checkpoint(1), PROMPT, [photo(1)], start_merge_step=0, steps=STEPS)
    assert len(unet.calls) == STEPS
    for step, (kwargs, (embeds, pooled)) in enumerate(zip(unet.calls, expected, strict=True)):
        assert_close(kwargs["encoder_hidden_states"], embeds, step)
        assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled, step)
        image_embeds = kwargs["added_cond_kwargs"]["image_embeds"]
        assert len(image_embeds) == 1 and image_embeds[0].shape[:2] == (2, 1)  # CFG: [negative image, style]
        assert_close(image_embeds[0], unet.calls[0]["added_cond_kwargs"]["image_embeds"][0], step)
    other_style = pipe(
        PROMPT,
        input_id_images=[photo(1)],
        start_merge_step=0,
        num_inference_steps=STEPS,
        ip_adapter_image=photo(10, 48),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **extra,
    ).images
    assert not torch.allclose(styled, other_style, atol=1e-4)  # the style image shapes the picture


def test_either_loading_order_gives_the_same_picture(ip_adapter_dir):
    results = []
    for ip_adapter_first in (True, False):
        pipe, extra = build("text2img")
        load(pipe, ip_adapter_dir, ip_adapter_first)
        results.append(
            pipe(
                PROMPT,
                input_id_images=[photo(1)],
                ip_adapter_image=photo(9, 48),
                start_merge_step=0,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                **extra,
            ).images
        )
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_ip_adapter_projection_makes_the_official_number_of_tokens(ip_adapter_dir):
    pipe, _ = build("text2img")
    load(pipe, ip_adapter_dir, ip_adapter_first=False)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    tokens = projection(torch.zeros(1, pipe.image_encoder.config.projection_dim))
    assert tokens.shape == (1, IP_ADAPTER_TOKENS, pipe.unet.config.cross_attention_dim)
