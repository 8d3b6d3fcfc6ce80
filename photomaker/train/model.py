"""What PhotoMaker training builds and trains: the frozen SDXL parts, the UNet LoRA, the ID encoder; and the export.

Trained, as the paper: a rank-64 LoRA on ``to_q/to_k/to_v/to_out.0`` of every ``attn1``/``attn2`` of the UNet,
the fuse module, both visual projections (v1; v2 does not use them, so they stay frozen), the last N vision
layers and, for v2, the ``qformer_perceiver``. Everything else is frozen and cast to the weight dtype; trained
parameters stay fp32 so that mixed precision only changes the compute, not the optimiser's updates.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, TrainingConfigError
from ..id_encoder import (
    PhotoMakerIDEncoder,
    PhotoMakerIDEncoderConfig,
    create_id_encoder,
)
from ..loading import CHECKPOINT_SUFFIXES, build_id_encoder, load_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VISION_MODEL",
    "LORA_TARGET_PATTERN",
    "BaseComponents",
    "PhotoMakerTrainingModel",
    "add_unet_lora",
    "build_id_encoder_for_training",
    "export_checkpoint",
    "freeze_for_training",
    "load_base_components",
    "load_legacy_lora",
    "lora_rank_of",
    "lora_state_dict_legacy",
]

DEFAULT_VISION_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_LORA_RANK = 64
LORA_TARGET_PATTERN = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_LEGACY_KEY = re.compile(
    r"^unet\.(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)


@dataclass
class BaseComponents:
    """The SDXL pieces training needs (all frozen)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any


def load_base_components(base_model: str, dtype: torch.dtype) -> BaseComponents:
    """SDXL components from a Hub id, a diffusers folder or a single ``.safetensors``/``.ckpt`` file."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    path = os.path.expanduser(base_model)
    if base_model.endswith((".safetensors", ".ckpt")):
        pipe = StableDiffusionXLPipeline.from_single_file(path, dtype=dtype)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype)
    return BaseComponents(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        # The training forward process: DDPM's add_noise/get_velocity on the base model's noise schedule.
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )


def _fresh_encoder_config(vision_config: Any, text_widths: tuple[int, int]) -> PhotoMakerIDEncoderConfig:
    """ID encoder sizes around a given vision tower, with projections to the base model's two text widths."""
    embed_dim = sum(text_widths)
    return PhotoMakerIDEncoderConfig(
        vision_hidden_size=vision_config.hidden_size,
        vision_num_layers=vision_config.num_hidden_layers,
        vision_num_heads=vision_config.num_attention_heads,
        vision_intermediate_size=vision_config.intermediate_size,
        patch_size=vision_config.patch_size,
        image_size=vision_config.image_size,
        hidden_act=vision_config.hidden_act,
        layer_norm_eps=vision_config.layer_norm_eps,
        projection_dim_1=text_widths[0],
        projection_dim_2=text_widths[1],
        resampler_heads=max(1, embed_dim // 128),
    )


def build_id_encoder_for_training(
    init: str,
    pm_version: int,
    text_widths: tuple[int, int],
    vision_model: str | None,
    random_vision_config: Any = None,
) -> tuple[PhotoMakerIDEncoder, dict[str, torch.Tensor] | None]:
    """The ID encoder to train (fp32) and the init checkpoint's LoRA weights (None for a fresh start).

    ``init`` is a PhotoMaker checkpoint (a file, or a folder or Hub repo id whose ``photomaker-v{pm_version}.bin``
    is used) or ``"none"``: fresh ID heads on a pretrained CLIP vision tower (``vision_model``: Hub id or folder of a
    ``CLIPVisionModelWithProjection``; ``None`` means the paper's CLIP ViT-L/14). Only ``vision_model=None`` with a
    ``random_vision_config`` (a ``CLIPVisionConfig``, for offline tests) gives a randomly initialised tower: a
    real run never trains on one by omission.
    """
    if init != "none":
        # A file is read as it is; a folder or a Hub repo id (e.g. TencentARC/PhotoMaker-V2) means its official file
        # for the version.
        path = os.path.expanduser(init)
        is_file = os.path.isfile(path) or init.endswith(CHECKPOINT_SUFFIXES)
        checkpoint = load_checkpoint(
            path if os.path.exists(path) else init, weight_name=None if is_file else f"photomaker-v{pm_version}.bin"
        )
        encoder = build_id_encoder(checkpoint["id_encoder"], version=pm_version)
        if encoder.embed_dim != sum(text_widths):
            raise CheckpointError(
                f"The checkpoint's ID encoder makes {encoder.embed_dim}-d tokens but the base model's text "
                f"encoders are {sum(text_widths)} wide: use an SDXL base model with this checkpoint."
            )
        return encoder.float(), checkpoint["lora_weights"]

    from transformers import CLIPVisionModelWithProjection

    if vision_model is None and random_vision_config is not None:
        logger.warning("The ID encoder's vision tower starts from random weights (tests only)")
        encoder = create_id_encoder(_fresh_encoder_config(random_vision_config, text_widths), pm_version)
        return encoder.float(), None
    vision_model = os.path.expanduser(vision_model or DEFAULT_VISION_MODEL)
    clip = CLIPVisionModelWithProjection.from_pretrained(vision_model, dtype=torch.float32)
    encoder = create_id_encoder(_fresh_encoder_config(clip.config, text_widths), pm_version)
    tower = {
        key.removeprefix("vision_model."): value
        for key, value in clip.state_dict().items()
        if key.startswith("vision_model.")
    }
    encoder.vision_model.load_state_dict(tower, strict=True)
    if clip.visual_projection.weight.shape == encoder.visual_projection.weight.shape:
        encoder.visual_projection.weight.data.copy_(clip.visual_projection.weight.data)
    else:
        logger.info(
            "visual_projection starts fresh: CLIP's projects to %d, the base model's first text encoder is %d wide",
            clip.visual_projection.out_features,
            text_widths[0],
        )
    encoder.reset_position_ids()
    return encoder.float(), None


def add_unet_lora(unet: nn.Module, rank: int) -> None:
    """Add a peft LoRA (alpha = rank, so scale 1 like the official file) on every attention projection."""
    from peft import LoraConfig

    if rank < 1:
        raise TrainingConfigError(f"--lora-rank must be at least 1; got {rank}.")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGET_PATTERN))


def _lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers of the UNet by module path (``...attn1.to_out.0``)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def _legacy_name(module_path: str) -> tuple[str, str]:
    """``a.attn1.to_out.0`` -> (``a.attn1``, ``to_out``); ``a.attn1.to_q`` -> (``a.attn1``, ``to_q``)."""
    path = module_path.removesuffix(".0")
    attention, projection = path.rsplit(".", 1)
    return attention, projection


def load_legacy_lora(unet: nn.Module, lora_weights: dict[str, torch.Tensor]) -> None:
    """Copy an official (legacy-key) LoRA into the UNet's peft layers; every key must find its layer."""
    layers = {_legacy_name(name): layer for name, layer in _lora_layers(unet).items()}
    seen = set()
    for key, tensor in lora_weights.items():
        match = _LEGACY_KEY.match(key)
        if match is None or (match["path"], match["proj"]) not in layers:
            raise CheckpointError(
                f"The init checkpoint's LoRA key {key!r} does not name an attention projection of this UNet; "
                "use a PhotoMaker checkpoint made for an SDXL base model."
            )
        layer = layers[(match["path"], match["proj"])]
        weight = (layer.lora_A if match["part"] == "down" else layer.lora_B)["default"].weight
        if weight.shape != tensor.shape:
            raise CheckpointError(
                f"LoRA tensor {key} has shape {tuple(tensor.shape)} but the LoRA layer is {tuple(weight.shape)}: "
                f"pass --lora-rank equal to the checkpoint's rank ({min(tensor.shape)})."
            )
        with torch.no_grad():
            weight.copy_(tensor.to(weight.dtype))
        seen.add(key)
    if len(seen) != 2 * len(layers):
        raise CheckpointError(
            f"The init checkpoint has LoRA weights for {len(seen) // 2} of this UNet's {len(layers)} attention "
            "projections; PhotoMaker checkpoints adapt all of them."
        )


def lora_rank_of(lora_weights: dict[str, torch.Tensor]) -> int:
    """Rank of a legacy LoRA (the rows of its first ``down`` weight)."""
    for key, tensor in lora_weights.items():
        if key.endswith(".down.weight"):
            return int(tensor.shape[0])
    raise CheckpointError("The init checkpoint's lora_weights has no '...down.weight' tensor.")


def freeze_for_training(
    unet: nn.Module, id_encoder: PhotoMakerIDEncoder, train_vision_layers: int
) -> dict[str, list[nn.Parameter]]:
    """Freeze everything, then unfreeze what the paper trains; return the two optimiser groups.

    ``"main"``: LoRA, fuse module, projections (v1), qformer_perceiver (v2); ``"vision"``: the last
    ``train_vision_layers`` transformer layers of the vision tower.
    """
    layers = id_encoder.vision_model.encoder.layers
    if not 0 <= train_vision_layers <= len(layers):
        raise TrainingConfigError(
            f"--train-vision-layers must be between 0 and {len(layers)} (the vision tower's depth); "
            f"got {train_vision_layers}."
        )
    unet.requires_grad_(False)
    id_encoder.requires_grad_(False)
    main = [p for name, p in unet.named_parameters() if "lora_" in name]
    heads: list[nn.Module] = [id_encoder.fuse_module]
    if id_encoder.version >= 2:
        heads.append(id_encoder.qformer_perceiver)
    else:
        heads += [id_encoder.visual_projection, id_encoder.visual_projection_2]
    main += [p for module in heads for p in module.parameters()]
    vision = [p for layer in layers[len(layers) - train_vision_layers :] for p in layer.parameters()]
    for parameter in main + vision:
        parameter.requires_grad_(True)
    return {"main": main, "vision": vision}


def cast_frozen(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Frozen tensors to the weight dtype, trained ones to fp32."""
    for module in modules:
        for parameter in module.parameters():
            parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else dtype)


class PhotoMakerTrainingModel(nn.Module):
    """The trained modules under one ``nn.Module``, so that DDP/DeepSpeed wrap and synchronise them together.

    ``forward`` fuses the ID tokens into each prompt's class-word rows and runs the UNet: everything that
    needs gradients happens inside it.
    """

    def __init__(self, unet: nn.Module, id_encoder: PhotoMakerIDEncoder) -> None:
        super().__init__()
        self.unet = unet
        self.id_encoder = id_encoder

    def fuse_prompt(
        self,
        hidden: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        id_pixel_values: torch.Tensor,
        face_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """One prompt's [77, D] embedding: the class copies of each text encoder's half fused with the ID tokens.

        ``hidden`` holds each text encoder's [77, d_i] (penultimate layer); ``masks`` their class-copy masks, or
        None for a dropped caption, which keeps the plain text embedding.
        """
        if masks[0] is None:
            return torch.cat(hidden, dim=-1)
        id_tokens = self.id_encoder.encode_images(id_pixel_values, face_embeds)
        count = id_tokens.shape[0] * id_tokens.shape[1]
        class_rows = torch.cat([h[m].view(1, count, -1) for h, m in zip(hidden, masks, strict=True)], dim=-1)
        all_rows = torch.ones(class_rows.shape[:2], dtype=torch.bool, device=class_rows.device)
        fused = self.id_encoder.fuse(class_rows, id_tokens, all_rows)[0]
        parts = []
        for h, m, part in zip(hidden, masks, fused.split([h.shape[-1] for h in hidden], dim=-1), strict=True):
            out = h.clone().to(part.dtype)
            out[m] = part
            parts.append(out)
        return torch.cat(parts, dim=-1)

    def forward(self, groups: list[dict[str, Any]]) -> list[torch.Tensor]:
        """UNet predictions [B_g, C, h, w], one per group of same-size images (one forward call, as DDP needs).

        A group has ``noisy_latents``, ``timesteps``, ``pooled``, ``time_ids`` and ``prompts``: per image
        (hidden states per text encoder, class-copy masks, ID pixel values, face embeddings or None).
        """
        dtype = self.unet.conv_in.weight.dtype  # the frozen weights' dtype; LoRA layers cast for themselves
        predictions = []
        for group in groups:
            embeds = torch.stack([self.fuse_prompt(*prompt) for prompt in group["prompts"]])
            predictions.append(
                self.unet(
                    group["noisy_latents"].to(dtype),
                    group["timesteps"],
                    encoder_hidden_states=embeds.to(dtype),
                    added_cond_kwargs={
                        "text_embeds": group["pooled"].to(dtype),
                        "time_ids": group["time_ids"].to(dtype),
                    },
                ).sample
            )
        return predictions


def lora_state_dict_legacy(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA in the official legacy key format (``unet.<attn>.processor.to_q_lora.down.weight``).

    peft's ``lora_alpha / r`` scaling is folded into the up weight, since the official format has no alpha.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in _lora_layers(unet).items():
        attention, projection = _legacy_name(name)
        prefix = f"unet.{attention}.processor.{projection}_lora"
        scale = layer.scaling["default"]
        state[f"{prefix}.down.weight"] = layer.lora_A["default"].weight.detach().float().cpu().clone()
        state[f"{prefix}.up.weight"] = (layer.lora_B["default"].weight.detach().float() * scale).cpu().clone()
    return state


def export_checkpoint(
    model: PhotoMakerTrainingModel, path: str | Path | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"id_encoder", "lora_weights"}`` in the official layout; written as a torch pickle when ``path`` is given."""
    checkpoint = {
        "id_encoder": {name: tensor.detach().cpu().clone() for name, tensor in model.id_encoder.state_dict().items()},
        "lora_weights": lora_state_dict_legacy(model.unet),
    }
    if path is not None:
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        torch.save(checkpoint, partial)
        partial.replace(target)
        logger.info("Wrote %s", target)
    return checkpoint
