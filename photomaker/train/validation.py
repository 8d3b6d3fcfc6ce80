"""Validation during training: generate held-out identities with fixed seeds, score them, save an image grid.

The model is used as it trains (LoRA layers active, nothing fused), through the project's own pipeline, so
what is measured is what the exported checkpoint will generate. The numbers are evaluation's (`Scorers`,
`score_images`, `summarise`), so a validation line means what ``python -m photomaker eval`` reports.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import NoFaceError
from ..evaluation import References, Scorers, score_images, summarise

logger = logging.getLogger(__name__)

__all__ = ["load_validation_scorers", "run_validation"]

VALIDATION_DIR = "validation"
TINY_SCORERS_DIR = "scorers"
_START_MERGE_SHARE = 0.2  # the demo's default style strength (20 %)


def load_validation_scorers(config: Any, device: torch.device | str) -> Scorers:
    """Evaluation's scorers for `config`: the face backend, plus CLIP and DINO when their models are given.

    With --tiny and no CLIP/DINO model, tiny random ones are written under TINY/scorers, so that the offline test
    mode runs every metric through the same loading path as the real models.
    """
    clip_model, dino_model = config.val_clip_model, config.val_dino_model
    if config.tiny_dir is not None and clip_model is None and dino_model is None:
        from ..testing_eval import make_tiny_scorers

        paths = make_tiny_scorers(Path(config.tiny_dir) / TINY_SCORERS_DIR)
        clip_model, dino_model = str(paths["clip"]), str(paths["dino"])
    face_backend = None if config.val_face_backend == "none" else config.val_face_backend
    # --face-model-dir is the folder of the backend the ID photos need (InsightFace for v2, dlib for v1); a scorer of
    # the other backend uses its own default folder rather than failing on the wrong models after N steps.
    generator_backend = "insightface" if config.pm_version == 2 else "dlib"
    model_dir = config.face_model_dir if face_backend == generator_backend else None
    return Scorers.load(clip_model, dino_model, face_backend, model_dir, str(device), config.trigger_word)


def _references(scorers: Scorers, photos: list[Image.Image], names: list[str], identity: str) -> References:
    """The identity's references; without a face in one, its face scores are left out (and said so)."""
    try:
        return scorers.references(photos, names=names)
    except NoFaceError as error:
        logger.warning("Validation identity %r: %s; its Face Sim is left out.", identity, error)
        faceless = copy.copy(scorers)
        faceless.face_analyzer = None
        return faceless.references(photos, names=names)


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equal-size tiles pasted into one image."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            grid.paste(tile.convert("RGB").resize((width, height)), (x * width, y * height))
    return grid


@torch.no_grad()
def run_validation(trainer: Any, step: int, scorers: Scorers) -> dict[str, Any]:
    """Generate one image per held-out identity (seed = training seed + identity position), score, save a grid.

    Returns the metrics line's fields: ``metrics`` (evaluation's `summarise` over the identities: face_sim,
    face_div, clip_t, clip_i, dino, no_face_rate, n; None where a scorer is off or found no face), ``scores``
    (Face Sim per identity) and ``grid`` (path relative to OUT). The tracker gets ``val/<metric>`` and the grid.
    """
    from diffusers import EulerDiscreteScheduler

    from ..pipeline import PhotoMakerStableDiffusionXLPipeline

    config, base, accelerator = trainer.config, trainer.base, trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    model.eval()
    pipe = PhotoMakerStableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.id_encoder = model.id_encoder
    pipe.id_image_processor = trainer.image_processor
    pipe.pm_version = model.id_encoder.version
    pipe.trigger_word = config.trigger_word

    grid_rows, score_rows = [], []
    for position, identity in enumerate(config.val_identities):
        records = [record for record in trainer.records if record.identity == identity][:4]
        references = [Image.open(record.image).convert("RGB") for record in records]
        width, height = references[0].size
        if config.val_size:
            width = height = config.val_size
        face_embeds = None
        if pipe.pm_version >= 2:
            face_embeds = torch.stack(
                [torch.from_numpy(np.load(r.face_embedding).astype(np.float32).reshape(-1)) for r in records]
            )
        steps = max(config.val_steps, 1)
        prompt = f"a photo of a {records[0].class_word} {config.trigger_word}"
        with accelerator.autocast():
            image = pipe(
                prompt,
                input_id_images=references,
                id_embeds=face_embeds,
                num_inference_steps=steps,
                start_merge_step=int(_START_MERGE_SHARE * steps),
                height=height,
                width=width,
                generator=torch.Generator().manual_seed(config.seed + position),
            ).images[0]
        identity_references = _references(scorers, references, [str(r.image) for r in records], identity)
        score_rows += score_images([image], [prompt], identity_references, scorers, groups=[identity])
        grid_rows.append([references[0], image])
    model.train()

    folder = trainer.out_dir / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    grid_path = folder / f"step-{step:06d}.png"
    grid = _grid(grid_rows)
    grid.save(grid_path)
    summary = summarise(score_rows)
    accelerator.log(
        {f"val/{name}": value for name, value in summary.items() if value is not None and name != "seconds_per_image"},
        step=step,
    )
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"val/grid": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
    logger.info("Validation at step %d: %s, grid %s", step, summary, grid_path)
    return {
        "metrics": {name: value for name, value in summary.items() if name != "seconds_per_image"},
        "scores": {identity: row["face_sim"] for identity, row in zip(config.val_identities, score_rows, strict=True)},
        "grid": str(Path(VALIDATION_DIR) / grid_path.name),
    }
