"""ID encoders and fuse module against direct computations of the reference implementation's v1 and v2."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from photomaker.errors import CheckpointError, IDImageError
from photomaker.id_encoder import (
    FuseModule,
    PhotoMakerIDEncoderConfig,
    PhotoMakerIDEncoderV2,
    create_id_encoder,
)
from photomaker.testing import tiny_id_encoder_config

# A small encoder whose resampler has 2 heads (embed 96 + 160 = 256, heads = 256 // 128), so the head split
# is exercised; 28 px images keep the vision tower at 5 tokens.
SMALL = PhotoMakerIDEncoderConfig(
    vision_hidden_size=64,
    vision_num_layers=1,
    vision_num_heads=1,
    vision_intermediate_size=96,
    patch_size=14,
    image_size=28,
    projection_dim_1=96,
    projection_dim_2=160,
    id_embed_dim=16,
    num_tokens=2,
    resampler_depth=1,
    resampler_heads=2,
    resampler_dim_head=128,
    resampler_ff_mult=2,
    token_proj_ratio=2,
)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere (norms too), so a skipped or swapped parameter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            for name, parameter in owner.named_parameters(recurse=False):
                noise = torch.randn(parameter.shape, generator=generator)
                if isinstance(owner, nn.LayerNorm) and name == "weight":
                    parameter.copy_(1.0 + 0.2 * noise)
                elif parameter.ndim >= 2:
                    parameter.copy_(noise / math.sqrt(parameter[0].numel()))
                else:
                    parameter.copy_(0.2 * noise)
    return module.eval()


def _encoder(version: int, config: PhotoMakerIDEncoderConfig = SMALL, seed: int = 0):
    return _randomise(create_id_encoder(config, version), seed)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ln(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ sd[f"{name}.weight"].T
    return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out


def _direct_fuse(c: torch.Tensor, e: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    def mlp(x: torch.Tensor, name: str) -> torch.Tensor:
        h = _gelu(_linear(_ln(x, sd, f"{prefix}{name}.layernorm"), sd, f"{prefix}{name}.fc1"))
        return _linear(h, sd, f"{prefix}{name}.fc2")

    h = mlp(torch.cat([c, e], dim=-1), "mlp1") + c
    h = mlp(h, "mlp2") + h
    return _ln(h, sd, f"{prefix}layer_norm")


def _prompt(batch: int, dim: int, positions: list[list[int]], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 12, dim, generator=generator)
    mask = torch.zeros(batch, 12, dtype=torch.bool)
    for row, cols in enumerate(positions):
        mask[row, cols] = True
    return embeds, mask


def test_fuse_module_matches_the_reference_formula() -> None:
    module = _randomise(FuseModule(8), seed=3)
    c, e = torch.randn(5, 8), torch.randn(5, 8)
    expected = _direct_fuse(c, e, module.state_dict())
    torch.testing.assert_close(module(c, e), expected, rtol=1e-5, atol=1e-5)
    assert set(module.state_dict()) == {
        *(
            f"{b}.{layer}.{p}"
            for b in ("mlp1", "mlp2")
            for layer in ("layernorm", "fc1", "fc2")
            for p in ("weight", "bias")
        ),
        "layer_norm.weight",
        "layer_norm.bias",
    }


@pytest.mark.parametrize("version", [1, 2])
def test_fuse_gives_every_prompt_all_tokens_image_major(version: int) -> None:
    encoder = _encoder(version)
    tokens_per_image = encoder.tokens_per_image
    assert tokens_per_image == version
    num_images = 2
    id_tokens = torch.randn(num_images, tokens_per_image, encoder.embed_dim)
    count = num_images * tokens_per_image
    positions = [list(range(2, 2 + count)), list(range(6, 6 + count))]
    prompt, mask = _prompt(2, encoder.embed_dim, positions)
    prompt_before, mask_before = prompt.clone(), mask.clone()

    with torch.no_grad():
        out = encoder.fuse(prompt, id_tokens, mask)

    flat_ids = id_tokens.reshape(count, -1)  # img0 tok0, img0 tok1, img1 tok0, ...
    sd = encoder.state_dict()
    for row, cols in enumerate(positions):
        expected = _direct_fuse(prompt[row, cols], flat_ids, sd, "fuse_module.")
        torch.testing.assert_close(out[row, cols], expected, rtol=1e-5, atol=1e-5)
        untouched = [i for i in range(12) if i not in cols]
        assert torch.equal(out[row, untouched], prompt[row, untouched])
    assert torch.equal(prompt, prompt_before) and torch.equal(mask, mask_before)


def test_fuse_refuses_a_mask_with_the_wrong_count() -> None:
    encoder = _encoder(2)
    id_tokens = torch.randn(2, 2, encoder.embed_dim)
    prompt, mask = _prompt(2, encoder.embed_dim, [[1, 2, 3, 4], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"exactly 4 class-token positions.*rows \[1\]"):
        encoder.fuse(prompt, id_tokens, mask)


def test_identity_weights_blend_between_class_word_and_fused() -> None:
    encoder = _encoder(1)
    id_tokens = torch.randn(2, 1, encoder.embed_dim)
    prompt, mask = _prompt(1, encoder.embed_dim, [[3, 4]])
    with torch.no_grad():
        reference = encoder.fuse(prompt, id_tokens, mask)
        ones = encoder.fuse(prompt, id_tokens, mask, torch.ones(2))
        zeros = encoder.fuse(prompt, id_tokens, mask, torch.zeros(2))
        half = encoder.fuse(prompt, id_tokens, mask, [0.5, 0.5])
        mixed = encoder.fuse(prompt, id_tokens, mask, [1.0, 0.0])
    assert torch.equal(ones, reference)
    assert torch.equal(zeros, prompt)
    assert not torch.allclose(reference, prompt)
    torch.testing.assert_close(half, (reference + prompt) / 2, rtol=1e-5, atol=1e-6)
    assert torch.equal(mixed[0, 3], reference[0, 3]) and torch.equal(mixed[0, 4], prompt[0, 4])
    with pytest.raises(ValueError, match="one weight per ID image"):
        encoder.fuse(prompt, id_tokens, mask, [1.0])


def test_v1_token_is_the_two_projections_of_the_pooled_clip_output() -> None:
    encoder = _encoder(1)
    pixels = torch.randn(3, 3, SMALL.image_size, SMALL.image_size)
    with torch.no_grad():
        tokens = encoder.encode_images(pixels)
        pooled = encoder.vision_model(pixel_values=pixels).pooler_output
        first = pooled @ encoder.visual_projection.weight.T
        second = pooled @ encoder.visual_projection_2.weight.T
    assert tokens.shape == (3, 1, SMALL.embed_dim)
    torch.testing.assert_close(tokens[:, 0, : SMALL.projection_dim_1], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0, SMALL.projection_dim_1 :], second, rtol=1e-5, atol=1e-5)


def test_v2_tokens_match_the_reference_resampler_computation() -> None:
    encoder = _encoder(2, seed=5)
    assert isinstance(encoder, PhotoMakerIDEncoderV2) and encoder.config.resampler_heads == 2
    pixels = torch.randn(2, 3, SMALL.image_size, SMALL.image_size)
    face = torch.randn(2, SMALL.id_embed_dim)
    sd = encoder.state_dict()
    p = "qformer_perceiver."
    r = p + "perceiver_resampler."
    heads, dim_head = SMALL.resampler_heads, SMALL.resampler_dim_head

    with torch.no_grad():
        tokens = encoder.encode_images(pixels, face)
        clip = encoder.vision_model(pixel_values=pixels).last_hidden_state  # no post_layernorm
        x = _linear(_gelu(_linear(face, sd, p + "token_proj.0")), sd, p + "token_proj.2")
        x = _ln(x.reshape(2, 2, SMALL.embed_dim), sd, p + "token_norm")
        features = _linear(clip, sd, r + "proj_in")
        latents = x
        for i in range(SMALL.resampler_depth):
            a = f"{r}layers.{i}.0."
            f = _ln(features, sd, a + "norm1")
            lat = _ln(latents, sd, a + "norm2")
            q = lat @ sd[a + "to_q.weight"].T
            k, v = (torch.cat([f, lat], dim=1) @ sd[a + "to_kv.weight"].T).chunk(2, dim=-1)

            def heads_of(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(t.shape[0], t.shape[1], heads, dim_head).permute(0, 2, 1, 3)

            scale = dim_head**-0.25
            weights = torch.softmax((heads_of(q) * scale) @ (heads_of(k) * scale).transpose(-1, -2), dim=-1)
            attended = (weights @ heads_of(v)).permute(0, 2, 1, 3).reshape(2, 2, heads * dim_head)
            latents = attended @ sd[a + "to_out.weight"].T + latents
            ff = f"{r}layers.{i}.1."
            h = _gelu(_ln(latents, sd, ff + "0") @ sd[ff + "1.weight"].T) @ sd[ff + "3.weight"].T
            latents = h + latents
        expected = x + _ln(_linear(latents, sd, r + "proj_out"), sd, r + "norm_out")

    assert tokens.shape == (2, 2, SMALL.embed_dim)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)


def test_v2_needs_one_face_embedding_per_photo() -> None:
    encoder = _encoder(2)
    pixels = torch.randn(2, 3, SMALL.image_size, SMALL.image_size)
    with pytest.raises(IDImageError, match=r"face_embeds.*\[2, 16\]"):
        encoder.encode_images(pixels)
    with pytest.raises(IDImageError, match=r"shape \(1, 16\) for 2 photo"):
        encoder.encode_images(pixels, torch.randn(1, SMALL.id_embed_dim))


def test_state_dict_has_the_official_key_names() -> None:
    with torch.device("meta"):
        keys = set(create_id_encoder(PhotoMakerIDEncoderConfig(), 2).state_dict())
    assert "vision_model.embeddings.position_ids" not in keys
    for key in (
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.encoder.layers.23.self_attn.q_proj.bias",
        "vision_model.encoder.layers.23.mlp.fc1.weight",
        "vision_model.post_layernorm.bias",
        "visual_projection.weight",
        "visual_projection_2.weight",
        "fuse_module.mlp1.fc1.weight",
        "fuse_module.layer_norm.weight",
        "qformer_perceiver.token_proj.2.weight",
        "qformer_perceiver.perceiver_resampler.layers.3.0.to_kv.weight",
        "qformer_perceiver.perceiver_resampler.layers.3.1.3.weight",
        "qformer_perceiver.perceiver_resampler.norm_out.weight",
    ):
        assert key in keys, key
    assert "visual_projection.bias" not in keys


@pytest.mark.parametrize("config", [PhotoMakerIDEncoderConfig(), SMALL, tiny_id_encoder_config()])
def test_config_is_inferred_back_from_shapes(config: PhotoMakerIDEncoderConfig) -> None:
    with torch.device("meta"):
        v2_sd = create_id_encoder(config, 2).state_dict()
        v1_sd = create_id_encoder(config, 1).state_dict()
    assert PhotoMakerIDEncoderConfig.from_state_dict(v2_sd) == config
    v1_fields = {f.name for f in dataclasses.fields(config)} - {
        "id_embed_dim",
        "num_tokens",
        "resampler_depth",
        "resampler_heads",
        "resampler_dim_head",
        "resampler_ff_mult",
        "token_proj_ratio",
    }
    inferred = PhotoMakerIDEncoderConfig.from_state_dict(v1_sd)
    assert {f: getattr(inferred, f) for f in v1_fields} == {f: getattr(config, f) for f in v1_fields}
    assert PhotoMakerIDEncoderConfig().embed_dim == 2048


def test_inference_names_the_tensor_it_needs() -> None:
    with torch.device("meta"):
        sd = create_id_encoder(SMALL, 1).state_dict()
    del sd["visual_projection_2.weight"]
    with pytest.raises(CheckpointError, match="visual_projection_2.weight"):
        PhotoMakerIDEncoderConfig.from_state_dict(sd)
