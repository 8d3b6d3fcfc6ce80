"""Generation parameters stored inside the PNG, so that every result says how it was made and can be remade.

Two text chunks: `photomaker` holds the parameters as JSON (machine-readable, the source of truth) and
`parameters` a one-screen summary in the form image viewers and other SD tools display.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, PngImagePlugin

from photomaker import presets
from photomaker.aspect_ratios import ASPECT_RATIOS
from photomaker.errors import InvalidRequestError
from photomaker.fields import REQUEST_FIELDS, RequestField
from photomaker.images import MAX_IMAGE_PIXELS
from photomaker.requests import GenerationRequest

logger = logging.getLogger(__name__)

JSON_CHUNK = "photomaker"
TEXT_CHUNK = "parameters"
METADATA_VERSION = 1

# Every key a generated image carries (missing values are written as null): the request fields' keys (the
# field table's), then what the service derived from them and which model made the image.
DERIVED_KEYS: tuple[str, ...] = (
    "prompt_used",  # what the text encoders saw: the styled prompt (`prompt` is the user's, trigger inserted)
    "negative_prompt_used",  # the style's negative, then the user's
    "start_merge_step",  # from the style strength and the steps
)
MODEL_KEYS: tuple[str, ...] = ("base_model", "pm_version", "adapter", "face_backend")
PARAMETER_KEYS: tuple[str, ...] = (
    *(item.metadata_key for item in REQUEST_FIELDS if item.metadata_key),
    *DERIVED_KEYS,
    *MODEL_KEYS,
    "identity",  # the likeness to the ID photos (IdentityScore.as_dict())
    "library_version",
    "metadata_version",
)


UNNAMED_IMAGE = "(image)"
"""What the PNG records for an image field given without a file name (an upload, bytes, a drawing)."""


def image_label(source: Any) -> str | None:
    """What the PNG records for an image field: its file name, UNNAMED_IMAGE without one, None when not given.

    The image itself is not stored (a PNG restores the settings, and the user gives the images again)."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source)) or UNNAMED_IMAGE
    name = getattr(source, "filename", None)  # a PIL image opened from a file
    return os.path.basename(name) if isinstance(name, str) and name else UNNAMED_IMAGE


def library_version() -> str:
    """The installed photomaker version, or 'unknown' when running from a bare source tree."""
    import photomaker

    return str(getattr(photomaker, "__version__", "unknown"))


def complete_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with every key of PARAMETER_KEYS present, in that order, followed by any extra keys."""
    out = {key: params.get(key) for key in PARAMETER_KEYS}
    out["metadata_version"] = METADATA_VERSION
    if out["library_version"] is None:
        out["library_version"] = library_version()
    out.update({key: value for key, value in params.items() if key not in out})
    return out


def format_parameters(params: Mapping[str, Any]) -> str:
    """Human-readable summary: the prompt, the negative prompt, then `Key: value` pairs on one line."""
    identity = params.get("identity") or {}
    similarity = identity.get("similarity") if isinstance(identity, Mapping) else None
    fields = [
        ("Steps", params.get("num_steps")),
        ("Seed", params.get("seed")),
        ("Guidance", params.get("guidance_scale")),
        ("Style", params.get("style")),
        ("Style strength", params.get("style_strength")),
        ("Start merge step", params.get("start_merge_step")),
        ("Size", f"{params.get('width')}x{params.get('height')}"),
        ("Fast", params.get("fast") or "off"),
        ("Control", _control_summary(params)),
        ("Start photo", f"strength {params.get('strength')}" if params.get("init_image") else None),
        ("Mask", "the face" if params.get("mask_face") else params.get("mask_image")),
        ("Style image", f"scale {params.get('style_image_scale')}" if params.get("style_image") else None),
        ("Base model", params.get("base_model")),
        ("PhotoMaker", f"v{params.get('pm_version')} ({params.get('adapter')})"),
        ("Identity similarity", "no face found" if identity and similarity is None else similarity),
        ("Version", params.get("library_version")),
    ]
    pairs = ", ".join(f"{name}: {value}" for name, value in fields if value is not None)
    prompt = params.get("prompt_used") or params.get("prompt") or ""
    negative = params.get("negative_prompt_used") or params.get("negative_prompt") or ""
    return f"{prompt}\nNegative prompt: {negative}\n{pairs}"


def _control_summary(params: Mapping[str, Any]) -> str | None:
    """ "canny 0.8 (0-1)": the control type, its scale and the fraction of the steps it acted on."""
    if not params.get("control_type"):
        return None
    return (
        f"{params['control_type']} {params.get('control_scale')} "
        f"({params.get('control_start')}-{params.get('control_end')})"
    )


def _pnginfo(params: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    full = complete_parameters(params)
    info = PngImagePlugin.PngInfo()
    # iTXt (UTF-8): prompts may hold any language or emoji, which tEXt (Latin-1) cannot.
    info.add_itxt(JSON_CHUNK, json.dumps(full, ensure_ascii=False, sort_keys=False))
    info.add_itxt(TEXT_CHUNK, format_parameters(full))
    return info


def save_png(image: Image.Image, path: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
    """Write `image` as PNG at `path` with `params` in its text chunks."""
    image.save(path, format="PNG", pnginfo=_pnginfo(params))


def image_with_metadata(image: Image.Image, params: Mapping[str, Any]) -> Image.Image:
    """A copy of `image` decoded from PNG bytes that carry `params`.

    The text chunks are then in `image.info`, which Gradio and `save_png`-less callers copy when they save,
    so a download keeps the parameters.
    """
    buffer = io.BytesIO()
    save_png(image, buffer, params)
    buffer.seek(0)
    out = Image.open(buffer)
    out.load()
    return out


def _png_text(file: Any, name: str) -> dict[str, Any]:
    """The text chunks of an image file (`image.info`), without decoding pixels when they precede the image data.

    `name` is the file as messages call it.
    """
    subject = name[:1].upper() + name[1:]
    try:
        with Image.open(file) as image:
            if JSON_CHUNK in image.info or image.format != "PNG":
                return dict(image.info)
            # Text chunks after the image data are only read with the pixels: decode them if that is safe.
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(
                    f"{subject} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS / 1e6:g} megapixels "
                    f"accepted, and has no {JSON_CHUNK!r} text chunk before its pixels: it was not made by this tool."
                )
            image.load()
            return dict(image.info)
    except Image.DecompressionBombError as exc:
        raise InvalidRequestError(f"{subject} is too large to read: {exc}") from exc
    except (OSError, SyntaxError) as exc:
        raise InvalidRequestError(f"Cannot read {name} as an image: {exc}.") from exc


def read_parameters(source: str | os.PathLike[str] | bytes | Image.Image) -> dict[str, Any]:
    """The parameters stored by `save_png` / `image_with_metadata` in a PNG file, its bytes, or an image.

    No pixel is decoded when the chunk comes before the image data, as this tool writes it: a small file can
    hold a huge picture. Only a PNG whose chunk may follow the image data is decoded, and only when its size is
    within `photomaker.images.MAX_IMAGE_PIXELS`.
    """
    if isinstance(source, Image.Image):
        name, info = "the image", source.info
    else:
        name = "the PNG data" if isinstance(source, bytes) else repr(os.fspath(source))
        info = _png_text(io.BytesIO(source) if isinstance(source, bytes) else source, name)
    raw = info.get(JSON_CHUNK)
    if raw is None:
        raise InvalidRequestError(
            f"{name} carries no PhotoMaker parameters (no {JSON_CHUNK!r} PNG text chunk): it was not made by "
            "this tool, or it was converted or re-saved in a way that dropped its metadata."
        )
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"The {JSON_CHUNK!r} text chunk of {name} is not valid JSON: {exc}.") from exc
    if not isinstance(params, dict):
        raise InvalidRequestError(f"The {JSON_CHUNK!r} text chunk of {name} is not a JSON object.")
    return params


@dataclass
class RestoredSettings:
    """What a PNG's parameters restore: the request that remakes the image, and what had to change."""

    request: GenerationRequest
    changes: list[str]  # one sentence per stored value not used as it was, for the user


def _in_range(value: Any, what: str, low: float, high: float, integer: bool, changes: list[str]) -> float | None:
    """`value` within [low, high] (None when it is not a number); `changes` says what was changed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        changes.append(f"The stored {what} {value!r} is not a number; the default is used.")
        return None
    number = round(value) if integer else float(value)
    low, high = (int(low), int(high)) if integer else (low, high)
    clamped = min(max(number, low), high)
    show = [f"{x:g}" if isinstance(x, float) else str(x) for x in (value, low, high, clamped)]
    if clamped != number:
        changes.append(f"The stored {what} {show[0]} is outside the accepted {show[1]}-{show[2]}; set to {show[3]}.")
    elif number != value:
        changes.append(f"The stored {what} {show[0]} is not a whole number; set to {show[3]}.")
    return clamped


def _restored_value(item: RequestField, value: Any, steps_min: int, changes: list[str]) -> Any:
    """The stored `value` of field `item` as its control accepts it, or None (the default) with a change said."""
    if item.kind in ("int", "float"):
        low, high = (steps_min, item.high) if item.low_setting else item.bounds()
        return _in_range(value, item.label, low, high, item.integer, changes)
    if item.kind == "choice":
        if isinstance(value, str) and value in item.choices():
            return value
        changes.append(f"The {item.label} {value!r} is not available here; the default {item.label} is used.")
        return None
    expected = {"text": str, "bool": bool}[item.kind]
    if isinstance(value, expected):
        return value
    changes.append(f"The stored {item.label} {value!r} is not {item.describe_type()}; the default is used.")
    return None


def restore_settings(
    params: Mapping[str, Any],
    id_images: Sequence[Any] = (),
    mix_images: Sequence[Any] = (),
    *,
    steps_min: int = presets.STEPS_MIN,
) -> RestoredSettings:
    """The request that regenerates the image `params` describe, given the same ID photos, as the app's controls
    (and the service) accept it. Every request field with a PNG key in the field table is restored.

    It asks for one output at the image's own seed: since image k of a request uses its own generator seeded
    with seed + k, that single image is the same picture. Photos are not stored in the PNG, so they are passed
    again here. In fast mode the preset sets steps and guidance, so the stored ones are not restored (those of
    the guidance-free presets are below the standard range). Images (control image, start photo, mask, style
    image) are not stored either: `changes` asks for each one the image was made with. Other values outside
    the accepted ranges (steps from `steps_min`, the service's `config.steps_min`: a --tiny image may have 2)
    are moved into them, unknown
    styles, sizes and presets fall back to the defaults, and `changes` says so. A width and height equal to the
    stored output size's are left to it (None).
    """
    for key in ("prompt", "seed"):
        if params.get(key) is None:
            raise InvalidRequestError(f"The stored parameters lack {key!r}; this image cannot be reproduced.")
    changes: list[str] = []
    seed = _in_range(params["seed"], "seed", presets.SEED_MIN, presets.SEED_MAX, True, changes)
    if seed is None:
        raise InvalidRequestError(
            f"The stored seed {params['seed']!r} is not a number; this image cannot be reproduced."
        )
    values: dict[str, Any] = {"prompt": str(params["prompt"]), "seed": int(seed)}
    fast = params.get("fast")
    if fast:
        try:
            values["fast"] = presets.get_fast_preset(str(fast)).key  # stored by key; a label is accepted too
        except InvalidRequestError:
            changes.append(f"The fast mode {fast!r} is not available here; standard sampling is used.")
    size_changes: list[str] = []
    for item in REQUEST_FIELDS:
        key = item.metadata_key
        if (
            key is None
            or not item.restored
            or item.name in values
            or item.name == "fast"
            or params.get(key) is None
            or (item.set_by_fast_mode and "fast" in values)
        ):
            continue
        said = size_changes if item.name == "aspect_ratio" else changes
        value = _restored_value(item, params[key], steps_min, said)
        if value is not None:
            values[item.name] = value
    for item in REQUEST_FIELDS:
        name = params.get(item.metadata_key) if item.kind == "image" and item.metadata_key else None
        if name:
            shown = "" if name == UNNAMED_IMAGE else f" ({name})"
            changes.append(f"The {item.label}{shown} is not stored in the image: give it again.")
    size = (values.pop("width", None), values.pop("height", None))
    if None in size:
        changes.extend(size_changes)  # an unknown output size matters only without a stored size
    if None not in size and size != ASPECT_RATIOS.get(values.get("aspect_ratio", "")):
        values["width"], values["height"] = size

    request = GenerationRequest(
        id_images=list(id_images),
        num_outputs=1,
        best_of=1,
        mix_images=list(mix_images),
        **values,
    )
    return RestoredSettings(request, changes)


def request_from_parameters(
    params: Mapping[str, Any], id_images: Sequence[Any] = (), mix_images: Sequence[Any] = (), *, steps_min: int = 1
) -> GenerationRequest:
    """`restore_settings(...).request`; steps are kept down to `steps_min` (1: any count the service accepts)."""
    return restore_settings(params, id_images, mix_images, steps_min=steps_min).request
