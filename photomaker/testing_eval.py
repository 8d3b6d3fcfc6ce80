"""Tiny random-weight CLIP and DINO models for the evaluation tests, saved so the real loading path reads them.

They have the real architectures (``CLIPModel`` with the real CLIP vocabulary, a ``ViTModel`` like
``facebook/dino-vits16``) at a few thousand parameters, so `photomaker.evaluation` loads them with
``from_pretrained`` exactly as it loads the paper's models from the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from photomaker.testing import CLIP_VOCAB_SIZE, clip_tokenizer

IMAGE_SIZE = 32


def tiny_clip_model(seed: int = 0) -> CLIPModel:
    """A CLIP model with a 32 px vision tower and a 2-layer text tower over the real vocabulary."""
    text = {
        "vocab_size": CLIP_VOCAB_SIZE + 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "eos_token_id": 49407,
        "bos_token_id": 49406,
        "pad_token_id": 49407,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).eval()


def tiny_dino_model(seed: int = 0) -> ViTModel:
    """A ViT like DINO ViT-S/16 (its CLS token is what DINO scores use), at 32 px with 8 px patches."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    return ViTModel(config).eval()


def make_tiny_scorers(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write ``clip/`` and ``dino/`` (model + processor) under `out_dir`; return their paths."""
    root = Path(out_dir)
    paths = {"clip": root / "clip", "dino": root / "dino"}
    image_size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    tiny_clip_model(seed).save_pretrained(paths["clip"])
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size=image_size, crop_size=crop), tokenizer=clip_tokenizer()
    ).save_pretrained(paths["clip"])
    tiny_dino_model(seed).save_pretrained(paths["dino"])
    ViTImageProcessor(size=crop).save_pretrained(paths["dino"])
    return paths
