"""The tiny offline models: real CLIP tokenization, SDXL-shaped components, official checkpoint layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from photomaker.loading import build_id_encoder
from photomaker.testing import (
    make_tiny,
    tiny_checkpoint,
    tiny_id_encoder_config,
    tiny_sdxl_components,
    tiny_unet_config,
)


def test_tokenizer_has_the_real_clip_ids(clip_tokenizer) -> None:
    clip_tokenizer.add_tokens(["img"], special_tokens=True)
    assert clip_tokenizer("a photo of a man img").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        786,
        49408,
        49407,
    ]
    assert len(clip_tokenizer) == 49409
    assert clip_tokenizer.model_max_length == 77


def test_second_tokenizer_pads_with_exclamation_mark(clip_tokenizer, clip_tokenizer_2) -> None:
    first = clip_tokenizer("a man", padding="max_length", max_length=77).input_ids
    second = clip_tokenizer_2("a man", padding="max_length", max_length=77).input_ids
    assert first[:4] == second[:4] == [49406, 320, 786, 49407]
    assert set(first[4:]) == {49407} and set(second[4:]) == {0}
    assert len(first) == len(second) == 77


def test_components_are_sdxl_shaped_with_distinct_encoder_widths() -> None:
    components = tiny_sdxl_components()
    te1, te2, unet = (
        components["text_encoder"],
        components["text_encoder_2"],
        components["unet"],
    )
    assert te1.config.hidden_size != te2.config.hidden_size
    width = te1.config.hidden_size + te2.config.hidden_size
    assert width == unet.config.cross_attention_dim == tiny_id_encoder_config().embed_dim
    assert width % 128 == 0
    assert te1.config.eos_token_id == te2.config.eos_token_id == 2
    assert unet.config.addition_embed_type == "text_time"
    assert 2 ** (len(components["vae"].config.block_out_channels) - 1) == 8
    # Same seed, same weights; another seed, other weights.
    again = tiny_sdxl_components()["unet"].state_dict()
    other = tiny_sdxl_components(seed=1)["unet"].state_dict()
    key = "conv_in.weight"
    assert torch.equal(unet.state_dict()[key], again[key]) and not torch.equal(unet.state_dict()[key], other[key])


def test_checkpoint_has_the_official_layout_and_loads() -> None:
    legacy = re.compile(r"^unet\..+\.attn[12]\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
    for version in (1, 2):
        checkpoint = tiny_checkpoint(version)
        assert list(checkpoint) == ["id_encoder", "lora_weights"]
        lora = checkpoint["lora_weights"]
        assert all(legacy.match(key) for key in lora)
        ups = [tensor for key, tensor in lora.items() if key.endswith("up.weight")]
        assert ups and all(tensor.abs().sum() > 0 for tensor in ups)
        encoder = build_id_encoder(checkpoint["id_encoder"], version=version)
        assert encoder.embed_dim == 128
        assert encoder.config.image_size == 224 and encoder.config.patch_size == 14
        if version == 2:
            assert encoder.config == tiny_id_encoder_config()
    # 8 transformer blocks: down_blocks.1 (1 attention x 2 layers), mid (1 x 2), up_blocks.0 (2 x 2);
    # each has attn1 and attn2 with q, k, v, out, each a down and an up tensor.
    assert tiny_unet_config()["transformer_layers_per_block"] == (1, 2)
    assert len(tiny_checkpoint(1)["lora_weights"]) == 8 * 2 * 4 * 2
    first, again = tiny_checkpoint(2)["id_encoder"], tiny_checkpoint(2)["id_encoder"]
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_tiny_lora_visibly_changes_the_unet() -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(), add_watermarker=False)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 128, generator=torch.Generator().manual_seed(1))
    added = {
        "text_embeds": torch.randn(1, 32),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        before = pipe.unet(sample, 10, text, added_cond_kwargs=added).sample
        pipe.load_lora_weights(dict(tiny_checkpoint(1)["lora_weights"]), adapter_name="photomaker")
        after = pipe.unet(sample, 10, text, added_cond_kwargs=added).sample
    assert (after - before).abs().mean() > 0.01 * before.abs().mean()


def test_make_tiny_writes_a_loadable_pipeline_and_official_files(
    tiny_models_dir: Path,
) -> None:
    from diffusers import StableDiffusionXLPipeline

    paths = make_tiny(tiny_models_dir)  # already built by the fixture: must be a no-op
    assert paths == {
        "base": tiny_models_dir / "base",
        "v1": tiny_models_dir / "photomaker-v1.bin",
        "v2": tiny_models_dir / "photomaker-v2.bin",
        "fast_loras": tiny_models_dir / "fast-loras",
        "control": tiny_models_dir / "control",
    }
    from photomaker.presets import FAST_PRESETS

    assert sorted(p.name for p in paths["fast_loras"].iterdir()) == sorted(p.weight_name for p in FAST_PRESETS.values())
    stamp = paths["v1"].stat().st_mtime_ns
    make_tiny(tiny_models_dir)
    assert paths["v1"].stat().st_mtime_ns == stamp

    for version in (1, 2):
        contents = torch.load(paths[f"v{version}"], map_location="cpu", weights_only=True)
        assert list(contents) == ["id_encoder", "lora_weights"]
        expected = tiny_checkpoint(version)["id_encoder"]
        assert all(torch.equal(contents["id_encoder"][key], expected[key]) for key in expected)

    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base"])
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407
    assert pipe.tokenizer.model_max_length == 77
    images = pipe(
        "a photo of a man",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_make_tiny_rebuilds_an_incomplete_folder(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()  # e.g. an interrupted earlier run
    paths = make_tiny(tmp_path)
    assert (paths["base"] / "model_index.json").is_file() and paths["v2"].is_file()


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoint_seed_changes_weights(version: int) -> None:
    a, b = tiny_checkpoint(version, seed=0), tiny_checkpoint(version, seed=1)
    key = "fuse_module.mlp1.fc1.weight"
    assert not torch.equal(a["id_encoder"][key], b["id_encoder"][key])


# ----------------------------------------------------------------------------- control and composition models


def test_tiny_controlnet_residuals_fit_the_unet_and_follow_the_control_image() -> None:
    import numpy as np

    from photomaker.testing import synthetic_control_image, tiny_controlnet

    unet = tiny_sdxl_components()["unet"]
    controlnet = tiny_controlnet(unet)
    sample = torch.randn(1, 4, 8, 8)
    cond = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)

    def residuals(seed: int):
        pixels = torch.from_numpy(np.array(synthetic_control_image(64, seed=seed), dtype=np.float32))
        return controlnet(
            sample,
            10,
            encoder_hidden_states=hidden,
            added_cond_kwargs=cond,
            controlnet_cond=pixels.permute(2, 0, 1)[None] / 255,
            return_dict=False,
        )

    down, mid = residuals(1)
    other_down, _ = residuals(2)
    unet(
        sample,
        10,
        encoder_hidden_states=hidden,
        added_cond_kwargs=cond,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    )  # shapes fit
    assert all(d.abs().max() > 0 for d in down)
    assert not torch.allclose(down[0], other_down[0])


def test_tiny_t2i_adapter_features_fit_the_unet_down_blocks() -> None:
    from photomaker.testing import tiny_t2i_adapter

    features = tiny_t2i_adapter()(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 32, 4, 4), (1, 64, 4, 4)]


def test_tiny_ip_adapter_has_the_official_keys_and_loads_through_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from photomaker.testing import tiny_ip_adapter_state_dict, write_tiny_ip_adapter

    components = tiny_sdxl_components()
    state = tiny_ip_adapter_state_dict(components["unet"])
    projection_keys = {
        "image_proj.proj.weight",
        "image_proj.proj.bias",
        "image_proj.norm.weight",
        "image_proj.norm.bias",
    }
    assert projection_keys < set(state)
    ip_keys = sorted(k for k in state if k.startswith("ip_adapter."))
    assert all(re.fullmatch(r"ip_adapter\.\d+\.to_[kv]_ip\.weight", k) for k in ip_keys)
    assert {int(k.split(".")[1]) for k in ip_keys} == {1, 3, 5, 7, 9, 11, 13, 15}  # 8 cross-attention layers
    pipe = StableDiffusionXLPipeline(**components)
    pipe.load_ip_adapter(
        str(write_tiny_ip_adapter(tmp_path, components["unet"])), subfolder="", weight_name="ip-adapter.safetensors"
    )
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    processors = [p for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")]
    assert processors and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in processors)
    torch.testing.assert_close(processors[0].to_k_ip[0].weight, state["ip_adapter.1.to_k_ip.weight"])
