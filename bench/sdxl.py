"""Real-size SDXL architecture (configs written from the published SDXL base 1.0 architecture) and builders.

Everything here can be built on the ``meta`` device (no memory, no time) to count parameters, or materialised
in bf16 with cheap deterministic random weights for timing and memory benchmarks. Nothing is downloaded.

Also: the few-step LoRAs of the fast presets, with random weights in each preset's key format, for any
SDXL-shaped UNet config (real size or the tiny test models), so fast mode runs offline end to end.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

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


def attention_lora_targets(unet: nn.Module) -> list[tuple[str, str, int, int]]:
    """(attention path, projection name, in, out) for q/k/v/out of every attn1/attn2 of a UNet (any device)."""
    from diffusers.models.attention_processor import Attention

    targets = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ("attn1", "attn2"):
            for projection, linear in (
                ("to_q", module.to_q),
                ("to_k", module.to_k),
                ("to_v", module.to_v),
                ("to_out", module.to_out[0]),
            ):
                targets.append((name, projection, linear.in_features, linear.out_features))
    return targets


def photomaker_lora_state_dict(
    unet: nn.Module, rank: int = PHOTOMAKER_LORA_RANK, seed: int = 1, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """PhotoMaker's LoRA in the official legacy format: ``unet.<path>.processor.to_q_lora.down.weight`` ..."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path, projection, fan_in, fan_out in attention_lora_targets(unet):
        prefix = f"unet.{path}.processor.{projection}_lora"
        state[f"{prefix}.down.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in**0.5).to(dtype)
        state[f"{prefix}.up.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.02 / rank**0.5).to(dtype)
    return state


# Modules a few-step distillation LoRA adapts (the linear layers of every transformer; LCM-LoRA and Hyper-SD
# also adapt convolutions, which change the file size but not the cost of a fused UNet).
_FAST_LORA_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)

# Key format of each preset's published file, as used here: "peft" = diffusers/peft
# (``unet.<path>.lora_A.weight``), "kohya" = ``lora_unet_<path with _>.lora_down.weight`` + ``.alpha``.
FAST_LORA_FORMATS = {
    "lcm-4": "peft",
    "hyper-sd-8": "peft",
    "hyper-sd-12": "peft",
    "lightning-8": "kohya",
}


def fast_lora_state_dict(
    unet: nn.Module, key_format: str, rank: int, seed: int = 7, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A random few-step LoRA for ``unet`` (any device) in ``key_format`` ("peft" or "kohya")."""
    if key_format not in ("peft", "kohya"):
        raise ValueError(f"key_format must be 'peft' or 'kohya', got {key_format!r}")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or not name.endswith(_FAST_LORA_SUFFIXES):
            continue
        down = (torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5).to(dtype)
        up = (torch.randn(module.out_features, rank, generator=generator) * 0.02 / rank**0.5).to(dtype)
        if key_format == "peft":
            state[f"unet.{name}.lora_A.weight"] = down
            state[f"unet.{name}.lora_B.weight"] = up
        else:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    if not state:
        raise ValueError("The UNet has no linear layers to adapt")
    return state


def write_fast_loras(
    folder: str | Path,
    unet: nn.Module,
    rank: int,
    dtype: torch.dtype = torch.bfloat16,
    presets_to_write: list[str] | None = None,
) -> Path:
    """Write one random LoRA per fast preset under its official file name (a ``PHOTOMAKER_FAST_LORA_DIR``)."""
    from safetensors.torch import save_file

    from photomaker import presets

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (key, preset) in enumerate(presets.FAST_PRESETS.items()):
        if presets_to_write is not None and key not in presets_to_write:
            continue
        target = folder / preset.weight_name
        if target.is_file():
            continue
        state = fast_lora_state_dict(unet, FAST_LORA_FORMATS.get(key, "peft"), rank, seed=7 + index, dtype=dtype)
        partial = target.with_name(target.name + ".partial")
        save_file(state, str(partial))
        partial.replace(target)
        logger.info("Wrote %s (%d tensors)", target, len(state))
    return folder
