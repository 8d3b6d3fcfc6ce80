"""Tiny random-weight control models with the real architectures, saved in the layout ``from_pretrained`` reads.

They let tests load pose and depth estimators, ControlNets and T2I-Adapters through the same code path as the
Hub checkpoints (:mod:`photomaker.control_models`), offline and in well under a second each.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessorPil,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessorPil,
    RTDetrResNetConfig,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
    VitPoseImageProcessorPil,
)

from . import testing
from .testing import tiny_sdxl_components

__all__ = [
    "TINY_CONTROL_LAYOUT",
    "TINY_POSE_INPUT_SIZE",
    "save_tiny_controlnet",
    "save_tiny_depth_model",
    "save_tiny_ip_adapter",
    "save_tiny_person_detector",
    "save_tiny_pose_model",
    "save_tiny_t2i_adapter",
    "tiny_control_overrides",
    "write_tiny_control_models",
]

TINY_POSE_INPUT_SIZE = {"height": 64, "width": 48}
"""ViTPose's 4:3 person crop, shrunk from 256x192."""


def save_tiny_pose_model(folder: str | Path, seed: int = 0) -> Path:
    """A ViTPose (simple decoder, 17 COCO keypoints) and its image processor, saved to ``folder``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(
        image_size=(TINY_POSE_INPUT_SIZE["height"], TINY_POSE_INPUT_SIZE["width"]),
        patch_size=(8, 8),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[2],
    )
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).save_pretrained(folder)
    VitPoseImageProcessorPil(size=dict(TINY_POSE_INPUT_SIZE)).save_pretrained(folder)
    return folder


def save_tiny_person_detector(folder: str | Path, labels: tuple[str, ...] = ("person", "car"), seed: int = 0) -> Path:
    """An RT-DETR (ResNet backbone, hybrid encoder, 1 decoder layer, 10 queries) and its processor."""
    folder = Path(folder)
    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=[16, 32, 64],
        encoder_hidden_dim=16,
        d_model=16,
        decoder_in_channels=[16, 16, 16],
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_layers=1,
        num_queries=10,
        num_denoising=0,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    RTDetrForObjectDetection(config).save_pretrained(folder)
    RTDetrImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def save_tiny_depth_model(folder: str | Path, seed: int = 0, depth_estimation_type: str = "relative") -> Path:
    """A Depth Anything (DINOv2 backbone, DPT head) and its image processor, saved to ``folder``.

    ``depth_estimation_type="metric"`` gives the metric head, which predicts distance (far = large).
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    backbone = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,  # as in the released Depth Anything configs: the neck reshapes
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[4, 8, 8, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type=depth_estimation_type,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14
    ).save_pretrained(folder)
    return folder


def save_tiny_controlnet(folder: str | Path, seed: int = 0) -> Path:
    """`testing.tiny_controlnet` of the tiny base UNet of `seed`, in `from_pretrained` layout."""
    folder = Path(folder)
    testing.tiny_controlnet(tiny_sdxl_components(seed)["unet"], seed).save_pretrained(folder)
    return folder


def save_tiny_t2i_adapter(folder: str | Path, seed: int = 0) -> Path:
    """`testing.tiny_t2i_adapter`, in `from_pretrained` layout."""
    folder = Path(folder)
    testing.tiny_t2i_adapter(seed).save_pretrained(folder)
    return folder


def save_tiny_ip_adapter(folder: str | Path, seed: int = 0) -> Path:
    """An IP-Adapter for the tiny SDXL UNet in the h94/IP-Adapter repository layout: ``sdxl_models/`` holds
    ``ip-adapter_sdxl.bin`` (the official nested pickle, ``{"image_proj": ..., "ip_adapter": ...}``) and
    ``image_encoder/``. `testing.write_tiny_ip_adapter` writes the same weights as one flat safetensors file."""
    models = Path(folder) / "sdxl_models"
    unet = tiny_sdxl_components(seed)["unet"]
    testing.write_tiny_ip_adapter(models, unet, seed)
    (models / "ip-adapter.safetensors").unlink()
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in testing.tiny_ip_adapter_state_dict(unet, seed).items():
        part, name = key.split(".", 1)
        nested[part][name] = tensor
    torch.save(nested, models / "ip-adapter_sdxl.bin")
    return Path(folder)


TINY_CONTROL_LAYOUT: dict[str, str] = {
    "pose": "controlnet-pose",
    "canny": "controlnet-canny",
    "depth": "controlnet-depth",
    "sketch": "t2i-adapter-sketch",
    "ip_adapter": "ip-adapter/ip-adapter.safetensors",
    "pose_estimator": "pose-estimator",
    "person_detector": "person-detector",
    "depth_estimator": "depth-estimator",
}
"""Where `write_tiny_control_models` puts each model, by `ControlModelRegistry` key."""


def tiny_control_overrides(folder: str | Path) -> dict[str, str]:
    """`ControlModelRegistry(overrides=...)` for the models `write_tiny_control_models(folder)` wrote."""
    return {key: str(Path(folder) / relative) for key, relative in TINY_CONTROL_LAYOUT.items()}


def write_tiny_control_models(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Every control model the service can use, tiny and random, in `TINY_CONTROL_LAYOUT` under `folder`: the
    pose, canny and depth ControlNets (from the tiny base UNet of `seed`, their control visible in the output),
    the sketch T2I-Adapter, the IP-Adapter, the pose estimator with its person detector, and a depth estimator.
    Returns `tiny_control_overrides(folder)`."""
    folder = Path(folder)
    paths = tiny_control_overrides(folder)
    unet = tiny_sdxl_components(seed)["unet"]
    for index, key in enumerate(("pose", "canny", "depth")):
        testing.tiny_controlnet(unet, seed=seed + index).save_pretrained(paths[key])
    testing.tiny_t2i_adapter(seed).save_pretrained(paths["sketch"])
    testing.write_tiny_ip_adapter(Path(paths["ip_adapter"]).parent, unet, seed)
    save_tiny_pose_model(paths["pose_estimator"], seed)
    save_tiny_person_detector(paths["person_detector"], seed=seed)
    save_tiny_depth_model(paths["depth_estimator"], seed)
    return paths
