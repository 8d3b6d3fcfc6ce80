"""Tiny random-weight models with the real SDXL / PhotoMaker architecture, built offline in code.

They let tests and ``python -m photomaker make-tiny`` exercise the real code paths (real CLIP vocabulary,
real CLIP image preprocessing at 224 px, SDXL's two text encoders, the official checkpoint layout and
legacy LoRA key format) in well under a second, without the Hub. Two text encoders of different widths
(32 and 96) make concatenation-order mistakes visible.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .id_encoder import PhotoMakerIDEncoderConfig, create_id_encoder

logger = logging.getLogger(__name__)

__all__ = [
    "attention_lora_targets",
    "clip_tokenizer",
    "fast_lora_state_dict",
    "legacy_lora_state_dict",
    "make_tiny",
    "synthetic_control_image",
    "synthetic_mask",
    "tiny_checkpoint",
    "tiny_controlnet",
    "tiny_ip_adapter_state_dict",
    "tiny_t2i_adapter",
    "write_tiny_ip_adapter",
    "tiny_id_encoder_config",
    "tiny_lora_state_dict",
    "tiny_sdxl_components",
    "tiny_unet_config",
    "write_fast_loras",
]

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
TEXT_HIDDEN_1 = 32
TEXT_HIDDEN_2 = 96
TEXT_PROJECTION_DIM = 32
ADDITION_TIME_EMBED_DIM = 8
CROSS_ATTENTION_DIM = TEXT_HIDDEN_1 + TEXT_HIDDEN_2  # 128: a multiple of 128 so the v2 resampler has 1 head
LORA_RANK = 4
TINY_FORMAT_VERSION = 2  # bump when make_tiny's output changes, so stale folders are rebuilt
_COMPLETE_MARKER = ".tiny-complete.json"


def _byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table used by byte-level BPE, in vocabulary order.

    Printable Latin-1 bytes map to themselves and come first; the others (control chars, space, ...) follow,
    shifted to code points 256+. The order matters: it fixes the ids of the first 512 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return table


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The 49,408-entry CLIP vocabulary and its merges, from the bundled OpenAI BPE file (MIT)."""
    data = (Path(__file__).parent / "data" / CLIP_VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # OpenAI's recipe: the first line is a header; keep 49152 - 256 - 2 merges.
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"The bundled CLIP vocabulary has {len(tokens)} entries instead of {CLIP_VOCAB_SIZE}.")
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer with the real vocabulary, built offline (SDXL's second tokenizer uses ``pad_token="!"``)."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic weights without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet_config() -> dict:
    """SDXL-shaped UNet config (text_time conditioning, 2-layer transformer blocks), small enough for CPU tests."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "transformer_layers_per_block": (1, 2),
        "norm_num_groups": 8,
        "cross_attention_dim": CROSS_ATTENTION_DIM,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        # 6 size/crop values embedded at addition_time_embed_dim each + the pooled text embedding.
        "projection_class_embeddings_input_dim": 6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
    }


def _text_config(hidden_size: int, heads: int, act: str, projection_dim: int) -> CLIPTextConfig:
    # bos/eos/pad ids as in SDXL's real text encoder configs: with eos_token_id=2 the pooled token is argmax(ids).
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Components for ``StableDiffusionXLPipeline(**components)``: random weights, real architecture.

    Text encoder 1 is 32 wide, text encoder 2 is 96 wide (pooled projection 32); their concatenation is the
    UNet's cross-attention width (128), which is also the tiny ID encoder's embed dim.
    """
    with _seeded(seed):
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(
            block_out_channels=(
                16,
                16,
                32,
                32,
            ),  # 4 levels -> scale factor 8, like SDXL's VAE
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.13025,
        )
        text_encoder = CLIPTextModel(_text_config(TEXT_HIDDEN_1, 4, "quick_gelu", TEXT_HIDDEN_1))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(TEXT_HIDDEN_2, 4, "gelu", TEXT_PROJECTION_DIM))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": clip_tokenizer(pad_token="!"),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_id_encoder_config() -> PhotoMakerIDEncoderConfig:
    """A small ID encoder matching the tiny SDXL (embed dim 32 + 96 = 128) that still takes 224 px photos.

    Sizes differ from the official defaults where they can (depths, MLP widths, ratios) so that config
    inference from shapes is exercised; face embeddings stay 512-d like InsightFace's.
    """
    return PhotoMakerIDEncoderConfig(
        vision_hidden_size=128,
        vision_num_layers=2,
        vision_num_heads=2,
        vision_intermediate_size=256,
        patch_size=14,
        image_size=224,
        projection_dim_1=TEXT_HIDDEN_1,
        projection_dim_2=TEXT_HIDDEN_2,
        id_embed_dim=512,
        num_tokens=2,
        resampler_depth=2,
        resampler_heads=1,
        resampler_dim_head=128,
        resampler_ff_mult=2,
        token_proj_ratio=1,
    )


def attention_lora_targets(unet: nn.Module) -> list[tuple[str, str, int, int]]:
    """(attention path, projection, in_features, out_features) for q/k/v/out of every attn1/attn2 of a UNet.

    The UNet may live on the meta device: only the layer shapes are read.
    """
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


def _meta_unet(unet_config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config)


def legacy_lora_state_dict(
    unet: nn.Module, rank: int, seed: int, up_std: float, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A random LoRA on every attention projection of ``unet`` in PhotoMaker's official (legacy) key format.

    Keys: ``unet.<attention path>.processor.to_{q,k,v,out}_lora.{down,up}.weight``; the up weights are non-zero
    (unlike a fresh LoRA) so that loading it visibly changes the UNet's output.
    """
    state_dict: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for path, projection, in_features, out_features in attention_lora_targets(unet):
        prefix = f"unet.{path}.processor.{projection}_lora"
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) * up_std / rank**0.5
        state_dict[f"{prefix}.down.weight"] = down.to(dtype)
        state_dict[f"{prefix}.up.weight"] = up.to(dtype)
    return state_dict


def tiny_lora_state_dict(seed: int = 0, rank: int = LORA_RANK) -> dict[str, torch.Tensor]:
    """PhotoMaker's LoRA for the tiny UNet in the official legacy key format, bf16 like the official files."""
    return legacy_lora_state_dict(_meta_unet(tiny_unet_config()), rank, seed + 1, up_std=0.5)


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
    folder: str | os.PathLike[str],
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


def tiny_checkpoint(version: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A PhotoMaker checkpoint for the tiny SDXL in the official layout: ``{"id_encoder", "lora_weights"}``.

    LayerNorm parameters are randomised too, so that a swapped or skipped norm changes the output.
    """
    with _seeded(seed + 100 * version):
        encoder = create_id_encoder(tiny_id_encoder_config(), version)
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, mean=1.0, std=0.1)
                nn.init.normal_(module.bias, std=0.1)
    id_encoder = {name: tensor.detach().clone() for name, tensor in encoder.state_dict().items()}
    return {"id_encoder": id_encoder, "lora_weights": tiny_lora_state_dict(seed)}


def make_tiny(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write a tiny SDXL pipeline folder and tiny v1/v2 PhotoMaker checkpoints; skip what is already complete.

    Returns paths ``{"base": out_dir/base, "v1": out_dir/photomaker-v1.bin, "v2": out_dir/photomaker-v2.bin,
    "fast_loras": out_dir/fast-loras, "control": out_dir/control}``. ``base`` loads with
    ``StableDiffusionXLPipeline.from_pretrained``; the ``.bin`` files are torch pickles in the official format;
    ``fast-loras`` holds one random LoRA per fast-mode preset under its official file name and key format, so
    fast mode runs offline; ``control`` holds every control model
    (`photomaker.testing_control.write_tiny_control_models`), so every mode runs offline. The output is the
    same for the same seed.
    """
    root = Path(out_dir)
    paths = {
        "base": root / "base",
        "v1": root / "photomaker-v1.bin",
        "v2": root / "photomaker-v2.bin",
        "fast_loras": root / "fast-loras",
        "control": root / "control",
    }
    marker = root / _COMPLETE_MARKER
    stamp = {"seed": seed, "format": TINY_FORMAT_VERSION}
    if marker.is_file() and all(path.exists() for path in paths.values()):
        try:
            if json.loads(marker.read_text()) == stamp:
                logger.info("Tiny models already present in %s", root)
                return paths
        except (OSError, ValueError):
            logger.warning("Ignoring an unreadable %s; rebuilding the tiny models", marker)
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    staging = root / "base.partial"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False)
    pipeline.save_pretrained(staging)
    shutil.rmtree(paths["base"], ignore_errors=True)
    staging.rename(paths["base"])
    for version in (1, 2):
        target = paths[f"v{version}"]
        partial = target.with_name(target.name + ".partial")
        torch.save(tiny_checkpoint(version, seed), partial)
        partial.replace(target)
    shutil.rmtree(paths["fast_loras"], ignore_errors=True)
    write_fast_loras(paths["fast_loras"], _meta_unet(tiny_unet_config()), LORA_RANK, torch.float32)
    from .testing_control import write_tiny_control_models  # it builds on this module's tiny models

    write_tiny_control_models(paths["control"], seed)
    marker.write_text(json.dumps(stamp))
    logger.info("Wrote tiny models to %s", root)
    return paths


# ----------------------------------------------------------------------------- control and composition models


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet made from the tiny UNet, as diffusers makes one from a real UNet (`from_unet`).

    A fresh ControlNet's zero convolutions (after the control image's embedding, and on every residual) would
    make the control image invisible and the residuals zero, so a test could not see whether they reach the
    UNet: they are randomised here (small, so images stay finite).
    """
    with _seeded(seed + 7):
        controlnet = ControlNetModel.from_unet(unet)
        zero_convs = [
            controlnet.controlnet_cond_embedding.conv_out,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ]
        for block in zero_convs:
            nn.init.normal_(block.weight, std=0.05)
            nn.init.normal_(block.bias, std=0.05)
    return controlnet.eval()


def tiny_t2i_adapter(seed: int = 0) -> T2IAdapter:
    """An SDXL-type T2I-Adapter (`full_adapter_xl`) sized to the tiny UNet: its features [32 ch, 64 ch] at 1/16 of
    the image size match the outputs of the UNet's two down blocks for a 64 px image."""
    with _seeded(seed + 8):
        adapter = T2IAdapter(
            in_channels=3,
            channels=list(tiny_unet_config()["block_out_channels"]),
            num_res_blocks=1,
            downscale_factor=16,
            adapter_type="full_adapter_xl",
        )
    return adapter.eval()


IP_ADAPTER_TOKENS = 4
IP_ADAPTER_IMAGE_SIZE = 32
IP_ADAPTER_PROJECTION_DIM = 32


def _tiny_image_encoder() -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=8,
            image_size=IP_ADAPTER_IMAGE_SIZE,
            projection_dim=IP_ADAPTER_PROJECTION_DIM,
        )
    ).eval()


def tiny_ip_adapter_state_dict(unet: UNet2DConditionModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """An IP-Adapter (plain, SDXL kind) for the tiny UNet in the official flat key format.

    `image_proj.proj.*` maps the image encoder's projection to 4 tokens of the UNet's cross-attention width,
    `image_proj.norm.*` normalises them; `ip_adapter.N.to_k_ip/to_v_ip.weight` are the extra key/value
    projections of each cross-attention layer, N = 1, 3, 5, ... in the order of `unet.attn_processors`.
    """
    cross_attention_dim = unet.config.cross_attention_dim
    state: dict[str, torch.Tensor] = {}
    with _seeded(seed + 9):
        state["image_proj.proj.weight"] = (
            torch.randn(IP_ADAPTER_TOKENS * cross_attention_dim, IP_ADAPTER_PROJECTION_DIM) * 0.1
        )
        state["image_proj.proj.bias"] = torch.randn(IP_ADAPTER_TOKENS * cross_attention_dim) * 0.1
        state["image_proj.norm.weight"] = 1 + 0.1 * torch.randn(cross_attention_dim)
        state["image_proj.norm.bias"] = 0.1 * torch.randn(cross_attention_dim)
        cross_attention_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
        for index, name in enumerate(cross_attention_layers):
            attention = unet.get_submodule(name[: -len(".processor")])
            for projection in ("to_k", "to_v"):
                shape = getattr(attention, projection).weight.shape
                state[f"ip_adapter.{2 * index + 1}.{projection}_ip.weight"] = torch.randn(shape) * 0.1
    return state


def write_tiny_ip_adapter(folder: str | os.PathLike[str], unet: UNet2DConditionModel, seed: int = 0) -> Path:
    """Write an IP-Adapter folder laid out like `h94/IP-Adapter/sdxl_models`: `ip-adapter.safetensors` and
    `image_encoder/` (a tiny CLIPVisionModelWithProjection). Load it with
    `pipe.load_ip_adapter(folder, subfolder="", weight_name="ip-adapter.safetensors")`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _seeded(seed + 10):
        _tiny_image_encoder().save_pretrained(folder / "image_encoder")
    save_file(tiny_ip_adapter_state_dict(unet, seed), str(folder / "ip-adapter.safetensors"))
    return folder


def synthetic_control_image(size: int = 64, kind: str = "edges", seed: int = 0) -> Image.Image:
    """A control image like the real extractors give: "edges" (white lines on black, as canny), "sketch" (black
    strokes on white) or "pose" (coloured limbs on black, as OpenPose)."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for _ in range(6):
        x0, y0, x1, y1 = rng.integers(0, size, 4)
        steps = max(abs(int(x1) - int(x0)), abs(int(y1) - int(y0)), 1)
        xs = np.linspace(x0, x1, steps + 1).round().astype(int)
        ys = np.linspace(y0, y1, steps + 1).round().astype(int)
        colour = rng.integers(64, 256, 3) if kind == "pose" else np.array([255, 255, 255])
        canvas[ys, xs] = colour
    if kind == "sketch":
        canvas = 255 - canvas
    elif kind not in ("edges", "pose"):
        raise ValueError(f"kind must be 'edges', 'sketch' or 'pose', got {kind!r}.")
    return Image.fromarray(canvas)


def synthetic_mask(size: int = 64, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """An inpainting mask: white (repaint) inside `box` (left, top, right, bottom), black elsewhere; by default
    the centre quarter, where a face would be."""
    left, top, right, bottom = box or (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)
