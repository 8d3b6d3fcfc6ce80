"""Training samples from a prepared DATA folder (``prepare-data``'s manifest.jsonl), drawn reproducibly.

Every random choice of a sample (which image, how many ID images and which, the background noise, caption
dropout, whether the loss is masked, the timestep, the diffusion noise) comes from a generator seeded by
``(seed, global sample index)``. A sample is therefore the same whichever process draws it, which is what makes
two processes with batch 1 train exactly like one process with batch 2, and a resumed run like an unbroken one.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from ..errors import TrainingConfigError, TrainingDataError
from ..prompt import DEFAULT_TRIGGER_WORD, has_trigger_word

logger = logging.getLogger(__name__)

__all__ = [
    "IdentityDataset",
    "ManifestRecord",
    "TrainingSample",
    "check_sample_probabilities",
    "read_manifest",
    "sample_generator",
]

MAX_ID_IMAGES = 4
_REQUIRED_FIELDS = ("identity", "image", "mask", "caption", "class_word")


@dataclass(frozen=True)
class ManifestRecord:
    """One kept image of the manifest, with absolute paths."""

    identity: str
    image: Path
    mask: Path
    caption: str
    class_word: str
    face_embedding: Path | None


@dataclass
class TrainingSample:
    """Everything one training example needs, already drawn.

    ``pixel_values`` is the target in [-1, 1] [3, H, W]; ``mask`` [1, H, W] in {0, 1}; ``id_pixel_values`` the
    CLIP-preprocessed ID images [N, 3, S, S] with their background replaced by noise; ``face_embeds`` [N, 512]
    (v2) or None; ``noise_seed`` seeds the VAE sampling and the diffusion noise.
    """

    index: int
    identity: str
    pixel_values: torch.Tensor
    mask: torch.Tensor
    caption: str
    id_pixel_values: torch.Tensor
    face_embeds: torch.Tensor | None
    use_mask_loss: bool
    timestep: int
    noise_seed: int


def check_sample_probabilities(caption_dropout: float, mask_loss_prob: float) -> None:
    """Both are probabilities: `TrainingConfigError` naming the flag otherwise (the trainer checks before loading)."""
    for flag, value in (("--caption-dropout", caption_dropout), ("--mask-loss-prob", mask_loss_prob)):
        if not 0.0 <= value <= 1.0:
            raise TrainingConfigError(f"{flag} must be between 0 and 1; got {value}.")


def sample_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of global sample ``index``: independent of process count and rank."""
    return np.random.default_rng([seed, index])


def read_manifest(data_dir: str | Path, trigger_word: str = DEFAULT_TRIGGER_WORD) -> list[ManifestRecord]:
    """Parse DATA/manifest.jsonl; a bad line or a missing file raises `TrainingDataError` naming it."""
    root = Path(data_dir)
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise TrainingDataError(
            f"No manifest at {manifest}: --data must be a folder written by `python -m photomaker prepare-data`."
        )
    records = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingDataError(f"{where} is not valid JSON ({exc.msg}); fix or delete that line.") from exc
        missing = [field for field in _REQUIRED_FIELDS if not entry.get(field)]
        if missing:
            raise TrainingDataError(f"{where} lacks {', '.join(missing)}; every line needs {_REQUIRED_FIELDS}.")
        if not has_trigger_word(entry["caption"], trigger_word):
            raise TrainingDataError(
                f"{where}: the caption {entry['caption']!r} has no trigger word '{trigger_word}'; write it right "
                f'after the class word, e.g. "a photo of a {entry["class_word"]} {trigger_word}".'
            )
        paths = {field: root / entry[field] for field in ("image", "mask")}
        embedding = entry.get("face_embedding")
        if embedding:
            paths["face_embedding"] = root / embedding
        absent = [f"{field} {path}" for field, path in paths.items() if not path.is_file()]
        if absent:
            raise TrainingDataError(f"{where} names files that do not exist: {', '.join(absent)}.")
        records.append(
            ManifestRecord(
                identity=str(entry["identity"]),
                image=paths["image"],
                mask=paths["mask"],
                caption=entry["caption"],
                class_word=entry["class_word"],
                face_embedding=paths.get("face_embedding"),
            )
        )
    if not records:
        raise TrainingDataError(f"{manifest} has no images; run prepare-data on a folder with photos.")
    return records


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def _load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Mask as float {0, 1} [H, W]; it must have the image's size (prepare-data writes it so)."""
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L"))
    if mask.shape != size:
        raise TrainingDataError(f"The mask {path} is {mask.shape[::-1]} but its image is {size[::-1]} (W x H).")
    return (mask >= 128).astype(np.float32)


class IdentityDataset:
    """Training samples over the identities that have at least two images (a target needs other ID images).

    ``held_out`` identities (validation) are excluded. ``sample(index)`` is a pure function of
    ``(seed, index)``; the index runs over all epochs (epoch = index // len).
    """

    def __init__(
        self,
        records: Sequence[ManifestRecord],
        *,
        image_processor: CLIPImageProcessor,
        seed: int,
        num_train_timesteps: int,
        caption_dropout: float = 0.1,
        mask_loss_prob: float = 0.5,
        need_face_embeddings: bool = False,
        held_out: Sequence[str] = (),
    ) -> None:
        by_identity: dict[str, list[ManifestRecord]] = defaultdict(list)
        for record in records:
            if record.identity not in held_out:
                by_identity[record.identity].append(record)
        single = sorted(name for name, items in by_identity.items() if len(items) < 2)
        if single:
            logger.warning("Skipping identities with a single image (no other ID image to pair): %s", single)
        self.by_identity = {name: items for name, items in by_identity.items() if len(items) >= 2}
        self.records = [record for items in self.by_identity.values() for record in items]
        if not self.records:
            raise TrainingDataError(
                "No identity has two or more training images (held-out validation identities excluded): each "
                "sample needs a target image plus at least one other image of the same person."
            )
        if need_face_embeddings:
            lacking = [str(r.image) for r in self.records if r.face_embedding is None]
            if lacking:
                raise TrainingDataError(
                    f"PhotoMaker v2 needs a face embedding per image, but {len(lacking)} manifest entries have "
                    f"none (first: {lacking[0]}); run prepare-data with the InsightFace backend, or train v1."
                )
        check_sample_probabilities(caption_dropout, mask_loss_prob)
        self.image_processor = image_processor
        self.seed = seed
        self.num_train_timesteps = num_train_timesteps
        self.caption_dropout = caption_dropout
        self.mask_loss_prob = mask_loss_prob
        self.need_face_embeddings = need_face_embeddings

    def __len__(self) -> int:
        return len(self.records)

    def _record_at(self, index: int) -> ManifestRecord:
        epoch, position = divmod(index, len(self.records))
        order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.records))
        return self.records[int(order[position])]

    def _id_image(self, record: ManifestRecord, rng: np.random.Generator) -> np.ndarray:
        """An ID image with everything outside its person mask replaced by uniform noise."""
        rgb = _load_rgb(record.image)
        mask = _load_mask(record.mask, rgb.shape[:2])[..., None]
        noise = rng.integers(0, 256, size=rgb.shape, dtype=np.uint8)
        return (rgb * mask + noise * (1.0 - mask)).round().astype(np.uint8)

    def sample(self, index: int) -> TrainingSample:
        rng = sample_generator(self.seed, index)
        target = self._record_at(index)
        others = [r for r in self.by_identity[target.identity] if r.image != target.image]
        count = int(rng.integers(1, min(MAX_ID_IMAGES, len(others)) + 1))
        chosen = [others[int(i)] for i in rng.choice(len(others), size=count, replace=False)]
        id_pixels = self.image_processor(
            [self._id_image(record, rng) for record in chosen], return_tensors="pt"
        ).pixel_values
        face_embeds = None
        if self.need_face_embeddings:
            face_embeds = torch.stack(
                [torch.from_numpy(np.load(record.face_embedding).astype(np.float32).reshape(-1)) for record in chosen]
            )
        rgb = _load_rgb(target.image)
        mask = _load_mask(target.mask, rgb.shape[:2])
        caption = "" if rng.random() < self.caption_dropout else target.caption
        return TrainingSample(
            index=index,
            identity=target.identity,
            pixel_values=torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0,
            mask=torch.from_numpy(mask)[None],
            caption=caption,
            id_pixel_values=id_pixels,
            face_embeds=face_embeds,
            use_mask_loss=bool(rng.random() < self.mask_loss_prob),
            timestep=int(rng.integers(0, self.num_train_timesteps)),
            noise_seed=int(rng.integers(0, 2**63 - 1)),
        )
