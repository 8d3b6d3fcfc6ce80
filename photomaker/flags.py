"""Command-line flags shared by `python -m photomaker` and `app.py`, built from the tables that define them.

Model flags map one to one onto `ServiceConfig` settings (`MODEL_FLAGS`); a flag left out is None, so that
`ServiceConfig.from_env` falls back to its PHOTOMAKER_* variable, then to the default. Request flags come from
the field table (`photomaker.fields`), so a new request field gets its flag without an edit here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from photomaker.config import (
    DEFAULT_BASE_MODEL,
    DTYPE_CHOICES,
    ENV_VARIABLES,
    FACE_BACKENDS,
    OFFLOAD_MODES,
    PM_VERSIONS,
    parse_pm_version,
)
from photomaker.errors import InvalidRequestError
from photomaker.fields import REQUEST_FIELDS, RequestField
from photomaker.requests import GenerationRequest

_VARIABLE_OF_SETTING = {setting: name for name, (setting, _) in ENV_VARIABLES.items()}


def _pm_version(text: str) -> int:
    try:
        return parse_pm_version(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@dataclass(frozen=True)
class ModelFlag:
    """One model flag: the ServiceConfig setting it sets, and how it reads on the command line."""

    setting: str
    flag: str
    help: str
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] = str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


MODEL_FLAGS: tuple[ModelFlag, ...] = (
    ModelFlag(
        "tiny_dir",
        "--tiny",
        "use the tiny random-weight test models in DIR, written there first if absent; "
        "fully offline, the outputs are noise",
        metavar="DIR",
    ),
    ModelFlag(
        "base_model",
        "--base-model",
        f"SDXL base model: Hub id, diffusers folder or single .safetensors file (default {DEFAULT_BASE_MODEL})",
        metavar="ID_OR_PATH",
    ),
    ModelFlag(
        "adapter",
        "--adapter",
        "PhotoMaker checkpoint: Hub repo, folder or file; default: the official one of --pm-version",
        metavar="ID_OR_PATH",
    ),
    ModelFlag(
        "pm_version",
        "--pm-version",
        "PhotoMaker version: 1 or 2 (v1 and v2 work too); v2 needs the insightface face backend (default 1)",
        choices=PM_VERSIONS,
        type=_pm_version,
        metavar="{1,2}",
    ),
    ModelFlag("device", "--device", "cuda, cuda:N, mps or cpu; default: the best available"),
    ModelFlag("dtype", "--dtype", "weights dtype; default: float16 on GPU, bfloat16 on CPU", choices=DTYPE_CHOICES),
    ModelFlag("offload", "--offload", "CPU offload for small GPUs (default none)", choices=OFFLOAD_MODES),
    ModelFlag(
        "face_backend",
        "--face-backend",
        "face cropping and identity scores; default: dlib for v1, insightface for v2",
        choices=FACE_BACKENDS,
    ),
    ModelFlag("face_model_dir", "--face-model-dir", "face models folder", metavar="DIR"),
    ModelFlag(
        "fast_lora_dir", "--fast-lora-dir", "folder with the fast-mode LoRA files, instead of the Hub", metavar="DIR"
    ),
)


def add_model_flags(
    group: argparse._ActionsContainer, settings: Iterable[str] | None = None, *, tiny_default: str | None = None
) -> None:
    """Add the model flags for `settings` (default: all). With `tiny_default`, `--tiny` alone uses that folder."""
    wanted = None if settings is None else set(settings)
    for item in MODEL_FLAGS:
        if wanted is not None and item.setting not in wanted:
            continue
        variable = _VARIABLE_OF_SETTING.get(item.setting)
        options: dict[str, Any] = {
            "help": f"{item.help} [{variable}]" if variable else item.help,
            "dest": item.dest,
            "type": item.type,
        }
        if item.choices is not None:
            options["choices"] = item.choices
        if item.metavar is not None:
            options["metavar"] = item.metavar
        if item.setting == "tiny_dir" and tiny_default is not None:
            options.update(nargs="?", const=tiny_default)
        group.add_argument(item.flag, **options)


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServiceConfig overrides from the model flags present in `args` (None: not given)."""
    return {item.setting: getattr(args, item.dest) for item in MODEL_FLAGS if hasattr(args, item.dest)}


def _request_flag_options(item: RequestField) -> dict[str, Any]:
    options: dict[str, Any] = {"dest": item.name, "help": item.help}
    if item.kind == "images":
        options.update(action="append", metavar=item.cli_metavar, required=item.required)
    elif item.kind == "bool":
        options.update(action="store_false" if item.default else "store_true", default=None)
    else:
        options.update(
            type={"int": int, "float": float}.get(item.kind, str), metavar=item.cli_metavar, required=item.required
        )
    options.update(item.cli_options)
    return options


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per request field; a flag left out keeps `GenerationRequest`'s default (the app's)."""
    for item in REQUEST_FIELDS:
        parser.add_argument(item.cli_flag, **_request_flag_options(item))


def request_from_flags(args: argparse.Namespace | Mapping[str, Any]) -> GenerationRequest:
    """The request for the given flags; every photo and image must exist."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    given = {item.name: values[item.name] for item in REQUEST_FIELDS if values.get(item.name) is not None}
    for item in REQUEST_FIELDS:
        if item.kind == "images":
            for photo in given.get(item.name, []):
                if not Path(photo).is_file():
                    raise InvalidRequestError(f"photo {photo!r} not found.")
        elif item.kind == "image" and item.name in given and not Path(given[item.name]).is_file():
            raise InvalidRequestError(f"{item.label} {given[item.name]!r} ({item.cli_flag}) not found.")
    return GenerationRequest(**given)
