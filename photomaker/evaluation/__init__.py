"""Measure likeness and prompt-following the way the PhotoMaker paper does (Table 1), on your own photos.

- `score_images` / `summarise`: the metrics on images already made (training's validation calls these);
- `Scorers`: the CLIP, DINO and face models those metrics use;
- `add_eval_arguments` / `run_eval_command`: ``python -m photomaker eval`` (generate, score, report).
"""

from photomaker.evaluation.command import add_eval_arguments, run_eval_command
from photomaker.evaluation.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    References,
    Scorers,
    clip_image_embeddings,
    face_diversity,
    fid,
    score_images,
    summarise,
)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "References",
    "Scorers",
    "add_eval_arguments",
    "clip_image_embeddings",
    "face_diversity",
    "fid",
    "run_eval_command",
    "score_images",
    "summarise",
]
