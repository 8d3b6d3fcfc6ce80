"""Generation parameters stored inside the PNG, so that every result says how it was made and can be remade.

Two text chunks: `photomaker` holds the parameters as JSON (machine-readable, the source of truth) and
`parameters` a one-screen summary in the form image viewers and other SD tools display.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from photomaker.errors import InvalidRequestError

if TYPE_CHECKING:
    from photomaker.service import GenerationRequest

logger = logging.getLogger(__name__)

JSON_CHUNK = "photomaker"
TEXT_CHUNK = "parameters"
METADATA_VERSION = 1

# Every key a generated image carries (missing values are written as null).
PARAMETER_KEYS: tuple[str, ...] = (
    "prompt",  # the user's prompt after trigger-word insertion, before the style template
    "negative_prompt",  # the user's negative prompt, before the style's negative is added
    "prompt_used",  # what the text encoders saw: the styled prompt
    "negative_prompt_used",
    "style",
    "aspect_ratio",
    "width",
    "height",
    "seed",  # the seed of this image alone (image k of a request uses seed + k)
    "num_steps",
    "guidance_scale",
    "style_strength",
    "start_merge_step",
    "num_id_images",
    "num_mix_images",
    "mix_strength",
    "crop_faces",
    "fast",
    "base_model",
    "pm_version",
    "adapter",
    "face_backend",
    "identity",
    "library_version",
    "metadata_version",
)


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
        ("Base model", params.get("base_model")),
        ("PhotoMaker", f"v{params.get('pm_version')} ({params.get('adapter')})"),
        ("Identity similarity", "no face found" if identity and similarity is None else similarity),
        ("Version", params.get("library_version")),
    ]
    pairs = ", ".join(f"{name}: {value}" for name, value in fields if value is not None)
    prompt = params.get("prompt_used") or params.get("prompt") or ""
    negative = params.get("negative_prompt_used") or params.get("negative_prompt") or ""
    return f"{prompt}\nNegative prompt: {negative}\n{pairs}"


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


def read_parameters(source: str | os.PathLike[str] | bytes | Image.Image) -> dict[str, Any]:
    """The parameters stored by `save_png` / `image_with_metadata` in a PNG file, its bytes, or an image."""
    if isinstance(source, Image.Image):
        info = source.info
        name = "the image"
    else:
        name = repr(os.fspath(source)) if not isinstance(source, bytes) else "the PNG data"
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            with Image.open(data) as image:
                image.load()
                info = dict(image.info)
        except (OSError, SyntaxError) as exc:
            raise InvalidRequestError(f"Cannot read {name} as an image: {exc}.") from exc
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


def request_from_parameters(
    params: Mapping[str, Any], id_images: Sequence[Any] = (), mix_images: Sequence[Any] = ()
) -> GenerationRequest:
    """A request that regenerates the image `params` describe, given the same ID photos.

    It asks for one output at the image's own seed: since image k of a request uses its own generator
    seeded with seed + k, that single image is the same picture. Photos are not stored in the PNG, so they
    are passed again here.
    """
    from photomaker.service import GenerationRequest

    for key in ("prompt", "seed"):
        if params.get(key) is None:
            raise InvalidRequestError(f"The stored parameters lack {key!r}; this image cannot be reproduced.")
    fields: dict[str, Any] = {}
    for key in (
        "negative_prompt",
        "style",
        "aspect_ratio",
        "num_steps",
        "style_strength",
        "guidance_scale",
        "mix_strength",
        "crop_faces",
        "fast",
        "width",
        "height",
    ):
        if params.get(key) is not None:
            fields[key] = params[key]
    return GenerationRequest(
        id_images=list(id_images),
        prompt=str(params["prompt"]),
        seed=int(params["seed"]),
        num_outputs=1,
        best_of=1,
        mix_images=list(mix_images),
        **fields,
    )
