"""Small DATA folders in prepare-data's manifest format, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_dataset(
    root: Path,
    identities: dict[str, int],
    size: int | tuple[int, int] = 64,
    with_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """DATA with ``identities[name]`` images each: a coloured disc ("face") on a patterned background.

    Each identity has its own colour, so the model has something identity-specific to learn; the mask is the
    disc. ``size`` is a side or (width, height). Returns ``root``.
    """
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    lines = []
    yy, xx = np.mgrid[0:height, 0:width]
    for number, (identity, count) in enumerate(identities.items()):
        colour = np.array([60 + 60 * number, 200 - 50 * number, 120], dtype=np.float32) % 256
        for index in range(count):
            cx, cy, radius = width / 2 + rng.uniform(-6, 6), height / 2 + rng.uniform(-6, 6), min(width, height) / 4
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            background = (np.stack([xx, yy, xx + yy], -1) * (3 + index)) % 256
            rgb = np.where(disc[..., None], colour, background).astype(np.uint8)
            stem = f"{index:03d}"
            image = f"images/{identity}/{stem}.png"
            mask = f"masks/{identity}/{stem}.png"
            for relative, array in ((image, rgb), (mask, (disc * 255).astype(np.uint8))):
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / relative)
            embedding = None
            if with_embeddings:
                embedding = f"embeddings/{identity}/{stem}.npy"
                (root / embedding).parent.mkdir(parents=True, exist_ok=True)
                np.save(root / embedding, rng.standard_normal(512).astype(np.float32))
            box = [int(cx - radius), int(cy - radius), int(cx + radius), int(cy + radius)]
            lines.append(
                {
                    "identity": identity,
                    "image": image,
                    "mask": mask,
                    "caption": "a photo of a man img",
                    "class_word": "man",
                    "trigger_word": "img",
                    "face_box": box,
                    "width": width,
                    "height": height,
                    "source": f"synthetic/{identity}/{stem}",
                    "face_embedding": embedding,
                }
            )
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root
