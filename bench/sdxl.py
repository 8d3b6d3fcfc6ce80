"""Real-size SDXL architecture (configs written from the published SDXL base 1.0 architecture) and builders.

Everything here can be built on the ``meta`` device (no memory, no time) to count parameters, or materialised
in bf16 with cheap deterministic random weights for timing and memory benchmarks. Nothing is downloaded.

The LoRA builders (attention targets, the fast presets' LoRAs in their key formats) are photomaker.testing's,
shared with the tiny models; this module only adds PhotoMaker's own LoRA at real size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from photomaker.testing import legacy_lora_state_dict

# --------------------------------------------------------------------------------------------- configs

# UNet of SDXL base 1.0: 3 levels (320, 640, 1280 channels), transformer depth 1 / 2 / 10 at the attention
# levels, 70 transformer blocks in all, cross-attention width 2048 = 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG),
# micro-conditioning: 6 size/crop numbers x 256 + the 1280-d pooled text embedding = 2816.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

# Text encoder 1: OpenAI CLIP ViT-L/14 text tower. bos/eos/pad ids as in SDXL's published configs.
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# Text encoder 2: OpenCLIP ViT-bigG/14 text tower with its 1280-d projection (the pooled embedding).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# VAE: 4 levels (128, 256, 512, 512) -> scale factor 8, 4 latent channels, SDXL's scaling factor.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

# Published parameter counts of SDXL base 1.0 (checked by make_real_size and the tests).
SDXL_PARAMETER_COUNTS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}
SDXL_TRANSFORMER_BLOCKS = 70
PHOTOMAKER_LORA_RANK = 64

# --------------------------------------------------------------------------------------------- builders


def build_unet(config: dict[str, Any] | None = None, device: str | torch.device = "meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**(config or SDXL_UNET_CONFIG))


def build_vae(config: dict[str, Any] | None = None, device: str | torch.device = "meta"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**(config or SDXL_VAE_CONFIG))


def build_text_encoders(device: str | torch.device = "meta") -> tuple[nn.Module, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))
    return te1, te2


def build_id_encoder(version: int = 1, device: str | torch.device = "meta") -> nn.Module:
    """The official-size PhotoMaker ID encoder (default config: CLIP ViT-L/14 vision + fuse module)."""
    from photomaker.id_encoder import PhotoMakerIDEncoderConfig, create_id_encoder

    with torch.device(device):
        return create_id_encoder(PhotoMakerIDEncoderConfig(), version)


def meta_components() -> dict[str, nn.Module]:
    """Every weight-holding part of SDXL + PhotoMaker v1, on ``meta`` (sizes only)."""
    te1, te2 = build_text_encoders()
    return {
        "id_encoder": build_id_encoder(1),
        "text_encoder": te1,
        "text_encoder_2": te2,
        "unet": build_unet(),
        "vae": build_vae(),
    }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def materialize_random(module: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Give a ``meta`` module real storage in ``dtype`` with cheap, well-scaled random weights.

    Matrices and kernels ~ N(0, 1/fan_in) (activations keep their scale through the network), embeddings
    ~ N(0, 0.02), norm scales 1, biases 0. Deterministic for a given seed and parameter order.
    """
    module = module.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if parameter.ndim >= 2:
            fan_in = parameter[0].numel()
            std = 0.02 if "embedding" in name else 1.0 / math.sqrt(fan_in)
            _fill_normal(parameter, std, generator)
        elif name.endswith("bias"):
            parameter.zero_()
        elif "norm" in name or name.endswith("weight"):
            parameter.fill_(1.0)
        else:  # class embedding and other free vectors
            _fill_normal(parameter, 0.02, generator)
    for name, buffer in module.named_buffers():
        if buffer.device.type == "meta":  # pragma: no cover - no SDXL part has such buffers after to_empty
            raise RuntimeError(f"Buffer {name} was not materialised")
    return module


def _fill_normal(parameter: torch.Tensor, std: float, generator: torch.Generator, chunk: int = 1 << 24) -> None:
    """normal_ in fp32 chunks, written into a bf16/fp16 parameter without a full-size fp32 copy."""
    flat = parameter.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        part.copy_(torch.randn(part.numel(), generator=generator) * std)


# --------------------------------------------------------------------------------------------- LoRAs


def photomaker_lora_state_dict(
    unet: nn.Module, rank: int = PHOTOMAKER_LORA_RANK, seed: int = 1, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """PhotoMaker's LoRA in the official legacy format: ``unet.<path>.processor.to_q_lora.down.weight`` ..."""
    return legacy_lora_state_dict(unet, rank, seed, up_std=0.02, dtype=dtype)
