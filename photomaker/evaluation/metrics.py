"""The paper's fidelity metrics on images already made: Face Sim, Face Div, CLIP-T, CLIP-I, DINO, FID.

Kept apart from generation so that training's validation scores its own samples with the same code
(`score_images`, then `summarise`). Definitions (PhotoMaker paper, Table 1, after DreamBooth and FastComposer):

- ``face_sim``: cosine of the generated image's largest face embedding to each reference face's, averaged over
  the references (None when the image has no face);
- ``face_div``: mean pairwise ``1 - cosine`` between the face embeddings generated for one identity (under one
  setting, across its prompts and seeds); a single value per identity. The paper averages LPIPS over pairs of face crops
  instead; LPIPS needs torchvision's pretrained networks, which this stack cannot install, so values are not
  comparable with the paper's Face Div column;
- ``clip_t``: ``100 x cosine`` of the CLIP image embedding and the CLIP text embedding of the prompt without
  the trigger word (the trigger is PhotoMaker's marker, not a word CLIP knows);
- ``clip_i``: cosine of CLIP image embeddings, whole image against each reference, averaged;
- ``dino``: the same with the CLS token of a self-supervised DINO ViT;
- FID (optional, per setting): torchmetrics' Fréchet distance over CLIP image embeddings of the generated and
  the real photos (Inception weights need torchvision, which this stack cannot install), so it ranks settings
  but is not comparable with Inception FID values.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from photomaker.errors import InvalidRequestError, ModelLoadError
from photomaker.faces import FaceAnalyzer, get_face_analyzer, prepare_id_photos
from photomaker.prompt import DEFAULT_TRIGGER_WORD, strip_trigger_word

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
METRICS = ("face_sim", "face_div", "clip_t", "clip_i", "dino")
SCORE_BATCH = 16  # images per forward pass of the scoring models
DEFAULT_GROUP = "identity"  # Face Div's group when `score_images` is given none: all its images (one identity)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosines between the rows of `a` (N, D) and `b` (M, D), in float32."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


@dataclass
class References:
    """One identity's reference photos, embedded once by every scorer."""

    clip: torch.Tensor | None  # (R, D) CLIP image embeddings; None without a CLIP model
    dino: torch.Tensor | None  # (R, D) DINO CLS embeddings; None without a DINO model
    faces: np.ndarray | None  # (R, E) face embeddings; None without a face backend


class Scorers:
    """The scoring models: CLIP (image and text), DINO, and a face analyzer; loaded once, used for every image."""

    def __init__(
        self,
        clip_model: Any,
        clip_processor: Any,
        dino_model: Any,
        dino_processor: Any,
        face_analyzer: FaceAnalyzer | None,
        device: str = "cpu",
        trigger_word: str = DEFAULT_TRIGGER_WORD,
    ) -> None:
        self.clip_model = clip_model
        self.clip_processor = clip_processor
        self.dino_model = dino_model
        self.dino_processor = dino_processor
        self.face_analyzer = face_analyzer
        self.device = device
        self.trigger_word = trigger_word

    @classmethod
    def load(
        cls,
        clip_model: str | None = DEFAULT_CLIP_MODEL,
        dino_model: str | None = DEFAULT_DINO_MODEL,
        face_backend: str | None = "dlib",
        face_model_dir: str | None = None,
        device: str | None = None,
        trigger_word: str = DEFAULT_TRIGGER_WORD,
    ) -> Scorers:
        """Load the models by Hub id or local folder (``from_pretrained``); a None model or backend skips its
        metrics (None in every row), as training's validation does when it has no CLIP or DINO model."""
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        clip = clip_processor = dino = dino_processor = None
        if clip_model is not None:
            clip, clip_processor = _load_scoring_model(
                clip_model,
                CLIPModel,
                AutoProcessor,
                "CLIP model (CLIP-T, CLIP-I)",
                "--clip-model",
                DEFAULT_CLIP_MODEL,
                "a CLIPModel",
            )
            clip = clip.to(device)
        if dino_model is not None:
            dino, dino_processor = _load_scoring_model(
                dino_model,
                AutoModel,
                AutoImageProcessor,
                "DINO model",
                "--dino-model",
                DEFAULT_DINO_MODEL,
                "a ViT model",
            )
            dino = dino.to(device)
        analyzer = get_face_analyzer(face_backend, face_model_dir) if face_backend else None  # type: ignore[arg-type]
        return cls(clip, clip_processor, dino, dino_processor, analyzer, device, trigger_word)

    @torch.no_grad()
    def _image_embeds(
        self,
        images: Sequence[Image.Image],
        processor: Any,
        model: Any,
        features: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """(N, D) float32 `features` of the processed images, SCORE_BATCH images per forward pass."""
        out = []
        for chunk in _chunks(images, SCORE_BATCH):
            pixel_values = processor(images=chunk, return_tensors="pt")["pixel_values"]
            out.append(features(pixel_values.to(self.device, model.dtype)).float().cpu())
        return torch.cat(out)

    def clip_image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) projected CLIP image embeddings."""
        return self._image_embeds(
            images,
            self.clip_processor,
            self.clip_model,
            lambda pixels: self.clip_model.get_image_features(pixel_values=pixels).pooler_output,
        )

    @torch.no_grad()
    def clip_text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) projected CLIP text embeddings (long prompts truncated to CLIP's 77 tokens)."""
        tokens = self.clip_processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        return self.clip_model.get_text_features(**tokens).pooler_output.float().cpu()

    def dino_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) DINO CLS-token embeddings of the last layer."""
        return self._image_embeds(
            images,
            self.dino_processor,
            self.dino_model,
            lambda pixels: self.dino_model(pixel_values=pixels).last_hidden_state[:, 0],
        )

    def face_embedding(self, image: Image.Image) -> np.ndarray | None:
        """The largest face's identity embedding, or None when there is no face (or no face backend)."""
        if self.face_analyzer is None:
            return None
        rgb = np.asarray(image.convert("RGB"))
        faces = self.face_analyzer.detect(rgb)
        return self.face_analyzer.embed(rgb, faces[0]) if faces else None

    def references(self, photos: Sequence[Any], names: Sequence[str] | None = None) -> References:
        """Embed an identity's reference photos (paths or images); a reference without a face is an error."""
        from photomaker.images import load_image

        images = [load_image(photo) for photo in photos]
        faces = None
        if self.face_analyzer is not None:
            prepared = prepare_id_photos(
                images, self.face_analyzer, crop=False, need_embeddings=True, names=names, noun="reference photo"
            )
            faces = prepared.face_embeds
        clip = self.clip_image_embeds(images) if self.clip_model is not None else None
        dino = self.dino_embeds(images) if self.dino_model is not None else None
        return References(clip, dino, faces)

    def prompt_text(self, prompt: str) -> str:
        """The prompt as CLIP-T reads it: without the trigger word."""
        return strip_trigger_word(prompt, self.trigger_word)[0]


def _load_scoring_model(
    name: str, model_class: Any, processor_class: Any, what: str, flag: str, example: str, kind: str
) -> tuple[Any, Any]:
    """(model in eval mode, processor) from a Hub id or a local folder; a failure says which flag to change."""
    try:
        return model_class.from_pretrained(name).eval(), processor_class.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load the {what} {name!r}: {str(error).rstrip('.')}. Pass {flag} with a Hub id (e.g. "
            f"{example}) or a local folder holding {kind} and its processor. Offline, a Hub id loads only from the "
            f"Hugging Face cache: fill it once while online with 'hf download {name}'."
        ) from error


def face_diversity(embeddings: Sequence[np.ndarray], analyzer: FaceAnalyzer) -> float | None:
    """Mean pairwise ``1 - cosine`` of the faces; None with fewer than two faces."""
    pairs = list(itertools.combinations(embeddings, 2))
    if not pairs:
        return None
    return float(np.mean([1.0 - analyzer.similarity(a, b) for a, b in pairs]))


def score_images(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    references: References | Sequence[Any],
    scorers: Scorers,
    groups: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One dict of metrics per image (see the module docstring), in the order given.

    `prompts[i]` is image i's prompt, trigger word included or not; `references` is one identity's photos (or
    `Scorers.references` of them). Face Div is computed per group (`groups[i]`, default: one group, the identity)
    and each row carries its group's value and name, so `summarise` counts every group once.
    """
    if len(prompts) != len(images):
        raise InvalidRequestError(f"got {len(prompts)} prompts for {len(images)} images; give one prompt per image.")
    if not images:
        return []
    groups = [DEFAULT_GROUP] * len(images) if groups is None else list(groups)
    if len(groups) != len(images):
        raise InvalidRequestError(f"got {len(groups)} group names for {len(images)} images; give one per image.")
    if not isinstance(references, References):
        references = scorers.references(references)
    absent = [None] * len(images)
    clip_t, clip_i, dino = absent, absent, absent
    if scorers.clip_model is not None and references.clip is not None:
        image_clip = scorers.clip_image_embeds(images)
        text_clip = scorers.clip_text_embeds([scorers.prompt_text(prompt) for prompt in prompts])
        clip_t = (
            100.0
            * (
                torch.nn.functional.normalize(image_clip, dim=-1) * torch.nn.functional.normalize(text_clip, dim=-1)
            ).sum(-1)
        ).tolist()
        clip_i = _cosine(image_clip, references.clip).mean(dim=1).tolist()
    if scorers.dino_model is not None and references.dino is not None:
        dino = _cosine(scorers.dino_embeds(images), references.dino).mean(dim=1).tolist()
    faces = [scorers.face_embedding(image) for image in images]

    analyzer = scorers.face_analyzer
    diversity: dict[str, float | None] = {}
    for group in dict.fromkeys(groups):
        found = [face for face, name in zip(faces, groups, strict=True) if name == group and face is not None]
        diversity[group] = face_diversity(found, analyzer) if analyzer is not None else None
    rows = []
    for index, face in enumerate(faces):
        face_sim = None
        if face is not None and references.faces is not None and analyzer is not None:
            face_sim = float(np.mean([analyzer.similarity(face, ref) for ref in references.faces]))
        rows.append(
            {
                "face_sim": face_sim,
                "face_found": face is not None if analyzer is not None else None,
                "face_div": diversity[groups[index]],
                "group": groups[index],
                "clip_t": clip_t[index],
                "clip_i": clip_i[index],
                "dino": dino[index],
            }
        )
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return float(np.mean(present)) if present else None


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Averages over rows of `score_images` (one setting): every metric, the no-face rate, seconds per image, n.

    Face Sim averages the images with a face; Face Div averages the groups (each once); the no-face rate is the
    share of images where the face backend found no face (None without a face backend).
    """
    per_group = {row["group"]: row["face_div"] for row in rows}
    checked = [row["face_found"] for row in rows if row.get("face_found") is not None]
    return {
        "face_sim": _mean([row["face_sim"] for row in rows]),
        "face_div": _mean(list(per_group.values())),
        "clip_t": _mean([row["clip_t"] for row in rows]),
        "clip_i": _mean([row["clip_i"] for row in rows]),
        "dino": _mean([row["dino"] for row in rows]),
        "no_face_rate": (1.0 - sum(checked) / len(checked)) if checked else None,
        "seconds_per_image": _mean([row.get("seconds") for row in rows]),
        "n": len(rows),
    }


class _GivenFeatures(torch.nn.Module):
    """The feature extractor handed to torchmetrics' FID: features are CLIP embeddings computed beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def clip_image_embeddings(images: Iterable[Any], scorers: Scorers) -> torch.Tensor:
    """(N, D) CLIP image embeddings of images or paths, read a batch at a time (thousands fit in memory)."""
    from photomaker.images import load_image

    batches = [
        scorers.clip_image_embeds([load_image(image).convert("RGB") for image in chunk])
        for chunk in _chunks(images, SCORE_BATCH)
    ]
    return torch.cat(batches) if batches else torch.empty(0, int(scorers.clip_model.config.projection_dim))


def fid(generated: Iterable[Any], real: Iterable[Any] | torch.Tensor, scorers: Scorers) -> float:
    """Fréchet distance between CLIP image embeddings of `generated` and `real` (torchmetrics).

    Each image is embedded as it is (CLIP's processor resizes and crops it). `real` is images or paths, or their
    `clip_image_embeddings`, so that a sweep embeds the real photos once for all its settings.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_embeds = real if isinstance(real, torch.Tensor) else clip_image_embeddings(real, scorers)
    generated_embeds = clip_image_embeddings(generated, scorers)
    if len(generated_embeds) < 2 or len(real_embeds) < 2:
        raise InvalidRequestError(
            f"FID needs at least 2 generated and 2 real images, got {len(generated_embeds)} and {len(real_embeds)}; "
            "add photos to --fid-real or generate more images."
        )
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real_embeds.shape[1]))
    metric.update(real_embeds, real=True)
    metric.update(generated_embeds, real=False)
    return float(metric.compute())
