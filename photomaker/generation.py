"""Generation on the loaded pipeline: the ID-encoding cache, fast-mode switching, the pipeline of the request's
mode (`photomaker.modes`), batching into pipeline calls, best-of-N selection by identity score, and the PNG
metadata of each image.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from photomaker import metadata, presets
from photomaker.config import ServiceConfig
from photomaker.errors import InvalidRequestError, PhotoMakerError
from photomaker.fields import FIELDS, REQUEST_FIELDS
from photomaker.lifecycle import ModelLifecycle, error_chain, explain_load_error, is_out_of_memory
from photomaker.modes import ModePipelines, mode_arguments
from photomaker.requests import GeneratedImage, GenerationPlan, GenerationResult, ProgressCallback

MAX_BATCH = 4  # images per pipeline call; best-of-N candidates beyond it run in further calls


@dataclass
class _IDEntry:
    """Everything derived from a set of photos: reused as a whole on a cache hit (no face detection either)."""

    encoding: Any  # photomaker.pipeline.IDEncoding
    crops: list[Image.Image]
    warnings: list[str]
    # Per person (first, then the second one of a mix): (N, D) face embeddings, for the identity score.
    people_embeds: list[np.ndarray] = field(default_factory=list)

    def references(self, mix_strength: float | None) -> np.ndarray | None:
        """The embeddings the likeness is measured against: those of the person who dominates the mix."""
        if not self.people_embeds:
            return None
        second = mix_strength is not None and mix_strength > 0.5 and len(self.people_embeds) > 1
        return self.people_embeds[1 if second else 0]


class _LRUCache:
    """The most recently used ID encodings, by photos' content; thread-safe, with hit and miss counters."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, _IDEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> _IDEntry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: _IDEntry) -> None:
        if self.max_size == 0:
            return
        with self._lock:
            self._items[key] = entry
            self._items.move_to_end(key)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "max_size": self.max_size}


def _pixels_digest(hasher: Any, images: Sequence[Image.Image]) -> None:
    for image in images:
        hasher.update(f"{image.mode}:{image.width}x{image.height};".encode())
        hasher.update(image.tobytes())


class GenerationRunner:
    """Runs validated plans on the pipeline that `model` holds; keeps the ID encodings of recent photos."""

    def __init__(self, config: ServiceConfig, model: ModelLifecycle) -> None:
        self.config = config
        self._model = model
        self._generate_lock = threading.Lock()
        self._fast_state: presets.FastModeState | None = None
        self._cache = _LRUCache(config.cache_size)
        self._modes: ModePipelines | None = None

    def reset(self) -> None:
        """Forget what belongs to the previous pipeline (a new one was loaded)."""
        self._fast_state = None
        self._cache.clear()
        self._modes = None

    def modes(self) -> ModePipelines:
        """The mode pipelines and control models of the loaded pipeline (made on first use).

        Control models load on the pipeline's execution device and dtype; with CPU offload they stay there
        (they are not part of the base pipeline's offload chain)."""
        if self._modes is None:
            from photomaker.control_models import ControlModelRegistry

            pipe = self._model.pipeline
            registry = ControlModelRegistry(
                device=pipe._execution_device, dtype=pipe.unet.dtype, overrides=self._model.control_model_overrides
            )
            self._modes = ModePipelines(pipe, registry)
        return self._modes

    def cache_info(self) -> dict[str, int]:
        """ID-encoding cache counters: hits, misses, size, max_size."""
        return self._cache.info()

    def run(self, plan: GenerationPlan, progress: ProgressCallback | None = None) -> GenerationResult:
        """Generate the plan's images on the loaded pipeline, one run at a time; out of memory is reported as a
        request too large for this machine, with what to change."""
        with self._generate_lock:
            try:
                return self._run(plan, progress)
            except BaseException as exc:
                # The traceback's finished frames hold every tensor of the failed run (latents, activations, the
                # allocation that failed); whoever receives the error keeps them alive, so clear them before freeing.
                for error in error_chain(exc):
                    traceback.clear_frames(error.__traceback__)
                self._model.free_memory()
                if is_out_of_memory(exc):
                    raise InvalidRequestError(
                        f"Ran out of memory generating {plan.num_outputs * plan.best_of} image(s) at "
                        f"{plan.width}x{plan.height}. Ask for fewer images or a smaller size, or start the service "
                        "with PHOTOMAKER_OFFLOAD=model and PHOTOMAKER_VAE_TILING=1."
                    ) from exc
                raise

    def _set_fast_mode(self, pipe: Any, preset: presets.FastPreset | None) -> None:
        current = self._fast_state.preset if self._fast_state else None
        if current == preset:
            return
        if self._fast_state is not None:
            presets.restore_standard_mode(pipe, self._fast_state)
            self._fast_state = None
        if preset is not None:
            source = preset.lora_path or preset.adapter_repo
            try:
                self._fast_state = presets.apply_fast_preset(pipe, preset)
            except Exception as exc:
                if isinstance(exc, PhotoMakerError):
                    raise
                raise explain_load_error(
                    exc, f"the fast-mode LoRA {preset.weight_name}", source, "PHOTOMAKER_FAST_LORA_DIR"
                ) from exc

    def _cache_key(self, plan: GenerationPlan) -> str:
        hasher = hashlib.sha256()
        hasher.update(b"first person;")
        _pixels_digest(hasher, plan.id_images)
        hasher.update(b"second person;")
        _pixels_digest(hasher, plan.mix_images)
        config = self.config
        identity = (
            self._model.adapter_label,
            config.adapter_weight_name,
            config.pm_version,
            plan.request.crop_faces,
            config.resolved_face_backend,
        )
        hasher.update(repr(identity).encode())
        return hasher.hexdigest()

    def _encode(self, pipe: Any, plan: GenerationPlan) -> tuple[_IDEntry, bool]:
        """The ID encoding of the plan's photos: from the cache, or face preparation + one ID-encoder run."""
        key = self._cache_key(plan)
        entry = self._cache.get(key)
        if entry is not None:
            return entry, True
        crops = plan.id_images + plan.mix_images
        people_embeds: list[np.ndarray] = []
        warnings: list[str] = []
        face_embeds = None
        analyzer = self._model.face_analyzer
        if analyzer is not None:
            from photomaker.faces import prepare_id_photos

            people = [
                prepare_id_photos(photos, analyzer, crop=plan.request.crop_faces, need_embeddings=True, names=names)
                for photos, names in ((plan.id_images, plan.id_names), (plan.mix_images, plan.mix_names))
                if photos
            ]
            crops = [image for person in people for image in person.images]
            warnings = [warning for person in people for warning in person.warnings]
            people_embeds = [person.face_embeds for person in people]
            if pipe.pm_version >= 2:
                face_embeds = torch.from_numpy(np.concatenate([person.face_embeds for person in people]))
        encoding = pipe.encode_id_images(crops, id_embeds=face_embeds)
        entry = _IDEntry(encoding=encoding, crops=crops, warnings=warnings, people_embeds=people_embeds)
        self._cache.put(key, entry)
        return entry, False

    def _run(self, plan: GenerationPlan, progress: ProgressCallback | None) -> GenerationResult:
        base = self._model.pipeline
        timings: dict[str, float] = {}
        started = time.perf_counter()
        num_photos = len(plan.id_images) + len(plan.mix_images)
        prompt_notes = _prompt_notes(base, plan, num_photos)
        self._set_fast_mode(base, plan.fast)

        report = progress or (lambda step, total, description: None)
        total_candidates = plan.num_outputs * plan.best_of
        chunks = [range(i, min(i + MAX_BATCH, total_candidates)) for i in range(0, total_candidates, MAX_BATCH)]
        steps_per_call = plan.composition.denoising_steps(plan.num_steps)
        total_steps = steps_per_call * len(chunks)
        report(0, total_steps, "Preparing the ID photos")
        entry, cache_hit = self._encode(base, plan)
        timings["id_encoding"] = time.perf_counter() - started

        composition = plan.composition
        control_notes: list[str] = []
        control_map = mask = None
        call_arguments: dict[str, Any] = {"width": plan.width, "height": plan.height}
        pipe = base
        if composition.pipeline != "text2img" or composition.style_image is not None or _has_ip_adapter(base):
            modes = self.modes()
            report(0, total_steps, "Preparing the control and style images")
            control_map, control_notes = modes.control_map(composition, plan.width, plan.height)
            mask = composition.mask_image
            if composition.mask_face:  # found in the photo as given, then fitted as the photo was
                from photomaker.control_images import fit_to_size, mask_face

                face = mask_face(composition.init_source, self._model.face_analyzer)
                mask, _ = fit_to_size(face, plan.width, plan.height, what="mask")
            pipe = modes.pipeline(composition)
            call_arguments = {
                **mode_arguments(composition, control_map, mask, plan.width, plan.height),
                **modes.style_arguments(pipe, composition),
            }
            timings["control"] = time.perf_counter() - started - timings["id_encoding"]

        denoise_started = time.perf_counter()
        candidates: list[Image.Image] = []
        for chunk_index, chunk in enumerate(chunks):
            done_before = chunk_index * steps_per_call
            description = f"Denoising ({len(chunk)} image{'s' if len(chunk) > 1 else ''})"

            def on_step(
                _pipe: Any, step: int, _timestep: Any, _kwargs: dict, done: int = done_before, text: str = description
            ) -> dict:
                report(done + step + 1, total_steps, text)
                return {}

            output = pipe(
                prompt=plan.positive,
                negative_prompt=plan.negative or None,
                input_id_images=entry.encoding,
                id_weights=plan.id_weights,
                start_merge_step=plan.composition.merge_step_in_run(plan.start_merge_step, plan.num_steps),
                num_inference_steps=plan.num_steps,
                guidance_scale=plan.guidance_scale,
                num_images_per_prompt=len(chunk),
                # One CPU generator per image: each image depends on its own seed only (reproducible alone,
                # and the same noise on every device).
                generator=[torch.Generator("cpu").manual_seed(plan.image_seed(k)) for k in chunk],
                callback_on_step_end=on_step,
                output_type="pil",
                **call_arguments,
            )
            candidates.extend(output.images)
        timings["denoising"] = time.perf_counter() - denoise_started

        score_started = time.perf_counter()
        identities: list[dict[str, Any] | None] = [None] * len(candidates)
        references = entry.references(plan.mix_strength)
        analyzer = self._model.face_analyzer
        if analyzer is not None and references is not None:
            from photomaker.faces import identity_score

            report(total_steps, total_steps, "Scoring the likeness")
            identities = [identity_score(image, references, analyzer).as_dict() for image in candidates]
        # Output k is the most alike of its own candidates k*B .. k*B+B-1 (seeds seed + k*B + j): the same
        # images as a batch job, which requests each output alone with seed + k*B.
        keep = [
            max(range(k * plan.best_of, (k + 1) * plan.best_of), key=lambda c: _similarity(identities[c]))
            for k in range(plan.num_outputs)
        ]
        timings["identity_score"] = time.perf_counter() - score_started

        images = []
        for k in keep:
            params = self._parameters(plan, plan.image_seed(k), identities[k])
            images.append(GeneratedImage(metadata.image_with_metadata(candidates[k], params), params, identities[k]))
        timings["total"] = time.perf_counter() - started
        return GenerationResult(
            images=images,
            seed=plan.seed,
            warnings=plan.warnings + control_notes + prompt_notes + entry.warnings,
            prompt_used=plan.positive,
            crops=list(entry.crops),
            negative_prompt_used=plan.negative,
            cache_hit=cache_hit,
            timings=timings,
            control_image=control_map,
            mask_image=mask,
        )

    def _parameters(self, plan: GenerationPlan, seed: int, identity: dict[str, Any] | None) -> dict[str, Any]:
        """What the PNG of one image records: every request field with a PNG key (as validated), what was
        derived from them, and the model."""
        config = self.config
        stored = {item.metadata_key: _stored_value(plan, item.name) for item in REQUEST_FIELDS if item.metadata_key}
        return metadata.complete_parameters(
            {
                **stored,
                "seed": seed,  # this image's own
                "crop_faces": plan.request.crop_faces and config.resolved_face_backend != "none",  # what was done
                "prompt_used": plan.positive,
                "negative_prompt_used": plan.negative,
                "start_merge_step": plan.start_merge_step,
                "base_model": self._model.base_model_label,
                "pm_version": config.pm_version,
                "adapter": self._model.adapter_label,
                "face_backend": config.resolved_face_backend,
                "identity": identity,
            }
        )


def _stored_value(plan: GenerationPlan, name: str) -> Any:
    """Field `name` as it was used: the plan's checked value where it has one (the composition's for control,
    start photo and style image settings, defaults resolved), else the request's; photos as their number, an
    image as its file name, a fast preset as its key."""
    if FIELDS[name].kind == "image":
        return metadata.image_label(getattr(plan.request, name))
    if hasattr(plan, name):
        value = getattr(plan, name)
    elif hasattr(plan.composition, name) and getattr(plan.composition, name) is not None:
        value = getattr(plan.composition, name)
    else:
        value = getattr(plan.request, name)
    if FIELDS[name].kind == "images":
        return len(value)
    if isinstance(value, presets.FastPreset):
        return value.key
    return value


def _has_ip_adapter(pipe: Any) -> bool:
    """Whether an IP-Adapter was loaded into the pipeline's UNet (by an earlier request with a style image)."""
    return getattr(pipe.unet, "encoder_hid_proj", None) is not None


def _similarity(identity: dict[str, Any] | None) -> float:
    """Ranking key for best-of-N: images without a detected face rank last."""
    if not identity or identity.get("similarity") is None:
        return -math.inf
    return float(identity["similarity"])


def _prompt_notes(pipe: Any, plan: GenerationPlan, num_photos: int) -> list[str]:
    """The pipeline's notes on the prompt and the negative prompt (words cut at 77 tokens), so that nothing is
    dropped silently from either."""
    return pipe.check_prompt(plan.positive, num_id_images=num_photos, negative_prompt=plan.negative or None)
