"""The one table of generation request fields.

Each `RequestField` says everything the shells need to know about one `GenerationRequest` field: its type,
default, range, PNG metadata key, CLI flag, help text and `/generate` API name. Validation, PNG metadata
(writing and restoring), batch job parsing, the CLI's request flags and the app's `/generate` signature all
read this table, so a new field is one entry here plus its use in generation. The table's order is the order
of the `/generate` parameters (old positional API calls keep working: add new fields at the end).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from photomaker import presets
from photomaker.aspect_ratios import ASPECT_RATIO_NAMES, DEFAULT_ASPECT_RATIO
from photomaker.styles import DEFAULT_STYLE_NAME, STYLE_NAMES

Kind = Literal["images", "image", "text", "choice", "int", "float", "bool"]


@dataclass(frozen=True)
class RequestField:
    """One request field, as every shell sees it."""

    name: str  # the GenerationRequest attribute, the batch JSONL key
    kind: Kind  # "images": a list of photos (paths in JSONL and on the command line, files through the API);
    # "image": one optional image (a path in JSONL and on the command line, a file through the API); its PNG
    # parameter records only its file name (or "(image)" without one), and a PNG never restores it
    default: Any
    label: str  # how messages name it ("number of steps")
    help: str  # the CLI's help text and the API's description
    api_name: str  # the `/generate` parameter
    cli_flag: str  # a bool flag turns the default off ("--no-crop") or on
    metadata_key: str | None  # PNG parameter (photos: their number); None: not stored
    low: float | None = None  # range of a number, or of a photo count
    high: float | None = None
    nullable: bool = False  # None is a valid value (seed: random; width: from the aspect ratio; fast: off)
    required: bool = False
    choices: Callable[[], Sequence[str]] | None = None  # the accepted names of a "choice" field
    low_setting: str | None = None  # a ServiceConfig attribute that replaces `low` (steps from 1 with --tiny)
    hint: str = ""  # added to an out-of-range message: what the value does, or its default
    set_by_fast_mode: bool = False  # a fast-mode preset uses its own value (steps, guidance)
    # Restored from a PNG (photos are not stored; a PNG is one output at its own seed, remade by one request
    # with num_outputs=1 and best_of=1 whatever its own request asked).
    restored: bool = True
    cli_metavar: str | None = None
    cli_options: Mapping[str, Any] = field(default_factory=dict)  # extra argparse keywords (nargs, const, ...)

    @property
    def integer(self) -> bool:
        return self.kind == "int"

    def bounds(self, config: Any = None) -> tuple[float, float]:
        """(low, high) of a number field; `config` (a ServiceConfig) may lower the low end (see low_setting)."""
        low = getattr(config, self.low_setting) if config is not None and self.low_setting else self.low
        return low, self.high

    def json_types(self) -> tuple[type, ...]:
        """The JSON value types a batch job may give (bool is never a number: `true` is not a step count)."""
        base: tuple[type, ...] = {
            "images": (list, str),
            "image": (str,),
            "text": (str,),
            "choice": (str,),
            "int": (int,),
            "float": (int, float),
            "bool": (bool,),
        }[self.kind]
        return (*base, type(None)) if self.nullable else base

    def describe_type(self, config: Any = None) -> str:
        """What a value must look like, for error messages: "a whole number from 64 to 2048 or null"; `config`
        as in `bounds`."""
        if self.kind == "images":
            text = "a list of image paths"
        elif self.kind == "image":
            text = "an image path"
        elif self.kind in ("int", "float"):
            number = "a whole number" if self.integer else "a number"
            low, high = self.bounds(config)
            text = f"{number} from {_show(low)} to {_show(high)}"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(choice) for choice in self.choices())
        elif self.kind == "bool":
            text = "true or false"
        else:
            text = "text"
        return f"{text} or null" if self.nullable else text


def _show(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _fast_preset_names() -> list[str]:
    return list(presets.FAST_PRESETS)


def _control_type_names() -> list[str]:
    return ["", *presets.CONTROL_TYPES]


REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField(
        "id_images",
        "images",
        (),
        "ID photos",
        "photo of the person (repeat for 1-4 photos)",
        "id_photos",
        "--id-image",
        "num_id_images",
        low=presets.ID_IMAGES_MIN,
        high=presets.ID_IMAGES_MAX,
        required=True,
        restored=False,
        cli_metavar="PHOTO",
    ),
    RequestField(
        "prompt",
        "text",
        "",
        "prompt",
        "e.g. 'a photo of a woman img as an astronaut' (class word, then the trigger 'img')",
        "prompt",
        "--prompt",
        "prompt",
        required=True,
        cli_metavar="TEXT",
    ),
    RequestField(
        "negative_prompt",
        "text",
        "",
        "negative prompt",
        "what the picture should not show",
        "negative_prompt",
        "--negative-prompt",
        "negative_prompt",
        cli_metavar="TEXT",
    ),
    RequestField(
        "style",
        "choice",
        DEFAULT_STYLE_NAME,
        "style",
        f"style template name, e.g. '{DEFAULT_STYLE_NAME}' or '(No style)'",
        "style",
        "--style",
        "style",
        choices=lambda: STYLE_NAMES,
        cli_metavar="NAME",
    ),
    RequestField(
        "aspect_ratio",
        "choice",
        DEFAULT_ASPECT_RATIO,
        "output size",
        f"aspect-ratio preset name, e.g. '{DEFAULT_ASPECT_RATIO}'",
        "aspect_ratio",
        "--aspect",
        "aspect_ratio",
        choices=lambda: ASPECT_RATIO_NAMES,
        cli_metavar="NAME",
    ),
    RequestField(
        "num_steps",
        "int",
        presets.STEPS_DEFAULT,
        "number of steps",
        f"sampling steps (default {presets.STEPS_DEFAULT}; fast mode uses its own)",
        "num_steps",
        "--steps",
        "num_steps",
        low=presets.STEPS_MIN,
        high=presets.STEPS_MAX,
        low_setting="steps_min",
        hint=f" The default is {presets.STEPS_DEFAULT}.",
        set_by_fast_mode=True,
        cli_metavar="N",
    ),
    RequestField(
        "style_strength",
        "float",
        presets.STYLE_STRENGTH_DEFAULT,
        "style strength",
        f"percent, {_show(presets.STYLE_STRENGTH_MIN)}-{_show(presets.STYLE_STRENGTH_MAX)} "
        f"(default {_show(presets.STYLE_STRENGTH_DEFAULT)})",
        "style_strength",
        "--style-strength",
        "style_strength",
        low=presets.STYLE_STRENGTH_MIN,
        high=presets.STYLE_STRENGTH_MAX,
        hint=" Higher keeps more of the prompt's style, lower more of the face.",
        cli_metavar="PCT",
    ),
    RequestField(
        "num_outputs",
        "int",
        presets.OUTPUTS_DEFAULT,
        "number of images",
        f"images to make, {presets.OUTPUTS_MIN}-{presets.OUTPUTS_MAX} (default {presets.OUTPUTS_DEFAULT})",
        "num_outputs",
        "--num-outputs",
        "num_outputs",
        low=presets.OUTPUTS_MIN,
        high=presets.OUTPUTS_MAX,
        restored=False,
        cli_metavar="N",
    ),
    RequestField(
        "guidance_scale",
        "float",
        presets.GUIDANCE_DEFAULT,
        "guidance scale",
        f"guidance scale (default {_show(presets.GUIDANCE_DEFAULT)}; fast mode uses its own)",
        "guidance_scale",
        "--guidance",
        "guidance_scale",
        low=presets.GUIDANCE_MIN,
        high=presets.GUIDANCE_MAX,
        hint=f" The default is {presets.GUIDANCE_DEFAULT:g}.",
        set_by_fast_mode=True,
        cli_metavar="G",
    ),
    RequestField(
        "seed",
        "int",
        None,
        "seed",
        "default: random; output k uses seed + k",
        "seed",
        "--seed",
        "seed",
        low=presets.SEED_MIN,
        high=presets.SEED_MAX,
        nullable=True,
        hint=" Leave it empty for a random seed.",
        cli_metavar="N",
    ),
    RequestField(
        "crop_faces",
        "bool",
        True,
        "face cropping",
        "use the photos as they are instead of cropping around the face",
        "crop_faces",
        "--no-crop",
        "crop_faces",
    ),
    RequestField(
        "mix_images",
        "images",
        (),
        "photos of the second person",
        "photo of a second person to blend in (repeatable)",
        "mix_photos",
        "--mix-image",
        "num_mix_images",
        low=0,
        high=presets.MIX_IMAGES_MAX,
        restored=False,
        cli_metavar="PHOTO",
    ),
    RequestField(
        "mix_strength",
        "float",
        presets.MIX_STRENGTH_DEFAULT,
        "mix strength",
        f"0 = first person only, 1 = second only (default {_show(presets.MIX_STRENGTH_DEFAULT)})",
        "mix_strength",
        "--mix-strength",
        "mix_strength",
        low=presets.MIX_STRENGTH_MIN,
        high=presets.MIX_STRENGTH_MAX,
        cli_metavar="M",
    ),
    RequestField(
        "fast",
        "choice",
        None,
        "fast mode",
        f"few-step mode with a distilled LoRA: {', '.join(presets.FAST_PRESETS)} "
        f"(--fast alone: {presets.DEFAULT_FAST_PRESET})",
        "fast_mode",
        "--fast",
        "fast",
        nullable=True,
        choices=_fast_preset_names,
        cli_metavar="PRESET",
        cli_options={"nargs": "?", "const": presets.DEFAULT_FAST_PRESET},
    ),
    RequestField(
        "best_of",
        "int",
        1,
        "best of",
        "make N candidates per output, keep the most alike",
        "best_of",
        "--best-of",
        "best_of",
        low=presets.BEST_OF_MIN,
        high=presets.BEST_OF_MAX,
        restored=False,
        cli_metavar="N",
    ),
    RequestField(
        "width",
        "int",
        None,
        "width",
        "with --height: explicit size, overrides --aspect",
        "width",
        "--width",
        "width",
        low=presets.SIZE_MIN,
        high=presets.SIZE_MAX,
        nullable=True,
        cli_metavar="PX",
    ),
    RequestField(
        "height",
        "int",
        None,
        "height",
        "with --width: explicit size, overrides --aspect",
        "height",
        "--height",
        "height",
        low=presets.SIZE_MIN,
        high=presets.SIZE_MAX,
        nullable=True,
        cli_metavar="PX",
    ),
    RequestField(
        "control_type",
        "choice",
        "",
        "control type",
        f"guide the layout with an image: {', '.join(presets.CONTROL_TYPES)} (needs --control-image)",
        "control_type",
        "--control",
        "control_type",
        choices=_control_type_names,
        cli_metavar="TYPE",
    ),
    RequestField(
        "control_image",
        "image",
        None,
        "control image",
        "the image that guides the layout: a photo of a person (pose, depth), any picture (canny), a drawing "
        "(sketch), or a ready-made map",
        "control_image",
        "--control-image",
        "control_image",
        restored=False,
        cli_metavar="PATH",
    ),
    RequestField(
        "control_scale",
        "float",
        None,
        "control strength",
        f"how strongly the control image steers, {_show(presets.CONTROL_SCALE_MIN)}-"
        f"{_show(presets.CONTROL_SCALE_MAX)} (default {_show(presets.CONTROL_SCALE_DEFAULT)}, sketch "
        f"{_show(presets.SKETCH_SCALE_DEFAULT)})",
        "control_scale",
        "--control-scale",
        "control_scale",
        low=presets.CONTROL_SCALE_MIN,
        high=presets.CONTROL_SCALE_MAX,
        nullable=True,
        hint=f" Leave it empty for the default ({_show(presets.CONTROL_SCALE_DEFAULT)}, sketch "
        f"{_show(presets.SKETCH_SCALE_DEFAULT)}).",
        cli_metavar="X",
    ),
    RequestField(
        "control_start",
        "float",
        0.0,
        "control start",
        "fraction of the steps before the control starts, 0-1 (default 0; the sketch adapter starts at 0)",
        "control_start",
        "--control-start",
        "control_start",
        low=0.0,
        high=1.0,
        cli_metavar="X",
    ),
    RequestField(
        "control_end",
        "float",
        None,
        "control end",
        f"fraction of the steps after which the control stops, 0-1 (default 1, sketch "
        f"{_show(presets.SKETCH_END_DEFAULT)})",
        "control_end",
        "--control-end",
        "control_end",
        low=0.0,
        high=1.0,
        nullable=True,
        hint=f" Leave it empty for the default (1, sketch {_show(presets.SKETCH_END_DEFAULT)}).",
        cli_metavar="X",
    ),
    RequestField(
        "init_image",
        "image",
        None,
        "start photo",
        "start from this photo (img2img), or with --mask / --mask-face put the person into it (inpaint)",
        "init_image",
        "--init-image",
        "init_image",
        restored=False,
        cli_metavar="PATH",
    ),
    RequestField(
        "strength",
        "float",
        None,
        "strength",
        f"how much of the start photo is redrawn, 0-1 (default {_show(presets.IMG2IMG_STRENGTH_DEFAULT)}, "
        f"with a mask {_show(presets.INPAINT_STRENGTH_DEFAULT)})",
        "strength",
        "--strength",
        "strength",
        low=0.0,
        high=1.0,
        nullable=True,
        hint=f" Leave it empty for the default "
        f"({_show(presets.IMG2IMG_STRENGTH_DEFAULT)}, with a mask {_show(presets.INPAINT_STRENGTH_DEFAULT)}).",
        cli_metavar="X",
    ),
    RequestField(
        "mask_image",
        "image",
        None,
        "mask",
        "white where the start photo is redrawn, black where it is kept",
        "mask_image",
        "--mask",
        "mask_image",
        restored=False,
        cli_metavar="PATH",
    ),
    RequestField(
        "mask_face",
        "bool",
        False,
        "face mask",
        "redraw the face found in the start photo (instead of --mask)",
        "mask_face",
        "--mask-face",
        "mask_face",
    ),
    RequestField(
        "style_image",
        "image",
        None,
        "style image",
        "a picture whose style and composition the result borrows (IP-Adapter)",
        "style_image",
        "--style-image",
        "style_image",
        restored=False,
        cli_metavar="PATH",
    ),
    RequestField(
        "style_image_scale",
        "float",
        presets.STYLE_IMAGE_SCALE_DEFAULT,
        "style image strength",
        f"how much the style image counts, 0-1 (default {_show(presets.STYLE_IMAGE_SCALE_DEFAULT)})",
        "style_image_scale",
        "--style-image-scale",
        "style_image_scale",
        low=0.0,
        high=1.0,
        cli_metavar="X",
    ),
)

FIELDS: dict[str, RequestField] = {item.name: item for item in REQUEST_FIELDS}
