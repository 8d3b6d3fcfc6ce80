"""Extra memory each control model needs at real size, computed from the real architectures built on ``meta``.

    python -m bench.bench_control_memory
    python -m bench.bench_control_memory --models controlnet t2i_adapter --json /tmp/control-memory.json

Nothing is downloaded or allocated: every model is built from its published configuration (written out below,
with the Hub repository it describes) on the ``meta`` device, and its weight bytes are parameters and buffers x the
bytes of each dtype. These are weights only: activations (small next to the SDXL UNet's for the estimators, about
a UNet encoder's worth per step for a ControlNet) and framework overheads are not counted.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bench import common, sdxl

DTYPES = (torch.float16, torch.float32)

# h94/IP-Adapter sdxl_models/image_encoder (what ip-adapter_sdxl.bin was trained with): OpenCLIP ViT-bigG/14.
IP_ADAPTER_IMAGE_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
IP_ADAPTER_TOKENS = 4  # ip-adapter_sdxl.bin: 4 image tokens, one 1280 -> 4 x 2048 projection

# TencentARC/t2i-adapter-sketch-sdxl-1.0
T2I_SKETCH_ADAPTER_CONFIG: dict[str, Any] = {
    "adapter_type": "full_adapter_xl",
    "in_channels": 3,
    "channels": [320, 640, 1280, 1280],
    "num_res_blocks": 2,
    "downscale_factor": 16,
}

# usyd-community/vitpose-base-simple: ViT-B/16 on 256 x 192 person crops, simple decoder, 17 COCO keypoints.
VITPOSE_BACKBONE_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "image_size": [256, 192],
    "patch_size": [16, 16],
    "out_indices": [12],
}

# PekingU/rtdetr_r50vd_coco_o365: ResNet-50-vd backbone, hybrid encoder, 6 decoder layers, 300 queries, COCO's 80.
RT_DETR_NUM_LABELS = 80

# Intel/dpt-hybrid-midas: BiT-R50 stem (3 stages) + ViT-B/16 at 384 px, DPT neck and depth head.
DPT_HYBRID_CONFIG: dict[str, Any] = {
    "is_hybrid": True,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 384,
    "patch_size": 16,
    "backbone_out_indices": [2, 5, 8, 11],
    "neck_hidden_sizes": [256, 512, 768, 768],
    "reassemble_factors": [1, 1, 1, 0.5],
    "readout_type": "project",
    "fusion_hidden_size": 256,
    "head_in_index": -1,
    "backbone_featmap_shape": [1, 1024, 24, 24],
}


@dataclass(frozen=True)
class ControlModelSize:
    """One control model's weights: where it comes from, what it is, how many numbers it holds."""

    key: str
    name: str
    repository: str
    architecture: str
    parameters: int
    buffer_elements: int

    def bytes(self, dtype: torch.dtype) -> int:
        return (self.parameters + self.buffer_elements) * torch.empty((), dtype=dtype).element_size()

    def as_result(self) -> dict[str, Any]:
        return {**asdict(self), **{f"{_dtype_name(d)}_bytes": self.bytes(d) for d in DTYPES}}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _elements(module: nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())


def controlnet() -> nn.Module:
    """A full SDXL ControlNet, as diffusers derives it from the SDXL UNet (encoder copy + zero convolutions)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel.from_unet(sdxl.build_unet())


def t2i_sketch_adapter() -> nn.Module:
    from diffusers import T2IAdapter

    with torch.device("meta"):
        return T2IAdapter(**T2I_SKETCH_ADAPTER_CONFIG)


def ip_adapter_image_encoder() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**IP_ADAPTER_IMAGE_ENCODER_CONFIG))


def ip_adapter_weights() -> nn.Module:
    """What ip-adapter_sdxl.bin adds to the UNet: the image projection and to_k_ip / to_v_ip in every attn2."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection

    unet = sdxl.build_unet()
    cross = unet.config.cross_attention_dim
    with torch.device("meta"):
        processors = nn.ModuleList(
            IPAdapterAttnProcessor2_0(module.to_q.out_features, cross, num_tokens=(IP_ADAPTER_TOKENS,))
            for name, module in unet.named_modules()
            if name.endswith("attn2")
        )
        projection = ImageProjection(
            IP_ADAPTER_IMAGE_ENCODER_CONFIG["projection_dim"], cross, num_image_text_embeds=IP_ADAPTER_TOKENS
        )
    return nn.ModuleDict({"image_proj": projection, "attention": processors})


def vitpose_base() -> nn.Module:
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    with torch.device("meta"):
        config = VitPoseConfig(backbone_config=VitPoseBackboneConfig(**VITPOSE_BACKBONE_CONFIG), num_labels=17)
        return VitPoseForPoseEstimation(config)


def rt_detr_r50() -> nn.Module:
    from transformers import RTDetrConfig, RTDetrForObjectDetection

    with torch.device("meta"):
        return RTDetrForObjectDetection(RTDetrConfig(num_labels=RT_DETR_NUM_LABELS))


def dpt_hybrid() -> nn.Module:
    from transformers import DPTConfig, DPTForDepthEstimation

    with torch.device("meta"):
        return DPTForDepthEstimation(DPTConfig(**DPT_HYBRID_CONFIG))


@dataclass(frozen=True)
class ControlModelBuilder:
    """A control model: the key that selects it, how the report names it, and how to build it on meta."""

    key: str
    name: str
    repository: str
    architecture: str
    build: Callable[[], nn.Module]


# The control models photomaker.control_models loads by default, each from its published configuration.
CONTROL_MODELS: tuple[ControlModelBuilder, ...] = (
    ControlModelBuilder(
        "controlnet",
        "ControlNet (pose, canny or depth: each)",
        "thibaud/controlnet-openpose-sdxl-1.0, diffusers/controlnet-{canny,depth}-sdxl-1.0",
        "ControlNetModel.from_unet(SDXL UNet)",
        controlnet,
    ),
    ControlModelBuilder(
        "t2i_adapter",
        "sketch T2I-Adapter",
        "TencentARC/t2i-adapter-sketch-sdxl-1.0",
        "T2IAdapter full_adapter_xl",
        t2i_sketch_adapter,
    ),
    ControlModelBuilder(
        "ip_adapter_image_encoder",
        "IP-Adapter image encoder",
        "h94/IP-Adapter sdxl_models/image_encoder",
        "CLIPVisionModelWithProjection ViT-bigG/14, projection 1280",
        ip_adapter_image_encoder,
    ),
    ControlModelBuilder(
        "ip_adapter",
        "IP-Adapter weights",
        "h94/IP-Adapter sdxl_models/ip-adapter_sdxl.bin",
        "ImageProjection 1280 -> 4 x 2048 + to_k_ip/to_v_ip in 70 attn2",
        ip_adapter_weights,
    ),
    ControlModelBuilder(
        "pose_estimator",
        "pose estimator",
        "usyd-community/vitpose-base-simple",
        "VitPoseForPoseEstimation ViT-B/16",
        vitpose_base,
    ),
    ControlModelBuilder(
        "person_detector",
        "person detector",
        "PekingU/rtdetr_r50vd_coco_o365",
        "RTDetrForObjectDetection R50-vd",
        rt_detr_r50,
    ),
    ControlModelBuilder(
        "depth_estimator",
        "depth estimator",
        "Intel/dpt-hybrid-midas",
        "DPTForDepthEstimation hybrid (BiT + ViT-B/16)",
        dpt_hybrid,
    ),
)
CONTROL_MODEL_KEYS = tuple(spec.key for spec in CONTROL_MODELS)


def measure(keys: tuple[str, ...] = CONTROL_MODEL_KEYS) -> list[ControlModelSize]:
    """Sizes of the chosen control models, in CONTROL_MODELS order."""
    sizes = []
    for spec in CONTROL_MODELS:
        if spec.key in keys:
            parameters, buffers = _elements(spec.build())
            sizes.append(ControlModelSize(spec.key, spec.name, spec.repository, spec.architecture, parameters, buffers))
    return sizes


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    rows = [
        [
            m["name"],
            m["repository"],
            m["architecture"],
            f"{m['parameters']:,}",
            *(_gb(m[f"{_dtype_name(d)}_bytes"]) for d in DTYPES),
        ]
        for m in result["control_models"]
    ]
    lines = common.header("Control models: extra memory at real size (computed)", result)
    lines += [
        common.table(["model", "repository", "architecture", "parameters", "fp16", "fp32"], rows),
        "",
        "Computed, not measured: (parameters + buffers) x bytes per element of models built from the published "
        "configs on the meta device. Weights only (no activations, no CUDA context). The IP-Adapter needs both "
        "of its rows; the person detector is only loaded with the pose estimator.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=CONTROL_MODEL_KEYS, default=list(CONTROL_MODEL_KEYS))
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    with common.quiet_libraries():
        sizes = measure(tuple(args.models))
    result = common.new_result(args, control_models=[size.as_result() for size in sizes])
    return common.finish(args, result, report)


if __name__ == "__main__":
    main()
