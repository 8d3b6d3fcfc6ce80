"""Gradio adapters for the web app's `/generate` API: payload checks with messages that say what to send,
conversions between request fields and page controls, and the small pure helpers the page shows.

The `app` extra: the only module of the package that imports gradio, so that the library, the CLI and batch
run without it. `app.py` keeps the layout, the event handlers and `main`.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import processing_utils
from PIL import Image
from pydantic import ConfigDict, ValidationError

from photomaker import presets
from photomaker.aspect_ratios import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from photomaker.fields import REQUEST_FIELDS, RequestField
from photomaker.requests import GenerationRequest, ServiceStatus

RANDOMIZE_SEED = "randomize_seed"  # the one /generate parameter that is not a request field: it follows seed
PAINTED_OVER_FIELDS = ("mask_image",)  # image fields whose page canvas only paints over the app's background
EMPTY_CANVAS: dict[str, Any] = {"background": None, "layers": [], "composite": None}  # a canvas with nothing on it


# ---------------------------------------------------------------------------------------------------------------
# Gradio's file cache
# ---------------------------------------------------------------------------------------------------------------


def save_pil_to_cache_atomically(img: Any, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's `processing_utils.save_pil_to_cache`, but written under a temporary name and renamed into place.

    Gradio 6 rewrites an image output in place at a path named by its content hash, so when two requests return
    the same picture (the face crop of the same example photo) one request truncates the file while another
    client is downloading it, and that client fails ("peer closed connection ... received 0 bytes"). Gradio's
    `save_file_to_cache` already writes this way.
    """
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# /generate payloads: checked before any handler runs, refused with the expected format
# ---------------------------------------------------------------------------------------------------------------


def named_in_errors(
    component: gr.components.Component, expected: str, *, nullable: bool = False
) -> gr.components.Component:
    """Gradio checks slider, number and dropdown values sent through the API before any app code runs, with
    messages such as "Value 0 is less than minimum value 1."; prefix the control's label so the user knows which,
    and turn any other refusal of a malformed value (a text for a number, ...) into a message saying what
    `expected` values look like. With `nullable`, null passes through (the field's default: a slider whose
    default depends on the mode, such as the control strength).

    Wraps the instance's method: subclassing a Gradio component would make Gradio write an `app.pyi` file.
    """
    check = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None and nullable:
            return None
        try:
            return check(payload)
        except gr.Error as error:
            raise gr.Error(f"{component.label}: {error.message}") from error
        except Exception as error:  # noqa: BLE001 - any malformed API value: say what is expected
            raise gr.Error(f"{component.label}: expected {expected}, got {payload!r}.") from error

    component.preprocess = preprocess
    return component


def photo_list_format(api_name: str) -> str:
    """How a photo list is passed to `/generate` through gradio_client, for error messages."""
    return (
        f"{api_name} takes a list of image files: [handle_file('me.jpg'), ...] or gallery items "
        f"[{{'image': handle_file('me.jpg'), 'caption': None}}, ...] (from gradio_client import handle_file)"
    )


def _gallery_item(item: Any, api_name: str) -> dict[str, Any]:
    """One photo of an API payload as a gallery item; gr.Error (showing the expected format) if it is none."""
    if isinstance(item, (list, tuple)) and 1 <= len(item) <= 2:  # (file, caption), as Gallery values read
        item = {"image": item[0], "caption": item[1] if len(item) == 2 else None}
    elif isinstance(item, dict) and "image" not in item and "path" in item:  # a bare file: handle_file(path)
        item = {"image": item, "caption": None}
    if not (isinstance(item, dict) and isinstance(item.get("image"), dict) and item["image"].get("path")):
        raise gr.Error(f"{photo_list_format(api_name)}; got {item!r} in the list.")
    if item.get("caption") is not None and not isinstance(item["caption"], str):
        item = {**item, "caption": str(item["caption"])}
    return item


def accept_bare_files(gallery: gr.Gallery, api_name: str) -> gr.Gallery:
    """Let `/generate` take a photo list as bare files (`[handle_file(path)]`, what a gradio_client user tries
    first) as well as gallery items, and refuse anything else with a message showing the expected format.

    Gradio validates a gallery payload against its data model before any app code runs, and refuses other
    shapes with an opaque "The upstream Gradio app has raised an exception"; this instance gets a data model
    that first rewrites the payload (its schema, which the API page shows, stays the Gallery's).
    """

    class PhotoListPayload(gallery.data_model):  # type: ignore[name-defined,misc]
        model_config = ConfigDict(title=gallery.data_model.__name__)  # the API page shows the Gallery's schema

        @classmethod
        def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
            # gr.Error raised here reaches the client; raised inside a pydantic validator it would be wrapped
            # into a ValidationError, and so shown as the opaque message.
            if isinstance(obj, list):
                obj = [_gallery_item(item, api_name) for item in obj]
            elif obj is not None and not isinstance(obj, cls):
                raise gr.Error(f"{photo_list_format(api_name)}; got {obj!r}.")
            try:
                return super().model_validate(obj, *args, **kwargs)
            except ValidationError as error:
                raise gr.Error(f"{photo_list_format(api_name)}; got {obj!r}.") from error

    gallery.data_model = PhotoListPayload
    return gallery


def image_format(api_name: str, editor: bool) -> str:
    """How one image is passed to `/generate` through gradio_client, for error messages."""
    text = f"{api_name} takes one image file: handle_file('picture.png') (from gradio_client import handle_file)"
    if editor:
        text += ", or an image editor value {'background': handle_file(...), 'layers': [...], 'composite': ...}"
    return text + ", or null for none"


def accept_image_file(component: gr.Image | gr.ImageEditor, api_name: str) -> gr.Image | gr.ImageEditor:
    """Let a single-image `/generate` parameter take a bare file (`handle_file(path)`) or null, and refuse
    anything else with a message naming the parameter and showing the expected format.

    An image editor (a canvas the user draws on) takes its own value too, and a bare file, which reaches the
    handler as its path (an uploaded image: a drawing, a mask). As in `accept_bare_files`, the rewrite lives in
    the instance's data model, which Gradio validates before any app code runs.
    """
    editor = isinstance(component, gr.ImageEditor)

    class ImagePayload(component.data_model):  # type: ignore[name-defined,misc]
        model_config = ConfigDict(title=component.data_model.__name__)

        @classmethod
        def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
            if obj is None or isinstance(obj, cls):
                return obj
            if editor and isinstance(obj, dict) and "path" in obj:  # a bare file: the background, nothing else
                obj = {"background": obj, "layers": [], "composite": None}
            if not isinstance(obj, dict) or not (
                {"background", "layers", "composite", "id"} & set(obj) if editor else obj.get("path") or obj.get("url")
            ):
                raise gr.Error(f"{image_format(api_name, editor)}; got {obj!r}.")
            try:
                return super().model_validate(obj, *args, **kwargs)
            except ValidationError as error:
                raise gr.Error(f"{image_format(api_name, editor)}; got {obj!r}.") from error

    component.data_model = ImagePayload
    if editor:
        editor_preprocess = component.preprocess

        def preprocess(payload: Any) -> Any:
            # Only a bare file has a background and nothing else: hand the library its path, as the CLI does,
            # so the PNG records the file's name.
            if (
                payload is not None
                and payload.background is not None
                and not payload.layers
                and payload.composite is None
                and payload.id is None
            ):
                return payload.background.path
            return editor_preprocess(payload)

        component.preprocess = preprocess


def accept_shorter_calls(demo: gr.Blocks, api_name: str) -> None:
    """Let a raw HTTP call of endpoint `api_name` leave out trailing parameters, which take their controls'
    initial values, as gradio_client does for a call that leaves them out.

    Gradio refuses a `data` list shorter than the endpoint's inputs ("didn't receive enough input values"), so
    without this every script that posts the parameters `/generate` had before new ones were appended would
    break. Wraps this page's own check (nothing global is patched).
    """
    validate_inputs = demo.validate_inputs

    def validate_with_defaults(block_fn: Any, inputs: list[Any]) -> None:
        if block_fn.api_name == api_name and len(inputs) < len(block_fn.inputs):
            inputs.extend(block.value for block in block_fn.inputs[len(inputs) :])  # checked in place by Gradio
        validate_inputs(block_fn, inputs)

    demo.validate_inputs = validate_with_defaults


def declare_optional_images(handler: Any) -> Any:
    """Declare each single-image field's `/generate` parameter on `handler`'s signature with a None default.

    Gradio tells API clients that a parameter may be left out only when its component starts with a value or
    the handler declares that parameter with a None default; image inputs start empty, so without this every
    existing call (which knows nothing of them) would be refused. The handler still receives them in
    `**values`.
    """
    signature = inspect.signature(handler)
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    optional = [
        inspect.Parameter(item.api_name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any)
        for item in REQUEST_FIELDS
        if item.kind == "image"
    ]
    handler.__signature__ = signature.replace(parameters=[*parameters, *optional, *rest])
    return handler


# ---------------------------------------------------------------------------------------------------------------
# Request fields <-> page controls
# ---------------------------------------------------------------------------------------------------------------


def gallery_paths(value: Sequence[Any] | None) -> list[str]:
    """File paths from a Gallery input value (a list of (path, caption) tuples, or None)."""
    if not value:
        return []
    return [item[0] if isinstance(item, (tuple, list)) else item for item in value]


def _painted(layer: Image.Image) -> bool:
    """Whether a canvas layer holds any stroke (alpha, or non-black where the layer has no alpha)."""
    band = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
    return band.getbbox() is not None


def canvas_or_none(value: Any, *, paint_only: bool = False) -> Any:
    """An image editor's value, or None when nothing was uploaded or drawn on it (an untouched canvas still
    sends its composite, which is no image).

    With `paint_only` (the mask canvas, whose background is the target photo the app put there) a canvas the
    page sent (it has a composite) with nothing painted is an empty mask, which the library refuses as such;
    an uploaded mask file (a bare file through the API: a background without a composite) stays a mask.
    """
    if not isinstance(value, dict):
        return value
    layers = value.get("layers") or []
    painted = any(_painted(layer) for layer in layers)
    if paint_only and not painted and value.get("composite") is not None:
        return EMPTY_CANVAS
    if value.get("background") is not None or painted:
        return value
    if not layers and value.get("composite") is not None:  # an API value carrying only the composite
        return value
    return None


def from_control(item: RequestField, value: Any) -> Any:
    """A control's value as the request field `item` takes it: an empty control means the field's default,
    and a size of 0 (below the field's range) means "from the aspect ratio"."""
    if item.kind == "images":
        return gallery_paths(value)
    if item.kind == "image":
        return canvas_or_none(value, paint_only=item.name in PAINTED_OVER_FIELDS)
    if value is None or value == "":
        return None if item.nullable else item.default
    if item.kind == "bool":
        return bool(value)
    if item.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if item.nullable and item.kind == "int" and value == 0 and item.low > 0:
        return None
    return value


def to_control(item: RequestField, value: Any, request: GenerationRequest) -> Any:
    """A request value as the control of field `item` shows it (the reverse of `from_control`)."""
    if value is None and item.kind == "choice":
        return ""  # e.g. fast mode off
    if value is None and item.kind == "int" and item.low > 0:
        return 0  # e.g. a size from the aspect ratio
    if value is None and item.kind == "float":  # a slider shows the default the request stands for
        return mode_defaults(request.control_type, inpaint=request.mask_face)[item.name]
    return value


def mode_defaults(control_type: str, *, inpaint: bool) -> dict[str, float]:
    """The slider values a control type and a start-photo mode stand for when left at their defaults (the
    sketch adapter's scale and end as the reference demo; inpainting redraws more than img2img)."""
    sketch = control_type == "sketch"
    return {
        "control_scale": presets.SKETCH_SCALE_DEFAULT if sketch else presets.CONTROL_SCALE_DEFAULT,
        "control_end": presets.SKETCH_END_DEFAULT if sketch else presets.CONTROL_END_DEFAULT,
        "strength": presets.INPAINT_STRENGTH_DEFAULT if inpaint else presets.IMG2IMG_STRENGTH_DEFAULT,
    }


def output_size(aspect_ratio: str | None, width: float | None, height: float | None) -> tuple[int, int]:
    """The output size a request asks for: width and height when both are set, else the aspect ratio's (an
    unknown one falls back to the default: validation refuses it later)."""
    if width and height:
        return int(width), int(height)
    return ASPECT_RATIOS.get(aspect_ratio or "", ASPECT_RATIOS[DEFAULT_ASPECT_RATIO])


def request_from_api(values: dict[str, Any]) -> GenerationRequest:
    """The request for `/generate`'s values, by API name (see `photomaker.fields`)."""
    fields = {item.name: from_control(item, values.get(item.api_name)) for item in REQUEST_FIELDS}
    if values.get(RANDOMIZE_SEED):
        fields["seed"] = None
    return GenerationRequest(**fields)


# ---------------------------------------------------------------------------------------------------------------
# What the page shows, and the GPU time a request reserves
# ---------------------------------------------------------------------------------------------------------------


def status_markdown(status: ServiceStatus) -> str:
    """The model status line shown at the top of the page."""
    if status.state == "ready":
        return f"**Model ready.** {status.message} Upload photos and press Generate."
    if status.state == "error":
        return (
            f"**The model could not be loaded.** {status.message}\n\n"
            "The page keeps running; fix the setting named above and restart the app."
        )
    if status.state == "loading":
        return f"**Loading the model ({status.progress:.0%})**: {status.message} The page works meanwhile."
    return "**The model is not loaded yet.** It loads with the first generation."


def identity_caption(identity: dict[str, Any] | None) -> str | None:
    """The text under a result: its face similarity to the ID photos."""
    if not identity:
        return None
    if not identity.get("face_found", True):
        return "identity: no face found"
    verdict = "same person" if identity.get("same_person") else "different person"
    return f"identity {identity['similarity']:.2f} ({verdict})"


def gpu_duration(request: GenerationRequest, progress: Any = None) -> int:
    """Seconds of GPU to reserve on ZeroGPU for `request`: grows with steps, images and pixels.

    Runs before the request is validated, so odd values fall back to the defaults instead of raising.
    """
    width, height = output_size(request.aspect_ratio, request.width, request.height)
    return presets.gpu_seconds(
        request.num_steps, request.num_outputs, width, height, best_of=request.best_of, fast=request.fast
    )
