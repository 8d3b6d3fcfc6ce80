"""Request validation as a pure function: `validate_request(request, config) -> GenerationPlan`.

Checks every field and decodes the photos with no model and no service object, so a bad request fails in
milliseconds with a message that says what to change. Only the 77-token budget of the prompt with its
class-word copies needs the tokenizers; the generation step checks it.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from photomaker import aspect_ratios, control_images, presets, styles
from photomaker.config import ServiceConfig
from photomaker.errors import ControlImageError, IDImageError, InvalidRequestError, PromptError
from photomaker.fields import FIELDS
from photomaker.images import MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES, load_image, photo_label
from photomaker.prompt import check_prompt_text, insert_trigger_word, strip_trigger_word
from photomaker.requests import CompositionPlan, GenerationPlan, GenerationRequest

MAX_PROMPT_CHARS = 2000  # SDXL reads 77 tokens (about 60 words); longer text is almost surely a mistake
# C0/C1 control characters other than tab and newline: invisible in the UI, meaningless to the tokenizer.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _show(value: float) -> str:
    """A number as people write it: 2147483647 rather than 2.14748e+09, 0.1 rather than 0.10000."""
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}"


def _number(name: str, value: Any, low: float, high: float, *, integer: bool, hint: str = "") -> float:
    """`value` as a finite number in [low, high] (an int when `integer`), else a specific error."""
    bounds = f"between {_show(low)} and {_show(high)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number {bounds}, got {value!r}.{hint}")
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number {bounds}, got {value}.{hint}")
    if integer and value != int(value):
        raise InvalidRequestError(f"{name} must be a whole number {bounds}, got {value}.{hint}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be {bounds}, got {_show(value)}.{hint}")
    return int(value) if integer else float(value)


def _field_number(name: str, value: Any, config: ServiceConfig | None) -> float:
    """`value` checked against the range that the field table gives field `name` (and `config`, if any)."""
    item = FIELDS[name]
    low, high = item.bounds(config)
    return _number(name, value, low, high, integer=item.integer, hint=item.hint)


def _photo_list(value: Any, what: str) -> list[Any]:
    """A request's photo field as a list; a single path, bytes or image counts as one photo."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, os.PathLike, Image.Image)):
        return [value]
    if not isinstance(value, Sequence):
        raise IDImageError(f"{what} must be a list of photos (paths, bytes or images), got {type(value).__name__}.")
    return list(value)


def _file_name(source: Any) -> str | None:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else None


def _load_photos(sources: Sequence[Any], names: Sequence[str | None], noun: str) -> list[Image.Image]:
    """Decode uploaded photos within the upload limits; errors name the photo ("ID photo 2 (me.jpg): ...")."""
    return [
        load_image(source, name=photo_label(index, name, noun), max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_IMAGE_PIXELS)
        for index, (source, name) in enumerate(zip(sources, names, strict=True))
    ]


def _clean_text(name: str, value: Any, warnings: list[str]) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"The {name} must be text, got {type(value).__name__}.")
    cleaned, count = _CONTROL_CHARS.subn(" ", value)
    if count:
        warnings.append(f"Removed {count} invisible control character(s) from the {name}.")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"The {name} is {len(cleaned)} characters long; keep it under {MAX_PROMPT_CHARS}. SDXL reads only "
            "the first 77 tokens (about 60 words), so shorten it to the words that matter."
        )
    return cleaned.strip()


def validate_request(request: GenerationRequest, config: ServiceConfig) -> GenerationPlan:
    """Check every field of `request` against `config` and decode the photos; raise a specific error for the
    first problem found."""
    warnings: list[str] = []

    photos = _photo_list(request.id_images, "id_images")
    fewest, most = (int(bound) for bound in FIELDS["id_images"].bounds())
    if not fewest <= len(photos) <= most:
        raise IDImageError(
            f"Got {len(photos)} ID photos; give {fewest} to {most} photos of "
            "the same person (more photos from different angles give a more faithful likeness)."
        )
    mix_photos = _photo_list(request.mix_images, "mix_images")
    most_mixed = int(FIELDS["mix_images"].high)
    if len(mix_photos) > most_mixed:
        raise IDImageError(f"Got {len(mix_photos)} photos of the second person; give at most {most_mixed}.")

    prompt = _clean_text("prompt", request.prompt, warnings)
    if not prompt:
        raise PromptError(
            f"The prompt is empty. Describe the picture and name the person with a class word followed by "
            f"'{config.trigger_word}', e.g. \"a photo of a woman {config.trigger_word} in a garden\"."
        )
    negative = _clean_text("negative prompt", request.negative_prompt or "", warnings)
    negative, had_trigger = strip_trigger_word(negative, config.trigger_word)
    if had_trigger:
        warnings.append(
            f"Removed '{config.trigger_word}' from the negative prompt: it only marks the person in the prompt."
        )
    if not isinstance(request.style, str):
        raise InvalidRequestError(f"style must be a style name, got {request.style!r}.")
    prompt, note = insert_trigger_word(prompt, config.trigger_word)
    if note:
        warnings.append(note)
    check_prompt_text(prompt, config.trigger_word)
    positive, full_negative = styles.apply_style(request.style, prompt, negative)
    width, height = _validate_size(request)

    fast = None
    if request.fast:
        if not isinstance(request.fast, str):
            raise InvalidRequestError(f"fast must be a preset name or None, got {request.fast!r}.")
        fast = presets.get_fast_preset(request.fast)
        if config.resolved_fast_lora_dir:
            fast = fast.with_weights(config.resolved_fast_lora_dir)
        if config.offload == "sequential":
            raise InvalidRequestError(
                "Fast mode cannot be used with PHOTOMAKER_OFFLOAD=sequential (its LoRA is fused into weights "
                "that sequential offload keeps off the device); use PHOTOMAKER_OFFLOAD=model."
            )
    style_strength = _field_number("style_strength", request.style_strength, config)
    if fast is None:
        num_steps = int(_field_number("num_steps", request.num_steps, config))
        guidance = _field_number("guidance_scale", request.guidance_scale, config)
        merge_step = presets.start_merge_step(style_strength, num_steps)
    else:
        num_steps, guidance = fast.steps, fast.guidance_scale
        merge_step = fast.start_merge_step(style_strength)
        ignored = [
            f"{name} {value!r}"
            for name, value, default in (
                ("steps", request.num_steps, presets.STEPS_DEFAULT),
                ("guidance", request.guidance_scale, presets.GUIDANCE_DEFAULT),
            )
            if value != default
        ]
        if ignored:
            warnings.append(
                f"{fast.label} uses its own {fast.steps} steps and guidance {fast.guidance_scale:g}; "
                f"the given {' and '.join(ignored)} were not used."
            )
    num_outputs = int(_field_number("num_outputs", request.num_outputs, config))
    best_of = int(_field_number("best_of", request.best_of, config))
    if best_of > 1 and config.resolved_face_backend == "none":
        raise InvalidRequestError(
            "best_of needs identity scores to pick the most alike images, and this service runs without face "
            "analysis (PHOTOMAKER_FACE_BACKEND=none); use best_of=1 or start it with a face backend."
        )
    if request.seed is None:
        seed = secrets.randbelow(presets.SEED_MAX + 1)
    else:
        seed = int(_field_number("seed", request.seed, config))
    if not isinstance(request.crop_faces, bool):
        raise InvalidRequestError(f"crop_faces must be true or false, got {request.crop_faces!r}.")
    mix_strength = None
    if mix_photos:
        mix_strength = _field_number("mix_strength", request.mix_strength, config)

    id_names = [_file_name(src) for src in photos]
    mix_names = [f"second person, {name}" if name else "second person" for name in map(_file_name, mix_photos)]
    id_images = _load_photos(photos, id_names, "ID photo")
    mix_images = _load_photos(mix_photos, list(map(_file_name, mix_photos)), "photo of the second person")

    composition = validate_composition(request, config, width, height, num_steps, warnings)
    if fast is not None and not fast.uses_cfg and full_negative:
        whose = "your negative prompt" if negative else f"the negative prompt of the style {request.style!r}"
        warnings.append(
            f"{fast.label} samples without classifier-free guidance, so {whose} has no effect; "
            "the Hyper-SD presets keep it."
        )
    return GenerationPlan(
        request=request,
        id_images=id_images,
        mix_images=mix_images,
        id_names=id_names,
        mix_names=mix_names,
        prompt=prompt,
        negative_prompt=negative,
        positive=positive,
        negative=full_negative,
        width=width,
        height=height,
        num_steps=num_steps,
        guidance_scale=guidance,
        style_strength=style_strength,
        start_merge_step=merge_step,
        seed=seed,
        num_outputs=num_outputs,
        best_of=best_of,
        mix_strength=mix_strength,
        fast=fast,
        warnings=warnings,
        composition=composition,
    )


def _validate_size(request: GenerationRequest) -> tuple[int, int]:
    """(width, height): the preset's, or the explicit size, which must be given whole and within range."""
    # Checked even when width and height override it: it is written into the PNG, to be restored later.
    if not isinstance(request.aspect_ratio, str):
        raise InvalidRequestError(f"aspect_ratio must be a preset name, got {request.aspect_ratio!r}.")
    preset_size = aspect_ratios.get_size(request.aspect_ratio)
    if request.width is None and request.height is None:
        return preset_size
    if request.width is None or request.height is None:
        raise InvalidRequestError("Give both width and height, or neither (then the aspect ratio decides).")
    sizes = []
    for name, value in (("width", request.width), ("height", request.height)):
        size = int(_field_number(name, value, None))
        if size % presets.SIZE_MULTIPLE:
            lower = size - size % presets.SIZE_MULTIPLE
            raise InvalidRequestError(
                f"{name} must be a multiple of {presets.SIZE_MULTIPLE}, got {size}; use {lower} or "
                f"{lower + presets.SIZE_MULTIPLE}."
            )
        sizes.append(size)
    return sizes[0], sizes[1]


def _optional_image(name: str, value: Any) -> Image.Image | None:
    """One image field decoded within the upload limits (None when not given); errors name the field."""
    if value is None:
        return None
    label = FIELDS[name].label
    named = _file_name(value)
    what = f"the {label} ({named})" if named else f"the {label}"
    if isinstance(value, dict):  # a Gradio ImageEditor value (a drawing, or an upload painted over)
        return control_images.flatten_drawing(value, what=what)
    try:
        return load_image(value, name=what, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_IMAGE_PIXELS)
    except IDImageError as exc:
        raise ControlImageError(str(exc)) from exc


def _optional_number(name: str, value: Any, config: ServiceConfig) -> float | None:
    return None if value is None else _field_number(name, value, config)


def _check_sketch_size(width: int, height: int) -> None:
    """The sketch adapter needs both sides in multiples of 16 px; name the presets and sizes that fit."""
    multiple = presets.SKETCH_SIZE_MULTIPLE
    if not (width % multiple or height % multiple):
        return
    fitting = [name for name, (w, h) in aspect_ratios.ASPECT_RATIOS.items() if not (w % multiple or h % multiple)]
    raise InvalidRequestError(
        f"The sketch adapter needs a width and height that are multiples of {multiple} px; {width}x{height} is not. "
        f"Use {width - width % multiple}x{height - height % multiple}, or one of the output sizes "
        f"{', '.join(repr(name) for name in fitting)}."
    )


def validate_composition(
    request: GenerationRequest, config: ServiceConfig, width: int, height: int, num_steps: int, warnings: list[str]
) -> CompositionPlan:
    """Check the control, start-photo and style-image fields together, decode their images, and pick the
    pipeline; notes on resized images go to `warnings`."""
    control_type = request.control_type or ""
    choices = FIELDS["control_type"].choices()
    if not isinstance(control_type, str) or control_type not in choices:
        raise InvalidRequestError(
            f"control_type must be one of {', '.join(repr(choice) for choice in choices)} ('' for none), got "
            f"{request.control_type!r}."
        )
    if control_type and request.control_image is None:
        raise ControlImageError(
            f"Control type {control_type!r} needs a control image (--control-image): upload or draw one, or set "
            "the control type to none."
        )
    if not control_type and request.control_image is not None:
        raise ControlImageError(
            "A control image was given but no control type: choose pose, canny, depth or sketch (--control TYPE) "
            "to say how it should guide the picture, or remove the control image."
        )
    if request.mask_image is not None and request.mask_face:
        raise InvalidRequestError(
            "Give either a mask or mask_face (--mask or --mask-face), not both: mask_face makes the mask from the "
            "face in the start photo."
        )
    masked = request.mask_image is not None or request.mask_face is True
    if masked and request.init_image is None:
        which = "mask_face" if request.mask_face is True else "A mask"
        raise InvalidRequestError(
            f"{which} needs a start photo (init_image, --init-image) to redraw: give the photo to put the person "
            "into, or remove the mask."
        )
    if control_type and request.init_image is not None:
        raise InvalidRequestError(
            f"Control ({control_type}) together with a start photo is not supported: there is no ControlNet "
            "img2img or inpaint pipeline here. Remove the control image to redraw the start photo, or remove the "
            "start photo to generate from scratch in the control image's layout."
        )
    if not isinstance(request.mask_face, bool):
        raise InvalidRequestError(f"mask_face must be true or false, got {request.mask_face!r}.")
    if request.mask_face and config.resolved_face_backend == "none":
        raise InvalidRequestError(
            "mask_face needs face detection, and this service runs without face analysis "
            "(PHOTOMAKER_FACE_BACKEND=none); draw or upload a mask instead, or start it with a face backend."
        )

    plan = CompositionPlan(
        control_type=control_type,
        style_image_scale=_field_number("style_image_scale", request.style_image_scale, config),
        mask_face=request.mask_face,
    )
    if control_type:
        plan.control_scale = _optional_number("control_scale", request.control_scale, config)
        plan.control_start = _field_number("control_start", request.control_start, config)
        plan.control_end = _optional_number("control_end", request.control_end, config)
        if control_type == "sketch":
            plan.pipeline = "t2i_adapter"
            if plan.control_start > 0:
                raise InvalidRequestError(
                    f"The sketch adapter always applies from the first step, so control_start must be 0, got "
                    f"{_show(plan.control_start)}; use control_end (default {_show(presets.SKETCH_END_DEFAULT)}) "
                    "to say when it stops."
                )
            plan.control_scale = presets.SKETCH_SCALE_DEFAULT if plan.control_scale is None else plan.control_scale
            plan.control_end = presets.SKETCH_END_DEFAULT if plan.control_end is None else plan.control_end
            _check_sketch_size(width, height)
        else:
            plan.pipeline = "controlnet"
            plan.control_scale = presets.CONTROL_SCALE_DEFAULT if plan.control_scale is None else plan.control_scale
            plan.control_end = presets.CONTROL_END_DEFAULT if plan.control_end is None else plan.control_end
        if plan.control_start >= plan.control_end:
            raise InvalidRequestError(
                f"control_start ({_show(plan.control_start)}) must be below control_end "
                f"({_show(plan.control_end)}): the control acts between the two fractions of the steps."
            )
        if control_type in ("canny", "sketch"):  # no model needed: made now, so a blank drawing fails at once
            prepared = control_images.prepare_control_image(control_type, request.control_image, width, height)
            plan.control_map = prepared.image
            warnings.extend(prepared.notes)
        else:
            plan.control_source = _optional_image("control_image", request.control_image).convert("RGB")

    if request.init_image is not None:
        plan.init_source = _optional_image("init_image", request.init_image).convert("RGB")
        plan.init_image, note = control_images.fit_to_size(plan.init_source, width, height, what="start photo")
        if note:
            warnings.append(note)
        plan.pipeline = "inpaint" if masked else "img2img"
        default = presets.INPAINT_STRENGTH_DEFAULT if masked else presets.IMG2IMG_STRENGTH_DEFAULT
        strength = _optional_number("strength", request.strength, config)
        plan.strength = default if strength is None else strength
        if plan.denoising_steps(num_steps) < 1:
            raise InvalidRequestError(
                f"strength {_show(plan.strength)} with {num_steps} steps leaves no step to run (the start photo "
                f"would come back unchanged); raise strength to at least {_show(math.ceil(100 / num_steps) / 100)} "
                "or use more steps."
            )
        if request.mask_image is not None:
            prepared = control_images.prepare_mask(request.mask_image, width, height)
            plan.mask_image = prepared.image
            warnings.extend(prepared.notes)
    if request.style_image is not None:
        plan.style_image = _optional_image("style_image", request.style_image).convert("RGB")
    return plan
