"""The bad-inputs catalogue: every awkward or hostile input, through the app's `/generate` and through the library.

Each case runs twice: through ``/generate`` of a running ``python app.py --tiny`` (gradio_client, or plain HTTP
for values gradio_client cannot encode, such as NaN) and through ``PhotoMakerService.generate`` on the same tiny
models. Each case either gives a result (odd but valid input: the images come back with the requested seed and
size) or a refusal whose message names the problem; either way the next valid request succeeds.

The app checks slider, number and dropdown bounds itself (Gradio's own messages, "Value 0 is less than minimum
value 1.") before the library sees the request; where its message differs, the case says so (``app_refused``).
Ranges are the service's for the tiny models (1-100 steps; real models start at 20).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from photomaker import presets
from photomaker.errors import PhotoMakerError
from photomaker.images import MAX_UPLOAD_BYTES
from photomaker.metadata import read_parameters
from photomaker.service import GenerationRequest, PhotoMakerService, ServiceConfig

pytest.register_assert_rewrite("app_server", "robust_app", "bad_inputs")
import bad_inputs
from app_server import photos_payload
from robust_app import (
    SIZE,
    RobustServer,
    call_raw,
    gallery_value,
    generate_args,
    upload,
)

pytest_plugins = ["app_server", "robust_app"]

STEPS_MIN = ServiceConfig(tiny_dir="tiny").steps_min  # what the tiny app and service accept (1)
STEPS_MAX = presets.STEPS_MAX
SEED_MAX = presets.SEED_MAX
LONG_PROMPT = "a photo of a woman img " + "in a sunlit garden full of roses, " * 150  # ~5000 characters
ALLOWED_LONG_PROMPT = "a photo of a woman img " + "in a sunlit garden full of roses, " * 40  # > 77 tokens, < 2000 chars
CONTROL_PROMPT = "a photo of a\x00 woman img\x07 smiling\x1b[31m"
EMOJI_PROMPT = "a photo of a woman img as an astronaut 👩\u200d🚀 on the moon 🌕✨"


@dataclass(frozen=True)
class Case:
    """One input and its right outcome. `fields` are GenerationRequest fields; photos are named (bad_inputs)."""

    fields: dict[str, Any]
    refused: str | None = None  # regex the refusal must match (library, and app unless app_refused)
    app_refused: str | None = None  # the app's message where Gradio's own input check answers first
    warning: str | None = None  # accepted: a regex one of the warnings (the app's notes) must match
    echo: str | None = None  # accepted: text the prompt actually used must contain
    seeds: list[int] | None = None  # accepted: the seed stored in each image's PNG metadata
    raw: bool = False  # through the app as plain HTTP (JSON with NaN / Infinity)
    client_side: bool = False  # gradio_client itself refuses before sending (it knows the server's limits)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.refused is None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _range(name: str, low: float, high: float, got: str) -> str:
    return re.escape(f"{name} must be between {_number(low)} and {_number(high)}, got {got}.")


def _gradio_low(value: str, low: str) -> str:
    return r"^[A-Z][^:]+: " + re.escape(f"Value {value} is less than minimum value {low}.")


def _gradio_high(value: str, high: str) -> str:
    return r"^[A-Z][^:]+: " + re.escape(f"Value {value} is greater than maximum value {high}.")


CASES: dict[str, Case] = {
    # ---- files
    "text file named .jpg": Case(
        {"id_images": ["text_named_jpg"]}, r"ID photo 1 \(holiday\.jpg\): not a readable image file; use a JPEG"
    ),
    "truncated JPEG": Case(
        {"id_images": ["truncated_jpeg"]}, r"ID photo 1 \(truncated\.jpg\): the image data is truncated or corrupt"
    ),
    "empty file": Case({"id_images": ["empty_file"]}, r"ID photo 1 \(empty\.png\): the file is empty \(0 bytes\)"),
    "PNG header claiming 100000x100000": Case(
        {"id_images": ["png_claiming_huge_size"]},
        r"ID photo 1 \(claims_huge\.png\): the image is too large.*the limit is 40 megapixels; resize it",
    ),
    "real PNG over the pixel limit": Case(
        {"id_images": ["pixel_bomb"]},
        r"ID photo 1 \(pixel_bomb\.png\): the image is too large \(8000x5008\), the limit is 40 megapixels",
    ),
    "real photo over the byte limit": Case(
        {"id_images": ["oversized_photo"]},
        r"ID photo 1 \(huge_photo\.png\): the file is too large \(20\.\d MiB, the limit is 20\.0 MiB\)",
        app_refused=re.escape(f"exceeds the maximum file size of {MAX_UPLOAD_BYTES} bytes"),
        client_side=True,
    ),
    "photo without a face": Case({"id_images": ["no_face"]}, r"photo 1 \(noise\.png\): no face found"),
    "animated GIF (first frame used)": Case({"id_images": ["animated_gif"]}),
    "16-bit PNG": Case({"id_images": ["png_16bit"]}),
    "CMYK JPEG": Case({"id_images": ["cmyk_jpeg"]}),
    "grayscale JPEG": Case({"id_images": ["grayscale_jpeg"]}),
    "RGBA with transparency": Case({"id_images": ["rgba_transparent"]}),
    "EXIF-rotated (face found only once upright)": Case({"id_images": ["exif_rotated"]}),
    "PNG named .jpg": Case({"id_images": ["png_named_jpg"]}),
    # ---- photo counts
    "no photos": Case({"id_images": []}, r"Got 0 ID photos; give 1 to 4 photos of the same person"),
    "five photos": Case(
        {"id_images": ["astronaut", "grayscale_jpeg", "cmyk_jpeg", "png_named_jpg", "astronaut"]},
        r"Got 5 ID photos; give 1 to 4 photos of the same person",
    ),
    # ---- prompts
    "empty prompt": Case({"prompt": ""}, r"The prompt is empty\. Describe the picture .* followed by 'img'"),
    "whitespace prompt": Case({"prompt": " \t\n  "}, r"The prompt is empty\."),
    "missing prompt (None)": Case(
        {"prompt": None}, r"The prompt must be text, got NoneType\.", app_refused=r"The prompt is empty\."
    ),
    "two triggers": Case(
        {"prompt": "a man img and a woman img"}, r"The prompt has the trigger word 'img' 2 times; use it exactly once"
    ),
    "trigger with no class word": Case(
        {"prompt": "img in a garden", "style": "(No style)"},
        r"The trigger word 'img' must follow a class word that names the subject.*nothing comes before it",
    ),
    "trigger with no class word, inside a style template": Case(
        {"prompt": "img in a garden"},
        r"The trigger word 'img' must follow a class word that names the subject.*nothing comes before it",
    ),
    "neither class word nor trigger": Case(
        {"prompt": "a beautiful landscape at dawn"}, r"The prompt has no trigger word 'img', so the ID photos"
    ),
    "class word without trigger (inserted)": Case(
        {"prompt": "a photo of a man at the beach"},
        warning=r"Added the trigger word 'img' after the class word 'man'",
        echo="a man img at the beach",
    ),
    "over-long prompt": Case(
        {"prompt": LONG_PROMPT},
        re.escape(f"The prompt is {len(LONG_PROMPT)} characters long; keep it under 2000."),
    ),
    "long prompt within the limit (cut to 77 tokens)": Case({"prompt": ALLOWED_LONG_PROMPT}),
    "over-long negative prompt": Case(
        {"negative_prompt": "blurry, " * 400}, r"The negative prompt is 3200 characters long; keep it under 2000\."
    ),
    "emoji": Case({"prompt": EMOJI_PROMPT}, echo="👩\u200d🚀 on the moon 🌕✨"),
    "control characters": Case(
        {"prompt": CONTROL_PROMPT},
        warning=r"Removed 3 invisible control character\(s\) from the prompt",
        echo="a photo of a  woman img  smiling [31m",
    ),
    # ---- steps
    "steps 0": Case(
        {"num_steps": 0}, _range("num_steps", STEPS_MIN, STEPS_MAX, "0"), app_refused=_gradio_low("0", str(STEPS_MIN))
    ),
    "steps 1": Case({"num_steps": 1}) if STEPS_MIN <= 1 else Case({"num_steps": 1}, r"num_steps must be between"),
    "steps 2.5": Case({"num_steps": 2.5}, re.escape(f"num_steps must be a whole number between {STEPS_MIN} and 100")),
    "steps 100000": Case(
        {"num_steps": 100000},
        _range("num_steps", STEPS_MIN, STEPS_MAX, "100000"),
        app_refused=_gradio_high("100000", str(STEPS_MAX)),
    ),
    # ---- guidance
    "guidance negative": Case(
        {"guidance_scale": -1.0}, _range("guidance_scale", 0.1, 10, "-1"), app_refused=_gradio_low("-1.0", "0.1")
    ),
    "guidance NaN": Case(
        {"guidance_scale": math.nan}, r"guidance_scale must be a finite number between 0\.1 and 10, got nan", raw=True
    ),
    "guidance infinite": Case(
        {"guidance_scale": math.inf},
        r"guidance_scale must be a finite number between 0\.1 and 10, got inf",
        app_refused=_gradio_high("inf", "10.0"),
        raw=True,
    ),
    "guidance minus infinite": Case(
        {"guidance_scale": -math.inf},
        r"guidance_scale must be a finite number between 0\.1 and 10, got -inf",
        app_refused=_gradio_low("-inf", "0.1"),
        raw=True,
    ),
    # ---- seeds
    "negative seed": Case({"seed": -1}, _range("seed", 0, SEED_MAX, "-1"), app_refused=_gradio_low("-1", "0")),
    "seed 2**63": Case(
        {"seed": 2**63},
        _range("seed", 0, SEED_MAX, "9.22337e+18"),  # the service shows numbers above 1e16 in short form
        app_refused=_gradio_high(str(2**63), str(SEED_MAX)),
    ),
    "seed 1e30": Case(
        {"seed": 1e30},
        r"seed must be between 0 and 2147483647, got 1e\+30",
        app_refused=_gradio_high("1e+30", str(SEED_MAX)),
    ),
    "largest seed (image seeds wrap)": Case({"seed": SEED_MAX, "num_outputs": 2}, seeds=[SEED_MAX, 0]),
    # ---- sizes
    "width not a multiple of 8": Case({"width": 100}, r"width must be a multiple of 8, got 100; use 96 or 104\."),
    "height above 2048": Case(
        {"height": 4096}, _range("height", 64, 2048, "4096"), app_refused=_gradio_high("4096", "2048")
    ),
    "width without height": Case({"height": None}, r"Give both width and height, or neither"),
    "non-square custom size": Case({"width": 72, "height": 64}),
    # ---- other numbers and names
    "zero outputs": Case({"num_outputs": 0}, _range("num_outputs", 1, 4, "0"), app_refused=_gradio_low("0", "1")),
    "style strength 99 %": Case(
        {"style_strength": 99}, _range("style_strength", 15, 50, "99"), app_refused=_gradio_high("99", "50")
    ),
    "unknown style": Case(
        {"style": "Baroque Nightmare"},
        r"Unknown style 'Baroque Nightmare'",
        app_refused=r"Value: Baroque Nightmare is not in the list of choices: \['\(No style\)', 'Photographic",
    ),
    "unknown aspect ratio": Case(
        {"aspect_ratio": "7:5 Cinemascope", "width": None, "height": None},
        r"Unknown aspect ratio '7:5 Cinemascope'",
        app_refused=r"Value: 7:5 Cinemascope is not in the list of choices: \['Instagram \(1:1\)'",
    ),
}

_markers = itertools.count(100_000)


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every file of the catalogue, by builder name, plus the example portrait as "astronaut"."""
    files = bad_inputs.build_all(tmp_path_factory.mktemp("bad-inputs"))
    files["astronaut"] = bad_inputs.ASTRONAUT
    return files


@pytest.fixture(scope="module")
def client(robust_server: RobustServer):
    client = robust_server.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def uploaded_astronaut(robust_server: RobustServer) -> list[dict[str, Any]]:
    """The portrait uploaded once, as a Gallery value for plain-HTTP calls."""
    return gallery_value(upload(robust_server.url, bad_inputs.ASTRONAUT), "astronaut.png")


# ------------------------------------------------------------------------------------------------- routes


def _library_request(fields: dict[str, Any], photos: dict[str, Path], seed: int) -> GenerationRequest:
    values: dict[str, Any] = {
        "id_images": ["astronaut"],
        "prompt": "a photo of a woman img smiling",
        "num_steps": 1,
        "num_outputs": 1,
        "width": SIZE,
        "height": SIZE,
        "seed": seed,
    }
    values.update(fields)
    values["id_images"] = [str(photos[name]) for name in values["id_images"]]
    return GenerationRequest(**values)


def _app_args(fields: dict[str, Any], photos: dict[str, Path], seed: int) -> dict[str, Any]:
    args = generate_args(seed=seed)
    for key, value in fields.items():
        if key == "id_images":
            args["id_photos"] = photos_payload([photos[name] for name in value])
        else:
            args[key] = value
    return args


@dataclass
class Outcome:
    """What one route gave back, in the same shape for both."""

    images: list[Image.Image]
    seed: int
    image_seeds: list[int]
    warnings: str
    prompt_used: str


def run_library(service: PhotoMakerService, fields: dict[str, Any], photos: dict[str, Path], seed: int) -> Outcome:
    result = service.generate(_library_request(fields, photos, seed))
    return Outcome(
        [item.image for item in result.images],
        result.seed,
        [item.seed for item in result.images],
        "\n".join(result.warnings),
        result.prompt_used,
    )


def run_app(client, fields: dict[str, Any], photos: dict[str, Path], seed: int) -> Outcome:
    gallery, seed_used, _crops, notes = client.predict(**_app_args(fields, photos, seed), api_name="/generate")
    paths = [item["image"] for item in gallery]
    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image)
    return Outcome(images, int(seed_used), [read_parameters(path)["seed"] for path in paths], notes, notes)


def refusal_from_app(case: Case, client, url: str, uploaded: list, photos: dict[str, Path], seed: int) -> str:
    """The message the app gives for a case that must be refused."""
    if case.raw:
        event, message = call_raw(url, uploaded, **{**case.fields, "seed": seed})
        assert event == "error", f"accepted: {message!r}"
        return str(message)
    expected = ValueError if case.client_side else AppError
    with pytest.raises(expected) as refused:
        client.predict(**_app_args(case.fields, photos, seed), api_name="/generate")
    assert case.client_side != isinstance(refused.value, AppError)
    return str(refused.value)


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("route", ["app", "library"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_catalogue(name: str, route: str, request: pytest.FixtureRequest, photos: dict[str, Path]) -> None:
    case = CASES[name]
    seed = next(_markers)
    if route == "app":
        server: RobustServer = request.getfixturevalue("robust_server")
        client = request.getfixturevalue("client")

        def run(fields: dict[str, Any], seed: int) -> Outcome:
            return run_app(client, fields, photos, seed)
    else:
        service: PhotoMakerService = request.getfixturevalue("library_service")

        def run(fields: dict[str, Any], seed: int) -> Outcome:
            return run_library(service, fields, photos, seed)

    if case.accepted:
        outcome = run(case.fields, seed)
        outputs = case.fields.get("num_outputs", 1)
        size = (case.fields.get("width", SIZE), case.fields.get("height", SIZE))
        seed = case.fields.get("seed", seed)
        assert len(outcome.images) == outputs and outcome.seed == seed
        assert all(image.size == size for image in outcome.images)
        assert outcome.image_seeds == (case.seeds or [seed + k for k in range(outputs)])
        if case.warning:
            assert re.search(case.warning, outcome.warnings), outcome.warnings
        if case.echo:
            assert case.echo in outcome.prompt_used, outcome.prompt_used
        return

    pattern = case.app_refused if route == "app" and case.app_refused else case.refused
    if route == "app":
        uploaded = request.getfixturevalue("uploaded_astronaut") if case.raw else []
        message = refusal_from_app(case, client, server.url, uploaded, photos, seed)
    else:
        with pytest.raises(PhotoMakerError) as refused:  # every refusal is one of the library's own errors
            run(case.fields, seed)
        message = str(refused.value)
    assert re.search(pattern, message), f"{name} via {route}: message {message!r} does not match {pattern!r}"

    follow_up = next(_markers)
    outcome = run({}, follow_up)  # the next valid request is served normally
    assert outcome.seed == follow_up and len(outcome.images) == 1


def test_catalogue_is_complete() -> None:
    """At least 30 cases, with both outcomes represented and every bad-file builder used."""
    assert len(CASES) >= 30
    assert sum(case.accepted for case in CASES.values()) >= 10
    assert sum(not case.accepted for case in CASES.values()) >= 25
    used = {name for case in CASES.values() for name in case.fields.get("id_images", [])}
    assert set(bad_inputs.BUILDERS) <= used


def test_cut_prompt_is_told_to_the_user_and_logged_with_the_real_token_limit(
    library_service: PhotoMakerService, photos: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A prompt longer than SDXL's 77 tokens is cut at the end; the user and the log are told which words went."""
    with caplog.at_level("WARNING", logger="photomaker.pipeline"):
        outcome = run_library(library_service, {"prompt": ALLOWED_LONG_PROMPT}, photos, seed=9)
    expected_start = "The prompt is longer than 77 tokens; these last words were cut: "
    logged = [record.getMessage() for record in caplog.records if "last words were cut" in record.getMessage()]
    told = [line for line in outcome.warnings.splitlines() if "last words were cut" in line]
    assert logged and told, (logged, outcome.warnings)
    for message in logged + told:
        assert message.startswith(expected_start), message
        # The words that were dropped: the end of the styled prompt, not its beginning.
        assert "skin texture" in message and "startoftext" not in message, message
