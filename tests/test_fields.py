"""The field table: every request field round-trips through the CLI, a batch JSONL line, `/generate` (against
the running --tiny app) and the PNG metadata of the image it made.

Each field gets a sample value different from its default, so a shell that dropped or renamed a field would
hand the default on and fail here. A new field without a sample fails `test_every_field_has_a_sample`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from photomaker import batch, cli, metadata
from photomaker.fields import FIELDS, REQUEST_FIELDS, RequestField
from photomaker.requests import GenerationRequest

pytest.register_assert_rewrite("app_server")
from app_server import AppServer  # noqa: E402 (after register_assert_rewrite)

pytest_plugins = ["app_server"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASTRONAUT = EXAMPLES / "astronaut.png"
HOPPER = EXAMPLES / "grace_hopper.jpg"
MASK = Path(__file__).resolve().parent / "data" / "mask_face_box.png"

# A valid, non-default value per field, quick on the tiny models (64x64, 3 steps).
SAMPLES: dict[str, Any] = {
    "id_images": [str(ASTRONAUT), str(HOPPER)],
    "prompt": "a photo of a woman img reading a book",
    "negative_prompt": "blurry, text",
    "style": "Cinematic",
    "aspect_ratio": "Widescreen TV / Landscape (16:9)",
    "num_steps": 3,
    "style_strength": 30.0,
    "num_outputs": 1,
    "guidance_scale": 4.5,
    "seed": 1234,
    "crop_faces": False,
    "mix_images": [str(HOPPER)],
    "mix_strength": 0.25,
    "fast": "hyper-sd-8",
    "best_of": 2,
    "width": 64,
    "height": 72,
    "control_type": "canny",
    "control_image": str(HOPPER),
    "control_scale": 0.5,
    "control_start": 0.1,
    "control_end": 0.9,
    "init_image": str(ASTRONAUT),
    "strength": 0.8,
    "mask_image": str(MASK),
    "mask_face": True,
    "style_image": str(HOPPER),
    "style_image_scale": 0.4,
}


def stored(item: RequestField, value: Any) -> Any:
    """What the PNG records for `value` of field `item`: photos as their number, an image as its file name."""
    if item.kind == "images":
        return len(value)
    if item.kind == "image":
        return None if value is None else Path(value).name
    return value


def test_every_field_has_a_sample_and_the_request_has_every_field() -> None:
    assert set(SAMPLES) == set(FIELDS)
    request_fields = {item.name: item for item in dataclasses.fields(GenerationRequest)}
    assert set(request_fields) == set(FIELDS)
    for item in REQUEST_FIELDS:
        assert SAMPLES[item.name] != item.default, f"the sample of {item.name} is its default"
        declared = request_fields[item.name]
        default = declared.default if declared.default is not dataclasses.MISSING else item.default
        if not item.required:
            assert default == item.default, f"GenerationRequest.{item.name} and the table disagree on the default"


def test_names_flags_and_png_keys_are_unique() -> None:
    for attribute in ("name", "api_name", "cli_flag", "metadata_key"):
        values = [getattr(item, attribute) for item in REQUEST_FIELDS if getattr(item, attribute)]
        assert len(values) == len(set(values)), attribute


def cli_arguments(
    values: dict[str, Any], items: tuple[RequestField, ...] | list[RequestField] = REQUEST_FIELDS
) -> list[str]:
    """The `generate` command line for `values` of the fields `items`, built from the table."""
    argv: list[str] = []
    for item in items:
        value = values[item.name]
        if item.kind == "images":
            for photo in value:
                argv += [item.cli_flag, photo]
        elif item.kind == "bool":
            if value != item.default:
                argv.append(item.cli_flag)
        else:
            argv += [item.cli_flag, str(value)]
    return argv


def test_every_field_round_trips_through_the_cli(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["generate", *cli_arguments(SAMPLES), "--out", str(tmp_path)])
    request = cli.generation_request(args)
    for item in REQUEST_FIELDS:
        assert getattr(request, item.name) == SAMPLES[item.name], item.cli_flag


def test_fields_left_out_of_the_cli_keep_their_defaults(tmp_path: Path) -> None:
    argv = cli_arguments(SAMPLES, [item for item in REQUEST_FIELDS if item.required])
    request = cli.generation_request(cli.build_parser().parse_args(["generate", *argv, "--out", str(tmp_path)]))
    for item in REQUEST_FIELDS:
        expected = SAMPLES[item.name] if item.required else item.default
        assert getattr(request, item.name) == expected, item.name


def test_every_field_round_trips_through_a_batch_line(tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(json.dumps(SAMPLES) + "\n", encoding="utf-8")
    (job,) = batch.parse_jobs(jobs_file)
    assert job.error is None
    for item in REQUEST_FIELDS:
        assert getattr(job.request, item.name) == SAMPLES[item.name], item.name


def api_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """The `/generate` keyword arguments for `values`: photos as bare files, as a gradio_client user passes them."""
    from gradio_client import handle_file

    arguments = {"randomize_seed": False}
    for item in REQUEST_FIELDS:
        value = values[item.name]
        if item.kind == "images":
            arguments[item.api_name] = [handle_file(photo) for photo in value]
        elif item.kind == "image":
            arguments[item.api_name] = None if value is None else handle_file(value)
        else:
            arguments[item.api_name] = value
    return arguments


START_PHOTO_FIELDS = ("init_image", "strength", "mask_image", "mask_face")
CONTROL_FIELDS = ("control_type", "control_image", "control_scale", "control_start", "control_end")
# Control and a start photo do not combine, nor a mask and mask_face, so /generate gets the samples in two
# sets; each leaves the other's fields at their defaults.
WITH_CONTROL = {**SAMPLES, **{name: FIELDS[name].default for name in START_PHOTO_FIELDS}}
WITH_START_PHOTO = {**SAMPLES, **{name: FIELDS[name].default for name in (*CONTROL_FIELDS, "mask_face")}}
GENERATE_CASES = {
    "control": {**WITH_CONTROL, "fast": None},
    "control-fast-mode": WITH_CONTROL,
    "start-photo": {**WITH_START_PHOTO, "fast": None},
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_every_field_round_trips_through_generate_and_the_png(app_server: AppServer, case: str) -> None:
    """Fast mode sets its own steps and guidance, so those two round-trip in the standard calls only. Images are
    stored by file name and never restored: restoring asks for each one again."""
    values = GENERATE_CASES[case]
    fast = values["fast"]
    images, seed, _, _ = app_server.client().predict(**api_arguments(values), api_name="/generate")
    assert seed == values["seed"] and len(images) == values["num_outputs"]
    parameters = metadata.read_parameters(images[0]["image"])
    restored = metadata.restore_settings(parameters, steps_min=1)
    assert restored.changes == [
        f"The {item.label} ({Path(values[item.name]).name}) is not stored in the image: give it again."
        for item in REQUEST_FIELDS
        if item.kind == "image" and values[item.name] is not None
    ]
    for item in REQUEST_FIELDS:
        if fast and item.set_by_fast_mode:
            continue
        if item.name == "seed":  # the image's own: the best of the candidates seed ... seed + best_of - 1
            assert values["seed"] <= parameters["seed"] < values["seed"] + values["best_of"]
            assert restored.request.seed == parameters["seed"]
            continue
        assert parameters[item.metadata_key] == stored(item, values[item.name]), item.metadata_key
        if item.restored:
            assert getattr(restored.request, item.name) == values[item.name], item.name
