"""Validation during training: generate held-out identities with fixed seeds, score them, save an image grid.

The model is used as it trains (LoRA layers active, nothing fused), through the project's own pipeline, so
what is measured is what the exported checkpoint will generate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["identity_similarity", "run_validation"]

VALIDATION_DIR = "validation"
_START_MERGE_SHARE = 0.2  # the demo's default style strength (20 %)


def identity_similarity(image: Image.Image, references: Sequence[Image.Image], analyzer: Any) -> float | None:
    """Mean face similarity of ``image`` to the reference photos; None when either side has no face.

    The one place validation scores identity (photomaker.faces now; swap in evaluation's scorer here).
    """
    from ..faces.score import identity_score

    embeddings = []
    for reference in references:
        rgb = np.asarray(reference.convert("RGB"))
        faces = analyzer.detect(rgb)
        if faces:
            embeddings.append(analyzer.embed(rgb, faces[0]))
    if not embeddings:
        return None
    return identity_score(image, embeddings, analyzer, name="the validation image").similarity


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equal-size tiles pasted into one image."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            grid.paste(tile.convert("RGB").resize((width, height)), (x * width, y * height))
    return grid


@torch.no_grad()
def run_validation(trainer: Any, step: int) -> dict[str, Any]:
    """Generate one image per held-out identity (seed = training seed + identity position), score, save a grid.

    Returns the metrics line's fields: ``identity_score`` (mean over identities with a face, or None),
    ``scores`` per identity, and ``grid`` (path relative to OUT).
    """
    from diffusers import EulerDiscreteScheduler

    from ..pipeline import PhotoMakerStableDiffusionXLPipeline

    config, base, accelerator = trainer.config, trainer.base, trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    model.eval()
    pipe = PhotoMakerStableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.id_encoder = model.id_encoder
    pipe.id_image_processor = trainer.image_processor
    pipe.pm_version = model.id_encoder.version
    pipe.trigger_word = config.trigger_word

    analyzer = None
    if config.val_face_backend != "none":
        from ..faces import get_face_analyzer

        analyzer = get_face_analyzer(config.val_face_backend)
    rows, scores = [], {}
    for position, identity in enumerate(config.val_identities):
        records = [record for record in trainer.records if record.identity == identity][:4]
        references = [Image.open(record.image).convert("RGB") for record in records]
        width, height = references[0].size
        if config.val_size:
            width = height = config.val_size
        face_embeds = None
        if pipe.pm_version >= 2:
            face_embeds = torch.stack([torch.from_numpy(np.load(r.face_embedding).astype(np.float32).reshape(-1))
                                       for r in records])
        steps = max(config.val_steps, 1)
        with accelerator.autocast():
            image = pipe(
                f"a photo of a {records[0].class_word} {config.trigger_word}", input_id_images=references,
                id_embeds=face_embeds, num_inference_steps=steps, start_merge_step=int(_START_MERGE_SHARE * steps),
                height=height, width=width, generator=torch.Generator().manual_seed(config.seed + position),
            ).images[0]
        scores[identity] = identity_similarity(image, references, analyzer) if analyzer is not None else None
        rows.append([references[0], image])
    model.train()

    folder = trainer.out_dir / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    grid_path = folder / f"step-{step:06d}.png"
    grid = _grid(rows)
    grid.save(grid_path)
    found = [score for score in scores.values() if score is not None]
    mean_score = float(np.mean(found)) if found else None
    if mean_score is not None:
        accelerator.log({"val/identity_score": mean_score}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"val/grid": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
    logger.info("Validation at step %d: identity score %s, grid %s", step, mean_score, grid_path)
    return {"identity_score": mean_score, "scores": scores, "grid": str(Path(VALIDATION_DIR) / grid_path.name)}
